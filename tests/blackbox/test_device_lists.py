"""Device lists during a resync (issue #16), with a real joiner (``hs2``) and the
fake peer as the room's resident and other servers.

The fake servers record every transaction they receive, so each test counts the
``m.device_list_update`` EDUs each server got for bob's device. The resync is
held (the resident's ``/state`` and ``/state_ids`` wait) while the room is
partial, and let go to complete it.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

from tests.blackbox.endpoints import ADMIN
from tests.blackbox.resync_case import FAST, STATE_PATHS, wait_until
from tests.fedkit.homeserver import Homeserver
from tests.fedkit.matrix_client import Client
from tests.fedkit.testcase import FederationTestCase, on_both_databases

DEVICE_LIST_UPDATE = "m.device_list_update"


class DeviceListCase(FederationTestCase):
    """A fake room: the resident ``R`` with the creator and two members, and one
    member on each of the fake servers ``extra`` names (created here); ``hs2``
    with bob, who joins it."""

    EXTRA_SERVERS: tuple[str, ...] = ("a", "b", "c", "d")

    def setup_room(self, hidden: tuple[str, ...] = ()) -> None:
        self.peer = self.make_fake_peer()
        self.room = self.peer.create_room(
            members=2, servers=1, name="Device lists", room_version="10"
        )
        self.room_id: str = self.room["room_id"]
        self.resident: str = self.room["resident"]
        names = self.peer.create_servers(len(self.EXTRA_SERVERS))
        self.server = dict(zip(self.EXTRA_SERVERS, names, strict=True))
        #: the one member of each extra server
        self.member: dict[str, str] = {}
        for key, name in self.server.items():
            joined = self.peer.join_users(
                self.room_id, 1, servers=[name], destinations=[]
            )
            self.member[key] = joined["user_ids"][0]
        if hidden:
            self.peer.hide_servers(self.room_id, [self.server[k] for k in hidden])
        fast: dict[str, Any] = dict(FAST)
        self.hs2: Homeserver = self.make_homeserver("hs2", **fast)
        self.admin: Client = self.register(self.hs2, "admin", admin=True)
        self.bob: Client = self.register(self.hs2, "bob")
        status, body = self.bob.get("/_matrix/client/v3/account/whoami")
        self.assertEqual(status, 200, body)
        self.device_id: str = body["device_id"]

    # -- the resync ----------------------------------------------------------

    def join_and_hold(self) -> str:
        """bob joins; the resync waits for the resident until :meth:`release`."""
        rule = self.peer.add_behaviour(STATE_PATHS, "hold")
        self.bob.join(self.room_id, via=[self.resident])
        self.assertTrue(self.is_partial())
        return rule

    def release(self, rule: str) -> None:
        since = self.hs2.log_offset()
        self.peer.remove_behaviour(rule)
        self.hs2.wait_for_log(
            rf"Resync of {re.escape(self.room_id)} complete", timeout=120, since=since
        )
        self.assertFalse(self.is_partial())

    def is_partial(self) -> bool:
        rows = self.hs2.sql(
            "SELECT 1 FROM partial_state_rooms WHERE room_id = ?", (self.room_id,)
        )
        return bool(rows)

    def has_event(self, event_id: str) -> bool:
        return bool(
            self.hs2.sql("SELECT 1 FROM events WHERE event_id = ?", (event_id,))
        )

    def leave_on_peer(self, key: str) -> None:
        """The member of server ``key`` leaves; hs2 has it once this returns."""
        self.membership_at_hs2(self.member[key], "leave")

    def membership_at_hs2(
        self, user: str, membership: str, sender: str | None = None
    ) -> str:
        """``sender`` (default ``user``) sends ``user``'s ``membership`` through
        the fake peer; returns its event id once hs2 has it."""
        event_id: str = self.peer.send_event(
            self.room_id,
            "m.room.member",
            {"membership": membership},
            sender=sender or user,
            state_key=user,
        )["event_id"]
        wait_until(
            lambda: self.has_event(event_id), 30, f"{user}'s {membership} at hs2"
        )
        return event_id

    def join_other_room(self, key: str, localpart: str | None = None) -> str:
        """A user of server ``key`` joins a public room bob creates on hs2."""
        other = self.bob.create_room(preset="public_chat", name="Other room")
        result = self.peer.join(
            other,
            self.hs2.server_name,
            server=self.server[key],
            user_localpart=localpart or f"other{key}",
            omit_members=False,
        )
        self.assertEqual(result["send_join"]["status"], 200, result)
        wait_until(
            lambda: self.has_event(result["event_id"]), 30, "the other join at hs2"
        )
        return other

    # -- bob's device --------------------------------------------------------

    def rename_device(self, name: str) -> None:
        status, body = self.bob.put(
            f"/_matrix/client/v3/devices/{quote(self.device_id)}",
            {"display_name": name},
        )
        self.assertEqual(status, 200, body)

    def updates(self, server: str) -> list[dict[str, Any]]:
        """The device-list updates of bob's device ``server`` received."""
        return [
            edu
            for edu in self.peer.edus(server, DEVICE_LIST_UPDATE)
            if edu.get("user_id") == self.bob.user_id
            and edu.get("device_id") == self.device_id
        ]

    def wait_updates(self, servers: list[str], count: int) -> None:
        for server in servers:
            wait_until(
                lambda s=server: len(self.updates(s)) >= count,  # type: ignore[misc]
                60,
                f"{count} device-list update(s) at {server}",
            )

    def assert_updates(self, expected: dict[str, int]) -> None:
        got = {server: len(self.updates(server)) for server in expected}
        self.assertEqual(got, expected)
        for server in expected:
            ids = [edu["stream_id"] for edu in self.updates(server)]
            self.assertEqual(len(ids), len(set(ids)), f"{server} got a duplicate")

    def queued(self) -> int:
        """Local changes queued, in the table and in the admin API."""
        count = int(self.hs2.sql("SELECT COUNT(*) FROM sps_device_outbound")[0][0])
        status, body = self.admin.get(f"{ADMIN}/{quote(self.room_id)}")
        if status == 200:
            self.assertEqual(body["device_lists"]["outgoing_queued"], count)
        return count

    def admin_incoming(self) -> int:
        status, body = self.admin.get(ADMIN)
        self.assertEqual(status, 200, body)
        return int(body["incoming_device_list_updates_queued"])


