"""The room summary during a resync: the resident's MSC2775 summary from
``/send_join``, kept by a real joiner (``hs2``) and given by its progress
endpoint (and the members policy's counts) while the room is partial, instead of
counts computed from the members known so far.

The resident is a real module homeserver (``hs1``): its partial answer carries
the summary. To keep the room partial at hs2, hs1 is frozen (SIGSTOP) as soon as
bob's join returns: hs2's resync then waits for it; once hs1 runs again (SIGCONT)
the resync completes. With a stock resident (no summary), the counts are hs2's
own, from the members known so far.

Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from synapse_partial_state.wire import SUMMARY_FIELD
from tests.blackbox.resync_case import wait_until
from tests.blackbox.test_clients import endpoint
from tests.blackbox.test_clients_partial_reads import joined_path
from tests.fedkit.homeserver import Homeserver
from tests.fedkit.matrix_client import Client
from tests.fedkit.testcase import FederationTestCase, on_both_databases

#: Members of hs1's room besides alice: more than a partial answer carries
#: (heroes, power users, pending invites).
MEMBERS = 12
INVITED = 2

PARTIAL_MEMBERS = {"clients": {"members_during_resync": "partial"}}


@on_both_databases(ci_database="postgres")
class ResidentSummary(FederationTestCase):
    def build_room(self, resident_module: bool) -> None:
        self.hs1: Homeserver = self.make_homeserver("hs1", with_module=resident_module)
        self.hs2: Homeserver = self.make_homeserver(
            "hs2", module_config=PARTIAL_MEMBERS
        )
        alice = self.register(self.hs1, "alice")
        self.room_id = alice.create_room(preset="public_chat", name="Big room")
        for i in range(MEMBERS):
            self.register(self.hs1, f"member{i}").join(self.room_id)
        for i in range(INVITED):
            alice.invite(self.room_id, f"@invited{i}:{self.hs1.server_name}")
        self.bob: Client = self.register(self.hs2, "bob")

    def join_frozen(self) -> None:
        """bob joins; hs1 is frozen at once (its resync waits); unfrozen after
        the test whatever happens."""
        self.bob.join(self.room_id, via=[self.hs1.server_name])
        pid = self.hs1.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(self.thaw)

    def thaw(self) -> None:
        pid = self.hs1.pid
        if pid is not None:
            os.kill(pid, signal.SIGCONT)

    def progress(self) -> dict[str, Any]:
        status, body = self.bob.get(endpoint(self.room_id), timeout=15)
        self.assertEqual(status, 200, body)
        return body

    def test_resident_summary_while_partial(self) -> None:
        """While the resync waits for the frozen resident, the endpoint's
        summary is the resident's (every member counted, bob and the pending
        invites too; heroes from the resident, never bob), and the members
        policy's counts too, though hs2 knows fewer members; once complete,
        {"syncing": false} and stock's full member list."""
        self.build_room(resident_module=True)
        self.join_frozen()
        body = self.progress()
        self.assertIs(body["syncing"], True, "the resync completed before the freeze")
        joined = MEMBERS + 2  # alice, the members, bob
        summary = body["summary"]
        self.assertEqual(summary["m.joined_member_count"], joined)
        self.assertEqual(summary["m.invited_member_count"], INVITED)
        self.assertTrue(summary["m.heroes"])
        self.assertNotIn(self.bob.user_id, summary["m.heroes"])
        self.assertLessEqual(len(summary["m.heroes"]), 5)
        status, members = self.bob.get(joined_path(self.room_id), timeout=15)
        self.assertEqual(status, 200, members)
        self.assertLess(len(members["joined"]), joined)  # the members known so far
        self.assertEqual(members[SUMMARY_FIELD]["m.joined_member_count"], joined)
        self.assertEqual(members[SUMMARY_FIELD]["m.invited_member_count"], INVITED)
        self.assertEqual(self.stored_summaries(), [(self.room_id,)])

        self.thaw()
        wait_until(lambda: self.progress() == {"syncing": False}, 120, "complete")
        self.assertEqual(len(self.bob.joined_members(self.room_id)), joined)
        # Complete: Synapse's own summary is exact; the resident's is dropped.
        wait_until(lambda: not self.stored_summaries(), 30, "the summary dropped")

    def test_summary_dropped_with_an_abandoned_room(self) -> None:
        """bob leaves while the resync waits: the room is given up and purged,
        and its resident summary goes with it."""
        self.build_room(resident_module=True)
        self.join_frozen()
        self.assertIs(self.progress()["syncing"], True)
        wait_until(self.stored_summaries, 30, "the summary stored")
        self.bob.leave(self.room_id)
        self.thaw()
        wait_until(lambda: not self.stored_summaries(), 60, "the summary dropped")
        self.assertNotIn(self.room_id, self.bob.joined_rooms())

    def stored_summaries(self) -> list[tuple[str, ...]]:
        return self.hs2.sql("SELECT room_id FROM sps_join_summaries")

    def test_stock_resident_local_counts(self) -> None:
        """A stock resident sends no summary: while partial, the counts are
        hs2's own, from the members known so far."""
        self.build_room(resident_module=False)
        self.join_frozen()
        body = self.progress()
        self.assertIs(body["syncing"], True, "the resync completed before the freeze")
        status, members = self.bob.get(joined_path(self.room_id), timeout=15)
        self.assertEqual(status, 200, members)
        known = len(members["joined"])
        self.assertLess(known, MEMBERS + 2)
        self.assertEqual(body["summary"]["m.joined_member_count"], known)
        self.thaw()
        wait_until(lambda: self.progress() == {"syncing": False}, 120, "complete")
