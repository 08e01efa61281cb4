"""Re-authorisation of events received during a partial-state join (issue #4).

Complement's faster-joins suite has two cases about events that arrive while the
joining server has only partial state: "State accepted incorrectly" and "State
rejected incorrectly". Here they run against Synapse with the module (its resync
engine) and a fake peer as the resident, on SQLite and PostgreSQL.

How Synapse judges such an event (``FederationEventHandler._check_event_auth``):
against the event's own auth events, as always; then, since the state before it is
partial, against the state resolution of that partial state with the event's auth
events (and no soft-fail check at all). A sender whose membership the partial
``/send_join`` answer left out is therefore judged on what the event itself cites:
a member who left can send an event citing their old join, and it is accepted.
During the resync, Synapse's ``update_state_for_partial_state_event`` (which the
engine calls for every later event, in order) computes the full state before each
event, checks the event again against it, and flips its rejection either way; the
current state is then recomputed from the forward extremities.

* "State accepted incorrectly": derek, who had joined and left (or was banned)
  before hs2 joined, sets room state citing his old join. Accepted under partial state (hs2's current
  state even shows it); after the resync it is rejected, invisible, and the state is
  what it was before.
* "State rejected incorrectly": derek, a former moderator, kicks elsie citing his
  old join (accepted under partial state). elsie then sets room state citing her
  join. The partial view rejects it: state resolution of the partial state (which
  now has the kick) with her cited join orders her join before the kick (it is one
  of the kick's auth events), so the kick wins and she is "not in room". Under full
  state the kick is rejected (derek had left), so her event is valid: after the
  resync the kick is rejected and her event accepted, visible, and its state applied.

Both pass with the module's engine, as with Synapse's own resync loop: the per-event
re-authorisation is Synapse's code, which the engine calls like stock does.

The fake peer builds these events with ``send_event(auth_events=...,
apply_state=False)`` (an event citing chosen auth events, which the resident itself
treats as rejected: logged and served, never applied to its state) and holds every
server's ``/state`` and ``/state_ids`` (behaviour ``hold``) so that they arrive
while the room is partial. ``FakePeerSupport`` checks those two features alone.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any
from urllib.parse import quote

import requests
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS

from tests.blackbox.endpoints import ADMIN
from tests.blackbox.resync_case import (
    FAST,
    STATE_PATHS,
    resident_state,
    wait_until,
)
from tests.fedkit.fakepeer.control_client import FakePeer, FakePeerError
from tests.fedkit.fakepeer.signing import event_id_of
from tests.fedkit.homeserver import Homeserver
from tests.fedkit.matrix_client import Client
from tests.fedkit.peercase import PeerTestCase, q
from tests.fedkit.testcase import (
    FederationTestCase,
    on_room_versions,
)

MEMBER = "m.room.member"
TEST_TYPE = "m.room.test"


class _ReauthCase(FederationTestCase):
    def setup_room(self) -> None:
        self.peer: FakePeer = self.make_fake_peer()
        self.room = self.peer.create_room(
            members=5,
            servers=2,
            name="Reauth room",
            room_version=self.ROOM_VERSION or "10",
        )
        self.room_id: str = self.room["room_id"]
        self.resident: str = self.room["resident"]
        # Not the resident's users: hs2 fetches their events from another server.
        other = self.room["servers"][1]
        self.derek = f"@derek:{other}"
        self.elsie = f"@elsie:{other}"
        fast: dict[str, Any] = dict(FAST)  # quick retries, as in test_resync
        self.hs2: Homeserver = self.make_homeserver("hs2", **fast)
        self.admin: Client = self.register(self.hs2, "admin", admin=True)
        self.bob: Client = self.register(self.hs2, "bob")

    # -- the fake peer's room ----------------------------------------------------

    def peer_events(self) -> list[dict[str, Any]]:
        return self.peer.room_events(self.room_id, limit=100000)["events"]

    def peer_state(self, key: tuple[str, str]) -> dict[str, Any]:
        """The resident's current state event for ``key``."""
        events = self.peer_events()
        event_id = resident_state(events)[key]
        return next(e for e in events if e["event_id"] == event_id)

    def set_power_levels(self, users: dict[str, int]) -> None:
        content = self.peer_state(("m.room.power_levels", ""))["content"]
        content["users"] = {**content.get("users", {}), **users}
        self.send("m.room.power_levels", content, state_key="")

    def send(self, type: str, content: dict[str, Any], **kw: Any) -> str:
        """The fake peer sends an event (from the room's creator unless
        ``sender``) to hs2 once it is in the room; returns its id."""
        return str(self.peer.send_event(self.room_id, type, content, **kw)["event_id"])

    def membership(self, user: str, membership: str) -> str:
        return self.send(
            MEMBER, {"membership": membership}, sender=user, state_key=user
        )

    def auth_ids(self, *members: str) -> list[str]:
        """Auth events citing the current create (before room version 12, where
        the room ID stands for it) and power levels events and the given member
        events."""
        create = [] if self.ROOM_VERSION == "12" else [("m.room.create", "")]
        return [
            *(self.peer_state(key)["event_id"] for key in create),
            self.peer_state(("m.room.power_levels", ""))["event_id"],
            *members,
        ]

    # -- hs2 -----------------------------------------------------------------------

    def join_partial_and_held(self) -> str:
        """bob joins while every server holds its state answers: the room stays
        partial until the returned rule is removed."""
        rule = self.peer.add_behaviour(STATE_PATHS, "hold", seconds=300)
        self.since = self.hs2.log_offset()
        self.bob.join(self.room_id, via=[self.resident])
        wait_until(
            lambda: any(
                r["behaviour"] == "hold"
                for r in self.peer.requests(path_regex=STATE_PATHS)
            ),
            60,
            "the resync's state request (held)",
        )
        return rule

    def assert_still_partial(self) -> None:
        status, job = self.admin.get(f"{ADMIN}/{quote(self.room_id)}")
        self.assertEqual(status, 200, job)
        self.assertEqual(job["phase"], "fetching", job)

    def release_and_wait(self, rule: str) -> None:
        """Let the resync go on, and wait for it to complete."""
        self.peer.remove_behaviour(rule)
        self.hs2.wait_for_log(
            rf"Resync of {re.escape(self.room_id)} complete",
            timeout=120,
            since=self.since,
        )

    def event_status(self, event_id: str) -> int:
        """What bob gets for ``/rooms/{room}/event/{id}``: 200 (accepted and
        visible) or 404 (unknown, or rejected)."""
        status, body = self.bob.get(
            f"/_matrix/client/v3/rooms/{quote(self.room_id)}/event/{quote(event_id)}"
        )
        self.assertIn(status, (200, 404), body)
        return int(status)

    def wait_visible(self, event_id: str, timeout: float = 60) -> None:
        wait_until(lambda: self.event_status(event_id) == 200, timeout, event_id)

    def room_test_state(self) -> Any:
        """Content of hs2's current ``m.room.test`` state (None if unset); never
        waits for the resync (not a member event)."""
        status, body = self.bob.get(
            f"/_matrix/client/v3/rooms/{quote(self.room_id)}/state/{TEST_TYPE}/"
        )
        if status == 404:
            return None
        self.assertEqual(status, 200, body)
        return body

    def state_ids(self) -> dict[tuple[str, str], str]:
        """hs2's current state of the room (waits for the resync)."""
        return {
            (e["type"], e["state_key"]): e["event_id"]
            for e in self.bob.room_state(self.room_id)
        }

    def seen_ids(self) -> tuple[set[str], set[str]]:
        """Event ids bob sees in ``/messages`` (backwards from now) and in a fresh
        initial ``/sync``'s timeline."""
        chunk = self.bob.messages(self.room_id, limit=100)["chunk"]
        filt = Client.lazy_loading_filter(self.room_id, timeline_limit=100)
        synced = self.bob.sync(filter=json.dumps(filt))
        timeline = synced["rooms"]["join"][self.room_id]["timeline"]["events"]
        return {e["event_id"] for e in chunk}, {e["event_id"] for e in timeline}

    def assert_resident_state(self, rejected: set[str]) -> None:
        """hs2's state is the resident's (which logs the events it rejected but
        never applied them)."""
        expected = resident_state(
            [e for e in self.peer_events() if e["event_id"] not in rejected]
        )
        self.assertEqual(self.state_ids(), expected)