@on_both_databases(ci_database="postgres")
class OutgoingDeviceListTests(DeviceListCase):
    def test_replay_reaches_missed_servers_once(self) -> None:
        """Complement's outgoing group in one room: the resident, ``a`` and ``b``
        are named at the join, ``c`` and ``d`` are not (absent from the partial
        state); ``b`` leaves during the resync; ``d``'s user joins another room
        shared with bob and leaves this one. A change made while partial reaches
        the named servers at once, and once the resync completes the absent
        ones, even ``d`` which left meanwhile; nobody gets it twice. After
        completion, ``b`` (departed) gets no more updates."""
        self.setup_room(hidden=("c", "d"))
        r, a, b, c, d = (self.resident, *(self.server[k] for k in "abcd"))
        rule = self.join_and_hold()
        self.leave_on_peer("b")

        self.rename_device("during the resync")
        self.wait_updates([r, a, b], 1)
        self.assert_updates({r: 1, a: 1, b: 1, c: 0, d: 0})
        self.assertEqual(self.queued(), 1)

        self.join_other_room("d")
        self.leave_on_peer("d")
        self.assert_updates({r: 1, a: 1, b: 1, c: 0, d: 0})

        self.release(rule)
        self.wait_updates([c, d], 1)
        self.assert_updates({r: 1, a: 1, b: 1, c: 1, d: 1})
        self.assertEqual(self.queued(), 0)

        self.rename_device("after the resync")
        self.wait_updates([r, a, c, d], 2)
        self.assert_updates({r: 2, a: 2, b: 1, c: 2, d: 2})

    def test_newly_joined_server_gets_updates_once(self) -> None:
        """Complement's "device list updates reach newly joined servers in
        partial state rooms": a server whose user joins during the resync gets a
        change made while the room is partial at once, not again at the replay,
        and the changes made after completion."""
        self.setup_room()
        rule = self.join_and_hold()
        (e,) = self.peer.create_servers(1)
        joined = self.peer.join_users(self.room_id, 1, servers=[e])
        wait_until(
            lambda: self.has_event(joined["event_ids"][0]), 30, "e's join at hs2"
        )

        self.rename_device("during the resync")
        self.wait_updates([e], 1)
        self.release(rule)
        self.assertEqual(self.queued(), 0)
        self.assert_updates({self.resident: 1, e: 1})

        self.rename_device("after the resync")
        self.wait_updates([e], 2)
        self.assert_updates({self.resident: 2, e: 2})

    def test_restart_between_queueing_and_replay(self) -> None:
        """The queue survives a restart: replayed once after it, no duplicates."""
        self.setup_room(hidden=("c",))
        r, a, c = self.resident, self.server["a"], self.server["c"]
        rule = self.join_and_hold()
        self.rename_device("before the restart")
        self.wait_updates([r, a], 1)
        self.assertEqual(self.queued(), 1)

        self.hs2.restart()
        self.assertTrue(self.is_partial())
        self.assertEqual(self.queued(), 1)
        self.assert_updates({r: 1, a: 1, c: 0})

        self.release(rule)
        self.wait_updates([c], 1)
        self.assertEqual(self.queued(), 0)
        self.rename_device("after the resync")
        self.wait_updates([r, a, c], 2)
        self.assert_updates({r: 2, a: 2, c: 2})

    def test_leaving_before_completion_sends_to_other_rooms(self) -> None:
        """synapse#13894: bob changes his device while the room is partial;
        ``c``, absent from the partial state, misses it; ``c``'s user joins
        another room shared with bob; bob leaves before the resync completes.
        The room is given up, and ``c`` gets the change it missed (once); the
        queue is dropped. Rejoining later replays nothing twice."""
        self.setup_room(hidden=("c",))
        r, c = self.resident, self.server["c"]
        rule = self.join_and_hold()
        self.rename_device("during the resync")
        self.wait_updates([r], 1)
        self.join_other_room("c")
        self.assert_updates({c: 0})

        since = self.hs2.log_offset()
        self.bob.leave(self.room_id)
        self.hs2.wait_for_log(
            rf"Resync of {re.escape(self.room_id)} aborted", timeout=60, since=since
        )
        self.wait_updates([c], 1)
        self.assertEqual(self.queued(), 0)
        self.peer.remove_behaviour(rule)
        self.rename_device("after leaving")
        self.wait_updates([c], 2)
        self.assert_updates({c: 2})

        # A rejoin starts afresh: nothing of the first join is replayed again.
        since = self.hs2.log_offset()
        self.bob.join(self.room_id, via=[self.resident])
        self.hs2.wait_for_log(
            rf"Resync of {re.escape(self.room_id)} complete", timeout=120, since=since
        )
        self.assertEqual(self.queued(), 0)
        self.rename_device("after rejoining")
        self.wait_updates([r], 2)
        self.wait_updates([c], 3)
        self.assert_updates({r: 2, c: 3})


