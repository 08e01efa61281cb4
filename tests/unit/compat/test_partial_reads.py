"""The partial-read scope: Synapse's wait for full state is skipped only for the
scope's rooms, only within it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from synapse_partial_state.compat import partial_reads
from synapse_partial_state.compat.partial_reads import (
    _MembersPolicy,
    _wrap_await_full_state,
    _wrap_get_child_events,
    reading_partial_state,
)


class Tracker:
    """Stands for ``PartialCurrentStateTracker``: records who waited."""

    def __init__(self) -> None:
        self.waited: list[str] = []
        self.await_full_state = _wrap_await_full_state(Tracker._native)

    async def _native(self, room_id: str) -> None:
        self.waited.append(room_id)


class ScopeTests(unittest.TestCase):
    def wait(self, tracker: Tracker, room_id: str) -> None:
        self.successResultOf(
            defer.ensureDeferred(tracker.await_full_state(tracker, room_id))
        )

    def test_waits_outside_the_scope(self) -> None:
        tracker = Tracker()
        self.wait(tracker, "!r:x")
        self.assertEqual(tracker.waited, ["!r:x"])

    def test_skips_the_scope_room_only_within_it(self) -> None:
        tracker = Tracker()
        with reading_partial_state("!r:x"):
            self.wait(tracker, "!r:x")
            self.wait(tracker, "!other:x")
            with reading_partial_state("!s:x"):
                self.wait(tracker, "!r:x")
            self.wait(tracker, "!s:x")
        self.wait(tracker, "!r:x")
        self.assertEqual(tracker.waited, ["!other:x", "!s:x", "!r:x"])

    def test_child_events_read_within_the_scope(self) -> None:
        tracker = Tracker()

        async def native(handler: Any, room_id: str) -> list[str]:
            await tracker.await_full_state(tracker, room_id)
            return ["child"]

        wrapped = _wrap_get_child_events(native)
        result = self.successResultOf(defer.ensureDeferred(wrapped(None, "!s:x")))
        self.assertEqual(result, ["child"])
        self.assertEqual(tracker.waited, [])
        self.wait(tracker, "!s:x")  # the scope ended with the call
        self.assertEqual(tracker.waited, ["!s:x"])


class MembersServletTests(unittest.TestCase):
    """``on_GET`` of the members servlets, wrapped, with a policy installed."""

    def setUp(self) -> None:
        self.tracker = Tracker()
        self.marked: list[str] = []
        self.at_once = True
        policy = _MembersPolicy(self._answers_at_once, self._mark)
        self.patch(partial_reads, "_POLICY", [policy])

        async def native(servlet: Any, request: Any, room_id: str) -> Any:
            await self.tracker.await_full_state(self.tracker, room_id)
            return 200, {"chunk": []}

        self.on_get = partial_reads._wrap_members_on_get(native)

    async def _answers_at_once(self, room_id: str) -> bool:
        return self.at_once

    async def _mark(self, body: dict[str, Any], room_id: str) -> None:
        body["marked"] = True
        self.marked.append(room_id)

    def get(self, args: dict[bytes, Any]) -> Any:
        request = SimpleNamespace(args=args)
        return self.successResultOf(
            defer.ensureDeferred(self.on_get(None, request, "!r:x"))
        )

    def test_answers_from_partial_state_and_marks(self) -> None:
        self.assertEqual(self.get({}), (200, {"chunk": [], "marked": True}))
        self.assertEqual(self.tracker.waited, [])
        self.assertEqual(self.marked, ["!r:x"])

    def test_stock_when_the_policy_says_so(self) -> None:
        self.at_once = False
        self.assertEqual(self.get({}), (200, {"chunk": []}))
        self.assertEqual(self.tracker.waited, ["!r:x"])

    def test_stock_with_an_at_token(self) -> None:
        self.assertEqual(self.get({b"at": [b"s1"]}), (200, {"chunk": []}))
        self.assertEqual(self.tracker.waited, ["!r:x"])
        self.assertEqual(self.marked, [])