# The names say what the partial view did wrong, as in Complement.


@on_room_versions("10", "11", "12", ci_rotate=True)
class StateAcceptedIncorrectly(_ReauthCase):
    def test_event_from_a_former_member_is_rejected_after_the_resync(self) -> None:
        """derek (power 50, enough to send state) joined and left before hs2
        joined; the partial /send_join answer has neither membership. He then
        sets room state citing his old join: accepted under partial state,
        rejected once the resync knows he had left, and the state is as before."""
        self.check_rejected_after_resync(banned=False)

    def test_event_from_a_banned_member_is_rejected_after_the_resync(self) -> None:
        """The same with derek banned (by the creator) instead of gone: this
        resident, like stock Synapse, leaves bans out of the partial answer."""
        self.check_rejected_after_resync(banned=True)

    def check_rejected_after_resync(self, banned: bool) -> None:
        self.setup_room()
        self.set_power_levels({self.derek: 50})
        original = self.send(TEST_TYPE, {"body": "original"}, state_key="")
        derek_join = self.membership(self.derek, "join")
        if banned:
            self.send(MEMBER, {"membership": "ban"}, state_key=self.derek)
        else:
            self.membership(self.derek, "leave")

        rule = self.join_partial_and_held()
        bad = self.send(
            TEST_TYPE,
            {"body": "bad"},
            sender=self.derek,
            state_key="",
            auth_events=self.auth_ids(derek_join),
            apply_state=False,
        )
        after = self.send("m.room.message", {"msgtype": "m.text", "body": "after"})
        self.wait_visible(after)
        # The case is real: while partial, hs2 took the event and its state.
        self.assert_still_partial()
        self.assertEqual(self.event_status(bad), 200)
        self.assertEqual(self.room_test_state(), {"body": "bad"})

        self.release_and_wait(rule)
        self.assertEqual(self.event_status(bad), 404)
        self.assertEqual(self.event_status(after), 200)
        self.assertEqual(self.room_test_state(), {"body": "original"})
        self.assertEqual(self.state_ids()[(TEST_TYPE, "")], original)
        messages, timeline = self.seen_ids()
        self.assertIn(after, messages)
        self.assertNotIn(bad, messages)
        self.assertIn(after, timeline)
        self.assertNotIn(bad, timeline)
        self.assert_resident_state(rejected={bad})
        self.assertRegex(
            self.hs2.read_log()[self.since :],
            rf"While checking auth of <Event event_id={re.escape(bad)}.* "
            "against room state before the event: 403",
        )