def device_list_edu(user_id: str, device_id: str, stream_id: int) -> dict[str, Any]:
    return {
        "edu_type": DEVICE_LIST_UPDATE,
        "content": {
            "user_id": user_id,
            "device_id": device_id,
            "stream_id": stream_id,
            "prev_id": [stream_id - 1],
            "deleted": False,
            "device_display_name": "a device",
        },
    }


def signing_key_edu(user_id: str) -> dict[str, Any]:
    key = "l8Hft5qXKn1vfHrg3p4+W8gELQVo8N13JkluMfmn2sQ"  # any 32 bytes, unpadded
    return {
        "edu_type": "m.signing_key_update",
        "content": {
            "user_id": user_id,
            "master_key": {
                "user_id": user_id,
                "usage": ["master"],
                "keys": {f"ed25519:{key}": key},
            },
        },
    }


@on_both_databases(ci_database="sqlite")
class IncomingDeviceListTests(DeviceListCase):
    EXTRA_SERVERS = ("a", "b")

    def inbound(self) -> int:
        return int(self.hs2.sql("SELECT COUNT(*) FROM sps_device_inbound")[0][0])

    def tracked(self, user_id: str) -> bool:
        rows = self.hs2.sql(
            "SELECT 1 FROM device_lists_remote_extremeties WHERE user_id = ?",
            (user_id,),
        )
        return bool(rows)

    def device_requests(self, server: str) -> int:
        """Requests for users' devices or keys ``server`` got from hs2."""
        return len(self.peer.requests(server=server, path_regex=r"/user/"))

    def test_updates_of_unknown_members_applied_at_completion(self) -> None:
        """``a``'s member is in the room, but not in the partial state: its
        device-list and signing-key updates received during the resync are
        kept and applied once the full state shows it in the room (bob is told
        in /keys/changes, Synapse refetches its devices, its master key is
        stored). An update for a user in no shared room is dropped and that
        user is not tracked."""
        self.setup_room()
        a = self.server["a"]
        member, ghost = self.member["a"], f"@ghost:{a}"
        rule = self.join_and_hold()
        since = self.bob.sync(timeout_ms=0)["next_batch"]
        self.peer.send_edus(
            a,
            self.hs2.server_name,
            [
                device_list_edu(member, "ADEV", 5),
                signing_key_edu(member),
                device_list_edu(ghost, "GDEV", 7),
            ],
        )
        wait_until(lambda: self.inbound() == 3, 30, "3 queued EDUs")
        self.assertEqual(self.admin_incoming(), 3)
        self.assertEqual(self.device_requests(a), 0)

        self.release(rule)
        self.assertEqual(self.inbound(), 0)
        self.assertEqual(self.admin_incoming(), 0)
        wait_until(
            lambda: self.hs2.sql(
                "SELECT 1 FROM e2e_cross_signing_keys WHERE user_id = ?", (member,)
            ),
            30,
            "the member's master key",
        )
        wait_until(lambda: self.tracked(member), 30, "the member's devices refetched")
        until = self.bob.sync(timeout_ms=0)["next_batch"]
        status, body = self.bob.get(
            "/_matrix/client/v3/keys/changes", params={"from": since, "to": until}
        )
        self.assertEqual(status, 200, body)
        self.assertIn(member, body["changed"])
        self.assertNotIn(ghost, body["changed"])
        self.assertFalse(self.tracked(ghost))
        self.assertFalse(
            self.hs2.sql(
                "SELECT 1 FROM device_lists_remote_cache WHERE user_id = ?", (ghost,)
            )
        )

    def test_leaving_stops_tracking(self) -> None:
        """Complement's skipped "device list no longer tracked when leaving
        partial state room": elsie joins during the resync, bob queries her keys
        (her device list is now tracked); bob leaves before the resync completes;
        the room is given up and elsie's device list is no longer tracked (bob's
        next query asks her server), and bob's /sync and /keys/changes list her
        in ``left`` once (Synapse reads that from the room's members, which the
        purge deleted)."""
        self.setup_room()
        a = self.server["a"]
        rule = self.join_and_hold()
        elsie = f"@elsie:{a}"
        self.membership_at_hs2(elsie, "join")
        self.query_keys(elsie)
        wait_until(lambda: self.tracked(elsie), 30, "elsie's devices tracked")
        token = self.bob.sync(timeout_ms=0)["next_batch"]

        since = self.hs2.log_offset()
        self.bob.leave(self.room_id)
        self.hs2.wait_for_log(
            rf"Resync of {re.escape(self.room_id)} aborted", timeout=60, since=since
        )
        self.peer.remove_behaviour(rule)
        wait_until(lambda: not self.tracked(elsie), 30, "elsie no longer tracked")
        body = self.bob.sync(since=token, timeout_ms=0)
        self.assertIn(elsie, body.get("device_lists", {}).get("left", []))
        status, changes = self.bob.get(
            "/_matrix/client/v3/keys/changes",
            params={"from": token, "to": body["next_batch"]},
        )
        self.assertEqual(status, 200, changes)
        self.assertIn(elsie, changes["left"])
        again = self.bob.sync(since=body["next_batch"], timeout_ms=0)
        self.assertNotIn(elsie, again.get("device_lists", {}).get("left", []))
        before = self.device_requests(a)
        self.query_keys(elsie)
        after = self.device_requests(a)
        self.assertGreater(after, before)

    def query_keys(self, user_id: str) -> dict[str, Any]:
        status, body = self.bob.post(
            "/_matrix/client/v3/keys/query", {"device_keys": {user_id: []}}
        )
        self.assertEqual(status, 200, body)
        return body


