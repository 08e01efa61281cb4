"""The ``/send_join`` wrappers (in-process; the native methods are faked).

The summary and the partial-join observer hang off a single
``on_send_join_request`` wrapper; the essentials are chosen by the
``_on_send_membership_event`` wrapper once Synapse has validated and accepted the
join, never before. One patch record per target says what it does.
"""

from __future__ import annotations

import unittest
from types import SimpleNamespace
from typing import Any

from synapse.api.errors import Codes, SynapseError
from synapse.federation import federation_server as fs
from synapse.federation.transport import server as transport_server
from synapse.handlers import federation_event
from synapse.storage.roommember import MemberSummary
from synapse.types.state import StateFilter
from twisted.internet import defer

from synapse_partial_state.compat import patching, send_join, servlets
from tests.unit.sync_run import run

TARGET = "synapse.federation.federation_server.FederationServer.on_send_join_request"
VALIDATE = (
    "synapse.federation.federation_server.FederationServer._on_send_membership_event"
)
#: The origin the faked validation refuses, as Synapse does a server the room's
#: ACL denies.
DENIED = "denied"


class FakeEvent:
    """What the faked validation returns for a valid join."""

    def __init__(self, state_key: str, state_dag: bool = False) -> None:
        self.state_key = state_key
        self.room_version = SimpleNamespace(msc4242_state_dags=state_dag)


#: The room summary the faked store gives (heroes come from its members).
SUMMARY = {
    "join": MemberSummary([("@alice:a", "$a"), ("@bob:c", "$b")], 7),
    "ban": MemberSummary([("@mallory:m", "$m")], 1),
}


class _SummaryStore:
    async def get_room_summary(self, room_id: str) -> dict[str, MemberSummary]:
        return SUMMARY


class _Context:
    """An event context recording its prev-state reads."""

    def __init__(self, state_group: int | None = 7) -> None:
        self.reads: list[StateFilter | None] = []
        self.rejected = False
        self.state_group_before_event = state_group

    async def get_prev_state_ids(self, state_filter: StateFilter | None = None) -> Any:
        self.reads.append(state_filter)
        return {("m.room.create", ""): "$create"}


class _MemberReads:
    """Stands for ``group_memberships`` (tested on real databases by the
    resident's black-box tests): records what is asked, answers for @a:x."""

    def __init__(self, case: unittest.TestCase) -> None:
        self.asked: list[tuple[Any, int, set[str]]] = []
        saved = send_join.group_memberships
        case.addCleanup(setattr, send_join, "group_memberships", saved)
        send_join.group_memberships = self  # type: ignore[assignment]

    async def __call__(self, hs: Any, group: int, user_ids: Any) -> dict[str, str]:
        self.asked.append((hs, group, set(user_ids)))
        return {"@a:x": "$ax"} if "@a:x" in user_ids else {}


class PrevStateReadsTests(unittest.TestCase):
    def test_unfiltered_reads_are_narrowed_filtered_ones_pass(self) -> None:
        members = _MemberReads(self)
        context = _Context()
        hs = object()
        reads = send_join.PrevStateReads(context, hs, ["@a:x", "@b:y"])
        state = run(reads.get_prev_state_ids())
        # The non-member state through Synapse, the members by our own read.
        self.assertEqual(
            state, {("m.room.create", ""): "$create", ("m.room.member", "@a:x"): "$ax"}
        )
        self.assertEqual(members.asked, [(hs, 7, {"@a:x", "@b:y"})])
        other = StateFilter.from_types([("m.room.create", "")])
        run(reads.get_prev_state_ids(other))
        self.assertEqual(context.reads, [send_join.NON_MEMBERS, other])
        self.assertIs(reads.rejected, False)  # the rest is the context's own

    def test_no_state_group_no_state(self) -> None:
        """As Synapse's own context: an outlier's state is empty."""
        members = _MemberReads(self)
        context = _Context(state_group=None)
        reads = send_join.PrevStateReads(context, object(), ["@a:x"])
        self.assertEqual(run(reads.get_prev_state_ids()), {})
        self.assertEqual((context.reads, members.asked), ([], []))

    def test_non_members(self) -> None:
        """What Synapse reads for the non-member part: no member at all."""
        f = send_join.NON_MEMBERS
        self.assertTrue(f.include_others)
        self.assertEqual(f.types["m.room.member"], frozenset())
        member_part, _ = f.get_member_split()
        self.assertEqual(member_part.make_sql_filter_clause(), ("1 = 2", []))