@on_room_versions("10", "11", "12", ci_rotate=True)
class StateRejectedIncorrectly(_ReauthCase):
    def test_event_rejected_under_partial_state_is_accepted_after_the_resync(
        self,
    ) -> None:
        """derek (power 100) joined and left; elsie (power 50) joined. While hs2
        is partial, derek kicks elsie citing his old join (accepted), then elsie
        sets room state citing her join, which the partial view rejects because
        of the kick. After the resync the kick is rejected (derek had left), so
        elsie is still in the room and her state event is accepted and applied."""
        self.setup_room()
        self.set_power_levels({self.derek: 100, self.elsie: 50})
        derek_join = self.membership(self.derek, "join")
        self.membership(self.derek, "leave")
        elsie_join = self.membership(self.elsie, "join")

        rule = self.join_partial_and_held()
        kick = self.send(
            MEMBER,
            {"membership": "leave"},
            sender=self.derek,
            state_key=self.elsie,
            auth_events=self.auth_ids(derek_join, elsie_join),
            apply_state=False,
        )
        # Valid for the resident, which never applied the kick: it cites (and
        # the peer picks) elsie's join.
        elsies = self.send(
            TEST_TYPE, {"body": "elsie's"}, sender=self.elsie, state_key=""
        )
        after = self.send("m.room.message", {"msgtype": "m.text", "body": "after"})
        self.wait_visible(after)
        # The case is real: while partial, hs2 took the kick and rejected elsie's.
        self.assert_still_partial()
        self.assertEqual(self.event_status(kick), 200)
        self.assertEqual(self.event_status(elsies), 404)
        self.assertIsNone(self.room_test_state())
        self.assertRegex(
            self.hs2.read_log()[self.since :],
            rf"While checking auth of <Event event_id={re.escape(elsies)}.* "
            "against room state before the event: 403: User \\S+ not in room",
        )

        self.release_and_wait(rule)
        self.assertEqual(self.event_status(kick), 404)
        self.assertEqual(self.event_status(elsies), 200)
        self.assertEqual(self.room_test_state(), {"body": "elsie's"})
        state = self.state_ids()
        self.assertEqual(state[(MEMBER, self.elsie)], elsie_join)
        self.assertEqual(state[(TEST_TYPE, "")], elsies)
        messages, timeline = self.seen_ids()
        self.assertIn(elsies, messages)
        self.assertNotIn(kick, messages)
        self.assertIn(elsies, timeline)
        self.assertNotIn(kick, timeline)
        self.assert_resident_state(rejected={kick})


