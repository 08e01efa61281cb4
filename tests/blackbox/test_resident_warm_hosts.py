"""The servers in a big room worked out ahead of its joiners
(``resident.warm_hosts_min_members``, :mod:`synapse_partial_state.resident.warm`).

A real module joiner (``hs2``) resyncs a room, becomes a resident of it, and
works out the room's servers once the resync ends and again once it restarts
(the two moments Synapse's per-room cache of them is empty); partial
``/send_join`` answers it then gives name exactly the room's servers, before and
after a join changes them.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from tests.blackbox.resync_case import ResyncCase
from tests.fedkit.testcase import on_both_databases

WARM = {"resident": {"warm_hosts_min_members": 100}}


def warmed_line(room_id: str) -> str:
    return rf"Worked out the servers in {re.escape(room_id)} \(\d+ members\)"


def prepared_line(room_id: str) -> str:
    return rf"state cache: prepared the state answers of {re.escape(room_id)} ahead"


@on_both_databases(ci_database="postgres")
class WarmHostsAfterResyncAndRestart(ResyncCase):
    MEMBERS = 150
    SERVERS = 4

    def setUp(self) -> None:
        super().setUp()
        self.setup_room(
            module_config={
                **WARM,
                "resync": {"initial_backoff_seconds": 0.5, "max_backoff_seconds": 2},
            }
        )

    def servers_in_room(self) -> set[str]:
        members = self.bob.joined_members(self.room_id, timeout=60)
        return {user_id.split(":", 1)[1] for user_id in members}

    def partial_join(self) -> dict[str, Any]:
        result = self.peer.join(self.room_id, self.hs2.server_name)
        self.assertEqual(result["send_join"]["status"], 200, result)
        return result

    def assert_state_ids_prepared(self, join: dict[str, Any], since: int) -> None:
        """``/state_ids`` before the join's prev event (as a resyncing joiner
        asks) comes from the cache: no state was built for it since ``since``."""
        (prev,) = join["join_event"]["prev_events"]
        answer = self.peer.federation_request(
            join["server"],
            self.hs2.server_name,
            "GET",
            f"/_matrix/federation/v1/state_ids/{quote(self.room_id, safe='')}"
            f"?event_id={quote(prev, safe='')}",
        )
        self.assertEqual(answer["status"], 200, answer)
        line = self.hs2.wait_for_log(r"state cache: /state_ids .*", since=since)
        self.assertIn("entry=hit", line.group(0))
        built = re.findall("state cache: built state", self.hs2.read_log()[since:])
        self.assertEqual(built, [])

    def test_servers_worked_out_after_the_resync_and_after_a_restart(self) -> None:
        since = self.hs2.log_offset()
        self.bob.join(self.room_id, via=[self.resident])
        self.wait_complete(since)
        # After the resync: the room has MEMBERS + 1 members (over the threshold).
        self.hs2.wait_for_log(warmed_line(self.room_id), timeout=60, since=since)
        expected = self.servers_in_room()
        self.assertEqual(len(expected), self.SERVERS + 1, expected)

        # The state a joiner's resync asks for (before the room's forward
        # extremity, which its join cites) is prepared too, before anyone asks.
        self.hs2.wait_for_log(prepared_line(self.room_id), timeout=60, since=since)
        prepared_at = self.hs2.log_offset()

        first = self.partial_join()
        self.assertEqual(set(first["send_join"]["body"]["servers_in_room"]), expected)
        joined = first["join_event"]["state_key"].split(":", 1)[1]
        self.assertNotIn(joined, expected)
        self.assert_state_ids_prepared(first, prepared_at)

        # After a restart: once the process is up, from Synapse's room statistics.
        since = self.hs2.log_offset()
        self.hs2.restart()
        self.hs2.wait_for_log(warmed_line(self.room_id), timeout=90, since=since)
        prepared_at = self.hs2.log_offset()
        self.hs2.wait_for_log(prepared_line(self.room_id), timeout=60, since=since)
        second = self.partial_join()
        self.assert_state_ids_prepared(second, prepared_at)
        self.assertEqual(
            set(second["send_join"]["body"]["servers_in_room"]), expected | {joined}
        )
        self.assertEqual(
            self.servers_in_room(),
            expected
            | {
                joined,
                second["join_event"]["state_key"].split(":", 1)[1],
            },
        )
