"""The state after a missing prev event (``compat/prev_state.py``) and big states
stored as deltas (``compat/state_group_deltas.py``), on a real joiner.

Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import re
from typing import Any

from tests.blackbox.resync_case import ResyncCase, resident_state
from tests.fedkit.homeserver import Homeserver
from tests.fedkit.testcase import on_both_databases

#: Events hs2 never receives: more than one get_missing_events answer (10).
GAP = 12


def group_state(hs: Homeserver, group: int) -> dict[tuple[str, str], str]:
    """A state group's whole state, read through its delta chain as Synapse
    reads it (a group's own rows override its predecessors')."""
    chain = [group]
    while True:
        prev = hs.sql(
            "SELECT prev_state_group FROM state_group_edges WHERE state_group = ?",
            (chain[-1],),
        )
        if not prev:
            break
        chain.append(prev[0][0])
    state: dict[tuple[str, str], str] = {}
    for member in reversed(chain):
        for type_, state_key, event_id in hs.sql(
            "SELECT type, state_key, event_id FROM state_groups_state"
            " WHERE state_group = ?",
            (member,),
        ):
            state[(type_, state_key)] = event_id
    return state


@on_both_databases(ci_database="postgres")
class MissingPrevState(ResyncCase):
    #: Above the state-group delta threshold (``MIN_ENTRIES``, 500 entries).
    MEMBERS = 600

    def test_state_after_missing_state_prev_events(self) -> None:
        """hs2 misses state events, then receives an event on top: the oldest
        one it pulls has a missing prev event (itself a state event), whose
        state Synapse asks for and reads back in one transaction. The state it
        builds is the resident's (the missing prev event's own entry included,
        and the one missing state event before it, fetched), and the new big
        state group is stored as a delta of those few entries."""
        self.setup_room()
        self.join_resync_and_see()
        top_group = self._max_state_group()
        gap = [
            self.peer.send_event(
                self.room_id,
                "org.example.gap",
                {"i": i},
                state_key=f"k{i}",
                destinations=[],
            )["event_id"]
            for i in range(GAP)
        ]
        since = self.hs2.log_offset()
        self.peer.send_event(
            self.room_id, "m.room.message", {"msgtype": "m.text", "body": "on top"}
        )
        self.bob.wait_for_message(self.room_id, "on top")
        # get_missing_events returns the ten newest; the oldest of those has
        # the second gap event as its missing prev event.
        missing_prev = gap[GAP - 11]
        match = self.hs2.wait_for_log(
            rf"State after missing prev event {re.escape(missing_prev)} of "
            rf"{re.escape(self.room_id)}: (\d+) state events \((\d+) were missing\)",
            timeout=30,
            since=since,
        )
        # the first gap event (in the state) and the prev event itself
        self.assertEqual(int(match.group(2)), 2, match.group(0))

        events = self.peer.room_events(self.room_id, limit=100000)["events"]
        ids = [e["event_id"] for e in events]
        first_pulled = gap[GAP - 10]
        expected = resident_state(events[: ids.index(first_pulled) + 1])
        group = self._group_of(first_pulled)
        self.assertEqual(group_state(self.hs2, group), expected)
        self.assertIn(("org.example.gap", "k0"), expected)
        self.assertIn(("org.example.gap", "k1"), expected)

        # Stored as a delta: the new groups' rows are a few entries each, not
        # the room's 600 members again.
        self.hs2.wait_for_log(
            r"State of \d+ entries at \S+ in "
            rf"{re.escape(self.room_id)} stored as a delta of \d+ from state group",
            timeout=30,
            since=since,
        )
        new_rows = self.hs2.sql(
            "SELECT COUNT(*) FROM state_groups_state WHERE state_group > ?"
            " AND room_id = ?",
            (top_group, self.room_id),
        )[0][0]
        self.assertLess(new_rows, 100)
        self.assert_resident_state()

    def _max_state_group(self) -> int:
        return int(self.hs2.sql("SELECT MAX(id) FROM state_groups")[0][0])

    def _group_of(self, event_id: str) -> Any:
        rows = self.hs2.sql(
            "SELECT state_group FROM event_to_state_groups WHERE event_id = ?",
            (event_id,),
        )
        self.assertEqual(len(rows), 1, event_id)
        return rows[0][0]
