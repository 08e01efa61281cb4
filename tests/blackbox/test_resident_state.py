"""Resident side: /state and /state_ids served by the module, against stock Synapse.

Black-box tests run a real Synapse with the module; a fake federation peer plays the
servers asking. The answers are compared with stock Synapse's for the *same*
database: the homeserver is restarted without the module and asked again. Each test
runs on SQLite and on PostgreSQL. The pure parts (the byte-budget cache, the answer
assembly, the state-before-event rule) have unit tests at the end. How fast the
answers are is the benchmark's business (``scripts-dev/bench``), not these tests'.
"""

from __future__ import annotations

import re
import time
from functools import partial
from typing import Any
from urllib.parse import quote

from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.events import make_event_from_dict

from synapse_partial_state.wire import MEMBERS_ONLY_PARAM
from tests.blackbox.endpoints import patch_targets
from tests.blackbox.resync_case import wait_until
from tests.fedkit.matrix_client import Client
from tests.fedkit.testcase import (
    FederationTestCase,
    on_both_databases,
    on_room_versions,
)

MEMBER = "m.room.member"
FED = "/_matrix/federation/v1"


def _q(value: str) -> str:
    return quote(value, safe="")


def state_path(
    room_id: str,
    event_id: str | None,
    endpoint: str = "state",
    members_only: str | None = None,
) -> str:
    path = f"{FED}/{endpoint}/{_q(room_id)}"
    params = []
    if event_id is not None:
        params.append(f"event_id={_q(event_id)}")
    if members_only is not None:
        params.append(f"{MEMBERS_ONLY_PARAM}={members_only}")
    return path + ("?" + "&".join(params) if params else "")


def pdus_by_id(pdus: list[dict[str, Any]], room_version: str) -> dict[str, Any]:
    """Event ID -> PDU, checking that no event is listed twice."""
    version = KNOWN_ROOM_VERSIONS[room_version]
    result = {make_event_from_dict(pdu, version).event_id: pdu for pdu in pdus}
    assert len(result) == len(pdus), "an event is listed twice"
    return result


