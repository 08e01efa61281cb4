"""The partial-read scope: Synapse's wait for full state is skipped only for the
scope's rooms, only within it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from synapse_partial_state.compat import backfill, partial_reads
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


class EventsTracker:
    """Stands for ``PartialStateEventsTracker``: events of two rooms."""

    def __init__(self) -> None:
        self.waited: list[list[str]] = []
        rooms = {"$a": "!r:x", "$b": "!other:x"}
        self._store = SimpleNamespace(get_events=self._get_events)
        self._rooms = rooms
        self.await_full_state = partial_reads._wrap_await_events_state(
            EventsTracker._native
        )

    async def _get_events(self, event_ids: Any, allow_rejected: bool) -> Any:
        return {
            e: SimpleNamespace(room_id=self._rooms[e])
            for e in event_ids
            if e in self._rooms
        }

    async def _native(self, event_ids: Any) -> None:
        self.waited.append(list(event_ids))


class EventsScopeTests(unittest.TestCase):
    def wait(self, tracker: EventsTracker, ids: list[str]) -> None:
        self.successResultOf(
            defer.ensureDeferred(tracker.await_full_state(tracker, ids))
        )

    def test_skips_the_scope_rooms_events_only(self) -> None:
        """Within the scope of !r:x, only its events are not waited for
        (events of other rooms, and unknown ones, are)."""
        tracker = EventsTracker()
        self.wait(tracker, ["$a", "$b"])
        with reading_partial_state("!r:x"):
            self.wait(tracker, ["$a", "$b", "$unknown"])
            self.wait(tracker, ["$a"])
        self.assertEqual(tracker.waited, [["$a", "$b"], ["$b", "$unknown"]])


class BackfillTests(unittest.TestCase):
    """``maybe_backfill`` within a scope of a partial room: stock's, in the
    foreground, within the backfill narrowing of the room; otherwise as stock."""

    def setUp(self) -> None:
        self.calls: list[tuple[str, frozenset[str], frozenset[str]]] = []
        self.partial = True

        async def is_partial_state_room(room_id: str) -> bool:
            return self.partial

        self.handler = SimpleNamespace(
            store=SimpleNamespace(is_partial_state_room=is_partial_state_room),
        )

        async def native(handler: Any, room_id: str, depth: int) -> bool:
            self.calls.append(
                (
                    room_id,
                    partial_reads._PARTIAL_READS.get(),
                    backfill._BACKFILLING.get(),
                )
            )
            return True

        self.backfill = partial_reads._wrap_maybe_backfill(native)

    def call(self, room_id: str) -> bool:
        d = defer.ensureDeferred(self.backfill(self.handler, room_id, 5))
        return bool(self.successResultOf(d))

    def test_outside_a_scope_as_stock(self) -> None:
        self.assertTrue(self.call("!r:x"))
        self.assertEqual(self.calls, [("!r:x", frozenset(), frozenset())])

    def test_partial_room_in_scope_backfills_now_narrowed(self) -> None:
        """In the foreground (its result is the request's), still reading the
        partial state, with the room's fetched state narrowed; not after."""
        with reading_partial_state("!r:x"):
            self.assertTrue(self.call("!r:x"))
        room = frozenset({"!r:x"})
        self.assertEqual(self.calls, [("!r:x", room, room)])
        self.assertEqual(backfill._BACKFILLING.get(), frozenset())

    def test_full_room_in_scope_as_stock(self) -> None:
        self.partial = False
        with reading_partial_state("!r:x"):
            self.assertTrue(self.call("!r:x"))
        self.assertEqual(self.calls, [("!r:x", frozenset({"!r:x"}), frozenset())])
