"""Resident side: who may read the state, and at which events, against stock Synapse.

The module answers ``/state`` and ``/state_ids`` from a cache keyed by state group:
a request that reaches a cached entry without stock's checks would leak the
room's state. Each case here first warms the cache with a legitimate request,
then asks where stock refuses (or answers) and compares the module's status and
body with stock Synapse's, for the *same* database (hs1 restarted without the
module). Each test runs on SQLite and on PostgreSQL, in rooms of versions 10 and
12.

The room is hosted by the fake peer and hs1 has joined it (its partial join
resynced), so that the fake peer can send hs1 whatever events it likes: a
server's last user leaving, an event from a non-member (rejected), events from a
banned user citing the room before the ban (soft-failed); and hs1 holds the
room's older events as outliers, fetched during its join.
"""

from __future__ import annotations

import json
import time
from typing import Any

from synapse.api.room_versions import KNOWN_ROOM_VERSIONS

from synapse_partial_state.wire import MEMBERS_ONLY_PARAM
from tests.blackbox.test_resident_state import pdus_by_id, state_path
from tests.fedkit.testcase import FederationTestCase, on_room_versions

MEMBER = "m.room.member"
ACL = "m.room.server_acl"
#: Every fake server is on 127.0.0.1 (hs1 too, but a room's ACL does not apply
#: to its own users' events).
DENY_FAKE_SERVERS = {"allow": ["*"], "deny": ["127.0.0.1"], "allow_ip_literals": True}
ALLOW_ALL = {"allow": ["*"], "allow_ip_literals": True}

#: (endpoint, members_only) variants asked for each case.
VARIANTS = (("state", None), ("state_ids", None), ("state", "true"))

#: What stock answers in each case (the module must answer the same).
EXPECTED = {
    "server whose users all left": (403, "M_FORBIDDEN"),
    "server denied by the ACL": (403, "M_FORBIDDEN"),
    "outlier create event": (404, "M_NOT_FOUND"),
    "outlier member event": (404, "M_NOT_FOUND"),
    "rejected event": (404, "M_NOT_FOUND"),
    "soft-failed message": (200, None),
    "soft-failed member event": (200, None),
}

Outcome = tuple[int, Any]


def _brief(outcome: Outcome) -> tuple[int, Any]:
    """An outcome for a failure message: the error, or the answer's size."""
    status, body = outcome
    if not isinstance(body, dict) or "errcode" in body:
        return status, body
    return status, {
        field: len(value) if isinstance(value, list) else value
        for field, value in body.items()
    }


