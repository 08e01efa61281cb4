"""The foundation, end to end: the module inside real Synapses that federate.

Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import re
import time
from urllib.parse import quote

import requests

from synapse_partial_state.compat.patching import TESTED_RANGE_ENV
from tests.blackbox.endpoints import ADMIN, STATUS, full_status
from tests.fedkit.homeserver import HomeserverStartError
from tests.fedkit.testcase import FederationTestCase, on_both_databases


@on_both_databases(ci_database="postgres")
class TwoModuleHomeservers(FederationTestCase):
    def test_partial_join_and_messages_both_ways(self) -> None:
        hs1, hs2 = self.make_homeservers(["hs1", "hs2"])

        # The module is loaded in both, with its send_join patches in place.
        for hs in (hs1, hs2):
            body = full_status(self.register(hs, "probe", admin=True))
            self.assertEqual(body["module"], "synapse_partial_state")
            self.assertEqual(body["server_name"], hs.server_name)
            targets = {p["target"].rsplit(".", 1)[-1] for p in body["patches"]}
            self.assertIn("on_send_join_request", targets)
            self.assertIn("_get_event_ids_for_partial_state_join", targets)
            self.assertIn("_sync_partial_state_room", targets)
            self.assertIn("_update_current_state", targets)

        alice = self.register(hs1, "alice")
        bob = self.register(hs2, "bob")
        room_id = alice.create_room(preset="public_chat", name="Foundation")

        since = hs2.log_offset()
        self.assertEqual(bob.join(room_id, via=[hs1.server_name]), room_id)
        # hs2 joined with partial state: the module's engine started a resync...
        hs2.wait_for_log(
            rf"Starting resync of {re.escape(room_id)}", timeout=30, since=since
        )

        bob.send_message(room_id, "hello from hs2")
        alice.wait_for_message(room_id, "hello from hs2", timeout=30)
        alice.send_message(room_id, "hello from hs1")
        bob.wait_for_message(room_id, "hello from hs1", timeout=30)

        # ...which completes, after which the member list is whole.
        hs2.wait_for_log(
            rf"Resync of {re.escape(room_id)} complete", timeout=60, since=since
        )
        self.assertEqual(set(bob.joined_members(room_id)), {alice.user_id, bob.user_id})


@on_both_databases(ci_database="sqlite")
class JoinBigFakeRoom(FederationTestCase):
    def test_join_returns_before_full_member_list(self) -> None:
        peer = self.make_fake_peer()
        room = peer.create_room(members=1000, servers=20, name="Big fake room")
        resident = room["resident"]
        # Hold the resident's /state answers for a few seconds so the partial
        # phase is observable however fast the rest is.
        peer.add_behaviour(r"^/_matrix/federation/v1/state/", "delay", seconds=4)

        (hs2,) = self.make_homeservers(["hs2"])
        bob = self.register(hs2, "bob")
        since = hs2.log_offset()
        started = time.monotonic()
        self.assertEqual(bob.join(room["room_id"], via=[resident]), room["room_id"])
        join_seconds = time.monotonic() - started

        # Right after /join: lazy-loading /sync already shows the room, knowing
        # far fewer members than the room has, and the resync has not finished.
        resp = bob.sync(filter=bob.lazy_loading_filter(room["room_id"]))
        joined = resp["rooms"]["join"]
        self.assertIn(room["room_id"], joined)
        self.assertNotIn("complete in", hs2.read_log()[since:])
        self.assertLess(join_seconds, 30)

        # Afterwards the full member list arrives: 1000 fake members plus bob.
        hs2.wait_for_log(
            rf"Resync of {re.escape(room['room_id'])} complete",
            timeout=120,
            since=since,
        )
        members = bob.joined_members(room["room_id"])
        self.assertEqual(len(members), room["member_count"] + 1)
        self.assertIn(bob.user_id, members)


@on_both_databases(ci_database="postgres")
class UntestedSynapse(FederationTestCase):
    """On a Synapse outside the tested range the server still starts, with every
    patch off: Synapse behaves as stock, and the log, the status endpoint and the
    admin API say so. The installed Synapse is made "untested" with the gate's
    environment override, which only compat/patching.py reads."""

    def test_starts_with_patches_off_and_joins_as_stock(self) -> None:
        peer = self.make_fake_peer()
        room = peer.create_room(members=200, servers=5, name="Stock room")
        (hs2,) = self.make_homeservers(["hs2"], env={TESTED_RANGE_ENV: "1.0.0,1.1.0"})
        admin = self.register(hs2, "admin", admin=True)
        bob = self.register(hs2, "bob")

        # Loudly in the log...
        hs2.wait_for_log(
            r" - ERROR - .*Synapse .+ is outside the range this module was tested "
            r"with \(1\.0\.0 <= version < 1\.1\.0\)\. .*NONE is installed"
        )
        # ...in the status endpoint, to anyone and in full to an admin...
        r = requests.get(hs2.client_url + STATUS, timeout=30)
        minimal = r.json()
        self.assertEqual(r.status_code, 200, minimal)
        self.assertIs(minimal["patches_active"], False)
        self.assertIn("every patch is off", minimal["patches_reason"])
        full = full_status(admin)
        self.assertIs(full["patches_active"], False)
        self.assertEqual(full["patches"], [])
        self.assertEqual(
            (full["version_gate"]["tested"], full["version_gate"]["tested_range"]),
            (False, "1.0.0 <= version < 1.1.0"),
        )
        # ...and in the admin API, which has no engine to ask.
        status, body = admin.get(ADMIN)
        self.assertEqual(status, 200, body)
        self.assertEqual(body["rooms"], [])
        self.assertIs(body["patches_active"], False)
        self.assertIn("every patch is off", body["patches_reason"])

        # A partial join works, as stock: Synapse's own resync completes it.
        since = hs2.log_offset()
        self.assertEqual(
            bob.join(room["room_id"], via=[room["resident"]]), room["room_id"]
        )
        (send_join,) = peer.requests(path_regex=r"^/_matrix/federation/v2/send_join/")
        self.assertEqual(send_join["query"].get("omit_members"), ["true"])
        # Blocks until Synapse has the room's full state.
        members = bob.joined_members(room["room_id"])
        self.assertEqual(len(members), room["member_count"] + 1)
        status, body = admin.get(f"{ADMIN}/{quote(room['room_id'])}")
        self.assertEqual((status, body.get("errcode")), (404, "M_NOT_FOUND"))
        self.assertNotIn("Starting resync of", hs2.read_log()[since:])


@on_both_databases(ci_database="sqlite")
class ConfigErrors(FederationTestCase):
    def test_bad_module_option_stops_synapse_with_its_message(self) -> None:
        hs = self.make_homeserver(
            "bad", start=False, module_config={"resident": {"heroes": "yes"}}
        )
        with self.assertRaises(HomeserverStartError) as cm:
            hs.start(timeout=60)
        message = str(cm.exception)
        self.assertIn("'resident.heroes'", message)
        self.assertIn("'yes' (str)", message)
        self.assertIn("true or false", message)
        self.assertFalse(hs.is_running())
