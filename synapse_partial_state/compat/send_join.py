"""The ``/send_join`` seam (resident side): the wrappers of
``FederationServer.on_send_join_request`` and of its validation
(``_on_send_membership_event``), the partial-state selector, and the room facts
the essentials are chosen from (summary, power levels, memberships)."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attr
from synapse.api.constants import EventTypes, Membership
from synapse.module_api import ModuleApi
from synapse.types.state import StateFilter

from synapse_partial_state.compat.patching import (
    PatchRecord,
    homeserver,
    main_store,
    record_patch,
    record_patch_replacing,
    wrap_instance_method,
)
from synapse_partial_state.compat.runtime import call_later_s
from synapse_partial_state.compat.servlets import (
    AnswerTracker,
    after_response,
    replace_federation_servlets,
    request_aware_servlet,
)
from synapse_partial_state.compat.state_groups import group_memberships

if TYPE_CHECKING:
    from synapse.events import EventBase
    from synapse.events.snapshot import EventContext
    from synapse.federation.federation_server import FederationServer
    from synapse.storage.roommember import MemberSummary
    from synapse.types import StateMap

logger = logging.getLogger(__name__)


@attr.s(auto_attribs=True, slots=True)
class _PartialJoin:
    """The partial ``/send_join`` being answered in this task.

    ``extras``: the extra membership state keys (user IDs), in priority order,
    chosen once Synapse has accepted the join; None until then (and for good when
    it refused it, or the essentials could not be read). ``summary``: the room
    summary the heroes are taken from, read with them (None: the one native code
    hands the selector)."""

    room_id: str
    extras: tuple[str, ...] | None = None
    summary: Mapping[str, MemberSummary] | None = None


#: All the state but the memberships.
NON_MEMBERS = StateFilter.freeze({EventTypes.Member: set()}, include_others=True)


class PrevStateReads:
    """An event context whose unfiltered ``get_prev_state_ids()`` is the
    non-member state and the memberships of ``user_ids`` only (a filtered call
    is passed through); anything else is the context's own.

    Handed to native code that reads the whole state before an event but uses
    only a known part of it. In a 100,000-member room, a state group not yet in
    Synapse's cache is 100,000 rows from the database and over a second of CPU
    (a partial ``/send_join``'s first answer after a state change took 3.1 s),
    where the part used is the non-member state and a few hundred members. The
    non-member state is read through Synapse (and cached by it); the members by
    :func:`~synapse_partial_state.compat.state_groups.group_memberships`, as
    Synapse's own filter for hundreds of keys is far slower than the whole
    group (one OR-clause per key)."""

    __slots__ = ("_context", "_hs", "_user_ids")

    def __init__(self, context: Any, hs: Any, user_ids: Collection[str]) -> None:
        self._context = context
        self._hs = hs
        self._user_ids = user_ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def get_prev_state_ids(
        self, state_filter: StateFilter | None = None
    ) -> StateMap[str]:
        if state_filter is not None:
            return await self._context.get_prev_state_ids(state_filter)
        # An unpersisted context (a /make_join's) may hold the state in memory
        # (resolved from several groups), which it returns whatever the filter.
        in_memory = getattr(self._context, "state_map_before_event", None)
        if in_memory:
            return in_memory
        group = self._context.state_group_before_event
        if group is None:  # as EventContext: no state for an outlier
            return {}
        others = await self._context.get_prev_state_ids(NON_MEMBERS)
        members = await group_memberships(self._hs, group, self._user_ids)
        state = dict(others)
        for user_id, event_id in members.items():
            state[(EventTypes.Member, user_id)] = event_id
        return state


#: Set by the ``on_send_join_request`` wrapper around the native call for a
#: partial answer; filled by the ``_on_send_membership_event`` wrapper, read by
#: the state selector, both called from that native call. A mutable holder, so
#: that what the one fills the other sees, even through a copied context.
_PARTIAL_JOIN: contextvars.ContextVar[_PartialJoin | None] = contextvars.ContextVar(
    "sps_partial_join", default=None
)

#: (room_id, joining user id) -> member user IDs to add to the partial state.
ExtrasProvider = Callable[[str, str], Awaitable[tuple[str, ...]]]
#: (room_id, joining user id) -> extra top-level fields for the partial answer.
ResponseDecorator = Callable[[str, str], Awaitable[Mapping[str, Any]]]
#: (join event, state before the join, room summary, extra user IDs) -> state IDs.
StateSelector = Callable[
    ["EventBase", "StateMap[str]", "Mapping[str, MemberSummary]", tuple[str, ...]],
    Collection[str],
]
#: (room ID, the ``prev_events`` of a join we answered with partial state).
PartialJoinObserver = Callable[[str, list[str]], None]
#: A partial answer counts as in progress this long after it has been sent: the
#: joiner's resync asks for ``/state_ids`` next (once it has stored the answer
#: and its join: about a second for a module joiner of a 100,000-member room),
#: then ``/state``; the fan-out of its join waits for those (the hold's
#: ``fanout_hold_seconds`` bounds it all). With half a second, a benchmark's
#: ``/state_ids`` arrived just after the fan-out had started (and took 18 s).
NEXT_REQUEST_GRACE_S = 2.0


@attr.s(auto_attribs=True, slots=True)
class _SendJoinHooks:
    """What the ``/send_join`` wrappers call (None: not installed)."""

    extras_provider: ExtrasProvider | None = None
    decorate_response: ResponseDecorator | None = None
    observer: PartialJoinObserver | None = None
    answer_started: AnswerTracker | None = None


_SEND_JOIN_HOOKS = _SendJoinHooks()

_ON_SEND_JOIN_TARGET = (
    "synapse.federation.federation_server.FederationServer.on_send_join_request"
)
_ON_SEND_MEMBERSHIP_TARGET = (
    "synapse.federation.federation_server.FederationServer._on_send_membership_event"
)


def _wrap_on_send_join_request() -> None:
    """Wrap ``FederationServer.on_send_join_request`` once, calling the hooks
    registered in :data:`_SEND_JOIN_HOOKS`, and (re)record what the wrapper does.

    ``on_send_join_request`` is a class method of 123 lines in 1.163.2; the
    servlets look it up on the instance at call time. For a partial answer the
    wrapper:

    1. when essentials are wanted, marks the task as answering a partial join
       (:data:`_PARTIAL_JOIN`), so that the ``_on_send_membership_event``
       wrapper chooses them once Synapse has accepted the join (see
       :func:`_wrap_on_send_membership_event`): nothing is read for a join
       Synapse refuses;
    2. calls the native method;
    3. when the answer has ``members_omitted`` (so Synapse accepted and stored
       the join): adds ``decorate_response``'s fields, and once the answer has
       been sent (see :func:`install_partial_join_observer`) tells
       ``observer(room_id, join["prev_events"])`` (which must not block; its
       errors are logged and swallowed).

    Full answers go through the native method untouched.
    """
    from synapse.federation import federation_server as fs

    def wrap(native: Callable[..., Any]) -> Callable[..., Any]:
        async def on_send_join_request(
            self: FederationServer,
            origin: str,
            content: dict[str, Any],
            room_id: str,
            caller_supports_partial_state: bool = False,
        ) -> dict[str, Any]:
            tracker = _SEND_JOIN_HOOKS.answer_started
            answered = tracker() if tracker is not None else None
            try:
                resp = await _native_with_extras(
                    native,
                    self,
                    origin,
                    content,
                    room_id,
                    caller_supports_partial_state,
                )
                partial = bool(resp.get("members_omitted"))
                if partial:
                    await _after_partial_answer(resp, content, room_id)
            except BaseException:
                if answered is not None:
                    answered()
                raise
            if answered is not None:
                # A partial join's resync asks for the state next.
                grace = NEXT_REQUEST_GRACE_S if partial else 0.0
                done = answered
                after_response(lambda: done(grace), f"/send_join answer in {room_id}")
            return resp

        return on_send_join_request

    # Recorded below with what it does now (the hooks installed so far).
    wrap_instance_method(
        fs.FederationServer,
        "on_send_join_request",
        wrap,
        _ON_SEND_JOIN_TARGET,
        "",
        kind="wrap",
    )

    duties = []
    if _SEND_JOIN_HOOKS.extras_provider is not None:
        duties.append(
            "mark partial joins for the MSC2775 essentials; add the MSC2775 summary "
            "to accepted partial answers"
        )
    if _SEND_JOIN_HOOKS.observer is not None:
        duties.append(
            "once a partial answer has been sent, prepare the /state the joiner's "
            "resync asks for next, in the background"
        )
    if _SEND_JOIN_HOOKS.answer_started is not None:
        duties.append(
            "hold the federation sender's wake-ups until the answer has been sent"
        )
    record_patch_replacing(PatchRecord(_ON_SEND_JOIN_TARGET, "wrap", "; ".join(duties)))


async def _native_with_extras(
    native: Callable[..., Awaitable[dict[str, Any]]],
    server: FederationServer,
    origin: str,
    content: dict[str, Any],
    room_id: str,
    caller_supports_partial_state: bool,
) -> dict[str, Any]:
    """The native answer; for a partial one, with :data:`_PARTIAL_JOIN` set while
    native code runs (nothing is read here: the join is not validated yet)."""
    if not caller_supports_partial_state or _SEND_JOIN_HOOKS.extras_provider is None:
        return await native(
            server, origin, content, room_id, caller_supports_partial_state
        )
    token = _PARTIAL_JOIN.set(_PartialJoin(room_id))
    try:
        return await native(server, origin, content, room_id, True)
    finally:
        _PARTIAL_JOIN.reset(token)


def _wrap_on_send_membership_event() -> None:
    """Wrap ``FederationServer._on_send_membership_event`` once, and record it.

    ``_on_send_membership_event`` (a class method of 120 lines in 1.163.2, which
    native ``on_send_join_request`` looks up on the instance) is where Synapse
    checks a ``/send_join``, ``/send_leave`` or ``/send_knock``: the room, the
    event's format and membership, the server ACL, the signatures and hashes, the
    auth rules; it returns only once the event has been accepted and stored.
    Native ``on_send_join_request`` then computes the partial state with the
    synchronous selector, so the essentials must be ready before it returns to
    native code: the wrapper chooses them right after the native method returns,
    for a partial join (:data:`_PARTIAL_JOIN` set) only. A refused join raises
    Synapse's own error before anything of ours runs; leaves, knocks and full
    joins pass through untouched.
    """
    from synapse.federation import federation_server as fs

    def wrap(native: Callable[..., Any]) -> Callable[..., Any]:
        async def _on_send_membership_event(
            self: FederationServer,
            origin: str,
            content: dict[str, Any],
            membership_type: str,
            room_id: str,
        ) -> tuple[EventBase, EventContext]:
            event, context = await native(
                self, origin, content, membership_type, room_id
            )
            pending = _PARTIAL_JOIN.get()
            if (
                pending is not None
                and pending.extras is None
                and membership_type == Membership.JOIN
                and pending.room_id == room_id
            ):
                pending.extras = await _essentials_for(room_id, event)
                context = await _narrowed(self, room_id, event, context, pending)
            return event, context

        return _on_send_membership_event

    wrap_instance_method(
        fs.FederationServer,
        "_on_send_membership_event",
        wrap,
        _ON_SEND_MEMBERSHIP_TARGET,
        "choose a partial join's MSC2775 essentials once Synapse has validated "
        "and stored it (a refused join reads nothing)",
        kind="wrap",
    )


async def _narrowed(
    server: FederationServer,
    room_id: str,
    join: EventBase,
    context: EventContext,
    pending: _PartialJoin,
) -> Any:
    """``context`` for the rest of native ``on_send_join_request``, whose one use
    of it (checked in 1.163.2) is ``get_prev_state_ids()``, for the partial
    state the selector picks: a :class:`PrevStateReads` reading the non-member
    state and the memberships the selector can pick (the joiner's, the
    essentials', and the members of the room summary it takes the heroes from,
    read here and kept in ``pending``). The answer is the same as with the whole
    state. The context itself for an MSC4242 join (native answers it with full
    state) or when the summary cannot be read."""
    from synapse.events.py_protocol import supports_msc4242_state_dag

    if supports_msc4242_state_dag(join):
        return context
    try:
        # Any: mypy without Synapse's own plugin mis-types @cached methods.
        store: Any = server.store
        summary = await store.get_room_summary(room_id)
    except Exception:
        logger.exception("Could not read the room summary of %s", room_id)
        return context
    pending.summary = summary
    users = {join.state_key, *(pending.extras or ())}
    for member_summary in summary.values():
        users.update(user_id for user_id, _ in member_summary.members)
    return PrevStateReads(context, server.hs, users)


def _wrap_check_join_restrictions() -> None:
    """Wrap ``FederationEventHandler.check_join_restrictions(context, event)``
    once, and record it: native code gets a :class:`PrevStateReads` reading the
    non-member state and the joiner's membership, all it uses of the state
    before the join (checked in 1.163.2: the joiner's previous membership, and
    the join rules ``check_restricted_join_rules`` reads). Synapse calls it for
    every ``/make_join`` and ``/send_join``: in a 100,000-member room whose
    latest state group is not in Synapse's cache, each read the whole group."""
    from synapse.handlers import federation_event

    def wrap(native: Callable[..., Any]) -> Callable[..., Any]:
        async def check_join_restrictions(
            self: Any, context: Any, event: EventBase
        ) -> None:
            await native(
                self, PrevStateReads(context, self.hs, [event.state_key]), event
            )

        return check_join_restrictions

    wrap_instance_method(
        federation_event.FederationEventHandler,
        "check_join_restrictions",
        wrap,
        "synapse.handlers.federation_event.FederationEventHandler"
        ".check_join_restrictions",
        "read only the non-member state and the joiner's membership (all it "
        "uses), not the whole state before the join",
        kind="wrap",
    )


async def _essentials_for(room_id: str, join: EventBase) -> tuple[str, ...]:
    """``extras_provider``'s choice for ``join``, accepted into ``room_id``; none
    when there is no selector to feed or choosing them failed: the join is stored
    by then, so a failure here must not fail the answer (the joiner gets
    Synapse's own partial state instead)."""
    from synapse.events.py_protocol import supports_msc4242_state_dag

    provider = _SEND_JOIN_HOOKS.extras_provider
    # Native answers MSC4242 (state DAG) joins with full state: no selector.
    if provider is None or supports_msc4242_state_dag(join):
        return ()
    try:
        return await provider(room_id, join.state_key)
    except Exception:
        logger.exception(
            "Could not choose the send_join essentials of %s in %s; answering "
            "with Synapse's partial state",
            join.state_key,
            room_id,
        )
        return ()


async def _after_partial_answer(
    resp: dict[str, Any], content: dict[str, Any], room_id: str
) -> None:
    """Add ``decorate_response``'s fields to a partial answer, and tell the
    observer once it has been sent."""
    hooks = _SEND_JOIN_HOOKS
    joiner = content.get("state_key")
    if hooks.decorate_response is not None and isinstance(joiner, str):
        resp.update(await hooks.decorate_response(room_id, joiner))
    observer = hooks.observer
    if observer is not None:
        prev_events = content.get("prev_events")
        prev = (
            [e for e in prev_events if isinstance(e, str)]
            if isinstance(prev_events, list)
            else []
        )
        after_response(
            lambda: observer(room_id, prev),
            f"partial join observer for {room_id}",
        )


def install_send_join_hooks(
    extras_provider: ExtrasProvider,
    selector: StateSelector,
    decorate_response: ResponseDecorator,
) -> None:
    """Enrich partial ``/send_join`` answers (MSC3706 + MSC2775 essentials).

    Three patches, working together:

    * the ``FederationServer.on_send_join_request`` wrapper (see
      :func:`_wrap_on_send_join_request`, shared with
      :func:`install_partial_join_observer`) marks partial joins, and adds
      ``decorate_response``'s fields to partial answers (which Synapse only gives
      for joins it accepted);
    * the ``FederationServer._on_send_membership_event`` wrapper (see
      :func:`_wrap_on_send_membership_event`) asks ``extras_provider`` which
      member events to add once Synapse has validated and stored the join, never
      for a join it refuses;
    * the module-level ``_get_event_ids_for_partial_state_join`` (46 lines,
      unchanged since 1.100), which native looks up by global name at call time, is
      replaced by ``selector``. It sees the exact state before the join, so only
      member events really in that state are ever returned; the native auth-chain
      computation and deduplication then apply to them unchanged.

    Installing again replaces the hooks.
    """
    from synapse.federation import federation_server as fs

    def select(
        join_event: EventBase,
        prev_state_ids: StateMap[str],
        summary: Mapping[str, MemberSummary],
    ) -> Collection[str]:
        pending = _PARTIAL_JOIN.get()
        if pending is None:
            return selector(join_event, prev_state_ids, summary, ())
        # The summary whose members prev_state_ids was read for (_narrowed).
        if pending.summary is not None:
            summary = pending.summary
        return selector(join_event, prev_state_ids, summary, pending.extras or ())

    _SEND_JOIN_HOOKS.extras_provider = extras_provider
    _SEND_JOIN_HOOKS.decorate_response = decorate_response
    _wrap_on_send_join_request()
    _wrap_on_send_membership_event()
    _wrap_check_join_restrictions()
    fs._get_event_ids_for_partial_state_join = select
    record_patch(
        PatchRecord(
            "synapse.federation.federation_server._get_event_ids_for_partial_state_join",
            "replace",
            "partial state = native choice + MSC2775 essential members",
        )
    )


def install_partial_join_observer(observer: PartialJoinObserver) -> None:
    """Tell ``observer`` when a server got a partial ``/send_join`` answer from us.

    Registers ``observer`` with the one ``FederationServer.on_send_join_request``
    wrapper (:func:`_wrap_on_send_join_request`), which calls it with the room ID
    and the join's ``prev_events`` for every answer with ``members_omitted``, once
    the answer has been written (so that what it starts does not compete with
    sending it). Such a joiner resyncs next: it asks for ``/state_ids`` and
    ``/state`` at those events once it has processed the answer. Installing again
    replaces it.

    To know when the answer has been written, ``FederationV2SendJoinServlet`` (the
    only ``/send_join`` with partial answers; unchanged since 1.100 but for type
    hints, checked in 1.163.2) is replaced by a subclass of the same name that
    only puts the request in a context variable (:func:`request_aware_servlet`).
    """
    from synapse.federation.transport import server as transport_server
    from synapse.federation.transport.server import federation as fed_servlets

    _SEND_JOIN_HOOKS.observer = observer
    _wrap_on_send_join_request()
    group = transport_server.SERVLET_GROUPS["federation"]
    if not any(getattr(cls, "_sps_send_join_servlet", False) for cls in group):
        native = fed_servlets.FederationV2SendJoinServlet
        servlet = request_aware_servlet(native)
        servlet._sps_send_join_servlet = True  # type: ignore[attr-defined]
        replace_federation_servlets({native: servlet})
        record_patch(
            PatchRecord(
                "synapse.federation.transport.server.SERVLET_GROUPS[federation]"
                ".FederationV2SendJoinServlet",
                "replace",
                "know when a partial /send_join answer has been sent",
            )
        )


class WakeupHold(Protocol):
    """What :func:`install_fanout_hold` installs (see
    :class:`synapse_partial_state.resident.fanout.FanOutHold`)."""

    def notify(self, token: Any) -> None: ...

    def defer(self, name: str, wake: Callable[[], None]) -> None: ...

    def answer_started(self) -> Callable[..., None]: ...


#: (the sender's own wake-up, ``call_later(seconds, callback)``, a token's
#: position) -> the hold that takes the wake-ups in its place.
HoldFactory = Callable[
    [
        Callable[[Any], None],
        Callable[[float, Callable[[], None]], Any],
        Callable[[Any], int],
    ],
    WakeupHold,
]


def install_fanout_hold(api: ModuleApi, make_hold: HoldFactory) -> WakeupHold | None:
    """Let the federation sender's wake-ups go through ``make_hold(...)``'s hold,
    which this process's ``/send_join`` answers mark (see
    :mod:`synapse_partial_state.resident.fanout`). None (nothing installed) when
    this process does not send federation itself (in a worker deployment whose
    federation sender is another process, the fan-out does not share our
    reactor).

    Wraps, on the instance, ``FederationSender.notify_new_events(max_token)``
    (checked in 1.163.2: called by the notifier once events are persisted; it
    keeps the largest token's stream position and starts a background pass over
    the new events, read from the database), so the hold also covers wake-ups for
    other rooms meanwhile; and tells :func:`_wrap_on_send_join_request` to mark
    each answer, done once it has been written (with the request-aware servlet
    of :func:`install_partial_join_observer`) or else once computed.
    """
    hs = homeserver(api)
    if not hs.should_send_federation():
        return None
    clock = hs.get_clock()
    holds: list[WakeupHold] = []

    def wrap(native: Callable[[Any], None]) -> Callable[[Any], None]:
        hold = make_hold(
            native,
            lambda delay_s, f: call_later_s(clock, delay_s, f),
            lambda token: int(token.stream),
        )
        holds.append(hold)

        def notify_new_events(max_token: Any) -> None:
            hold.notify(max_token)

        return notify_new_events

    wrap_instance_method(
        hs.get_federation_sender(),
        "notify_new_events",
        wrap,
        "synapse.federation.sender.FederationSender.notify_new_events",
        "wait while a /send_join answer is prepared and sent (bounded)",
    )
    if not holds:  # installed before: the first one stays
        return None
    _hold_presence(hs, holds[0])
    _SEND_JOIN_HOOKS.answer_started = holds[0].answer_started
    _wrap_on_send_join_request()
    return holds[0]


def _hold_presence(hs: Any, hold: WakeupHold) -> None:
    """Synapse's presence handler's wake-ups through ``hold`` too, where this
    process runs it (a presence writer: ``PresenceHandler``, not the workers'
    ``WorkerPresenceHandler``, which has no such wake-up).

    ``PresenceHandler.notify_new_event()`` (checked in 1.163.2: no argument;
    it starts a background pass over the new current-state deltas unless one
    is running, and for each join works out the servers to send presence to
    from every member of the room, without yielding) is wrapped on the
    instance. The notifier calls it once events are persisted, through the
    bound method the handler registered at its start
    (``Notifier.add_replication_callback``, kept in
    ``ReplicationNotifier._replication_callbacks``): that entry is pointed at
    the wrapped method."""
    from synapse.handlers.presence import PresenceHandler

    presence = hs.get_presence_handler()
    if not isinstance(presence, PresenceHandler):
        return
    registered = presence.notify_new_event
    replication = getattr(hs.get_notifier(), "_replication_notifier", None)
    callbacks = getattr(replication, "_replication_callbacks", None)
    if not isinstance(callbacks, list) or registered not in callbacks:
        logger.warning(
            "Not holding the presence handler's wake-ups during /send_join "
            "answers: its notifier callback was not found in this Synapse"
        )
        return

    def wrap(native: Callable[[], None]) -> Callable[[], None]:
        def notify_new_event() -> None:
            hold.defer("presence", native)

        return notify_new_event

    wrap_instance_method(
        presence,
        "notify_new_event",
        wrap,
        "synapse.handlers.presence.PresenceHandler.notify_new_event",
        "wait while a /send_join answer is prepared and sent (bounded), as "
        "the federation sender does",
    )
    callbacks[callbacks.index(registered)] = presence.notify_new_event


async def get_room_summary(api: ModuleApi, room_id: str) -> Mapping[str, MemberSummary]:
    """Synapse's cached member summary of the room's current state."""
    # Any: mypy without Synapse's own plugin mis-types @cached methods.
    store: Any = main_store(api)
    return await store.get_room_summary(room_id)


def heroes_from_summary(summary: Mapping[str, MemberSummary], me: str) -> list[str]:
    """The room's heroes as Synapse computes them for ``/sync`` summaries."""
    from synapse.storage.databases.main.roommember import (
        extract_heroes_from_room_summary,
    )

    return extract_heroes_from_room_summary(summary, me)


async def get_current_state_event_content(
    api: ModuleApi, room_id: str, event_type: str, state_key: str
) -> Mapping[str, Any] | None:
    """Content of a current (non-member) state event, or None."""
    storage = homeserver(api).get_storage_controllers()
    event = await storage.state.get_current_state_event(room_id, event_type, state_key)
    return None if event is None else event.content


def _memberships_txn(
    txn: Any, room_id: str, want_joined: bool
) -> tuple[list[str], list[str], list[str]]:
    """(bans and kicks, invites and knocks, joined oldest-first) in current state."""
    txn.execute(
        """
        SELECT c.state_key, c.membership, m.sender
        FROM current_state_events AS c
        INNER JOIN room_memberships AS m USING (event_id)
        WHERE c.room_id = ? AND c.type = 'm.room.member'
          AND c.membership IN ('ban', 'leave', 'invite', 'knock')
        ORDER BY c.event_stream_ordering DESC
        """,
        (room_id,),
    )
    power: list[str] = []
    pending: list[str] = []
    for user_id, membership, sender in txn:
        if membership == Membership.BAN or (
            membership == Membership.LEAVE and sender != user_id
        ):
            power.append(user_id)
        elif membership in (Membership.INVITE, Membership.KNOCK):
            pending.append(user_id)
    joined: list[str] = []
    if want_joined:
        txn.execute(
            """
            SELECT state_key FROM current_state_events
            WHERE room_id = ? AND type = 'm.room.member' AND membership = 'join'
            ORDER BY event_stream_ordering ASC
            """,
            (room_id,),
        )
        joined = [row[0] for row in txn]
    return power, pending, joined


async def essential_memberships(
    api: ModuleApi, room_id: str, want_joined: bool
) -> tuple[list[str], list[str], list[str]]:
    """From the room's current state: (bans and kicks still in force, pending
    invites and knocks, most recent first; joined members oldest-first, when
    ``want_joined``). Reads ``current_state_events`` joined with
    ``room_memberships`` (for each membership's sender) in one transaction."""
    return await main_store(api).db_pool.runInteraction(
        "sps_send_join_essentials", _memberships_txn, room_id, want_joined
    )