class _StateRoom(FederationTestCase):
    """A room on hs1 (module) with bans, a kick, an invite, a power-level change,
    messages and a topic, and a fake server joined to it (the asker)."""

    MODULE_CONFIG: dict[str, Any] = {}

    def build_room(self) -> None:
        self.peer = self.make_fake_peer()
        (self.hs1,) = self.make_homeservers(["hs1"], module_config=self.MODULE_CONFIG)
        users = {
            name: self.register(self.hs1, name)
            for name in ("alice", "bob", "carol", "dave", "erin", "henry")
        }
        self.users = users
        alice = users["alice"]
        create: dict[str, Any] = {
            "preset": "public_chat",
            "name": "State room",
            "topic": "Serving state",
        }
        if self.ROOM_VERSION:
            create["room_version"] = self.ROOM_VERSION
        self.room_id = alice.create_room(**create)
        self.room_version = str(
            alice.state_event(self.room_id, "m.room.create").get("room_version", "1")
        )
        for name in ("bob", "carol", "dave", "erin"):
            users[name].join(self.room_id)
        alice.ban(self.room_id, users["dave"].user_id)
        alice.kick(self.room_id, users["erin"].user_id)
        alice.invite(self.room_id, users["henry"].user_id)
        self.message_id = alice.send_message(self.room_id, "hello")
        power = alice.state_event(self.room_id, "m.room.power_levels")
        power["users"][users["bob"].user_id] = 50
        self.power_id = alice.send_state(self.room_id, "m.room.power_levels", "", power)
        joined = self.peer.join(self.room_id, self.hs1.server_name, omit_members=False)
        self.assertEqual(joined["send_join"]["status"], 200, joined)
        self.asker = joined["server"]
        self.fake_join_id = joined["event_id"]
        self.last_id = alice.send_message(self.room_id, "after the fake join")

    # -- requests --------------------------------------------------------------

    def fed_get(self, path: str, server: str | None = None) -> dict[str, Any]:
        return self.peer.federation_request(
            server or self.asker, self.hs1.server_name, "GET", path
        )

    def get_state(
        self,
        event_id: str,
        endpoint: str = "state",
        members_only: str | None = None,
    ) -> dict[str, Any]:
        result = self.fed_get(
            state_path(self.room_id, event_id, endpoint, members_only)
        )
        self.assertEqual(result["status"], 200, result)
        body: dict[str, Any] = result["body"]
        return body

    def switch_to_stock(self) -> None:
        """Restart hs1 on the same database without the module."""
        self.hs1.with_module = False
        self.hs1.write_config()
        self.hs1.restart()

    def redact(self, client: Client, event_id: str) -> str:
        txn = f"r{time.monotonic_ns()}"
        status, body = client.put(
            f"/_matrix/client/v3/rooms/{_q(self.room_id)}/redact/{_q(event_id)}/{txn}",
            {"reason": "test"},
        )
        self.assertEqual(status, 200, body)
        return str(body["event_id"])

    def state_log_lines(self, since: int) -> list[str]:
        return [
            line
            for line in self.hs1.read_log()[since:].splitlines()
            if "state cache: /state" in line
        ]

    # -- checks ----------------------------------------------------------------

    def assert_same_state(
        self, module: dict[str, Any], stock: dict[str, Any], what: str = ""
    ) -> None:
        """Same keys, same events (as JSON values) in each list; order aside."""
        self.assertEqual(set(module), set(stock), what)
        for field in ("pdus", "auth_chain"):
            self.assertEqual(
                pdus_by_id(module[field], self.room_version),
                pdus_by_id(stock[field], self.room_version),
                f"{what}: {field}",
            )

    def assert_same_state_ids(
        self, module: dict[str, Any], stock: dict[str, Any], what: str = ""
    ) -> None:
        self.assertEqual(set(module), {"pdu_ids", "auth_chain_ids"}, what)
        self.assertEqual(set(module), set(stock), what)
        for field in ("pdu_ids", "auth_chain_ids"):
            ids = module[field]
            self.assertEqual(len(ids), len(set(ids)), f"{what}: {field}")
            self.assertEqual(set(ids), set(stock[field]), f"{what}: {field}")


