"""Resident side: partial /send_join answers from a real Synapse running the module.

The fake peer plays the joining server, so every field of the answer is inspected
as it went over the wire. Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.events import make_event_from_dict

from tests.blackbox.resync_case import wait_until
from tests.fedkit.homeserver import Homeserver
from tests.fedkit.matrix_client import Client
from tests.fedkit.process import read_from
from tests.fedkit.testcase import (
    FederationTestCase,
    on_both_databases,
    on_room_versions,
)

SUMMARY = "org.matrix.msc2775.summary"
MEMBER = "m.room.member"
ACL = "m.room.server_acl"
#: The module's log line each time a join makes it read the room's memberships.
ESSENTIALS_LINE = re.compile(r"send_join essentials for (\S+) in (\S+): \d+ candidates")


def event_ids(pdus: list[dict[str, Any]], room_version: str) -> list[str]:
    version = KNOWN_ROOM_VERSIONS[room_version]
    return [make_event_from_dict(pdu, version).event_id for pdu in pdus]


class _ResidentRoom(FederationTestCase):
    """A room on hs1 with bans, a kick, an invite, a power-level user and members
    from three servers (hs1 and two fake servers)."""

    MODULE_CONFIG: dict[str, Any] = {}
    ROOM_NAME: str | None = None

    def build_room(self) -> None:
        self.peer = self.make_fake_peer()
        (self.hs1,) = self.make_homeservers(["hs1"], module_config=self.MODULE_CONFIG)
        hs1 = self.hs1
        users = {
            name: self.register(hs1, name)
            for name in ("alice", "bob", "carol", "dave", "erin", "frank", "greg")
        }
        self.users = users
        alice = users["alice"]
        create: dict[str, Any] = {"preset": "public_chat"}
        if self.ROOM_VERSION:
            create["room_version"] = self.ROOM_VERSION
        if self.ROOM_NAME:
            create["name"] = self.ROOM_NAME
        self.room_id = alice.create_room(**create)
        self.room_version = self._room_version(alice)
        for name in ("bob", "carol", "dave", "erin", "frank", "greg"):
            users[name].join(self.room_id)
        alice.ban(self.room_id, users["dave"].user_id)
        alice.kick(self.room_id, users["erin"].user_id)
        self.invitee = "@henry:" + hs1.server_name
        self.register(hs1, "henry")
        alice.invite(self.room_id, self.invitee)
        power = alice.state_event(self.room_id, "m.room.power_levels")
        power["users"][users["greg"].user_id] = 50
        alice.send_state(self.room_id, "m.room.power_levels", "", power)
        # Two more local members: not heroes (five already), not power users,
        # not the first of their server: they must be omitted.
        for name in ("ivan", "judy"):
            users[name] = self.register(hs1, name)
            users[name].join(self.room_id)
        # Members of two more servers, joined with full state.
        self.fake_members = []
        for _ in range(2):
            result = self.peer.join(self.room_id, hs1.server_name, omit_members=False)
            self.assertEqual(result["send_join"]["status"], 200, result)
            self.fake_members.append(result["join_event"]["state_key"])

    def _room_version(self, client: Client) -> str:
        create = client.state_event(self.room_id, "m.room.create")
        return str(create.get("room_version", "1"))

    def partial_join(self, **kw: Any) -> dict[str, Any]:
        result = self.peer.join(self.room_id, self.hs1.server_name, **kw)
        self.assertEqual(result["send_join"]["status"], 200, result)
        return result

    def members_in(self, pdus: list[dict[str, Any]]) -> set[str]:
        return {p["state_key"] for p in pdus if p["type"] == MEMBER}

    def assert_auth_chain_minimal_and_complete(self, body: dict[str, Any]) -> None:
        state_ids = event_ids(body["state"], self.room_version)
        chain_ids = event_ids(body["auth_chain"], self.room_version)
        self.assertEqual(len(chain_ids), len(set(chain_ids)), "duplicate in auth_chain")
        self.assertEqual(len(state_ids), len(set(state_ids)), "duplicate in state")
        self.assertFalse(set(state_ids) & set(chain_ids), "auth_chain repeats state")
        known = set(state_ids) | set(chain_ids)
        for pdu in body["state"] + body["auth_chain"] + [body["event"]]:
            for auth_id in pdu.get("auth_events", []):
                self.assertIn(auth_id, known, f"auth event missing for {pdu['type']}")


@on_room_versions("10", "12", ci_rotate=True)
class PartialAnswerUnnamedRoom(_ResidentRoom):
    MODULE_CONFIG = {"resident": {"members_per_server": 1}}

    def test_essentials_summary_and_auth_chain(self) -> None:
        self.build_room()
        u = {name: c.user_id for name, c in self.users.items()}
        result = self.partial_join()
        body = result["send_join"]["body"]
        joiner = result["join_event"]["state_key"]

        self.assertIs(body["members_omitted"], True)
        self.assertEqual(
            set(body["servers_in_room"]),
            {self.hs1.server_name} | {m.split(":", 1)[1] for m in self.fake_members},
        )

        # Every non-member state event of the room is there.
        current = self.users["alice"].room_state(self.room_id)
        non_member = {
            (e["type"], e["state_key"]) for e in current if e["type"] != MEMBER
        }
        self.assertEqual(
            {(p["type"], p["state_key"]) for p in body["state"] if p["type"] != MEMBER},
            non_member,
        )

        heroes = [u["alice"], u["bob"], u["carol"], u["frank"], u["greg"]]
        expected = (
            set(heroes)  # heroes, in join order
            | {u["greg"]}  # named in power levels (alice too)
            | {u["dave"], u["erin"]}  # ban, kick
            | {self.invitee}  # pending invite
            | set(self.fake_members)  # first member of each other server
        )
        self.assertEqual(self.members_in(body["state"]), expected)
        self.assertNotIn(u["ivan"], self.members_in(body["state"]))
        by_key = {p["state_key"]: p for p in body["state"] if p["type"] == MEMBER}
        self.assertEqual(by_key[u["dave"]]["content"]["membership"], "ban")
        self.assertEqual(by_key[u["erin"]]["content"]["membership"], "leave")
        self.assertEqual(by_key[self.invitee]["content"]["membership"], "invite")
        # Each membership is the one in the state before the join (the module
        # reads them itself along the state group's delta chain, not through
        # Synapse's whole state: a member who joined and then was banned or
        # kicked has two rows in the chain, the latest wins).
        current_ids = {
            e["state_key"]: e["event_id"] for e in current if e["type"] == MEMBER
        }
        answer_ids = dict(
            zip(
                [p["state_key"] for p in body["state"]],
                event_ids(body["state"], self.room_version),
                strict=True,
            )
        )
        for user_id in by_key:
            self.assertEqual(answer_ids[user_id], current_ids[user_id], user_id)

        self.assert_auth_chain_minimal_and_complete(body)

        summary = body[SUMMARY]
        self.assertEqual(summary["m.heroes"], heroes)
        # alice bob carol frank greg ivan judy + 2 fake members + the joiner
        self.assertEqual(summary["m.joined_member_count"], 10)
        self.assertEqual(summary["m.invited_member_count"], 1)
        self.assertNotIn(joiner, summary["m.heroes"])

    def test_bad_omit_members_is_rejected_and_changes_nothing(self) -> None:
        self.build_room()
        for bad in ("yes", "1", "TRUE", ""):
            result = self.peer.join(
                self.room_id, self.hs1.server_name, omit_members=bad
            )
            send_join = result["send_join"]
            self.assertEqual(send_join["status"], 400, (bad, send_join))
            self.assertEqual(send_join["body"]["errcode"], "M_INVALID_PARAM")
            joiner = result["join_event"]["state_key"]
            status, _ = self.users["alice"].get(
                f"/_matrix/client/v3/rooms/{self.room_id}/state/{MEMBER}/{joiner}"
            )
            self.assertEqual(status, 404, f"{bad!r}: the join must not be persisted")

    def test_full_answers_are_unchanged(self) -> None:
        self.build_room()
        current = self.users["alice"].room_state(self.room_id)
        members = {e["state_key"] for e in current if e["type"] == MEMBER}
        for kw in (
            {"omit_members": False},
            {"omit_members": None},
            {"send_join_version": 1},
        ):
            result = self.partial_join(**kw)
            body = result["send_join"]["body"]
            if kw.get("send_join_version") == 1:
                # v1 wraps the answer as [200, {...}]
                self.assertEqual(body[0], 200)
                body = body[1]
            self.assertFalse(body.get("members_omitted", False), kw)
            self.assertNotIn(SUMMARY, body, kw)
            # every member known before this join is in the full state
            self.assertLessEqual(members, self.members_in(body["state"]), kw)
            members.add(result["join_event"]["state_key"])


@on_both_databases(ci_database="postgres")
class PartialAnswerNamedRoom(_ResidentRoom):
    ROOM_NAME = "A named room"

    def test_heroes_also_for_named_rooms(self) -> None:
        self.build_room()
        body = self.partial_join()["send_join"]["body"]
        got = self.members_in(body["state"])
        for name in ("alice", "bob", "carol", "frank", "greg"):
            self.assertIn(self.users[name].user_id, got)
        self.assertEqual(len(body[SUMMARY]["m.heroes"]), 5)
        # Per-server members are off by default: no member of the fake servers.
        self.assertFalse(set(self.fake_members) & got)


@on_both_databases(ci_database="sqlite")
class PartialAnswerCapped(_ResidentRoom):
    MODULE_CONFIG = {"resident": {"max_extra_members": 2}}

    def test_cap_keeps_the_highest_priority_members(self) -> None:
        self.build_room()
        body = self.partial_join()["send_join"]["body"]
        self.assertEqual(
            self.members_in(body["state"]),
            {self.users["alice"].user_id, self.users["bob"].user_id},
        )
        self.assert_auth_chain_minimal_and_complete(body)


@on_both_databases(ci_database="postgres")
class PartialAnswerDisabled(_ResidentRoom):
    MODULE_CONFIG = {"resident": {"enabled": False}}

    def test_native_answer_when_disabled(self) -> None:
        self.build_room()
        body = self.partial_join()["send_join"]["body"]
        self.assertIs(body["members_omitted"], True)
        self.assertNotIn(SUMMARY, body)
        # native: heroes only (unnamed room), no bans, invites or per-server members
        got = self.members_in(body["state"])
        self.assertNotIn(self.users["dave"].user_id, got)
        self.assertNotIn(self.invitee, got)
        self.assertFalse(set(self.fake_members) & got)


@on_both_databases(ci_database="sqlite")
class FanOutAfterTheAnswer(_ResidentRoom):
    """The join's fan-out to the room's other servers waits for the joiner's
    answer to be sent (``resident.fanout_hold_seconds``): in one process both
    share the reactor, and in a big room the fan-out is thousands of requests."""

    def test_other_servers_get_the_join_once_the_answer_is_sent(self) -> None:
        self.build_room()
        others = {m.split(":", 1)[1] for m in self.fake_members}
        since = self.hs1.log_offset()
        self.peer.clear_transactions()
        result = self.partial_join(include_body=False)
        answered_at = result["send_join"]["answered_at"]
        event_id = result["event_id"]

        def delivered() -> dict[str, float] | None:
            got = {
                txn["destination"]: txn["time"]
                for txn in self.peer.transactions(origin=self.hs1.server_name)
                for pdu in txn["body"].get("pdus", [])
                if pdu.get("state_key") == result["join_event"]["state_key"]
            }
            return got if others <= set(got) else None

        got = wait_until(delivered, 30, f"the join {event_id} at {others}")
        for server in others:
            # Nothing is lost, and nothing went out before the joiner had its
            # answer.
            self.assertGreaterEqual(got[server], answered_at, server)
        # Because the sender's wake-up was held until then, not by chance; and
        # the presence handler's (woken by the same join: in a big room it
        # works through every member at once) with it.
        self.hs1.wait_for_log(
            r"Federation sender and presence woken after the answers sent: "
            r"\d+ wake-up",
            timeout=10,
            since=since,
        )


class WireCompatibility(FederationTestCase):
    def _join_and_talk(self, resident: Homeserver, joiner: Homeserver) -> None:
        alice = self.register(resident, "alice")
        bob = self.register(joiner, "bob")
        room_id = alice.create_room(preset="public_chat")
        for i in range(3):
            self.register(resident, f"extra{i}").join(room_id)
        bob.join(room_id, via=[resident.server_name])
        bob.send_message(room_id, "hi")
        alice.wait_for_message(room_id, "hi")
        alice.send_message(room_id, "hello")
        bob.wait_for_message(room_id, "hello")
        self.assertEqual(len(bob.joined_members(room_id)), 5)

    def test_stock_joiner_module_resident(self) -> None:
        resident = self.make_homeserver("hs1", with_module=True)
        joiner = self.make_homeserver("hs2", with_module=False)
        self._join_and_talk(resident, joiner)

    def test_module_joiner_stock_resident(self) -> None:
        resident = self.make_homeserver("hs1", with_module=False)
        joiner = self.make_homeserver("hs2", with_module=True)
        self._join_and_talk(resident, joiner)


@on_both_databases(ci_database="postgres")
class UnknownRoom(_ResidentRoom):
    def test_unknown_room_is_refused_and_nothing_is_created(self) -> None:
        self.build_room()
        bogus = "!doesnotexist:" + self.hs1.server_name
        result = self.peer.join(bogus, self.hs1.server_name, omit_members=True)
        self.assertEqual(result["make_join"]["status"], 404, result)
        self.assertIsNone(result["send_join"])
        status, _ = self.users["alice"].get(f"/_matrix/client/v3/rooms/{bogus}/state")
        self.assertIn(status, (403, 404))


@on_both_databases(ci_database="sqlite")
class PartialAnswerKnockRoom(_ResidentRoom):
    """A knock-rule room (the default room version supports knocking) with a
    pending knock: the knock is an essential, like a pending invite."""

    def build_knock_room(self) -> None:
        self.peer = self.make_fake_peer()
        (self.hs1,) = self.make_homeservers(["hs1"])
        alice = self.register(self.hs1, "alice")
        kate = self.register(self.hs1, "kate")
        self.users = {"alice": alice, "kate": kate}
        self.room_id = alice.create_room(
            preset="private_chat",
            initial_state=[
                {
                    "type": "m.room.join_rules",
                    "state_key": "",
                    "content": {"join_rule": "knock"},
                }
            ],
        )
        self.room_version = self._room_version(alice)
        status, body = kate.post(
            f"/_matrix/client/v3/knock/{quote(self.room_id, safe='')}",
            {"reason": "let me in, please"},
        )
        self.assertEqual(status, 200, body)
        # The joiner needs an invite to get in a knock room.
        (self.server,) = self.peer.create_servers(1)
        alice.invite(self.room_id, f"@joiner:{self.server}")

    def test_pending_knock_is_an_essential(self) -> None:
        self.build_knock_room()
        alice, kate = self.users["alice"], self.users["kate"]
        self.assertTrue(KNOWN_ROOM_VERSIONS[self.room_version].knock_join_rule)
        self.assertEqual(
            alice.state_event(self.room_id, "m.room.join_rules")["join_rule"], "knock"
        )
        knock = alice._call(
            "GET",
            f"/_matrix/client/v3/rooms/{quote(self.room_id, safe='')}/state/"
            f"{MEMBER}/{quote(kate.user_id, safe='')}",
            params={"format": "event"},
        )
        self.assertEqual(knock["content"]["membership"], "knock")

        body = self.partial_join(server=self.server)["send_join"]["body"]
        self.assertIs(body["members_omitted"], True)
        by_key = {p["state_key"]: p for p in body["state"] if p["type"] == MEMBER}
        self.assertIn(kate.user_id, by_key)
        sent = by_key[kate.user_id]
        # The very event of the room's state, field by field.
        self.assertEqual(event_ids([sent], self.room_version), [knock["event_id"]])
        self.assertEqual(sent["type"], MEMBER)
        self.assertEqual(sent["sender"], kate.user_id)
        self.assertEqual(sent["state_key"], kate.user_id)
        self.assertEqual(sent["room_id"], self.room_id)
        self.assertEqual(sent["content"]["membership"], "knock")
        self.assertEqual(sent["content"]["reason"], "let me in, please")
        self.assertEqual(sent["content"], knock["content"])
        self.assertEqual(sent["origin_server_ts"], knock["origin_server_ts"])
        # The joiner's own invite is its previous membership: native keeps it.
        self.assertEqual(
            by_key[f"@joiner:{self.server}"]["content"]["membership"], "invite"
        )
        self.assert_auth_chain_minimal_and_complete(body)
        summary = body[SUMMARY]
        self.assertEqual(summary["m.joined_member_count"], 2)  # alice + the joiner
        self.assertEqual(summary["m.invited_member_count"], 0)


def state_map(client: Client, room_id: str) -> dict[tuple[str, str], str]:
    """(type, state_key) -> event ID of the room's current state, as ``client`` sees it."""
    return {
        (e["type"], e["state_key"]): e["event_id"] for e in client.room_state(room_id)
    }


