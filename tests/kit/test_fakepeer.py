"""Tests of the fake federation peer (tests/fedkit/fakepeer) on its own.

Each test starts the peer as a subprocess through the synchronous wrapper and
talks to its fake servers over TLS with ``requests`` (verifying against the kit
CA). No real Synapse is involved here.

Note: ``requests`` lets ``REQUESTS_CA_BUNDLE`` override ``Session.verify``, so
``verify=`` is passed on every call.
"""

from __future__ import annotations

import json
import time
import unittest
from typing import Any

import requests
from signedjson.key import generate_signing_key
from signedjson.sign import SignatureVerifyException, verify_signed_json
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS, RoomVersion
from synapse.crypto.event_signing import (
    add_hashes_and_signatures,
)
from synapse.event_auth import (
    auth_types_for_event,
    check_state_dependent_auth_rules,
    check_state_independent_auth_rules,
)
from synapse.events import EventBase, make_event_from_dict
from twisted.internet import defer
from twisted.python.failure import Failure

from tests.fedkit.fakepeer.control_client import FakePeer, FakePeerError
from tests.fedkit.peercase import JsonDict, PeerTestCase, q


class _DictStore:
    """Just enough of Synapse's event store for ``check_state_independent_auth_rules``."""

    def __init__(self, events: dict[str, EventBase]) -> None:
        self._events = events

    async def get_events(self, event_ids: Any, **kwargs: Any) -> dict[str, EventBase]:
        return {e: self._events[e] for e in event_ids if e in self._events}


class SyntheticRoomTests(PeerTestCase):
    """Big synthetic rooms are fast to build and pass Synapse's own checks."""

    def _check_room(self, version: str) -> None:
        rv = KNOWN_ROOM_VERSIONS[version]
        room = self.peer.create_room(
            room_version=version,
            members=10_000,
            servers=100,
            name=None,
            topic="t",
            alias=True,
            bans=5,
            kicks=3,
            invites=5,
            knocks=3,
            power_users=4,
            acl=True,
            join_rule="public",
        )
        self.assertLess(room["build_seconds"], 15, room)
        self.assertEqual(room["member_count"], 10_001)
        self.assertEqual(len(room["servers"]), 100)
        room_id, resident = room["room_id"], room["resident"]

        summary = self.peer.room(room_id)
        last = summary["last_event_id"]
        if rv.msc4291_room_ids_as_hashes:
            self.assertEqual(room_id, "!" + summary["create_event_id"][1:])
        else:
            self.assertTrue(room_id.endswith(":" + resident))
        self.assertEqual(
            summary["memberships"],
            {"join": 10_001, "ban": 5, "leave": 3, "invite": 5, "knock": 3},
        )

        ids = self.fed(
            resident,
            "GET",
            f"/_matrix/federation/v1/state_ids/{q(room_id)}",
            {"event_id": last},
        ).json()
        state = self.fed(
            resident,
            "GET",
            f"/_matrix/federation/v1/state/{q(room_id)}",
            {"event_id": last},
        ).json()
        self.assertEqual(
            sorted(ids["pdu_ids"]), sorted(self._ids_of(rv, state["pdus"]))
        )
        self.assertEqual(
            sorted(ids["auth_chain_ids"]), sorted(self._ids_of(rv, state["auth_chain"]))
        )
        # /state is the state *before* the last event (a state event), so it
        # must not contain the last event itself.
        self.assertNotIn(last, ids["pdu_ids"])
        # The last event is the final join_rules change, replacing an older
        # join_rules event: the number of state keys is the same before it.
        self.assertEqual(len(ids["pdu_ids"]), summary["state_event_count"])

        by_id: dict[str, JsonDict] = {}
        for pdu in state["pdus"] + state["auth_chain"]:
            by_id[make_event_from_dict(dict(pdu), rv).event_id] = pdu
        # Verify every non-member event and a sample of member events.
        members = [e for e, p in by_id.items() if p["type"] == "m.room.member"]
        sample = [
            e for e, p in by_id.items() if p["type"] != "m.room.member"
        ] + members[::97]
        events = {e: self.check_event_crypto(rv, by_id[e], e) for e in sample}
        all_events = {e: make_event_from_dict(dict(p), rv) for e, p in by_id.items()}
        store = _DictStore(all_events)
        for eid, ev in events.items():
            # state-independent rules (duplicate / unexpected auth events, create present)
            d = defer.ensureDeferred(check_state_independent_auth_rules(store, ev))  # type: ignore[arg-type]
            outcome: list[Any] = []
            d.addBoth(outcome.append)
            self.assertEqual(
                len(outcome), 1, "auth check did not complete synchronously"
            )
            if isinstance(outcome[0], Failure):
                self.fail(f"{eid}: {outcome[0].getErrorMessage()}")
            auth = [all_events[a] for a in ev.auth_event_ids()]
            allowed = auth_types_for_event(rv, ev)
            for a in auth:
                self.assertIn((a.type, a.state_key), allowed)
            check_state_dependent_auth_rules(ev, auth)
        self.assertTrue(
            all(
                p["room_id"] == room_id
                for p in by_id.values()
                if p["type"] != "m.room.create"
            )
        )

    def _ids_of(self, rv: RoomVersion, pdus: list[JsonDict]) -> list[str]:
        return [make_event_from_dict(dict(p), rv).event_id for p in pdus]

    def test_room_v10(self) -> None:
        self._check_room("10")

    def test_room_v11(self) -> None:
        self._check_room("11")

    def test_room_v12(self) -> None:
        self._check_room("12")

    def test_room_type(self) -> None:
        """``room_type`` is the create event's ``type`` (e.g. a space)."""
        for room_type in ("m.space", None):
            room = self.peer.create_room(members=1, room_type=room_type)
            create = self.peer.room_events(room["room_id"], limit=1)["events"][0]
            self.assertEqual(create["type"], "m.room.create")
            self.assertEqual(create["content"].get("type"), room_type)