@on_both_databases(ci_database="postgres")
class WronglyBelievedMemberTests(DeviceListCase):
    """synapse#13887 (one of the two cases Complement skips): elsie is banned,
    but her join sent during the resync cites no ban, so the partial state
    accepts it; bob caches her device list; she joins another room shared with
    bob (so stays tracked). Once the full state shows the join was not allowed,
    the updates she made meanwhile never reached hs2 (her server knew she was
    not in the room): her cached device list is refetched."""

    EXTRA_SERVERS = ("a",)

    def test_cached_device_list_refetched(self) -> None:
        self.setup_room()
        a = self.server["a"]
        elsie = f"@elsie:{a}"
        self.peer.send_event(
            self.room_id,
            "m.room.member",
            {"membership": "ban"},
            state_key=elsie,
            destinations=[],
        )
        rule = self.join_and_hold()
        events = self.peer.room_events(self.room_id, limit=1000)["events"]
        auth = [
            e["event_id"]
            for e in events
            if (e["type"], e.get("state_key"))
            in {
                ("m.room.create", ""),
                ("m.room.join_rules", ""),
                ("m.room.power_levels", ""),
            }
        ]
        bogus = self.peer.send_event(
            self.room_id,
            "m.room.member",
            {"membership": "join"},
            sender=elsie,
            state_key=elsie,
            auth_events=auth,
            apply_state=False,
        )["event_id"]
        wait_until(lambda: self.has_event(bogus), 30, "the bogus join at hs2")
        self.assertFalse(self.rejected(bogus))

        status, body = self.bob.post(
            "/_matrix/client/v3/keys/query", {"device_keys": {elsie: []}}
        )
        self.assertEqual(status, 200, body)
        wait_until(lambda: self.tracked(elsie), 30, "elsie's devices tracked")
        self.join_other_room("a", localpart="elsie")
        fetched = self.fetches(a, elsie)
        self.assertGreater(fetched, 0)

        self.release(rule)
        self.assertTrue(self.rejected(bogus))
        self.assertTrue(self.tracked(elsie))  # she shares the other room
        wait_until(
            lambda: self.fetches(a, elsie) > fetched, 60, "elsie's devices refetched"
        )

    def test_rejoin_before_completion(self) -> None:
        """Complement's other skipped #13887 case, as it sets it up: fred (an
        admin) left before hs2 joined; elsie joins; bob caches her device list;
        fred "bans" derek citing his old join, which the partial state accepts;
        derek kicks elsie, which hs2 then rejects (it believes derek banned):
        elsie stays "joined" at hs2, her server stops sending her updates; she
        rejoins before completion. The full state accepts the kick and the
        rejoin: hs2's cached device list of elsie may be stale, and is
        refetched."""
        self.setup_room()
        a = self.server["a"]
        derek, fred, elsie = (f"@{n}:{a}" for n in ("derek", "fred", "elsie"))
        joins: dict[str, str] = {}
        for user in (derek, fred):
            joins[user] = self.peer.send_event(
                self.room_id,
                "m.room.member",
                {"membership": "join"},
                sender=user,
                state_key=user,
                destinations=[],
            )["event_id"]
        events = self.peer.room_events(self.room_id, limit=1000)["events"]
        by_key = {(e["type"], e.get("state_key")): e for e in events}
        levels = dict(by_key[("m.room.power_levels", "")]["content"])
        levels["users"] = {**levels.get("users", {}), derek: 50, fred: 100}
        self.peer.send_event(
            self.room_id, "m.room.power_levels", levels, state_key="", destinations=[]
        )
        self.peer.send_event(
            self.room_id,
            "m.room.member",
            {"membership": "leave"},
            sender=fred,
            state_key=fred,
            destinations=[],
        )
        rule = self.join_and_hold()
        self.membership_at_hs2(elsie, "join")
        status, body = self.bob.post(
            "/_matrix/client/v3/keys/query", {"device_keys": {elsie: []}}
        )
        self.assertEqual(status, 200, body)
        wait_until(lambda: self.tracked(elsie), 30, "elsie's devices tracked")

        events = self.peer.room_events(self.room_id, limit=1000)["events"]
        by_key = {(e["type"], e.get("state_key")): e for e in events}
        ban = self.peer.send_event(
            self.room_id,
            "m.room.member",
            {"membership": "ban"},
            sender=fred,
            state_key=derek,
            auth_events=[
                by_key[("m.room.create", "")]["event_id"],
                by_key[("m.room.power_levels", "")]["event_id"],
                joins[fred],
            ],
            apply_state=False,
        )["event_id"]
        wait_until(lambda: self.has_event(ban), 30, "the bogus ban")
        kick = self.membership_at_hs2(elsie, "leave", sender=derek)
        self.assertTrue(self.rejected(kick))
        self.assertTrue(self.tracked(elsie))  # hs2 believes her still joined
        self.membership_at_hs2(elsie, "join")
        fetched = self.fetches(a, elsie)
        self.assertGreater(fetched, 0)

        self.release(rule)
        self.assertTrue(self.rejected(ban))
        self.assertFalse(self.rejected(kick))
        self.assertTrue(self.tracked(elsie))
        wait_until(
            lambda: self.fetches(a, elsie) > fetched, 60, "elsie's devices refetched"
        )

    def rejected(self, event_id: str) -> bool:
        return bool(
            self.hs2.sql("SELECT 1 FROM rejections WHERE event_id = ?", (event_id,))
        )

    def tracked(self, user_id: str) -> bool:
        return bool(
            self.hs2.sql(
                "SELECT 1 FROM device_lists_remote_extremeties WHERE user_id = ?",
                (user_id,),
            )
        )

    def fetches(self, server: str, user_id: str) -> int:
        """hs2's requests for ``user_id``'s devices at ``server``."""
        path = (
            f"/user/devices/({re.escape(quote(user_id, safe=''))}|{re.escape(user_id)})"
        )
        return len(self.peer.requests(server=server, path_regex=path))


