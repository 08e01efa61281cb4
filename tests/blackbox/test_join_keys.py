"""The join itself: a module resident names, in its ``/make_join`` answer, the
servers whose signing keys its partial ``/send_join`` answer will need; a module
joiner fetches them while the resident builds that answer, and Synapse checks the
answer once they are stored, checking its events in bulk first. Real homeservers (``hs1`` the resident, ``hs2`` the
joiner) and a fake peer whose members (of two fake servers) are among the
room's MSC2775 essentials, and whose key server answers slowly (1.5 s), so that
a check that did not wait for the prefetch would be seen starting before it
ended.
"""

from __future__ import annotations

import re
from typing import Any

from tests.fedkit.homeserver import Homeserver
from tests.fedkit.process import read_from
from tests.fedkit.testcase import FederationTestCase, on_room_versions

SIGNING_SERVERS = "org.matrix.msc2775.signing_servers"
MEMBER = "m.room.member"
KEY_PATH = r"^/_matrix/key/v2/server"
PREFETCHED = r"Join of (\S+): prefetched signing keys of (\d+) server\(s\) named"
CHECKING = r"Processing from send_join (\d+) events"
STORED = r"Stored (\d+) outliers of (\S+) in bulk"
LEFT_OUT = (
    r"Join of (\S+): (\d+) member event\(s\) of the essentials left to the resync"
)
BULK = (
    r"Join of (\S+): (\d+) of the (\d+) events of the /send_join answer checked in bulk"
)


class _JoinCase(FederationTestCase):
    #: Whether the resident (hs1) runs the module.
    RESIDENT_MODULE = True

    def build(
        self, slow_keys: bool = True, essentials_key_wait_seconds: float = 0.25
    ) -> None:
        self.peer = self.make_fake_peer()
        self.hs1 = self.make_homeserver("hs1", with_module=self.RESIDENT_MODULE)
        self.hs2 = self.make_homeserver(
            "hs2",
            module_config={
                "resync": {"essentials_key_wait_seconds": essentials_key_wait_seconds}
            },
        )
        alice = self.register(self.hs1, "alice")
        create: dict[str, Any] = {"preset": "public_chat", "name": "Named"}
        if self.ROOM_VERSION:
            create["room_version"] = self.ROOM_VERSION
        self.room_id = alice.create_room(**create)
        self.invitee = "@henry:" + self.hs1.server_name
        self.register(self.hs1, "henry")
        alice.invite(self.room_id, self.invitee)
        # Two members of two fake servers: one made a power user, one banned.
        fake = []
        for _ in range(2):
            result = self.peer.join(
                self.room_id, self.hs1.server_name, omit_members=False
            )
            self.assertEqual(result["send_join"]["status"], 200, result)
            fake.append(result["join_event"]["state_key"])
        self.power_user, self.banned = fake
        power = alice.state_event(self.room_id, "m.room.power_levels")
        power["users"][self.power_user] = 50
        alice.send_state(self.room_id, "m.room.power_levels", "", power)
        alice.ban(self.room_id, self.banned)
        self.fake_servers = {u.split(":", 1)[1] for u in fake}
        self.alice = alice
        if slow_keys:
            # The fake servers' key server is slow from now on (hs1 has their
            # keys).
            self.peer.add_behaviour(KEY_PATH, "delay", seconds=1.5)

    def current_members(self, hs: Homeserver) -> dict[str, str]:
        rows = hs.sql(
            "SELECT state_key, membership FROM current_state_events "
            "WHERE room_id = ? AND type = ?",
            (self.room_id, MEMBER),
        )
        return {str(k): str(m) for k, m in rows}