@on_room_versions("10", "11", "12", ci_rotate=True)
class StateAnswersMatchStock(_StateRoom):
    def test_state_and_state_ids_equal_stock_also_after_a_redaction(self) -> None:
        self.build_room()
        alice = self.users["alice"]
        events = {
            "message": self.message_id,
            "power levels (replaces state)": self.power_id,
            "fake join (new state key)": self.fake_join_id,
            "last": self.last_id,
        }
        # Warm the cache with every event of these states, unredacted.
        for event_id in events.values():
            self.get_state(event_id)
        topic_id = alice._call(
            "GET",
            f"/_matrix/client/v3/rooms/{_q(self.room_id)}/state/m.room.topic/",
            params={"format": "event"},
        )["event_id"]
        events["redaction"] = self.redact(alice, topic_id)

        module = {
            name: (
                self.get_state(event_id),
                self.get_state(event_id, "state_ids"),
                self.get_state(event_id, members_only="true"),
            )
            for name, event_id in events.items()
        }
        # The redacted topic is served pruned: the cached copy was dropped.
        topic = pdus_by_id(module["redaction"][0]["pdus"], self.room_version)[topic_id]
        self.assertEqual(topic["content"], {})
        # The state at the last event is the room's current state (before it).
        current = {
            (e["type"], e["state_key"]): e["event_id"]
            for e in alice.room_state(self.room_id)
        }
        self.assertEqual(
            set(pdus_by_id(module["last"][0]["pdus"], self.room_version)),
            set(current.values()),
        )

        self.switch_to_stock()
        for name, event_id in events.items():
            full, ids, members_only = module[name]
            self.assert_same_state(full, self.get_state(event_id), name)
            self.assert_same_state_ids(ids, self.get_state(event_id, "state_ids"), name)
            # A stock resident ignores members_only: a full answer, no marker.
            stock_mo = self.get_state(event_id, members_only="true")
            self.assertNotIn(MEMBERS_ONLY_PARAM, stock_mo)
            self.assert_same_state(full, stock_mo, name)
            self.assertIs(members_only[MEMBERS_ONLY_PARAM], True)

    def test_members_only_answer(self) -> None:
        self.build_room()
        for event_id in (self.power_id, self.last_id):
            full = self.get_state(event_id)
            answer = self.get_state(event_id, members_only="true")
            self.assertEqual(set(answer), {"pdus", "auth_chain", MEMBERS_ONLY_PARAM})
            self.assertIs(answer[MEMBERS_ONLY_PARAM], True)
            state = pdus_by_id(full["pdus"], self.room_version)
            members = {i for i, p in state.items() if p["type"] == MEMBER}
            others = set(state) - members
            pdus = pdus_by_id(answer["pdus"], self.room_version)
            chain = pdus_by_id(answer["auth_chain"], self.room_version)
            # Exactly the member events of the state, each as in the full answer.
            self.assertEqual(set(pdus), members)
            for event_id_, pdu in pdus.items():
                self.assertEqual(pdu, state[event_id_])
            # The auth chain repeats neither the members nor the other state...
            self.assertFalse(set(chain) & members)
            self.assertFalse(set(chain) & others)
            # ...and, with the rest of the state, holds every auth event needed.
            known = set(pdus) | set(chain) | others
            for pdu in list(pdus.values()) + list(chain.values()):
                for auth_id in pdu["auth_events"]:
                    self.assertIn(auth_id, known, pdu)
            # The full answer's auth chain, minus the state, is a superset.
            full_chain = set(pdus_by_id(full["auth_chain"], self.room_version))
            self.assertLessEqual(set(chain), full_chain - set(state))


@on_both_databases(ci_database="postgres")
class StateCache(_StateRoom):
    def test_repeats_hit_the_cache_and_new_state_gets_a_new_entry(self) -> None:
        self.build_room()
        since = self.hs1.log_offset()
        first = self.get_state(self.last_id)
        second = self.get_state(self.last_id)
        self.assertEqual(
            pdus_by_id(first["pdus"], self.room_version),
            pdus_by_id(second["pdus"], self.room_version),
        )
        self.get_state(self.last_id, "state_ids")
        time.sleep(0.5)  # the log is flushed five times a second
        lines = self.state_log_lines(since)
        self.assertEqual(len(lines), 3, lines)
        self.assertRegex(lines[0], r"/state full .* entry=miss .* loaded=[1-9]")
        self.assertRegex(lines[1], r"/state full .* entry=hit .* loaded=0 ")
        self.assertRegex(lines[2], r"/state_ids .* entry=hit ")

        # A new member: a new state group, so a new entry, and only the new
        # events are loaded; the answer has the new member.
        bob = self.users["bob"]
        newcomer = self.register(self.hs1, "newcomer")
        newcomer.join(self.room_id)
        after_id = bob.send_message(self.room_id, "welcome")
        since = self.hs1.log_offset()
        answer = self.get_state(after_id)
        time.sleep(0.5)
        # Its IDs came from the cached entry of the group it is a delta of.
        (built,) = [
            line
            for line in self.hs1.read_log()[since:].splitlines()
            if "state cache: built state" in line
        ]
        self.assertIn("state delta, auth chain by difference", built)
        (line,) = self.state_log_lines(since)
        match = re.search(r"entry=(\w+) .* loaded=(\d+) ", line)
        assert match is not None, line
        self.assertEqual(match.group(1), "miss")
        self.assertLessEqual(int(match.group(2)), 2, line)
        members = {p["state_key"] for p in answer["pdus"] if p["type"] == MEMBER}
        self.assertIn(newcomer.user_id, members)
        self.assertEqual(len(answer["pdus"]), len(first["pdus"]) + 1, "one more member")