class SendJoinWrapperTests(unittest.TestCase):
    def setUp(self) -> None:
        groups = transport_server.SERVLET_GROUPS
        self.addCleanup(groups.__setitem__, "federation", groups["federation"])
        hooks = send_join._SEND_JOIN_HOOKS
        saved = (
            fs.FederationServer.on_send_join_request,
            fs.FederationServer._on_send_membership_event,
            fs._get_event_ids_for_partial_state_join,
            list(patching.INSTALLED_PATCHES),
            (hooks.extras_provider, hooks.decorate_response, hooks.observer),
            federation_event.FederationEventHandler.check_join_restrictions,
            hooks.answer_started,
        )

        def restore() -> None:
            fs.FederationServer.on_send_join_request = saved[0]  # type: ignore[method-assign]
            fs.FederationServer._on_send_membership_event = saved[1]  # type: ignore[method-assign]
            fs._get_event_ids_for_partial_state_join = saved[2]
            patching.INSTALLED_PATCHES[:] = saved[3]
            (hooks.extras_provider, hooks.decorate_response, hooks.observer) = saved[4]
            federation_event.FederationEventHandler.check_join_restrictions = saved[5]  # type: ignore[method-assign]
            hooks.answer_started = saved[6]

        self.addCleanup(restore)
        hooks.extras_provider = hooks.decorate_response = hooks.observer = None
        hooks.answer_started = None
        patching.INSTALLED_PATCHES[:] = [
            p for p in patching.INSTALLED_PATCHES if p.target not in (TARGET, VALIDATE)
        ]
        self.calls: list[tuple[Any, ...]] = []
        calls = self.calls
        #: the contexts native on_send_join_request got back from validation
        self.contexts: list[Any] = []
        #: the summaries the selector was given
        self.summaries: list[Any] = []

        async def validate(
            server: Any,
            origin: str,
            content: dict[str, Any],
            membership_type: str,
            room_id: str,
        ) -> tuple[FakeEvent, None]:
            """Synapse's checks (ACL, format, signatures, auth) and persistence."""
            calls.append(("validate", membership_type))
            if origin == DENIED:
                raise SynapseError(403, "Server is banned from room", Codes.FORBIDDEN)
            state_key = content.get("state_key")
            if not isinstance(state_key, str):
                raise SynapseError(400, "Not an m.room.member event", Codes.BAD_JSON)
            return FakeEvent(state_key, bool(content.get("state_dag"))), None

        async def native(
            server: fs.FederationServer,
            origin: str,
            content: dict[str, Any],
            room_id: str,
            caller_supports_partial_state: bool = False,
        ) -> dict[str, Any]:
            """Native's order: validate and persist, then (partial) select."""
            calls.append(("native", caller_supports_partial_state))
            event, context = await server._on_send_membership_event(
                origin, content, "join", room_id
            )
            self.contexts.append(context)
            if caller_supports_partial_state:
                selected = fs._get_event_ids_for_partial_state_join(
                    event,  # type: ignore[arg-type]
                    {},
                    {"join": MemberSummary([("@native:a", "$n")], 1)},
                )
                calls.append(("selected", tuple(selected)))
            return {"members_omitted": caller_supports_partial_state}

        fs.FederationServer._on_send_membership_event = validate  # type: ignore[method-assign,assignment]
        fs.FederationServer.on_send_join_request = native  # type: ignore[method-assign,assignment]
        self.native = native
        self.validate = validate

    def install_all(self) -> None:
        calls = self.calls

        async def extras(room_id: str, joiner: str) -> tuple[str, ...]:
            calls.append(("extras", room_id, joiner))
            return ("@hero:a",)

        async def decorate(room_id: str, joiner: str) -> dict[str, Any]:
            calls.append(("decorate", room_id, joiner))
            return {"summary": 1}

        def observer(room_id: str, prev_events: list[str]) -> None:
            calls.append(("observer", room_id, prev_events))

        def selector(*args: Any) -> tuple[str, ...]:
            """The partial state is the extras it is given."""
            self.summaries.append(args[2])
            return tuple(args[3])

        send_join.install_send_join_hooks(extras, selector, decorate)
        send_join.install_partial_join_observer(observer)

    def call(
        self,
        partial: bool,
        content: dict[str, Any] | None = None,
        origin: str = "b",
        membership: str | None = None,
    ) -> Any:
        """``on_send_join_request`` as the servlet calls it (or, with
        ``membership``, ``_on_send_membership_event`` as ``/send_leave`` and
        ``/send_knock`` do)."""
        content = content or {"state_key": "@j:b", "prev_events": ["$p", 5]}
        # A FederationServer whose __init__ never ran: only its methods and
        # the room summary of its store are used.
        server = fs.FederationServer.__new__(fs.FederationServer)
        server.store = _SummaryStore()  # type: ignore[assignment]
        server.hs = object()  # type: ignore[assignment]
        if membership is not None:
            return run(
                server._on_send_membership_event(origin, content, membership, "!r:a")
            )
        return run(server.on_send_join_request(origin, content, "!r:a", partial))

    def test_one_wrapper_in_order_with_one_accurate_record(self) -> None:
        self.install_all()
        self.install_all()  # again: still one wrapper, hooks replaced
        wrapper = fs.FederationServer.on_send_join_request
        self.assertIsNot(wrapper, self.native)
        self.assertTrue(getattr(wrapper, "_sps_wrapped", False))

        resp = self.call(True)
        self.assertEqual(resp, {"members_omitted": True, "summary": 1})
        self.assertEqual(
            self.calls,
            [
                ("native", True),  # native called once, directly
                ("validate", "join"),
                # once Synapse accepted the join, once, for its state_key
                ("extras", "!r:a", "@j:b"),
                ("selected", ("@hero:a",)),  # the selector sees them
                ("decorate", "!r:a", "@j:b"),
                ("observer", "!r:a", ["$p"]),
            ],
        )
        records = [p for p in patching.INSTALLED_PATCHES if p.target == TARGET]
        self.assertEqual(len(records), 1)
        self.assertIn("MSC2775 summary", records[0].why)
        self.assertIn("prepare the /state", records[0].why)
        (validate,) = [p for p in patching.INSTALLED_PATCHES if p.target == VALIDATE]
        self.assertIn("MSC2775 essentials", validate.why)
        self.assertIn("validated", validate.why)

    def test_partial_answer_reads_only_the_state_it_can_pick(self) -> None:
        """Native's read of the state before the join gets the non-member state
        and the memberships the selector can pick: the joiner's, the essentials',
        the summary's members (whose summary the selector then gets)."""
        self.install_all()
        self.call(True)
        (context,) = self.contexts
        self.assertIsInstance(context, send_join.PrevStateReads)
        members = _MemberReads(self)
        inner = _Context()
        context._context = inner
        run(context.get_prev_state_ids())
        self.assertEqual(inner.reads, [send_join.NON_MEMBERS])
        ((_, group, users),) = members.asked
        self.assertEqual(group, 7)
        self.assertEqual(users, {"@j:b", "@hero:a", "@alice:a", "@bob:c", "@mallory:m"})
        self.assertEqual(self.summaries, [SUMMARY])

    def test_full_answers_get_the_context_itself(self) -> None:
        self.install_all()
        self.call(False)
        self.assertEqual(self.contexts, [None])

    def test_join_restrictions_read_the_joiners_membership(self) -> None:
        """For every join Synapse checks (make_join, partial and full
        send_join): the non-member state and the joiner's membership."""
        seen: list[Any] = []

        async def native(handler: Any, context: Any, event: Any) -> None:
            seen.append(await context.get_prev_state_ids())

        federation_event.FederationEventHandler.check_join_restrictions = native  # type: ignore[method-assign,assignment]
        self.install_all()
        check: Any = federation_event.FederationEventHandler.check_join_restrictions
        handler = federation_event.FederationEventHandler.__new__(
            federation_event.FederationEventHandler
        )
        handler.hs = object()  # type: ignore[assignment]
        members = _MemberReads(self)
        full = _Context()
        run(check(handler, full, FakeEvent("@j:b")))  # not a partial join
        narrowed = _Context()
        token = send_join._PARTIAL_JOIN.set(send_join._PartialJoin("!r:a"))
        try:
            run(check(handler, narrowed, FakeEvent("@a:x")))
        finally:
            send_join._PARTIAL_JOIN.reset(token)
        self.assertEqual(full.reads, [send_join.NON_MEMBERS])
        self.assertEqual(narrowed.reads, [send_join.NON_MEMBERS])
        self.assertEqual([users for _, _, users in members.asked], [{"@j:b"}, {"@a:x"}])
        self.assertEqual(
            seen,
            [
                {("m.room.create", ""): "$create"},
                {("m.room.create", ""): "$create", ("m.room.member", "@a:x"): "$ax"},
            ],
        )

    def test_state_in_memory_is_returned_as_is(self) -> None:
        """An unpersisted context (a make_join's) with its state resolved in
        memory returns it, as Synapse's does whatever the filter."""
        context = _Context()
        context.state_map_before_event = {("m.room.create", ""): "$in-memory"}  # type: ignore[attr-defined]
        members = _MemberReads(self)
        reads = send_join.PrevStateReads(context, object(), ["@a:x"])
        self.assertEqual(
            run(reads.get_prev_state_ids()), {("m.room.create", ""): "$in-memory"}
        )
        self.assertEqual((context.reads, members.asked), ([], []))

    def test_refused_join_reads_no_essentials(self) -> None:
        """Whatever Synapse refuses (here the origin, as the room's ACL does) gets
        Synapse's error, and the essentials are never asked for."""
        self.install_all()
        with self.assertRaises(SynapseError) as refused:
            self.call(True, origin=DENIED)
        self.assertEqual(refused.exception.code, 403)
        self.assertEqual(refused.exception.errcode, Codes.FORBIDDEN)
        self.assertEqual(self.calls, [("native", True), ("validate", "join")])
        self.assertIsNone(send_join._PARTIAL_JOIN.get())
        # The next, valid, join still gets its essentials.
        del self.calls[:]
        self.call(True)
        self.assertIn(("selected", ("@hero:a",)), self.calls)

    def test_full_answers_and_malformed_joins_are_native(self) -> None:
        self.install_all()
        self.assertEqual(self.call(False), {"members_omitted": False})
        self.assertEqual(self.calls, [("native", False), ("validate", "join")])
        del self.calls[:]
        # No usable state_key: native errs alone, nothing else runs.
        with self.assertRaises(SynapseError) as malformed:
            self.call(True, {"prev_events": []})
        self.assertEqual(malformed.exception.code, 400)
        self.assertEqual(self.calls, [("native", True), ("validate", "join")])

    def test_state_dag_joins_read_no_essentials(self) -> None:
        """Native answers MSC4242 joins with full state: no selector to feed."""
        self.install_all()
        self.call(True, {"state_key": "@j:b", "state_dag": True})
        self.assertNotIn("extras", [c[0] for c in self.calls])

    def test_leaves_and_knocks_are_native(self) -> None:
        """``/send_leave`` and ``/send_knock`` share the validation: no essentials."""
        self.install_all()
        for membership in ("leave", "knock"):
            event, _ = self.call(False, membership=membership)
            self.assertEqual(event.state_key, "@j:b")
        self.assertEqual(self.calls, [("validate", "leave"), ("validate", "knock")])

    def test_failing_essentials_do_not_fail_an_accepted_join(self) -> None:
        """The join is stored by then: without essentials, the answer is native's."""

        async def broken(room_id: str, joiner: str) -> tuple[str, ...]:
            raise RuntimeError("database gone")

        self.install_all()
        send_join._SEND_JOIN_HOOKS.extras_provider = broken
        with self.assertLogs(send_join.logger, "ERROR"):
            resp = self.call(True)
        self.assertEqual(resp, {"members_omitted": True, "summary": 1})
        self.assertIn(("selected", ()), self.calls)

    def test_observer_waits_until_the_answer_is_sent(self) -> None:
        self.install_all()
        finished: defer.Deferred[None] = defer.Deferred()

        class Request:
            def notifyFinish(self) -> defer.Deferred[None]:
                return finished

        token = servlets.FEDERATION_REQUEST.set(Request())  # type: ignore[arg-type]
        try:
            self.call(True)
        finally:
            servlets.FEDERATION_REQUEST.reset(token)
        self.assertEqual(
            [c[0] for c in self.calls],
            ["native", "validate", "extras", "selected", "decorate"],
        )
        finished.callback(None)
        self.assertEqual(self.calls[-1], ("observer", "!r:a", ["$p"]))

    def test_partial_answers_get_the_grace_full_ones_none(self) -> None:
        """The fan-out hold is told when an answer has been sent, a partial
        one with a grace (the joiner's ``/state_ids`` follows at once)."""
        finished: list[float] = []

        def tracker() -> Any:
            return lambda grace_s=0.0: finished.append(grace_s)

        send_join._SEND_JOIN_HOOKS.answer_started = tracker
        send_join._wrap_on_send_join_request()
        self.call(True)
        self.call(False)
        self.assertEqual(finished, [send_join.NEXT_REQUEST_GRACE_S, 0.0])

    def test_send_join_servlet_is_request_aware_once(self) -> None:
        from synapse.federation.transport.server import federation as fed_servlets

        self.install_all()
        self.install_all()
        group = transport_server.SERVLET_GROUPS["federation"]
        native = fed_servlets.FederationV2SendJoinServlet
        self.assertNotIn(native, group)
        (servlet,) = [c for c in group if c.__name__ == native.__name__]
        self.assertTrue(issubclass(servlet, native))
        self.assertIn(fed_servlets.FederationV1SendJoinServlet, group)

    def test_observer_failure_does_not_fail_the_join(self) -> None:
        def broken(room_id: str, prev_events: list[str]) -> None:
            raise RuntimeError("boom")

        send_join.install_partial_join_observer(broken)
        with self.assertLogs(servlets.logger, "ERROR"):
            self.assertEqual(self.call(True), {"members_omitted": True})
        records = [p for p in patching.INSTALLED_PATCHES if p.target == TARGET]
        self.assertEqual(len(records), 1)
        self.assertNotIn("MSC2775", records[0].why)
        # No essentials hooks: Synapse's validation is not wrapped.
        self.assertIs(fs.FederationServer._on_send_membership_event, self.validate)
        self.assertNotIn(VALIDATE, [p.target for p in patching.INSTALLED_PATCHES])