@on_room_versions("10", "12", ci_rotate=True)
class ModuleResident(_JoinCase):
    def test_make_join_names_every_server_the_partial_answer_needs(self) -> None:
        """The hint names the server of every sender of an event of the partial
        answer (state and auth chain): nothing the joiner needs is left for its
        check to fetch."""
        self.build()
        result = self.peer.join(self.room_id, self.hs1.server_name)
        self.assertEqual(result["send_join"]["status"], 200, result)
        hint = result["make_join"]["body"][SIGNING_SERVERS]
        body = result["send_join"]["body"]
        senders = {p["sender"] for p in body["state"] + body["auth_chain"]}
        needed = {s.split(":", 1)[1] for s in senders}
        self.assertLessEqual(needed, set(hint))
        self.assertLessEqual(self.fake_servers | {self.hs1.server_name}, set(hint))

    def test_joiner_fetches_the_keys_ahead_and_gets_the_essentials(self) -> None:
        """hs2's /join: the keys of the servers hs1 named are fetched during the
        /send_join round trip and stored before Synapse checks the answer (its
        check starts after the prefetch ends, though the key server takes 1.5 s
        and hs1 answers sooner: hs2 waits up to 3 s for the essentials' keys,
        in place of the default 0.25 s); the answer's essentials (a fake power
        user, a ban, an invite) were stored by the join, as its partial state."""
        self.build(essentials_key_wait_seconds=3)
        bob = self.register(self.hs2, "bob")
        since = self.hs2.log_offset()
        bob.join(self.room_id, via=[self.hs1.server_name])
        # The essentials are in hs2's current state (partial, or complete if the
        # resync has ended), and were stored by the join itself: before bob's
        # join event, where the resync stores what it fetches after it.
        rows = self.hs2.sql(
            "SELECT c.state_key, c.membership, e.stream_ordering "
            "FROM current_state_events AS c INNER JOIN events AS e USING (event_id) "
            "WHERE c.room_id = ? AND c.type = ?",
            (self.room_id, MEMBER),
        )
        members = {str(k): (str(m), int(o)) for k, m, o in rows}
        joined_at = members[bob.user_id][1]
        for user, membership in (
            (self.power_user, "join"),
            (self.banned, "ban"),
            (self.invitee, "invite"),
        ):
            found, stored_at = members.get(user, ("missing", joined_at))
            self.assertEqual(found, membership, user)
            self.assertLess(stored_at, joined_at, f"{user} not in send_join")

        # Synapse writes its log in batches: wait for the lines, then read them.
        for line in (PREFETCHED, BULK, CHECKING):
            self.hs2.wait_for_log(line, since=since)
        log = read_from(self.hs2.log_path, since)
        prefetched = re.search(PREFETCHED, log)
        checking = re.search(CHECKING, log)
        assert prefetched is not None and checking is not None, log[-3000:]
        self.assertEqual(prefetched.group(1), self.room_id)
        # both fake servers, and hs1 itself
        self.assertGreaterEqual(int(prefetched.group(2)), 3)
        self.assertLess(prefetched.start(), checking.start(), "checked before")
        # Every event of the answer was checked in bulk (its keys stored by
        # then), before Synapse's own check, which skipped them.
        bulk = re.search(BULK, log)
        assert bulk is not None, log[-3000:]
        self.assertEqual(bulk.group(1), self.room_id)
        self.assertEqual(bulk.group(2), bulk.group(3))
        self.assertEqual(bulk.group(3), checking.group(1))
        self.assertLess(bulk.start(), checking.start())
        # And stored in one go by the bulk outlier writer, before the join.
        self.hs2.wait_for_log(STORED, since=since)
        log = read_from(self.hs2.log_path, since)
        stored = re.search(STORED, log)
        persisting = re.search(r"Peristing join-via-remote", log)
        assert stored is not None and persisting is not None, log[-3000:]
        self.assertEqual(stored.group(2), self.room_id)
        self.assertEqual(int(stored.group(1)), int(checking.group(1)))
        self.assertLess(stored.start(), persisting.start())

    def test_an_essential_whose_keys_are_late_is_left_to_the_resync(self) -> None:
        """A third fake server's member is made a power user (an essential
        nothing in the answer needs), and that server's key server answers
        only after 4 s: hs2's join does not wait for it (it waits 1 s at most
        for the essentials' keys: its check starts before the prefetch ends),
        goes without that member, and keeps the other essentials (the ban and
        the invite, signed by hs1, the banned user's join by a server whose
        keys come at once); the resync then brings the member."""
        self.build(slow_keys=False, essentials_key_wait_seconds=1)
        extra = self.peer.join(self.room_id, self.hs1.server_name, omit_members=False)
        self.assertEqual(extra["send_join"]["status"], 200, extra)
        late_user = extra["join_event"]["state_key"]
        late_server = late_user.split(":", 1)[1]
        self.assertNotIn(late_server, self.fake_servers)
        power = self.alice.state_event(self.room_id, "m.room.power_levels")
        power["users"][late_user] = 50
        self.alice.send_state(self.room_id, "m.room.power_levels", "", power)
        self.peer.add_behaviour(KEY_PATH, "delay", server=late_server, seconds=4)
        bob = self.register(self.hs2, "bob")
        since = self.hs2.log_offset()
        bob.join(self.room_id, via=[self.hs1.server_name])
        members = self.current_members(self.hs2)
        self.assertEqual(members.get(bob.user_id), "join")
        self.assertEqual(members.get(self.banned), "ban")
        self.assertEqual(members.get(self.invitee), "invite")
        # Not stored by the join (the resync may have stored it since: then
        # after bob's join event).
        rows = self.hs2.sql(
            "SELECT e.stream_ordering FROM current_state_events AS c "
            "INNER JOIN events AS e USING (event_id) "
            "WHERE c.room_id = ? AND c.type = ? AND c.state_key IN (?, ?)",
            (self.room_id, MEMBER, late_user, bob.user_id),
        )
        self.assertIn(len(rows), (1, 2), rows)
        if len(rows) == 2:
            order = {
                str(k): int(o)
                for k, o in self.hs2.sql(
                    "SELECT c.state_key, e.stream_ordering "
                    "FROM current_state_events AS c "
                    "INNER JOIN events AS e USING (event_id) "
                    "WHERE c.room_id = ? AND c.state_key IN (?, ?)",
                    (self.room_id, late_user, bob.user_id),
                )
            }
            self.assertGreater(order[late_user], order[bob.user_id])
        self.hs2.wait_for_log(LEFT_OUT, since=since)
        self.hs2.wait_for_log(PREFETCHED, since=since)
        log = read_from(self.hs2.log_path, since)
        left_out = re.search(LEFT_OUT, log)
        prefetched = re.search(PREFETCHED, log)
        checking = re.search(CHECKING, log)
        assert left_out and prefetched and checking, log[-3000:]
        self.assertEqual((left_out.group(1), left_out.group(2)), (self.room_id, "1"))
        self.assertLess(checking.start(), prefetched.start(), "waited for the keys")
        # The resync brings it.
        self.hs2.wait_for_log(
            rf"Resync of {re.escape(self.room_id)} complete", since=since, timeout=120
        )
        self.assertEqual(self.current_members(self.hs2).get(late_user), "join")


@on_room_versions("10", ci_rotate=True)
class StockResident(_JoinCase):
    RESIDENT_MODULE = False

    def test_join_via_a_stock_resident_works_without_a_hint(self) -> None:
        """A stock resident's /make_join answer has no hint; the module joiner
        joins as stock does, fetching keys during its check."""
        self.build()
        result = self.peer.join(self.room_id, self.hs1.server_name)
        self.assertNotIn(SIGNING_SERVERS, result["make_join"]["body"])
        bob = self.register(self.hs2, "bob")
        since = self.hs2.log_offset()
        bob.join(self.room_id, via=[self.hs1.server_name])
        self.alice.send_message(self.room_id, "hello")
        self.assertEqual(self.current_members(self.hs2).get(bob.user_id), "join")
        self.hs2.wait_for_log(CHECKING, since=since)
        self.hs2.wait_for_log(BULK, since=since)
        log = read_from(self.hs2.log_path, since)
        self.assertRegex(log, CHECKING)
        self.assertNotRegex(log, PREFETCHED)
        # Without a hint, the answer is still checked in bulk (keys Synapse
        # does not hold yet are left to its own check).
        self.assertRegex(log, BULK)