@on_room_versions("10", "12", ci_rotate=True)
class ResidentAccessMatchesStock(FederationTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.peer = self.make_fake_peer()
        room = self.peer.create_room(
            room_version=self.ROOM_VERSION or "10", members=4, servers=2
        )
        self.room_id = room["room_id"]
        self.room_version = room["room_version"]
        self.resident = room["resident"]
        self.creator = f"@creator:{self.resident}"
        (self.hs1,) = self.make_homeservers(["hs1"])
        self.alice = self.register(self.hs1, "alice")
        self.alice.join(self.room_id, via=[self.resident])
        self.alice.joined_members(self.room_id, timeout=300)  # resync done

    # -- helpers ---------------------------------------------------------------

    def send(self, type: str, content: dict[str, Any], **kw: Any) -> str:
        """An event from the fake peer, delivered to hs1 and stored by it
        (accepted, soft-failed or rejected: Synapse answers the transaction
        first, and handles its events in the background)."""
        sent = self.peer.send_event(self.room_id, type, content, **kw)
        self.assertEqual(sent["delivered"], {self.hs1.server_name: 200}, sent)
        event_id = str(sent["event_id"])
        deadline = time.monotonic() + 30
        while not self.hs1.sql("SELECT 1 FROM events WHERE event_id = ?", (event_id,)):
            self.assertLess(time.monotonic(), deadline, f"{event_id} never stored")
            time.sleep(0.05)
        return event_id

    def ask(self, server: str, event_id: str) -> dict[str, Outcome]:
        """Every variant of the request, as ``server``: (status, body) each."""
        result = {}
        for endpoint, members_only in VARIANTS:
            answer = self.peer.federation_request(
                server,
                self.hs1.server_name,
                "GET",
                state_path(self.room_id, event_id, endpoint, members_only),
            )
            name = endpoint + (f" {MEMBERS_ONLY_PARAM}" if members_only else "")
            result[name] = (answer["status"], answer["body"])
        return result

    def event_row(self, sql: str, event_id: str) -> Any:
        rows = self.hs1.sql(sql, (event_id,))
        self.assertEqual(len(rows), 1, f"{event_id}: {rows}")
        return rows[0][0]

    def switch_to_stock(self) -> None:
        self.hs1.with_module = False
        self.hs1.write_config()
        self.hs1.restart()

    def assert_same(self, case: str, module: Outcome, stock: Outcome) -> None:
        """Same status; errors: the same body; answers: the same events."""
        self.assertEqual(module[0], stock[0], (case, _brief(module), _brief(stock)))
        if module[0] != 200:
            self.assertEqual(module[1], stock[1], case)
        elif "pdu_ids" in stock[1]:
            for field in ("pdu_ids", "auth_chain_ids"):
                self.assertEqual(set(module[1][field]), set(stock[1][field]), case)
        else:
            for field in ("pdus", "auth_chain"):
                self.assertEqual(
                    pdus_by_id(module[1][field], self.room_version),
                    pdus_by_id(stock[1][field], self.room_version),
                    f"{case}: {field}",
                )

    # -- the test --------------------------------------------------------------

    def test_refusals_and_answers_are_stock_with_a_warm_cache(self) -> None:
        alice, hs1 = self.alice, self.hs1
        version = KNOWN_ROOM_VERSIONS[self.room_version]
        # alice may send the server ACL (power 100), so that it can be lifted.
        power = alice.state_event(self.room_id, "m.room.power_levels")
        power.setdefault("users", {})[alice.user_id] = 100
        self.send("m.room.power_levels", power, state_key="")
        # A server whose only user joins now (and leaves below).
        (leaver_server,) = self.peer.create_servers(1)
        leaver = f"@leaver:{leaver_server}"
        self.send(MEMBER, {"membership": "join"}, sender=leaver, state_key=leaver)
        anchor = self.send("m.room.message", {"msgtype": "m.text", "body": "anchor"})

        # Warm the cache: the state at the anchor, asked legitimately by the
        # leaver and by the resident (every variant).
        warm = self.ask(self.resident, anchor)
        for name, (status, body) in warm.items():
            self.assertEqual(status, 200, (name, body))
        self.assertEqual(self.ask(leaver_server, anchor)["state"][0], 200)
        state = {
            (pdu["type"], pdu["state_key"]): event_id
            for event_id, pdu in pdus_by_id(
                warm["state"][1]["pdus"], self.room_version
            ).items()
        }

        # (a) The leaver's server has no user in the room any more.
        self.send(MEMBER, {"membership": "leave"}, sender=leaver, state_key=leaver)

        # (e) A banned user's events citing the room before the ban: they pass
        # the auth rules at their own state, fail against the current state.
        banned = f"@u1:{self.peer.room(self.room_id)['servers'][1]}"
        ban = self.send(MEMBER, {"membership": "ban"}, state_key=banned)
        base_auth = [state[("m.room.power_levels", "")], state[(MEMBER, banned)]]
        if not version.msc4291_room_ids_as_hashes:
            base_auth.insert(0, state[("m.room.create", "")])
        soft_message = self.send(
            "m.room.message",
            {"msgtype": "m.text", "body": "from before my ban"},
            sender=banned,
            prev_events=[anchor],
            auth_events=base_auth,
        )
        soft_member = self.send(
            MEMBER,
            {"membership": "join", "displayname": "still here"},
            sender=banned,
            state_key=banned,
            prev_events=[anchor],
            auth_events=base_auth + [state[("m.room.join_rules", "")]],
        )
        # (d) A message from a server's user who never joined: rejected.
        stranger = f"@stranger:{self.peer.room(self.room_id)['servers'][1]}"
        rejected = self.send(
            "m.room.message",
            {"msgtype": "m.text", "body": "not a member"},
            sender=stranger,
            prev_events=[ban],
        )

        # hs1 holds each event as the case says; (c) the room's first events
        # are outliers here, fetched with its partial join.
        outlier = "SELECT outlier FROM events WHERE event_id = ?"
        create_id = state[("m.room.create", "")]
        creator_join = state[(MEMBER, self.creator)]
        for event_id in (create_id, creator_join):
            self.assertTrue(self.event_row(outlier, event_id), event_id)
        for event_id in (anchor, soft_message, soft_member, rejected):
            self.assertFalse(self.event_row(outlier, event_id), event_id)
        metadata = "SELECT internal_metadata FROM event_json WHERE event_id = ?"
        for event_id in (soft_message, soft_member):
            self.assertIs(
                json.loads(self.event_row(metadata, event_id)).get("soft_failed"),
                True,
                event_id,
            )
        self.assertTrue(
            self.event_row("SELECT reason FROM rejections WHERE event_id = ?", rejected)
        )
        self.assertEqual(
            hs1.sql(
                "SELECT event_id FROM rejections WHERE event_id IN (?, ?)",
                (soft_message, soft_member),
            ),
            [],
        )

        cases = {
            "server whose users all left": (leaver_server, anchor),
            "outlier create event": (self.resident, create_id),
            "outlier member event": (self.resident, creator_join),
            "rejected event": (self.resident, rejected),
            "soft-failed message": (self.resident, soft_message),
            "soft-failed member event": (self.resident, soft_member),
        }
        acl_case = "server denied by the ACL"

        def answers() -> dict[str, dict[str, Outcome]]:
            """Every case; (b) the ACL's last, as it denies every fake server."""
            result = {name: self.ask(*where) for name, where in cases.items()}
            alice.send_state(self.room_id, ACL, "", DENY_FAKE_SERVERS)
            result[acl_case] = self.ask(self.resident, anchor)
            return result

        module = answers()
        self.switch_to_stock()
        alice.send_state(self.room_id, ACL, "", ALLOW_ALL)
        stock = answers()

        for case, by_variant in module.items():
            for variant, outcome in by_variant.items():
                what = f"{case}, {variant}"
                status, errcode = EXPECTED[case]
                self.assertEqual(outcome[0], status, (what, _brief(outcome)))
                if errcode is not None:
                    self.assertEqual(outcome[1].get("errcode"), errcode, what)
                if variant.endswith(MEMBERS_ONLY_PARAM) and status == 200:
                    # Ours by design: the member events only, with the marker.
                    self.assertIs(outcome[1][MEMBERS_ONLY_PARAM], True, what)
                    self.assertEqual(stock[case][variant][0], 200, what)
                    continue
                self.assert_same(what, outcome, stock[case][variant])
        # The soft-failed member event: the state before it holds the membership
        # it replaced (the join), as stock's.
        before = pdus_by_id(
            module["soft-failed member event"]["state"][1]["pdus"], self.room_version
        )
        self.assertIn(state[(MEMBER, banned)], before)
        self.assertNotIn(soft_member, before)
        self.assertEqual(
            before[state[(MEMBER, banned)]]["content"]["membership"], "join"
        )