@on_both_databases(ci_database="postgres")
class StateOfAWaveOfJoins(_StateRoom):
    def test_forked_joins_share_one_base_and_answer_as_stock(self) -> None:
        """Three servers join from one make_join moment (a wave): each join is
        its own fork, its state group a one-member delta of the same group.
        Their /state_ids and /state come from that group's entry, built once,
        and equal stock's."""
        self.build_room()
        # A new state group first, which nothing has asked about: the joins'
        # groups are deltas of it, and its entry is built once for them.
        self.users["alice"].send_state(
            self.room_id, "m.room.topic", "", {"topic": "before the wave"}
        )
        servers = self.peer.create_servers(3)
        vers = "&".join(f"ver={v}" for v in KNOWN_ROOM_VERSIONS)
        templates = []
        for server in servers:
            make_join = self.peer.federation_request(
                server,
                self.hs1.server_name,
                "GET",
                f"/_matrix/federation/v1/make_join/{_q(self.room_id)}/"
                f"{_q(f'@waver:{server}')}?{vers}",
            )
            self.assertEqual(make_join["status"], 200, make_join)
            templates.append(make_join["body"])
        prevs = {tuple(t["event"]["prev_events"]) for t in templates}
        self.assertEqual(len(prevs), 1, "every join on the same prev events")
        joins = []
        for server, template in zip(servers, templates, strict=True):
            joined = self.peer.join(
                self.room_id, self.hs1.server_name, server, "waver", template=template
            )
            self.assertEqual(joined["send_join"]["status"], 200, joined)
            joins.append(joined["event_id"])
        since = self.hs1.log_offset()
        module = {
            join: (self.get_state(join, "state_ids"), self.get_state(join))
            for join in joins
        }
        time.sleep(0.5)  # the log is flushed five times a second
        built = [
            line
            for line in self.hs1.read_log()[since:].splitlines()
            if "state cache: built state" in line
        ]
        self.assertEqual(sum("the base of a delta" in line for line in built), 1, built)
        joins_built = [line for line in built if "the base of a delta" not in line]
        self.assertEqual(len(joins_built), 3, built)
        self.assertTrue(all("state delta" in line for line in joins_built), built)
        self.switch_to_stock()
        for join, (ids, full) in module.items():
            self.assert_same_state_ids(ids, self.get_state(join, "state_ids"), join)
            self.assert_same_state(full, self.get_state(join), join)
            waver = {p["state_key"] for p in full["pdus"] if p["type"] == MEMBER}
            others = {f"@waver:{s}" for s in servers} & waver
            self.assertEqual(others, set(), "the state before a join has no waver")