class FakePeerSupport(PeerTestCase):
    """The two fake-peer features these tests rely on, without Synapse."""

    def test_send_event_with_chosen_auth_events_not_applied(self) -> None:
        info = self.peer.create_room(members=3, servers=2)
        room_id = info["room_id"]
        derek = f"@derek:{info['servers'][1]}"
        join = self.peer.send_event(
            room_id, MEMBER, {"membership": "join"}, sender=derek, state_key=derek
        )["event_id"]
        self.peer.send_event(
            room_id, MEMBER, {"membership": "leave"}, sender=derek, state_key=derek
        )
        before = self.peer.room(room_id)
        events = self.peer.room_events(room_id, limit=1000)["events"]
        state = resident_state(events)
        cited = [state[("m.room.create", "")], state[("m.room.power_levels", "")], join]
        bad = self.peer.send_event(
            room_id,
            TEST_TYPE,
            {"body": "bad"},
            sender=derek,
            state_key="",
            auth_events=cited,
            apply_state=False,
        )["event_id"]
        # Served as built, with the auth events given...
        served = self.fed(
            info["resident"], "GET", f"/_matrix/federation/v1/event/{q(bad)}"
        ).json()["pdus"][0]
        self.assertEqual(served["auth_events"], cited)
        chain = self.fed(
            info["resident"],
            "GET",
            f"/_matrix/federation/v1/event_auth/{q(room_id)}/{q(bad)}",
        ).json()["auth_chain"]
        rv = KNOWN_ROOM_VERSIONS[info["room_version"]]
        self.assertLessEqual(set(cited), {event_id_of(rv, e) for e in chain})
        # ... but never part of the resident's state, before or after it.
        after = self.peer.room(room_id)
        self.assertEqual(after["state_event_count"], before["state_event_count"])
        self.assertEqual(after["memberships"], before["memberships"])
        self.assertEqual(after["last_event_id"], bad)
        msg = self.peer.send_event(room_id, "m.room.message", {"body": "x"})["event_id"]
        ids = self.fed(
            info["resident"],
            "GET",
            f"/_matrix/federation/v1/state_ids/{q(room_id)}",
            {"event_id": msg},
        ).json()["pdu_ids"]
        self.assertNotIn(bad, ids)
        self.assertIn(state[("m.room.member", derek)], ids)
        # the later event builds on it
        self.assertEqual(
            self.peer.room_events(room_id, limit=1000)["events"][-1]["prev_events"],
            [bad],
        )
        # unknown auth events are refused
        with self.assertRaisesRegex(FakePeerError, "unknown auth_events"):
            self.peer.send_event(
                room_id, TEST_TYPE, {}, state_key="", auth_events=["$nope"]
            )

    def test_hold_until_removed(self) -> None:
        info = self.peer.create_room(members=3)
        server = info["resident"]
        rule = self.peer.add_behaviour("/version$", "hold")
        results: list[tuple[int, float]] = []

        def get() -> None:
            t = time.monotonic()
            r = self.fed(server, "GET", "/_matrix/federation/v1/version", timeout=30)
            results.append((r.status_code, time.monotonic() - t))

        thread = threading.Thread(target=get)
        thread.start()
        time.sleep(1.5)
        self.assertEqual(results, [])  # still held
        self.peer.remove_behaviour(rule)
        thread.join(10)
        self.assertEqual([s for s, _ in results], [200])
        self.assertGreaterEqual(results[0][1], 1.4)
        # with a cap, a held request is answered when it runs out
        self.peer.add_behaviour("/version$", "hold", seconds=1)
        t = time.monotonic()
        self.assertEqual(
            self.fed(server, "GET", "/_matrix/federation/v1/version").status_code, 200
        )
        self.assertGreaterEqual(time.monotonic() - t, 0.95)
        # clearing every rule releases what they hold
        self.peer.clear_behaviours()
        self.peer.add_behaviour("/version$", "hold")
        thread = threading.Thread(target=get)
        thread.start()
        time.sleep(0.5)
        self.peer.clear_behaviours()
        thread.join(10)
        self.assertEqual([s for s, _ in results], [200, 200])
        self.peer.add_behaviour("/version$", "hold")
        with self.assertRaises(requests.ReadTimeout):
            self.fed(server, "GET", "/_matrix/federation/v1/version", timeout=1)