@on_both_databases(ci_database="sqlite")
class PresenceDuringResyncTests(DeviceListCase):
    """Complement's skipped CanReceivePresenceDuringPartialStateJoin
    (synapse#13008): a member not in the partial state sends presence during
    the resync; bob's lazy-loading /sync shows it."""

    EXTRA_SERVERS = ("a",)

    def test_presence_reaches_local_members(self) -> None:
        self.setup_room()
        a, member = self.server["a"], self.member["a"]
        rule = self.join_and_hold()
        since = self.bob.sync(timeout_ms=0)["next_batch"]
        self.peer.send_edus(
            a,
            self.hs2.server_name,
            [
                {
                    "edu_type": "m.presence",
                    "content": {
                        "push": [
                            {
                                "user_id": member,
                                "presence": "online",
                                "last_active_ago": 100,
                            }
                        ]
                    },
                }
            ],
        )
        filt = json.dumps(self.bob.lazy_loading_filter(self.room_id))

        def presence_seen() -> bool:
            body = self.bob.sync(since=since, filter=filt, timeout_ms=1000)
            senders = [
                e.get("sender") for e in body.get("presence", {}).get("events", [])
            ]
            return member in senders

        wait_until(presence_seen, 30, "the member's presence in bob's /sync")
        self.assertTrue(self.is_partial())
        self.release(rule)
        self.assertFalse(
            self.hs2.sql(
                "SELECT 1 FROM sps_presence_interest WHERE room_id = ?", (self.room_id,)
            )
        )
