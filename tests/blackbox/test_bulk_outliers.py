"""The bulk outlier writer (``compat/bulk/outliers.py``) against Synapse's own path.

Two real joiners resync the same fake room: ``hs2`` with ``resync.bulk_writer:
false`` (Synapse's ``_auth_and_persist_outliers``), ``hs3`` with the bulk writer.
Every table Synapse's event persistence writes holds the same rows for the
room's events on both (``tests/fedkit/rowdump.py``: stream orderings, instance
names, reception times and chain IDs aside), and Synapse reads the result the
same: ``/joined_members``, ``/state``, ``/messages``, ``/sync`` and, as a
resident, federation ``/state_ids``.

The room (versions 10, 11, 12) has bans, kicks, invites, a knock, a moderator,
a third-party invite, and an event that fails auth on the joiner: a banned
user's join (the resident logs it without applying it), cited as the auth event
of that user's leave, which is in the state (Synapse stores the join as
rejected, and accepts the leave: the two are authed in the same batch).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from synapse_partial_state.compat.bulk.gate import BULK_OFF_CONFIG
from tests.blackbox.endpoints import full_status
from tests.blackbox.resync_case import FAST, ResyncCase, wait_until
from tests.fedkit.homeserver import Homeserver
from tests.fedkit.matrix_client import Client
from tests.fedkit.rowdump import ALL_TABLES, diff_dumps, dump_event_rows
from tests.fedkit.testcase import (
    FederationTestCase,
    on_both_databases,
    on_room_versions,
)

BULK_OFF: dict[str, Any] = {
    **FAST,
    "module_config": {
        "resync": {
            "initial_backoff_seconds": 0.5,
            "max_backoff_seconds": 2,
            "bulk_writer": False,
        }
    },
}
BULK_ON: dict[str, Any] = dict(FAST)
BULK_LOG = r"outliers of .* in bulk: auth"
#: A chunk of the resync's (the join's answer is stored in bulk too: a few).
RESYNC_CHUNK_LOG = r"Stored \d{4,} outliers of .* in bulk: auth"


@on_room_versions("10", "11", "12")
class BulkOutliersMatchSynapse(ResyncCase):
    MEMBERS = 60
    SERVERS = 3

    def build_room(self) -> None:
        #: the joiners' server names (their users and events are not compared)
        self.joiners: list[str] = []
        self.peer = self.make_fake_peer()
        self.room = self.peer.create_room(
            members=self.MEMBERS,
            servers=self.SERVERS,
            name="Bulk room",
            topic="rows",
            alias=True,
            acl=True,
            bans=2,
            kicks=2,
            invites=2,
            knocks=1,
            power_users=1,
            join_rule="public",
            room_version=self.ROOM_VERSION or "10",
        )
        self.room_id = self.room["room_id"]
        self.resident = self.room["resident"]
        events = self.peer_events()
        by_key = {(e["type"], e.get("state_key")): e for e in events}
        creator = by_key[("m.room.create", "")]["sender"]
        self.peer.send_event(
            self.room_id,
            "m.room.third_party_invite",
            {
                "display_name": "t...@example.org",
                "key_validity_url": "https://id.example.org/isvalid",
                "public_key": "2Jxz3SMYGjFd0t5V0LPlyjW1gtvfvhfXiSx8hsXhbS0",
            },
            sender=creator,
            state_key="tpi-token",
        )
        # banned0 joins again: invalid (banned), logged but not applied by the
        # resident; then leaves, citing that join as its membership.
        banned = next(
            k[1]
            for k, e in by_key.items()
            if k[0] == "m.room.member" and e["content"].get("membership") == "ban"
        )
        bad = self.peer.send_event(
            self.room_id,
            "m.room.member",
            {"membership": "join"},
            sender=banned,
            state_key=banned,
            apply_state=False,
        )
        self.rejected_id = bad["event_id"]
        pl = by_key[("m.room.power_levels", "")]["event_id"]
        auth = [pl, self.rejected_id]
        if not self.room_version_has_hashed_ids():
            auth.insert(0, by_key[("m.room.create", "")]["event_id"])
        leave = self.peer.send_event(
            self.room_id,
            "m.room.member",
            {"membership": "leave"},
            sender=banned,
            state_key=banned,
            auth_events=auth,
        )
        self.leave_id = leave["event_id"]
        #: the events compared: the room's state and auth chain at the joins
        self.peer_ids = {e["event_id"] for e in self.peer_events()}
        # hs2's join's prev event (the leave is then part of the state); not
        # compared: hs3's join comes after hs2's, whose prev event it is.
        self.peer.send_event(
            self.room_id,
            "m.room.message",
            {"msgtype": "m.text", "body": "hi"},
            sender=creator,
        )

    def room_version_has_hashed_ids(self) -> bool:
        from synapse.api.room_versions import KNOWN_ROOM_VERSIONS

        version = KNOWN_ROOM_VERSIONS[self.ROOM_VERSION or "10"]
        return bool(version.msc4291_room_ids_as_hashes)

    def peer_events(self) -> list[dict[str, Any]]:
        return self.peer.room_events(self.room_id, limit=100000)["events"]

    def joiner(self, name: str, **kw: Any) -> tuple[Homeserver, Client]:
        hs = self.make_homeserver(name, **kw)
        self.joiners.append(hs.server_name)
        bob = self.register(hs, "bob")
        since = hs.log_offset()
        bob.join(self.room_id, via=[self.resident])
        hs.wait_for_log(
            rf"Resync of {re.escape(self.room_id)} complete", timeout=120, since=since
        )
        return hs, bob

    def test_same_rows_and_same_answers(self) -> None:
        self.build_room()
        # One joiner at a time, each joining the same room state and reading
        # it alone (otherwise the second backfills from the first, which holds
        # only outliers, and its /messages and /sync windows differ).
        stock, stock_bob = self.joiner("hs2", **BULK_OFF)
        stock_rows = dump_event_rows(stock, self.peer_ids)
        stock_answers = self.answers(stock, stock_bob)
        self.leave(stock_bob)
        bulk, bulk_bob = self.joiner("hs3", **BULK_ON)
        bulk_rows = dump_event_rows(bulk, self.peer_ids)
        bulk_answers = self.answers(bulk, bulk_bob)
        self.assertRegex(bulk.read_log(), BULK_LOG)
        self.assertNotRegex(stock.read_log(), BULK_LOG)
        # On PostgreSQL the per-event tables' rows went with COPY
        # (compat/bulk/copy.py); on SQLite through Synapse's inserts.
        copied = sum(
            int(n) for n in re.findall(r"\((\d+) rows copied\)", bulk.read_log())
        )
        if bulk.db == "postgres":
            self.assertGreater(copied, len(self.peer_ids))
        else:
            self.assertEqual(copied, 0)
        # The status endpoint says which path stores, and why not the bulk one.
        self.assertEqual(
            full_status(self.register(stock, "admin", admin=True))["bulk_writers"],
            {"allowed": False, "reason": BULK_OFF_CONFIG},
        )
        self.assertEqual(
            full_status(self.register(bulk, "admin", admin=True))["bulk_writers"],
            {"allowed": True, "reason": None},
        )

        self.maxDiff = None
        self.assertEqual(diff_dumps(stock_rows, bulk_rows), {})
        self.assertEqual(set(stock_rows), set(ALL_TABLES))
        # The comparison compared something: the room's events and their rows.
        self.assertEqual(len(stock_rows["events"]), len(self.peer_ids))
        self.assertEqual(
            {r[0] for r in stock_rows["rejections"]},
            {self.rejected_id},
            stock_rows["rejections"],
        )
        self.assertIn(self.leave_id, {r[0] for r in stock_rows["room_memberships"]})
        self.assertTrue(stock_rows["event_auth_chain_links"])
        self.assertTrue(stock_rows["event_search"])

        # Synapse reads both the same way.
        for what in stock_answers:
            self.assertEqual(stock_answers[what], bulk_answers[what], what)
        self.assertEqual(stock_answers["state"][self.banned_key()], self.leave_id)
        self.assertGreater(len(stock_answers["messages"]), self.MEMBERS)

    def leave(self, bob: Client) -> None:
        """bob leaves, and the resident has his leave (so the next joiner's
        join comes after it)."""
        bob.leave(self.room_id)
        wait_until(
            lambda: any(
                e.get("state_key") == bob.user_id
                and e["content"].get("membership") == "leave"
                for e in self.peer_events()
            ),
            30,
            "the leave at the resident",
        )

    def banned_key(self) -> tuple[str, str]:
        return ("m.room.member", self.room_banned_user())

    def room_banned_user(self) -> str:
        return next(
            e["state_key"] for e in self.peer_events() if e["event_id"] == self.leave_id
        )

    def answers(self, hs: Homeserver, bob: Client) -> dict[str, Any]:
        """What clients and a federation peer get, without the joiner's own
        users and events."""

        def foreign(user_or_key: str | None) -> bool:
            return not any(
                (user_or_key or "").endswith(":" + name) for name in self.joiners
            )

        members = bob.joined_members(self.room_id, timeout=60)
        state = {
            (e["type"], e["state_key"]): e["event_id"]
            for e in bob.room_state(self.room_id)
            if foreign(e["state_key"])
        }
        # Every page back to the room's creation (backfilling as needed).
        messages: list[str] = []
        token = None
        for _ in range(50):
            page = bob.messages(self.room_id, limit=100, from_token=token)
            messages += [
                e["event_id"] for e in page["chunk"] if e["event_id"] in self.peer_ids
            ]
            token = page.get("end")
            if not page["chunk"] or token is None:
                break
        # The state /sync gives (its state section, then the timeline's state
        # events), but for the user whose leave cites the rejected join: for
        # that member /sync answers the ban or the leave from one run to the
        # next, with Synapse's own path as with the bulk writer (seen: stock
        # ban and bulk leave, stock leave and bulk ban, both leave); /state
        # answers the leave on both (compared above).
        room = bob.sync(full_state=True)["rooms"]["join"][self.room_id]
        synced: dict[tuple[str, str], str] = {}
        for e in room["state"]["events"] + room["timeline"]["events"]:
            if "state_key" in e and foreign(e["state_key"]):
                synced[(e["type"], e["state_key"])] = e["event_id"]
        synced.pop(self.banned_key(), None)
        join_id = next(
            e["event_id"]
            for e in bob.room_state(self.room_id)
            if e["type"] == "m.room.member" and e["state_key"] == bob.user_id
        )
        served = self.peer.federation_request(
            self.resident,
            hs.server_name,
            "GET",
            f"/_matrix/federation/v1/state_ids/{quote(self.room_id)}"
            f"?event_id={quote(join_id)}",
        )
        self.assertEqual(served["status"], 200, served)
        return {
            "members": {("m.room.member", u) for u in members if foreign(u)},
            "state": state,
            "messages": messages,
            "sync": synced,
            "served state_ids": sorted(
                i for i in served["body"]["pdu_ids"] if i in self.peer_ids
            ),
            "served auth chain": sorted(
                i for i in served["body"]["auth_chain_ids"] if i in self.peer_ids
            ),
        }


@on_both_databases
class BulkWriteSurvivesACrash(FederationTestCase):
    """hs3, with the bulk writer, is SIGKILLed as soon as its first bulk chunk
    is stored (the next being authed or written), then restarted: it resumes
    and ends with the rows of hs2, which stored the same room uninterrupted
    through Synapse's own path (batches of 500 there, 2,000 here)."""

    MEMBERS = 5000
    SERVERS = 20

    def test_killed_during_the_bulk_write(self) -> None:
        peer = self.make_fake_peer()
        room = peer.create_room(
            members=self.MEMBERS, servers=self.SERVERS, bans=3, kicks=3, invites=3
        )
        room_id, resident = room["room_id"], room["resident"]
        peer_ids = {
            e["event_id"] for e in peer.room_events(room_id, limit=100000)["events"]
        }
        complete = rf"Resync of {re.escape(room_id)} complete"

        stock = self.make_homeserver("hs2", **BULK_OFF)
        stock_bob = self.register(stock, "bob")
        stock_bob.join(room_id, via=[resident])
        stock.wait_for_log(complete, timeout=300)
        stock_rows = dump_event_rows(stock, peer_ids)
        stock_bob.leave(room_id)

        bulk = self.make_homeserver("hs3", **BULK_ON)
        bob = self.register(bulk, "bob")
        bob.join(room_id, via=[resident])
        bulk.wait_for_log(RESYNC_CHUNK_LOG, timeout=300)
        bulk.kill()
        stored_before = bulk.sql(
            "SELECT COUNT(*) FROM events WHERE room_id = ?", (room_id,)
        )
        bulk.start()
        bulk.wait_for_log(complete, timeout=300)
        log = bulk.read_log()
        self.assertIn(f"Resuming resync of {room_id}", log)
        # It was killed mid-store: part of the state, not all of it, was stored.
        self.assertLess(stored_before[0][0], len(peer_ids))
        self.assertGreater(stored_before[0][0], 1000)

        self.maxDiff = None
        self.assertEqual(diff_dumps(stock_rows, dump_event_rows(bulk, peer_ids)), {})
        self.assertEqual(len(stock_rows["events"]), len(peer_ids))
        members = bob.joined_members(room_id, timeout=60)
        self.assertEqual(len(members), room["member_count"] + 1)