@on_both_databases(ci_database="postgres")
class JoinFailingAuth(FederationTestCase):
    """Partial joins that fail the auth rules at ``/send_join`` (``make_join``
    would have refused them; the fake peer signs a doctored template): the error
    is stock Synapse's, and the room is untouched."""

    def test_refused_as_stock_and_nothing_changes(self) -> None:
        peer = self.make_fake_peer()
        (hs1,) = self.make_homeservers(["hs1"])
        alice = self.register(hs1, "alice")
        public = alice.create_room(preset="public_chat")
        self.register(hs1, "bob").join(public)
        private = alice.create_room(preset="private_chat")
        (server,) = peer.create_servers(1)
        mallory = f"@mallory:{server}"
        alice.ban(public, mallory)
        # A room only members of `public` may join: a member of the fake server
        # joins `public`, so that make_join answers it (the template names alice
        # as the authorising user); the join is then sent for someone else.
        restricted = alice.create_room(preset="public_chat")
        alice.send_state(
            restricted,
            "m.room.join_rules",
            "",
            {
                "join_rule": "restricted",
                "allow": [{"type": "m.room_membership", "room_id": public}],
            },
        )
        member = peer.join(
            public, hs1.server_name, server=server, user_localpart="member"
        )
        self.assertEqual(member["send_join"]["status"], 200, member)
        outsider = f"@outsider:{server}"
        # make_join needs an invited user in the invite-only room.
        alice.invite(private, f"@guest:{server}")
        private_state = state_map(alice, private)
        version = KNOWN_ROOM_VERSIONS[
            str(alice.state_event(private, "m.room.create").get("room_version", "1"))
        ]
        # What a join without an invite is authorised by (no member event).
        plain_auth = [
            private_state[("m.room.power_levels", "")],
            private_state[("m.room.join_rules", "")],
        ]
        if not version.msc4291_room_ids_as_hashes:
            plain_auth.append(private_state[("m.room.create", "")])
        cases: dict[str, dict[str, Any]] = {
            "banned": {
                "room_id": public,
                "user_localpart": "joiner",
                "event_overrides": {"sender": mallory, "state_key": mallory},
            },
            "not invited": {
                "room_id": private,
                "user_localpart": "guest",
                "event_overrides": {
                    "sender": mallory,
                    "state_key": mallory,
                    "auth_events": plain_auth,
                },
            },
            # Refused by Synapse's join-restriction check (the state before
            # the join says who may join).
            "not in the allowed room": {
                "room_id": restricted,
                "user_localpart": "member",
                "event_overrides": {"sender": outsider, "state_key": outsider},
            },
        }
        rooms = (public, private, restricted)
        before = {room: state_map(alice, room) for room in rooms}
        answers: dict[str, dict[str, Any]] = {}
        templates: dict[str, dict[str, Any]] = {}
        for variant in ("module", "stock"):
            if variant == "stock":
                hs1.with_module = False
                hs1.write_config()
                hs1.restart()
            for name, case in cases.items():
                result = peer.join(
                    remote=hs1.server_name, server=server, omit_members=True, **case
                )
                self.assertEqual(result["make_join"]["status"], 200, (name, result))
                self.assertEqual(result["user_id"], case["event_overrides"]["sender"])
                send_join = result["send_join"]
                answers[f"{name}, {variant}"] = send_join
                templates[f"{name}, {variant}"] = result["make_join"]["body"]["event"]
                room_id = str(case["room_id"])
                # Nothing changed: same state, the event was not stored.
                self.assertEqual(state_map(alice, room_id), before[room_id], name)
                status, _ = alice.get(
                    f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/event/"
                    f"{quote(result['event_id'], safe='')}"
                )
                self.assertEqual(status, 404, f"{name}, {variant}: event stored")
        for name in cases:
            module, stock = answers[f"{name}, module"], answers[f"{name}, stock"]
            self.assertEqual(
                (module["status"], module["body"]),
                (stock["status"], stock["body"]),
                name,
            )
            self.assertEqual(module["status"], 403, (name, module))
            self.assertEqual(module["body"]["errcode"], "M_FORBIDDEN", name)
            # The module narrows what /make_join reads of the current state
            # (the join rules, the joiner's membership): the same template.
            self.assertEqual(
                templates[f"{name}, module"]["content"],
                templates[f"{name}, stock"]["content"],
                name,
            )
        # In the restricted room, make_join read the whole state again, to
        # name a local member who could invite (alice).
        self.assertEqual(
            templates["not in the allowed room, module"]["content"].get(
                "join_authorised_via_users_server"
            ),
            alice.user_id,
        )
        # Refused by the join-restriction check (not by the auth rules).
        self.assertIn(
            "required rooms",
            answers["not in the allowed room, module"]["body"]["error"],
        )
        self.assertEqual(
            alice.state_event(public, MEMBER, mallory)["membership"], "ban"
        )


