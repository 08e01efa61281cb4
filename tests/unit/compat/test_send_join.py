"""The one ``on_send_join_request`` wrapper (in-process; the native method is faked).

The essentials (before the native answer), the summary and the partial-join
observer (after it) all hang off a single wrapper, with one patch record that says
what it does.
"""

from __future__ import annotations

import unittest
from collections.abc import Coroutine
from typing import Any

from synapse.federation import federation_server as fs
from synapse.federation.transport import server as transport_server
from twisted.internet import defer

from synapse_partial_state.compat import patching, send_join, servlets

TARGET = "synapse.federation.federation_server.FederationServer.on_send_join_request"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (every await below is immediate)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("coroutine suspended")


class SendJoinWrapperTests(unittest.TestCase):
    def setUp(self) -> None:
        groups = transport_server.SERVLET_GROUPS
        self.addCleanup(groups.__setitem__, "federation", groups["federation"])
        hooks = send_join._SEND_JOIN_HOOKS
        saved = (
            fs.FederationServer.on_send_join_request,
            fs._get_event_ids_for_partial_state_join,
            list(patching.INSTALLED_PATCHES),
            (hooks.extras_provider, hooks.decorate_response, hooks.observer),
        )

        def restore() -> None:
            fs.FederationServer.on_send_join_request = saved[0]  # type: ignore[method-assign]
            fs._get_event_ids_for_partial_state_join = saved[1]
            patching.INSTALLED_PATCHES[:] = saved[2]
            (hooks.extras_provider, hooks.decorate_response, hooks.observer) = saved[3]

        self.addCleanup(restore)
        hooks.extras_provider = hooks.decorate_response = hooks.observer = None
        patching.INSTALLED_PATCHES[:] = [
            p for p in patching.INSTALLED_PATCHES if p.target != TARGET
        ]
        self.calls: list[tuple[Any, ...]] = []
        calls = self.calls

        async def native(
            server: Any,
            origin: str,
            content: dict[str, Any],
            room_id: str,
            caller_supports_partial_state: bool = False,
        ) -> dict[str, Any]:
            calls.append(
                (
                    "native",
                    caller_supports_partial_state,
                    send_join._SEND_JOIN_EXTRAS.get(),
                )
            )
            return {"members_omitted": caller_supports_partial_state}

        fs.FederationServer.on_send_join_request = native  # type: ignore[method-assign,assignment]
        self.native = native

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

        send_join.install_send_join_hooks(extras, lambda *a: (), decorate)
        send_join.install_partial_join_observer(observer)

    def call(self, partial: bool, content: dict[str, Any] | None = None) -> Any:
        content = content or {"state_key": "@j:b", "prev_events": ["$p", 5]}
        return run(
            fs.FederationServer.on_send_join_request(
                object(),  # type: ignore[arg-type]
                "b",
                content,
                "!r:a",
                partial,
            )
        )

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
                ("extras", "!r:a", "@j:b"),
                ("native", True, ("@hero:a",)),  # native called once, directly
                ("decorate", "!r:a", "@j:b"),
                ("observer", "!r:a", ["$p"]),
            ],
        )
        records = [p for p in patching.INSTALLED_PATCHES if p.target == TARGET]
        self.assertEqual(len(records), 1)
        self.assertIn("MSC2775 essentials", records[0].why)
        self.assertIn("prepare the /state", records[0].why)

    def test_full_answers_and_malformed_joins_are_native(self) -> None:
        self.install_all()
        self.assertEqual(self.call(False), {"members_omitted": False})
        self.assertEqual(self.calls, [("native", False, None)])
        del self.calls[:]
        # No usable state_key: native answers (and errs) alone; observed if partial.
        self.call(True, {"prev_events": []})
        self.assertEqual(self.calls, [("native", True, None), ("observer", "!r:a", [])])

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
        self.assertEqual([c[0] for c in self.calls], ["extras", "native", "decorate"])
        finished.callback(None)
        self.assertEqual(self.calls[-1], ("observer", "!r:a", ["$p"]))

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