class SendJoinTests(PeerTestCase):
    """make_join / send_join answers of the fake resident."""

    version = "12"

    def setUp(self) -> None:
        super().setUp()
        self.rv = KNOWN_ROOM_VERSIONS[self.version]
        self.info = self.peer.create_room(
            room_version=self.version,
            members=2000,
            servers=20,
            name=None,
            bans=3,
            invites=3,
        )
        self.room_id = self.info["room_id"]
        self.resident = self.info["resident"]
        self.joiner_key = generate_signing_key("j1")

    def _join_event(self, user_id: str) -> tuple[str, JsonDict]:
        mj = self.fed(
            self.resident,
            "GET",
            f"/_matrix/federation/v1/make_join/{q(self.room_id)}/{q(user_id)}",
            params=[("ver", "9"), ("ver", self.version)],
        )
        self.assertEqual(mj.status_code, 200, mj.text)
        body = mj.json()
        self.assertEqual(body["room_version"], self.version)
        ev = dict(body["event"])
        ev["origin_server_ts"] = int(time.time() * 1000)
        server = user_id.split(":", 1)[1]
        add_hashes_and_signatures(self.rv, ev, server, self.joiner_key)
        return make_event_from_dict(dict(ev), self.rv).event_id, ev

    def _send_join(
        self, user_id: str, omit: str | None, v: int = 2
    ) -> requests.Response:
        event_id, ev = self._join_event(user_id)
        params = {"omit_members": omit} if omit is not None else None
        return self.fed(
            self.resident,
            "PUT",
            f"/_matrix/federation/v{v}/send_join/{q(self.room_id)}/{q(event_id)}",
            params=params,
            json=ev,
        )

    def _state_event_id(self, type: str) -> str:
        events = self.peer.room_events(self.room_id, 0, 20)["events"]
        return next(e["event_id"] for e in events if e["type"] == type)

    def _check_closed(self, body: JsonDict) -> tuple[set[str], set[str]]:
        state = {
            make_event_from_dict(dict(p), self.rv).event_id: p for p in body["state"]
        }
        auth = {
            make_event_from_dict(dict(p), self.rv).event_id: p
            for p in body["auth_chain"]
        }
        have = set(state) | set(auth)
        for pdu in list(state.values()) + list(auth.values()) + [body["event"]]:
            ev = make_event_from_dict(dict(pdu), self.rv)
            for a in ev.auth_event_ids():
                self.assertIn(a, have, f"auth event {a} of {ev.event_id} missing")
        return set(state), set(auth)

    def test_partial(self) -> None:
        resp = self._send_join("@newbie:127.0.0.1:1", "true")
        self.assertEqual(resp.status_code, 200, resp.text)
        body = resp.json()
        self.assertIs(body["members_omitted"], True)
        self.assertIn("event", body)
        state, auth = self._check_closed(body)
        self.assertEqual(state & auth, set())
        members = [p for p in body["state"] if p["type"] == "m.room.member"]
        # Unnamed room: up to 5 heroes are allowed, nothing else.
        self.assertLessEqual(len(members), 5)
        self.assertEqual(sorted(body["servers_in_room"]), sorted(self.info["servers"]))
        types = {p["type"] for p in body["state"]}
        self.assertTrue(
            {"m.room.create", "m.room.power_levels", "m.room.join_rules"} <= types
        )

    def test_partial_includes_own_previous_membership(self) -> None:
        invited = f"@invited0:{self.info['servers'][0]}"
        resp = self._send_join(invited, "true")
        self.assertEqual(resp.status_code, 200, resp.text)
        body = resp.json()
        own = [
            p
            for p in body["state"]
            if p["type"] == "m.room.member" and p["state_key"] == invited
        ]
        self.assertEqual(len(own), 1)
        self.assertEqual(own[0]["content"]["membership"], "invite")
        self._check_closed(body)

    def test_full(self) -> None:
        for omit in ("false", None):
            resp = self._send_join(f"@full{omit}:127.0.0.1:1", omit)
            self.assertEqual(resp.status_code, 200, resp.text)
            body = resp.json()
            self.assertFalse(body.get("members_omitted"))
            self._check_closed(body)
            members = {
                p["state_key"] for p in body["state"] if p["type"] == "m.room.member"
            }
            # creator + 2000 members + 3 banned + 3 invited (+ the earlier full joiner)
            self.assertGreaterEqual(len(members), 2007)
            self.assertIn(self.info["creator"], members)

    def test_v1_form(self) -> None:
        resp = self._send_join("@v1:127.0.0.1:1", None, v=1)
        self.assertEqual(resp.status_code, 200, resp.text)
        body = resp.json()
        self.assertEqual(body[0], 200)
        self.assertGreater(len(body[1]["state"]), 2000)

    def test_bad_omit_members(self) -> None:
        for bad in ("yes", "TRUE", "1", ""):
            resp = self._send_join("@bad:127.0.0.1:1", bad)
            self.assertEqual(resp.status_code, 400, bad)
            self.assertEqual(resp.json()["errcode"], "M_INVALID_PARAM")

    def test_incompatible_version(self) -> None:
        mj = self.fed(
            self.resident,
            "GET",
            f"/_matrix/federation/v1/make_join/{q(self.room_id)}/{q('@x:127.0.0.1:1')}",
            params={"ver": "1"},
        )
        self.assertEqual(mj.status_code, 400)
        self.assertEqual(mj.json()["errcode"], "M_INCOMPATIBLE_ROOM_VERSION")

    def test_join_appends_and_state_at_join(self) -> None:
        user = "@late:127.0.0.1:1"
        event_id, ev = self._join_event(user)
        resp = self.fed(
            self.resident,
            "PUT",
            f"/_matrix/federation/v2/send_join/{q(self.room_id)}/{q(event_id)}",
            params={"omit_members": "true"},
            json=ev,
        )
        self.assertEqual(resp.status_code, 200)
        summary = self.peer.room(self.room_id)
        self.assertEqual(summary["last_event_id"], event_id)
        self.assertIn("127.0.0.1:1", summary["real_servers_joined"])
        ids = self.fed(
            self.resident,
            "GET",
            f"/_matrix/federation/v1/state_ids/{q(self.room_id)}",
            {"event_id": event_id},
        ).json()
        self.assertNotIn(event_id, ids["pdu_ids"])
        self.assertEqual(len(ids["pdu_ids"]), summary["state_event_count"] - 1)
        got = self.fed(
            self.resident, "GET", f"/_matrix/federation/v1/event/{q(event_id)}"
        ).json()
        self.assertEqual(got["pdus"][0]["sender"], user)
        chain = self.fed(
            self.resident,
            "GET",
            f"/_matrix/federation/v1/event_auth/{q(self.room_id)}/{q(event_id)}",
        ).json()["auth_chain"]
        self.assertGreaterEqual(len(chain), 3)
        missing = self.fed(
            self.resident,
            "POST",
            f"/_matrix/federation/v1/get_missing_events/{q(self.room_id)}",
            json={"earliest_events": [], "latest_events": [event_id], "limit": 5},
        ).json()["events"]
        self.assertEqual(len(missing), 5)
        back = self.fed(
            self.resident,
            "GET",
            f"/_matrix/federation/v1/backfill/{q(self.room_id)}",
            params={"v": event_id, "limit": 7},
        ).json()["pdus"]
        self.assertEqual(len(back), 7)
        self.assertEqual(back[0]["sender"], user)

    def test_send_event_with_given_prev_events_forks_the_dag(self) -> None:
        before = self.peer.room(self.room_id)
        fork_point = before["last_event_id"]
        first = self.peer.send_event(
            self.room_id, "m.room.message", {"msgtype": "m.text", "body": "a"}
        )["event_id"]
        forked = self.peer.send_event(
            self.room_id,
            "m.room.message",
            {"msgtype": "m.text", "body": "b"},
            prev_events=[fork_point],
        )["event_id"]
        got = self.fed(
            self.resident, "GET", f"/_matrix/federation/v1/event/{q(forked)}"
        ).json()["pdus"][0]
        self.assertEqual(got["prev_events"], [fork_point])
        self.assertEqual(
            sorted(self.peer.room(self.room_id)["forward_extremities"]),
            sorted([first, forked]),
        )
        # the request log keeps the query string
        log = self.peer.requests(path_regex="/event/")
        self.assertEqual(log[-1]["query"], {})
        self.fed(
            self.resident,
            "GET",
            f"/_matrix/federation/v1/state_ids/{q(self.room_id)}",
            {"event_id": forked},
        )
        log = self.peer.requests(path_regex="/state_ids/")
        self.assertEqual(log[-1]["query"], {"event_id": [forked]})
        with self.assertRaises(Exception) as cm:
            self.peer.send_event(
                self.room_id, "m.room.message", {}, prev_events=["$nope"]
            )
        self.assertIn("unknown prev_events", str(cm.exception))

    def test_incoming_transaction_and_leave(self) -> None:
        user = "@guest:127.0.0.1:1"
        event_id, ev = self._join_event(user)
        path = f"/_matrix/federation/v2/send_join/{q(self.room_id)}/{q(event_id)}"
        resp = self.fed(self.resident, "PUT", path, {"omit_members": "true"}, json=ev)
        self.assertEqual(resp.status_code, 200)
        # a message from the "real" server, pushed to a non-resident fake server
        msg: JsonDict = {
            "type": "m.room.message",
            "room_id": self.room_id,
            "sender": user,
            "content": {"msgtype": "m.text", "body": "hello"},
            "depth": ev["depth"] + 1,
            "prev_events": [event_id],
            # create is implicit in v12: power levels and the sender's join
            "auth_events": [self._state_event_id("m.room.power_levels"), event_id],
            "origin_server_ts": int(time.time() * 1000),
        }
        add_hashes_and_signatures(self.rv, msg, "127.0.0.1:1", self.joiner_key)
        unsigned = dict(msg, sender="@x:127.0.0.1:2")
        other = self.info["servers"][3]
        txn = {"origin": "127.0.0.1:1", "origin_server_ts": 1, "pdus": [msg, unsigned]}
        resp = self.fed(other, "PUT", "/_matrix/federation/v1/send/t1", json=txn)
        self.assertEqual(resp.status_code, 200, resp.text)
        results = resp.json()["pdus"]
        msg_id = make_event_from_dict(dict(msg), self.rv).event_id
        self.assertEqual(results[msg_id], {})
        self.assertEqual(len(results), 2)
        self.assertTrue(any("error" in r for r in results.values()))
        self.assertEqual(self.peer.room(self.room_id)["last_event_id"], msg_id)
        recorded = self.peer.transactions(destination=other)
        self.assertEqual(len(recorded), 1)
        self.assertEqual(recorded[0]["txn_id"], "t1")

        # and leave again
        ml = self.fed(
            self.resident,
            "GET",
            f"/_matrix/federation/v1/make_leave/{q(self.room_id)}/{q(user)}",
        )
        self.assertEqual(ml.status_code, 200, ml.text)
        leave = dict(ml.json()["event"])
        add_hashes_and_signatures(self.rv, leave, "127.0.0.1:1", self.joiner_key)
        leave_id = make_event_from_dict(dict(leave), self.rv).event_id
        resp = self.fed(
            self.resident,
            "PUT",
            f"/_matrix/federation/v2/send_leave/{q(self.room_id)}/{q(leave_id)}",
            json=leave,
        )
        self.assertEqual(resp.status_code, 200, resp.text)
        summary = self.peer.room(self.room_id)
        self.assertEqual(summary["last_event_id"], leave_id)
        self.assertEqual(summary["real_servers_joined"], [])

    def test_keys_and_notary(self) -> None:
        a, b = self.info["servers"][:2]
        resp = self.fed(
            a,
            "POST",
            "/_matrix/key/v2/query",
            json={"server_keys": {a: {}, b: {}, "127.0.0.1:1": {}}},
        )
        keys = {k["server_name"]: k for k in resp.json()["server_keys"]}
        self.assertEqual(set(keys), {a, b})
        for name, body in keys.items():
            for vk in self.server_keys(name).values():
                verify_signed_json(body, name, vk)
        # b's entry is countersigned by the notary a
        for vk in self.server_keys(a).values():
            verify_signed_json(keys[b], a, vk)
        version = self.fed(b, "GET", "/_matrix/federation/v1/version").json()
        self.assertIn("server", version)
        devices = self.fed(
            b, "GET", f"/_matrix/federation/v1/user/devices/{q('@u1:' + b)}"
        )
        self.assertEqual(devices.json()["devices"], [])
        profile = self.fed(b, "GET", "/_matrix/federation/v1/query/profile")
        self.assertEqual(profile.status_code, 404)