@on_both_databases(ci_database="sqlite")
class StateErrorsMatchStock(_StateRoom):
    def test_refusals_are_stock_refusals(self) -> None:
        self.build_room()
        (outsider,) = self.peer.create_servers(1)
        other_room = self.users["alice"].create_room(preset="public_chat")
        other_event = self.users["alice"].send_message(other_room, "elsewhere")
        cases: dict[str, tuple[str, str | None]] = {}
        for endpoint in ("state", "state_ids"):
            cases[f"{endpoint}: server not in the room"] = (
                state_path(self.room_id, self.last_id, endpoint),
                outsider,
            )
            cases[f"{endpoint}: unknown event"] = (
                state_path(self.room_id, "$nosuchevent", endpoint),
                None,
            )
            cases[f"{endpoint}: event of another room"] = (
                state_path(self.room_id, other_event, endpoint),
                None,
            )
            cases[f"{endpoint}: no event_id"] = (
                state_path(self.room_id, None, endpoint),
                None,
            )
            cases[f"{endpoint}: unknown room"] = (
                state_path("!nosuchroom:example.org", self.last_id, endpoint),
                None,
            )
        cases["state: bad members_only"] = (
            state_path(self.room_id, self.last_id, members_only="yes"),
            None,
        )

        def outcomes() -> dict[str, tuple[int, str | None]]:
            result = {}
            for name, (path, server) in cases.items():
                answer = self.fed_get(path, server)
                body = answer["body"]
                errcode = body.get("errcode") if isinstance(body, dict) else None
                result[name] = (answer["status"], errcode)
            return result

        module = outcomes()
        self.assertEqual(module["state: server not in the room"], (403, "M_FORBIDDEN"))
        self.assertEqual(module["state: unknown event"], (404, "M_NOT_FOUND"))
        self.assertEqual(module["state: bad members_only"], (400, "M_INVALID_PARAM"))

        # The room bans the asker's host by server ACL: 403 too.
        acl_path = state_path(self.room_id, self.last_id)
        alice = self.users["alice"]
        alice.send_state(
            self.room_id,
            "m.room.server_acl",
            "",
            {"allow": ["*"], "deny": ["127.0.0.1"], "allow_ip_literals": True},
        )
        module_acl = self.fed_get(acl_path)
        self.assertEqual(module_acl["status"], 403, module_acl)

        self.switch_to_stock()
        stock_acl = self.fed_get(acl_path)
        self.assertEqual(
            (module_acl["status"], module_acl["body"].get("errcode")),
            (stock_acl["status"], stock_acl["body"].get("errcode")),
        )
        alice.send_state(self.room_id, "m.room.server_acl", "", {"allow": ["*"]})
        stock = outcomes()
        # A stock resident ignores the unknown parameter (it is ours).
        self.assertEqual(stock.pop("state: bad members_only")[0], 200)
        del module["state: bad members_only"]
        self.assertEqual(module, stock)


@on_both_databases(ci_database="postgres")
class StateWhilePartial(FederationTestCase):
    def test_partial_state_room_is_refused_as_stock_does(self) -> None:
        peer = self.make_fake_peer()
        room = peer.create_room(members=50, servers=3)
        # Never answer the resync's state requests: hs1 stays partial.
        peer.add_behaviour(r"^/_matrix/federation/v1/state", "hang")
        (hs1,) = self.make_homeservers(["hs1"])
        alice = self.register(hs1, "alice")
        alice.join(room["room_id"], via=[room["resident"]])
        join_id = alice._call(
            "GET",
            f"/_matrix/client/v3/rooms/{_q(room['room_id'])}/state/"
            f"{MEMBER}/{_q(alice.user_id)}",
            params={"format": "event"},
        )["event_id"]
        for endpoint in ("state", "state_ids"):
            answer = peer.federation_request(
                room["resident"],
                hs1.server_name,
                "GET",
                state_path(room["room_id"], join_id, endpoint),
            )
            self.assertEqual(answer["status"], 403, answer)
            self.assertEqual(
                answer["body"]["errcode"],
                "ORG.MATRIX.MSC3895_UNABLE_DUE_TO_PARTIAL_STATE",  # stock's code
                answer,
            )


