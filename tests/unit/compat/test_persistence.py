"""The current-state guard: Synapse's recalculation of a room's current state is
skipped while the room has partial-state events."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from synapse_partial_state.compat import persistence


class CurrentStateGuardTests(unittest.TestCase):
    """The persistence controller's current-state recalculation is skipped
    while the room has partial-state events."""

    def guarded(self, partial: set[str]) -> tuple[Any, list[str]]:
        ran: list[str] = []

        async def native(room_id: str, task: object) -> None:
            ran.append(room_id)

        async def has_partial_state_events(room_id: str) -> bool:
            return room_id in partial

        return persistence.current_state_guard(native, has_partial_state_events), ran

    def test_recalculated_without_partial_state_events(self) -> None:
        guarded, ran = self.guarded(partial={"!other:x"})
        self.successResultOf(defer.ensureDeferred(guarded("!r:x", object())))
        self.assertEqual(ran, ["!r:x"])

    def test_kept_while_partial_state_events_exist(self) -> None:
        guarded, ran = self.guarded(partial={"!r:x"})
        with self.assertLogs(
            "synapse_partial_state.compat.persistence", "INFO"
        ) as logs:
            self.successResultOf(defer.ensureDeferred(guarded("!r:x", object())))
        self.assertEqual(ran, [])
        self.assertIn("not recalculated", logs.output[0])

    def test_partial_state_events_query(self) -> None:
        import sqlite3

        db = sqlite3.connect(":memory:")
        txn = db.cursor()
        txn.execute("CREATE TABLE partial_state_events (room_id TEXT, event_id TEXT)")
        txn.execute("INSERT INTO partial_state_events VALUES ('!r:x', '$e')")
        self.assertTrue(persistence._has_partial_state_events_txn(txn, "!r:x"))
        self.assertFalse(persistence._has_partial_state_events_txn(txn, "!s:x"))