@on_both_databases(ci_database="sqlite")
class RefusedJoinsReadNothing(FederationTestCase):
    """Partial joins Synapse refuses: from a server the room's ACL denies, with a
    signature that does not verify, with a membership that is not a join. Each
    gets stock's error, and the resident never reads the room's memberships for
    it (the module logs a line each time it does): a junk ``/send_join`` from
    anyone must not cost a query over every ban, leave, invite and knock."""

    def test_refused_as_stock_without_reading_the_memberships(self) -> None:
        peer = self.make_fake_peer()
        (hs1,) = self.make_homeservers(["hs1"])
        alice = self.register(hs1, "alice")
        room_id = alice.create_room(preset="public_chat")
        self.register(hs1, "bob").join(room_id)
        self.register(hs1, "carol")
        alice.invite(room_id, "@carol:" + hs1.server_name)
        (server,) = peer.create_servers(1)
        # make_join refuses a denied server: ask for the template before the ACL.
        vers = "&".join(f"ver={v}" for v in KNOWN_ROOM_VERSIONS)
        make_join = peer.federation_request(
            server,
            hs1.server_name,
            "GET",
            f"/_matrix/federation/v1/make_join/{quote(room_id, safe='')}/"
            f"{quote(f'@denied:{server}', safe='')}?{vers}",
        )
        self.assertEqual(make_join["status"], 200, make_join)
        # Every fake server is on 127.0.0.1.
        deny = {"allow": ["*"], "deny": ["127.0.0.1"], "allow_ip_literals": True}

        def refused() -> dict[str, dict[str, Any]]:
            """Each refused partial join's ``send_join`` result, by case."""
            alice.send_state(room_id, ACL, "", deny)
            answers = {
                "denied by the ACL": peer.join(
                    room_id, hs1.server_name, server, template=make_join["body"]
                ),
            }
            alice.send_state(room_id, ACL, "", {"allow": ["*"]})
            answers["bad signature"] = peer.join(
                room_id, hs1.server_name, server, "forger", bad_signature=True
            )
            answers["not a join"] = peer.join(
                room_id,
                hs1.server_name,
                server,
                "leaver",
                event_overrides={"content": {"membership": "leave"}},
            )
            for name, result in answers.items():
                status, _ = alice.get(
                    f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/state/"
                    f"{MEMBER}/{quote(result['user_id'], safe='')}"
                )
                self.assertEqual(status, 404, f"{name}: the event was stored")
            return {name: result["send_join"] for name, result in answers.items()}

        since = hs1.log_offset()
        module = refused()
        # A join Synapse accepts does read them, once: the line is logged.
        accepted = peer.join(room_id, hs1.server_name, server)
        self.assertEqual(accepted["send_join"]["status"], 200, accepted)
        self.assertIs(accepted["send_join"]["body"]["members_omitted"], True)
        joiner = accepted["user_id"]
        hs1.wait_for_log(
            rf"send_join essentials for {re.escape(joiner)} in {re.escape(room_id)}: ",
            since=since,
        )
        read_for = [
            m.group(1) for m in ESSENTIALS_LINE.finditer(read_from(hs1.log_path, since))
        ]
        self.assertEqual(read_for, [joiner])

        hs1.with_module = False
        hs1.write_config()
        hs1.restart()
        stock = refused()
        expected = {
            "denied by the ACL": (403, "M_FORBIDDEN"),
            "bad signature": (403, "M_FORBIDDEN"),
            "not a join": (400, "M_BAD_JSON"),
        }
        for name, (status, errcode) in expected.items():
            got, want = module[name], stock[name]
            self.assertEqual(
                (got["status"], got["body"]["errcode"]), (status, errcode), (name, got)
            )
            self.assertEqual(
                (got["status"], got["body"]["errcode"]),
                (want["status"], want["body"]["errcode"]),
                name,
            )
        # The bad signature's message names the event (a new one each time).
        for name in ("denied by the ACL", "not a join"):
            self.assertEqual(module[name]["body"], stock[name]["body"], name)