class ControlJoinTests(PeerTestCase):
    """``/control/join`` driven against the peer's own resident (signed, over TLS)."""

    def test_join_variants(self) -> None:
        info = self.peer.create_room(room_version="11", members=300, servers=10)
        room_id, resident = info["room_id"], info["resident"]
        r = self.peer.join(room_id, resident, user_localpart="p1", omit_members=True)
        self.assertEqual(r["make_join"]["status"], 200)
        self.assertEqual(r["send_join"]["status"], 200)
        self.assertTrue(r["send_join"]["body"]["members_omitted"])
        self.assertEqual(r["send_join"]["summary"]["state_members"], 0)
        self.assertEqual(r["join_event"]["sender"], r["user_id"])
        origin = r["server"]
        self.assertEqual(
            [x["origin"] for x in self.peer.requests(path_regex="make_join")], [origin]
        )

        r = self.peer.join(
            room_id,
            resident,
            user_localpart="p2",
            omit_members=None,
            include_body=False,
        )
        self.assertEqual(r["send_join"]["status"], 200)
        self.assertNotIn("body", r["send_join"])
        self.assertGreater(r["send_join"]["summary"]["state_members"], 300)
        self.assertNotIn("omit_members", r["send_join"]["uri"])

        r = self.peer.join(room_id, resident, user_localpart="p3", omit_members="maybe")
        self.assertEqual(r["send_join"]["status"], 400)
        self.assertEqual(r["send_join"]["body"]["errcode"], "M_INVALID_PARAM")

        r = self.peer.join(
            room_id,
            resident,
            user_localpart="p4",
            send_join_version=1,
            omit_members=None,
        )
        self.assertEqual(r["send_join"]["body"][0], 200)

        # Events the peer creates are pushed to joined non-fake servers only;
        # an explicit destination list reaches a fake server and is recorded.
        other = self.peer.create_servers(1)[0]
        sent = self.peer.send_event(
            room_id,
            "m.room.message",
            {"msgtype": "m.text", "body": "hi"},
            destinations=[other],
        )
        self.assertEqual(sent["delivered"], {other: 200})
        txns = self.peer.transactions(origin=resident)
        self.assertEqual(len(txns), 1)
        self.assertEqual(txns[0]["destination"], other)
        self.assertEqual(txns[0]["body"]["pdus"][0]["content"]["body"], "hi")

        joined = self.peer.join_users(room_id, 120, destinations=[other])
        self.assertEqual(len(joined["event_ids"]), 120)
        self.assertEqual(joined["delivered"], {other: 200})
        self.assertEqual(len(self.peer.transactions(destination=other)), 1 + 3)

    def test_verified_requests(self) -> None:
        self.peer.stop()
        self.peer = FakePeer(
            f"{self.tmp}/peer2", f"{self.tmp}/ca", verify_requests=True
        )
        self.addCleanup(self.peer.stop)
        self.peer.start()
        info = self.peer.create_room(members=5)
        r = self.peer.join(info["room_id"], info["resident"], omit_members=True)
        self.assertEqual(r["send_join"]["status"], 200)
        # unsigned requests are refused when verification is on
        resp = self.fed(
            info["resident"],
            "GET",
            f"/_matrix/federation/v1/state_ids/{q(info['room_id'])}",
        )
        self.assertEqual(resp.status_code, 401)