@on_both_databases(ci_database="sqlite")
class StatePrewarm(FederationTestCase):
    def test_partial_join_and_state_ids_prepare_the_state_answer(self) -> None:
        peer = self.make_fake_peer()
        room = peer.create_room(members=1200, servers=4)
        room_id = room["room_id"]
        (hs1,) = self.make_homeservers(["hs1"])
        alice = self.register(hs1, "alice")
        alice.join(room_id, via=[room["resident"]])
        alice.joined_members(room_id, timeout=300)  # resync done: hs1 can resident

        # A new server joins through hs1 with partial state: the state before its
        # join's prev_events is prepared at once, so its /state finds it ready.
        since = hs1.log_offset()
        joined = peer.join(room_id, hs1.server_name)
        self.assertEqual(joined["send_join"]["status"], 200, joined)
        hs1.wait_for_log(r"state cache: prewarmed /state of", timeout=60, since=since)
        (prev_id,) = joined["join_event"]["prev_events"]
        answer = peer.federation_request(
            joined["server"], hs1.server_name, "GET", state_path(room_id, prev_id)
        )
        self.assertEqual(answer["status"], 200, answer)
        self.assertGreater(len(answer["body"]["pdus"]), 1200)
        line = hs1.wait_for_log(r"state cache: /state full .*", since=since)
        self.assertRegex(line.group(0), r" entry=hit .* loaded=0 ")

        # /state_ids for a state not prepared yet prepares the /state. The new
        # member joins once the resident has the earlier joiner's join (hs1
        # sends it to the room after the joiner's first state requests).
        wait_until(
            lambda: (
                joined["event_id"]
                in {
                    e["event_id"]
                    for e in peer.room_events(room_id, limit=100000)["events"]
                }
            ),
            30,
            "the earlier join at the resident",
        )
        new = peer.join_users(room_id, 1, destinations=[hs1.server_name])
        new_id = new["event_ids"][0]
        alice.wait_for_event(room_id, partial(_has_id, new_id))
        hs1.restart()  # forget everything
        since = hs1.log_offset()
        ids = peer.federation_request(
            joined["server"],
            hs1.server_name,
            "GET",
            state_path(room_id, new_id, "state_ids"),
        )
        self.assertEqual(ids["status"], 200, ids)
        hs1.wait_for_log(r"state cache: prewarmed /state of", timeout=60, since=since)
        answer = peer.federation_request(
            joined["server"], hs1.server_name, "GET", state_path(room_id, new_id)
        )
        self.assertEqual(answer["status"], 200, answer)
        line = hs1.wait_for_log(r"state cache: /state full .*", since=since)
        self.assertRegex(line.group(0), r" entry=hit .* loaded=0 ")
        # The state *before* the new member's join: the earlier joiner is in it,
        # the new member not yet.
        members = {
            p["state_key"] for p in answer["body"]["pdus"] if p["type"] == MEMBER
        }
        self.assertIn(joined["user_id"], members)
        self.assertNotIn(new["user_ids"][0], members)


@on_both_databases(ci_database="postgres")
class StateServingMembersOnlyOff(_StateRoom):
    MODULE_CONFIG = {"resident": {"state_cache": {"members_only": False}}}

    def test_members_only_off_gives_full_answers(self) -> None:
        self.build_room()
        self.assertIn(
            "FederationStateV1Servlet",
            patch_targets(self.register(self.hs1, "admin", admin=True)),
        )
        answer = self.get_state(self.last_id, members_only="true")
        self.assertNotIn(MEMBERS_ONLY_PARAM, answer)
        self.assert_same_state(answer, self.get_state(self.last_id))


@on_both_databases(ci_database="sqlite")
class StateServingDisabled(_StateRoom):
    MODULE_CONFIG = {"resident": {"state_cache": {"enabled": False}}}

    def test_disabled_leaves_stock_servlets(self) -> None:
        self.build_room()
        targets = patch_targets(self.register(self.hs1, "admin", admin=True))
        self.assertNotIn("FederationStateV1Servlet", targets)
        self.assertNotIn("FederationStateIdsServlet", targets)
        since = self.hs1.log_offset()
        answer = self.get_state(self.last_id, members_only="true")
        self.assertNotIn(MEMBERS_ONLY_PARAM, answer)
        self.get_state(self.last_id, "state_ids")
        time.sleep(0.5)
        self.assertEqual(self.state_log_lines(since), [])


# ---------------------------------------------------------------------------
# Unit tests


def _has_id(event_id: str, event: dict[str, Any]) -> bool:
    return event.get("event_id") == event_id
