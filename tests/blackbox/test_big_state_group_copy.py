"""A big room's whole state group written with ``COPY`` (``compat/bulk/copy.py``,
``ALWAYS_COPY_TABLES``) on PostgreSQL: a real joiner resyncs a fake room of more
members than ``ALWAYS_COPY_MIN_ROWS``; the state group Synapse stores whole for
the join holds every member (as Synapse's own insert would), and Synapse reads
it as its own: the room's state is exactly the resident's, and the joiner,
as a resident, serves the same state in ``/state_ids``."""

from __future__ import annotations

from urllib.parse import quote

from synapse_partial_state.compat.bulk.copy import ALWAYS_COPY_MIN_ROWS
from tests.blackbox.resync_case import ResyncCase


class BigStateGroupCopied(ResyncCase):
    DATABASE = "postgres"
    MEMBERS = ALWAYS_COPY_MIN_ROWS + 200
    SERVERS = 20

    def test_whole_state_group_rows_and_reads(self) -> None:
        self.setup_room()
        since = self.hs2.log_offset()
        self.bob.join(self.room_id, via=[self.resident])
        self.wait_complete(since, timeout=180)
        copied = self.hs2.wait_for_log(
            r"(\d+) rows of state_groups_state written with COPY", since=since
        )
        self.assertGreaterEqual(int(copied.group(1)), ALWAYS_COPY_MIN_ROWS)
        self.assert_resident_state()
        # The biggest group of the room holds its whole state, written once
        # (no duplicate rows from a COPY and an insert of the same group).
        [(group, rows, keys)] = self.hs2.sql(
            "SELECT state_group, COUNT(*), COUNT(DISTINCT (type, state_key)) "
            "FROM state_groups_state WHERE room_id = ? GROUP BY state_group "
            "ORDER BY COUNT(*) DESC LIMIT 1",
            (self.room_id,),
        )
        self.assertGreaterEqual(int(rows), ALWAYS_COPY_MIN_ROWS)
        self.assertEqual(rows, keys)
        # Every member of the room at the join is in it, as the resident has it.
        members = {
            str(k)
            for (k,) in self.hs2.sql(
                "SELECT state_key FROM state_groups_state "
                "WHERE state_group = ? AND type = 'm.room.member'",
                (group,),
            )
        }
        self.assertGreaterEqual(len(members), self.room["member_count"])
        # Served as a resident: /state_ids at bob's join lists the group.
        bob_join = next(
            e["event_id"]
            for e in self.bob.room_state(self.room_id)
            if e["type"] == "m.room.member" and e["state_key"] == self.bob.user_id
        )
        answer = self.peer.federation_request(
            self.resident,
            self.hs2.server_name,
            "GET",
            f"/_matrix/federation/v1/state_ids/{quote(self.room_id, safe='')}"
            f"?event_id={quote(bob_join, safe='')}",
        )
        self.assertEqual(answer["status"], 200, answer)
        self.assertGreaterEqual(
            len(answer["body"]["pdu_ids"]), self.room["member_count"]
        )