class BehaviourTests(PeerTestCase):
    """Injected misbehaviour takes effect and clears."""

    def setUp(self) -> None:
        super().setUp()
        self.info = self.peer.create_room(members=20, servers=2)
        self.server = self.info["resident"]
        self.path = "/_matrix/federation/v1/version"

    def _get(self, timeout: float = 10) -> requests.Response:
        return self.fed(self.server, "GET", self.path, timeout=timeout)

    def test_error_with_count(self) -> None:
        self.peer.add_behaviour("/version$", "error", status=503, count=2)
        self.assertEqual([self._get().status_code for _ in range(3)], [503, 503, 200])
        log = self.peer.requests(path_regex="version")
        self.assertEqual([x["behaviour"] for x in log], ["error", "error", None])
        self.assertEqual([x["status"] for x in log], [503, 503, 200])

    def test_skip_lets_the_first_requests_through(self) -> None:
        self.peer.add_behaviour("/version$", "error", status=503, skip=2, count=1)
        self.assertEqual(
            [self._get().status_code for _ in range(4)], [200, 200, 503, 200]
        )
        log = self.peer.requests(path_regex="version")
        self.assertEqual([x["behaviour"] for x in log], [None, None, "error", None])
        rule = self.peer.behaviours()[0]
        self.assertEqual((rule["skipped"], rule["hits"]), (2, 1))
        for skip in (-1, "2", True):
            with self.assertRaises(FakePeerError, msg=repr(skip)):
                self.peer.add_behaviour("/version$", "error", skip=skip)  # type: ignore[arg-type]

    def test_error_only_on_named_server(self) -> None:
        other = self.info["servers"][1]
        self.peer.add_behaviour("/version", "error", server=other, status=502)
        self.assertEqual(self._get().status_code, 200)
        self.assertEqual(self.fed(other, "GET", self.path).status_code, 502)

    def test_delay(self) -> None:
        self.peer.add_behaviour("/version", "delay", seconds=1.0)
        t = time.monotonic()
        self.assertEqual(self._get().status_code, 200)
        self.assertGreaterEqual(time.monotonic() - t, 0.95)
        self.assertEqual(self.peer.clear_behaviours(), 1)
        t = time.monotonic()
        self._get()
        self.assertLess(time.monotonic() - t, 0.9)

    def test_drop_and_hang(self) -> None:
        self.peer.add_behaviour("/version", "drop", count=1)
        with self.assertRaises(requests.ConnectionError):
            self._get()
        self.assertEqual(self._get().status_code, 200)
        rule = self.peer.add_behaviour("/version", "hang")
        with self.assertRaises(requests.ReadTimeout):
            self._get(timeout=1)
        self.peer.remove_behaviour(rule)
        self.assertEqual(self._get().status_code, 200)

    def test_bad_signature(self) -> None:
        rv = KNOWN_ROOM_VERSIONS["10"]
        room_id = self.info["room_id"]
        last = self.peer.room(room_id)["last_event_id"]
        path = f"/_matrix/federation/v1/state/{q(room_id)}"
        self.peer.add_behaviour("/state/", "bad_signature", count=1)
        bad = self.fed(self.server, "GET", path, {"event_id": last}).json()
        good = self.fed(self.server, "GET", path, {"event_id": last}).json()
        with self.assertRaises(SignatureVerifyException):
            self.check_event_crypto(rv, bad["pdus"][0], None)
        self.check_event_crypto(rv, good["pdus"][0], None)

    def test_omit_members_from_state(self) -> None:
        room_id = self.info["room_id"]
        last = self.peer.room(room_id)["last_event_id"]
        path = f"/_matrix/federation/v1/state/{q(room_id)}"
        ids_path = f"/_matrix/federation/v1/state_ids/{q(room_id)}"
        full = self.fed(self.server, "GET", path, {"event_id": last}).json()
        rule = self.peer.add_behaviour(r"/state/", "omit", omit=5)
        short = self.fed(self.server, "GET", path, {"event_id": last}).json()
        # /state_ids (not matched) still lists everything
        ids = self.fed(self.server, "GET", ids_path, {"event_id": last}).json()
        self.assertEqual(len(ids["pdu_ids"]), len(full["pdus"]))

        def key(e: JsonDict) -> str:
            return json.dumps(e, sort_keys=True)

        left_out = {key(e) for e in full["pdus"]} - {key(e) for e in short["pdus"]}
        self.assertEqual(len(short["pdus"]), len(full["pdus"]) - 5)
        self.assertEqual(len(left_out), 5)
        gone = [e for e in full["pdus"] if key(e) in left_out]
        self.assertEqual({e["type"] for e in gone}, {"m.room.member"})
        # the first five not also in the auth chain, and the chain is intact
        chain = {key(e) for e in full["auth_chain"]}
        expected = [
            e
            for e in full["pdus"]
            if e["type"] == "m.room.member" and key(e) not in chain
        ][:5]
        self.assertEqual(gone, expected)
        self.assertEqual(short["auth_chain"], full["auth_chain"])
        log = self.peer.requests(path_regex="/state/")
        self.assertEqual([x.get("omitted") for x in log], [None, 5])
        self.assertEqual(self.peer.behaviours()[0]["omit"], 5)
        # more than there are: every member event not in the chain goes
        self.peer.remove_behaviour(rule)
        self.peer.add_behaviour(r"/state/", "omit", omit=10_000)
        bare = self.fed(self.server, "GET", path, {"event_id": last}).json()
        self.assertTrue(
            all(e["type"] != "m.room.member" or key(e) in chain for e in bare["pdus"])
        )
        # errors pass through untouched
        missing = self.fed(self.server, "GET", path, {"event_id": "$nope"})
        self.assertEqual(missing.status_code, 404)
        self.assertEqual(missing.json()["errcode"], "M_NOT_FOUND")

    def test_omit_needs_a_count(self) -> None:
        for omit in (None, 0, -1, "3", True):
            with self.assertRaises(FakePeerError, msg=repr(omit)):
                self.peer.add_behaviour("/state/", "omit", omit=omit)  # type: ignore[arg-type]
        with self.assertRaises(FakePeerError):
            self.peer.add_behaviour("/state/", "error", omit=-2)

    def _state_path(self) -> tuple[str, dict[str, str]]:
        room_id = self.info["room_id"]
        last = self.peer.room(room_id)["last_event_id"]
        return f"/_matrix/federation/v1/state/{q(room_id)}", {"event_id": last}

    def test_trickle_while_the_rule_is_in_place_then_the_rest(self) -> None:
        path, params = self._state_path()
        whole = self.fed(self.server, "GET", path, params).content
        rule = self.peer.add_behaviour("/state/", "trickle")
        resp = self.http.get(
            f"https://{self.server}{path}",
            params=params,
            verify=self.peer.ca_path,
            timeout=30,
            stream=True,
        )
        self.assertEqual(resp.status_code, 200)
        self.assertEqual(int(resp.headers["Content-Length"]), len(whole))
        started = time.monotonic()
        first = resp.raw.read(3)  # one byte a second
        self.assertEqual(first, whole[:3])
        self.assertGreaterEqual(time.monotonic() - started, 1.5)
        self.peer.remove_behaviour(rule)
        rest = resp.raw.read()  # the rest at once once the rule is gone
        self.assertLess(time.monotonic() - started, 8)
        self.assertEqual(first + rest, whole)
        log = self.peer.requests(path_regex="/state/")
        self.assertEqual(log[-1]["behaviour"], "trickle")
        self.assertGreaterEqual(log[-1]["trickled"], 3)

    def test_trickle_for_at_most_its_seconds(self) -> None:
        path, params = self._state_path()
        self.peer.add_behaviour("/state/", "trickle", seconds=2)
        started = time.monotonic()
        resp = self.fed(self.server, "GET", path, params, timeout=30)
        self.assertGreaterEqual(time.monotonic() - started, 1.5)
        self.assertLess(time.monotonic() - started, 10)
        self.assertIn("pdus", resp.json())

    def test_truncate_cuts_the_answer_short(self) -> None:
        path, params = self._state_path()
        whole = self.fed(self.server, "GET", path, params).content
        self.peer.add_behaviour("/state/", "truncate", count=1)
        with self.assertRaises(requests.exceptions.ChunkedEncodingError):
            self.fed(self.server, "GET", path, params)
        self.assertEqual(self.fed(self.server, "GET", path, params).content, whole)
        log = self.peer.requests(path_regex="/state/")
        self.assertEqual(log[1]["behaviour"], "truncate")
        self.assertEqual(log[1]["truncated_at"], len(whole) // 2)

    def test_malformed_answers(self) -> None:
        path, params = self._state_path()
        whole = self.fed(self.server, "GET", path, params).json()
        self.peer.add_behaviour("/state/", "malformed", count=1)
        broken = self.fed(self.server, "GET", path, params)
        self.assertEqual(broken.status_code, 200)
        with self.assertRaises(ValueError):
            json.loads(broken.content)
        self.peer.add_behaviour("/state/", "malformed", mode="wrong_shape", count=1)
        shaped = self.fed(self.server, "GET", path, params).json()
        self.assertEqual(shaped["pdus"], list(range(len(whole["pdus"]))))
        self.assertEqual(shaped["auth_chain"], list(range(len(whole["auth_chain"]))))
        # errors pass through untouched, and then the rules are spent
        self.peer.add_behaviour("/state/", "malformed", count=1)
        missing = self.fed(self.server, "GET", path, {"event_id": "$nope"})
        self.assertEqual(missing.json()["errcode"], "M_NOT_FOUND")
        self.assertEqual(self.fed(self.server, "GET", path, params).json(), whole)

    def test_malformed_mode_is_checked(self) -> None:
        with self.assertRaises(FakePeerError):
            self.peer.add_behaviour("/state/", "malformed", mode="gibberish")
        with self.assertRaises(FakePeerError):
            self.peer.add_behaviour("/state/", "error", mode="wrong_shape")
        self.peer.add_behaviour("/state/", "malformed")
        self.assertEqual(self.peer.behaviours()[0]["mode"], "invalid_json")

    def test_stop_start_server(self) -> None:
        self.peer.stop_server(self.server)
        with self.assertRaises(requests.ConnectionError):
            self._get(timeout=3)
        self.peer.start_server(self.server)
        self.assertEqual(self._get().status_code, 200)

    def test_unknown_endpoint(self) -> None:
        resp = self.fed(self.server, "GET", "/_matrix/federation/v1/nonsense")
        self.assertEqual(resp.status_code, 404)
        self.assertEqual(resp.json()["errcode"], "M_UNRECOGNIZED")


if __name__ == "__main__":
    unittest.main()
