"""What clients see while a room is partial (MSC2775's client side), against a
real joiner (``hs2``) and a fake resident: the ``org.matrix.msc2775.syncing``
field in ``/sync`` and sliding sync, and the progress endpoint.

Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from typing import Any
from urllib.parse import quote

import requests

from synapse_partial_state.wire import SYNCING_FIELD
from tests.blackbox.resync_case import STATE_PATH, STATE_PATHS, ResyncCase, wait_until
from tests.fedkit.matrix_client import Client
from tests.fedkit.testcase import on_both_databases

#: The lazy-loading filter of the issue: members lazy-loaded in the state block.
LAZY = {"room": {"state": {"lazy_load_members": True}}}
#: Synapse's sliding sync (MSC4186; on by default in 1.163).
SLIDING_SYNC = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
#: A sliding sync list of every room, wanting only the room name (which partial
#: state has: the room is not held back until complete).
SLIDING_LIST = {
    "lists": {
        "all": {
            "ranges": [[0, 20]],
            "required_state": [["m.room.name", ""]],
            "timeline_limit": 1,
        }
    }
}


def endpoint(room_id: str) -> str:
    return (
        "/_matrix/client/unstable/org.matrix.msc2775/rooms/"
        f"{quote(room_id, safe='')}/partial_state"
    )


def joined(resp: dict[str, Any]) -> dict[str, Any]:
    return resp.get("rooms", {}).get("join", {})


def bodies(room: dict[str, Any]) -> list[str]:
    return [
        e.get("content", {}).get("body")
        for e in room.get("timeline", {}).get("events", [])
    ]


class ClientsCase(ResyncCase):
    def progress(self, client: Client | None = None) -> dict[str, Any]:
        status, body = (client or self.bob).get(endpoint(self.room_id))
        self.assertEqual(status, 200, body)
        return body

    def wait_synced(self, timeout: float = 120) -> None:
        """Until Synapse has cleared the room's partial-state flag (what the
        endpoint reads, and what /sync goes by)."""
        wait_until(lambda: self.progress() == {"syncing": False}, timeout, "complete")


@on_both_databases(ci_database="postgres")
class SyncingSignal(ClientsCase):
    def test_syncing_true_while_held_then_false_once(self) -> None:
        """While the resync is held, lazy-loading syncs (initial and
        incremental) show the room with the field true, eager ones do not show
        it; sliding sync shows it with true. Once complete, the next
        incremental lazy-loading sync of each client (bob on two devices)
        includes the room with false even though nothing happened in it (a
        long-polling one is woken for it), eager syncs get stock's newly joined
        room, and the sync after that has the room without the field; the next
        sliding sync response including the room has false (for the device told
        true), the one after that no field."""
        self.setup_room()
        rule = self.peer.add_behaviour(STATE_PATHS, "hold")
        self.bob.join(self.room_id, via=[self.resident])

        first = self.bob.sync(filter=LAZY)
        self.assertIs(joined(first)[self.room_id][SYNCING_FIELD], True)
        device2 = self.second_device()
        other = device2.sync(filter=LAZY)
        self.assertIs(joined(other)[self.room_id][SYNCING_FIELD], True)
        eager = self.bob.sync()
        self.assertNotIn(self.room_id, joined(eager))
        self.bob.send_message(self.room_id, "during")
        second = self.bob.sync(since=first["next_batch"], filter=LAZY)
        room = joined(second)[self.room_id]
        self.assertEqual(bodies(room), ["during"])
        self.assertIs(room[SYNCING_FIELD], True)
        eager = self.bob.sync(since=eager["next_batch"])
        self.assertNotIn(self.room_id, joined(eager))
        status, sliding = self.bob.post(SLIDING_SYNC, SLIDING_LIST)
        self.assertEqual(status, 200, sliding)
        self.assertIs(sliding["rooms"][self.room_id][SYNCING_FIELD], True)
        self.assertTrue(self.job()["running"])  # the resync is still held

        polled = self.long_poll_in_background(second["next_batch"])
        self.peer.remove_behaviour(rule)
        released = time.monotonic()
        self.wait_synced()

        after = self.bob.sync(since=second["next_batch"], filter=LAZY)
        room = joined(after)[self.room_id]
        self.assertIs(room[SYNCING_FIELD], False)
        self.assertEqual(room["timeline"]["events"], [])  # only for the signal
        room = joined(device2.sync(since=other["next_batch"], filter=LAZY))
        self.assertIs(room[self.room_id][SYNCING_FIELD], False)
        polled.join(timeout=60)
        self.assertIsNone(polled.error)
        self.assertIs(polled.result[SYNCING_FIELD], False)
        # woken by the completion, not by its 30 s timeout
        self.assertLess(polled.returned_at - released, 20)

        eager = self.bob.sync(since=eager["next_batch"])
        self.assertNotIn(SYNCING_FIELD, joined(eager)[self.room_id])  # stock's
        self.bob.send_message(self.room_id, "after")
        later = self.bob.sync(since=after["next_batch"], filter=LAZY)
        room = joined(later)[self.room_id]
        self.assertEqual(bodies(room), ["after"])
        self.assertNotIn(SYNCING_FIELD, room)
        # sliding sync: false in the next response that includes the room (to
        # bob's device that was told true; not to the other one), then nothing
        status, sliding = device2.post(SLIDING_SYNC, SLIDING_LIST)
        self.assertEqual(status, 200, sliding)
        self.assertNotIn(SYNCING_FIELD, sliding["rooms"][self.room_id])
        for expected in (False, None):
            status, sliding = self.bob.post(SLIDING_SYNC, SLIDING_LIST)
            self.assertEqual(status, 200, sliding)
            room = sliding["rooms"][self.room_id]
            self.assertIs(room.get(SYNCING_FIELD), expected)

    def second_device(self) -> Client:
        """bob, logged in again: another client, with its own sync stream."""
        body: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": "bob"},
            "password": "pw",
        }
        session = requests.Session()
        session.trust_env = False  # never send loopback traffic to a proxy
        with session:
            r = session.post(
                self.hs2.client_url + "/_matrix/client/v3/login", json=body, timeout=30
            )
        r.raise_for_status()
        client = Client(
            self.hs2.client_url, r.json()["user_id"], r.json()["access_token"]
        )
        self.addCleanup(client.close)
        return client

    def long_poll_in_background(self, since: str) -> _LongPoll:
        """A client long-polling lazy-loading syncs from ``since`` until the
        room shows up (its own session: requests sessions are not shared)."""
        client = Client(self.bob.base_url, self.bob.user_id, self.bob.access_token)
        self.addCleanup(client.close)
        poll = _LongPoll(client, since, self.room_id)
        poll.start()
        time.sleep(1)  # let it start waiting
        return poll


class _LongPoll(threading.Thread):
    def __init__(
        self,
        client: Client,
        since: str,
        room_id: str,
        filter: dict[str, Any] | None = LAZY,
    ) -> None:
        super().__init__(daemon=True)
        self.client, self.since, self.room_id = client, since, room_id
        self.filter = filter
        self.result: dict[str, Any] = {}
        self.returned_at = float("inf")
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                resp = self.client.sync(
                    since=self.since, filter=self.filter, timeout_ms=30000
                )
                self.since = resp["next_batch"]
                if self.room_id in joined(resp):
                    self.result = joined(resp)[self.room_id]
                    self.returned_at = time.monotonic()
                    return
        except Exception as e:  # reported by the test, not on stderr
            self.error = e


@on_both_databases(ci_database="sqlite")
class ProgressEndpoint(ClientsCase):
    MEMBERS = 2000
    SERVERS = 20

    def test_progress_moves_as_the_state_is_stored(self) -> None:
        """While the resident delays its /state answer, bob's endpoint says
        syncing with a progress block and a summary; as the state is stored,
        events_persisted grows (never backwards) with an ETA; once complete,
        {"syncing": false}."""
        self.setup_room()
        self.peer.add_behaviour(STATE_PATH, "delay", seconds=3)
        self.bob.join(self.room_id, via=[self.resident])
        seen = [self.progress()]
        while seen[-1]["syncing"]:
            time.sleep(0.05)
            seen.append(self.progress())
        self.assertEqual(seen[-1], {"syncing": False})
        during = [body for body in seen if body["syncing"]]
        self.assertTrue(during)
        for body in during:
            self.assertEqual(
                set(body), {"syncing", "progress", "eta_seconds", "summary"}
            )
            summary = body["summary"]
            self.assertNotIn(self.bob.user_id, summary["m.heroes"])
            self.assertLessEqual(len(summary["m.heroes"]), 5)
            self.assertGreaterEqual(summary["m.joined_member_count"], 1)
            self.assertGreaterEqual(summary["m.invited_member_count"], 0)
        progress = [b["progress"] for b in during if b["progress"] is not None]
        fields = {"phase", "events_persisted", "events_applied", "attempts"}
        self.assertEqual(set(progress[0]), fields | {"events_remaining"})
        self.assertEqual(progress[0]["phase"], "fetching")
        stored = [p["events_persisted"] for p in progress]
        self.assertEqual(stored, sorted(stored))  # never backwards
        total = self.job()["events_persisted"]
        self.assertGreater(total, self.MEMBERS)
        partway = [n for n in stored if 0 < n < total]
        self.assertTrue(partway, f"no answer while storing: {stored}")
        self.assertTrue(any(b["eta_seconds"] is not None for b in during))

    def test_who_may_ask(self) -> None:
        """A member gets the answer; a user not in the room gets 403 M_FORBIDDEN,
        the same for an unknown room; no token: 401."""
        self.setup_room()
        carol = self.register(self.hs2, "carol")
        rule = self.peer.add_behaviour(STATE_PATHS, "hold")
        self.bob.join(self.room_id, via=[self.resident])
        self.assertIs(self.progress()["syncing"], True)

        not_member = carol.get(endpoint(self.room_id))
        unknown = carol.get(endpoint(f"!unknown:{self.hs2.server_name}"))
        self.assertEqual(not_member[0], 403)
        self.assertEqual(not_member[1]["errcode"], "M_FORBIDDEN")
        self.assertEqual(unknown, not_member)
        self.assertEqual(self.bob.get(endpoint("!unknown:elsewhere")), not_member)
        session = requests.Session()
        session.trust_env = False  # never send loopback traffic to a proxy
        self.addCleanup(session.close)
        anonymous = session.get(
            self.hs2.client_url + endpoint(self.room_id), timeout=30
        )
        self.assertEqual(anonymous.status_code, 401)
        self.assertEqual(anonymous.json()["errcode"], "M_MISSING_TOKEN")

        self.peer.remove_behaviour(rule)
        self.wait_synced()
        self.assertEqual(carol.get(endpoint(self.room_id)), not_member)


def lazy(limit: int) -> dict[str, Any]:
    """:data:`LAZY` with a timeline limit."""
    return {
        "room": {"state": {"lazy_load_members": True}, "timeline": {"limit": limit}}
    }


def members_in(room: dict[str, Any]) -> set[str]:
    """The users whose m.room.member event is in a room object (state or timeline)."""
    events = room.get("state", {}).get("events", []) + room.get("timeline", {}).get(
        "events", []
    )
    return {e["state_key"] for e in events if e["type"] == "m.room.member"}


def senders(room: dict[str, Any]) -> set[str]:
    return {e["sender"] for e in room.get("timeline", {}).get("events", [])}


@on_both_databases(ci_database="postgres")
class StockSyncDuringResync(ClientsCase):
    """Stock behaviours the module must not change, while the resync is held."""

    def test_eager_long_poll_wakes_with_the_complete_room(self) -> None:
        """An eager (non-lazy-loading) sync long-polling while the room is
        partial does not show it, and is woken by the completion with the room
        whole (every member in its state), without the field."""
        self.setup_room()
        rule = self.peer.add_behaviour(STATE_PATHS, "hold")
        self.bob.join(self.room_id, via=[self.resident])
        first = self.bob.sync()
        self.assertNotIn(self.room_id, joined(first))
        polled = long_poll(self, first["next_batch"], filter=None)
        self.assertTrue(self.job()["running"])  # still held
        self.peer.remove_behaviour(rule)
        released = time.monotonic()
        polled.join(timeout=120)
        self.assertIsNone(polled.error)
        self.assertLess(polled.returned_at - released, 20)  # woken, not timed out
        room = polled.result
        self.assertNotIn(SYNCING_FIELD, room)
        joined_members = {
            e["state_key"]
            for e in room["state"]["events"] + room["timeline"]["events"]
            if e["type"] == "m.room.member" and e["content"].get("membership") == "join"
        }
        self.assertEqual(len(joined_members), self.room["member_count"] + 1)

    def test_lazy_syncs_carry_the_timeline_senders_memberships(self) -> None:
        """Lazy-loading syncs during the held resync (the room marked syncing)
        include the membership of each timeline event's sender, though hs2's
        partial state has not stored them all: initial, incremental, and a
        gappy (limited) incremental sync."""
        self.setup_room()
        rule = self.peer.add_behaviour(STATE_PATHS, "hold")
        self.bob.join(self.room_id, via=[self.resident])
        users = self.remote_members()
        s1, s2, s3 = users[-1], users[-2], users[-3]
        # not in hs2's partial state: Synapse finds them for lazy loading
        current = self.hs2.sql(
            "SELECT state_key FROM current_state_events"
            " WHERE room_id = ? AND type = 'm.room.member'",
            (self.room_id,),
        )
        self.assertFalse({s1, s2, s3} & {row[0] for row in current})

        self.say(s1, "one")
        initial = self.bob.sync(filter=lazy(10))
        room = joined(initial)[self.room_id]
        self.assertIs(room[SYNCING_FIELD], True)
        self.assertIn(s1, senders(room))
        self.assertLessEqual(senders(room), members_in(room))

        self.say(s2, "two")
        incremental = self.bob.sync(since=initial["next_batch"], filter=lazy(10))
        room = joined(incremental)[self.room_id]
        self.assertEqual(senders(room), {s2})
        self.assertIn(s2, members_in(room))

        for n in range(6):
            self.say(s3 if n % 2 else s1, f"gap {n}")
        gappy = self.bob.sync(since=incremental["next_batch"], filter=lazy(2))
        room = joined(gappy)[self.room_id]
        self.assertIs(room["timeline"]["limited"], True)
        self.assertIn(s3, senders(room))
        self.assertIn(s3, members_in(room))
        self.assertIs(room[SYNCING_FIELD], True)
        self.assertTrue(self.job()["running"])  # still held
        self.peer.remove_behaviour(rule)
        self.wait_synced()

    def remote_members(self) -> list[str]:
        """The fake room's joined members, oldest first (the last ones are not
        among the few a partial state carries)."""
        events = self.peer.room_events(self.room_id, limit=100000)["events"]
        return [
            e["state_key"]
            for e in events
            if e["type"] == "m.room.member"
            and e["content"].get("membership") == "join"
            and e["state_key"] not in (self.room["creator"], self.bob.user_id)
        ]

    def say(self, sender: str, body: str) -> None:
        """``sender`` sends a message; waits until bob can read it at hs2."""
        sent = self.peer.send_event(
            self.room_id,
            "m.room.message",
            {"msgtype": "m.text", "body": body},
            sender=sender,
        )
        path = (
            f"/_matrix/client/v3/rooms/{quote(self.room_id, safe='')}/event/"
            f"{quote(sent['event_id'], safe='')}"
        )
        wait_until(lambda: self.bob.get(path)[0] == 200, 30, f"{body!r} at hs2")


def long_poll(
    case: ClientsCase, since: str, filter: dict[str, Any] | None
) -> _LongPoll:
    """A client long-polling syncs (with ``filter``) from ``since`` until the
    room shows up, in the background."""
    client = Client(case.bob.base_url, case.bob.user_id, case.bob.access_token)
    case.addCleanup(client.close)
    poll = _LongPoll(client, since, case.room_id, filter)
    poll.start()
    time.sleep(1)  # let it start waiting
    return poll
