"""Resident side: hostile requests to ``/state``, ``/state_ids`` and ``/send_join``.

A fixed set of junk requests, signed by fake servers (the request signature is
valid: everything else is junk), goes to hs1 with the module and then to the same
hs1 restarted without it. Each must get stock's status code and errcode, answer
within :data:`BOUND_S`, and store nothing. Runs on SQLite and on PostgreSQL.

One difference is ours by design: ``/state`` validates the module's own
``org.matrix.msc2775.members_only`` parameter as Synapse validates its own
booleans (``omit_members=yes`` on ``/send_join``: 400 ``M_INVALID_PARAM``, before
any other check), where stock, which does not know it, ignores it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from synapse_partial_state.wire import MEMBERS_ONLY_PARAM
from tests.blackbox.test_resident_state import state_path
from tests.fedkit.testcase import FederationTestCase, on_both_databases

MEMBER = "m.room.member"
FED = "/_matrix/federation"
#: Every junk request is answered within this many seconds.
BOUND_S = 5.0
#: A "huge" body: well under Synapse's request size limit, so it is parsed.
HUGE = 1024 * 1024

#: (server, method, path, content): ``server`` names a role (see ``servers``).
Request = tuple[str, str, str, Any]
#: (status, errcode or None, seconds).
Outcome = tuple[int, str | None, float]


def _q(value: str) -> str:
    return quote(value, safe="")


#: Junk requests on which the module answers otherwise than stock, on purpose
#: (see the module docstring): name -> (the module's, stock's) (status, errcode).
OURS: dict[str, tuple[tuple[int, str | None], tuple[int, str | None]]] = {
    f"state: {MEMBERS_ONLY_PARAM}={value}": ((400, "M_INVALID_PARAM"), (200, None))
    for value in ("yes", "TRUE", "1", "", "true%00", "yes then true")
}
OURS[f"state: {MEMBERS_ONLY_PARAM}=yes from a server not in the room"] = (
    (400, "M_INVALID_PARAM"),
    (403, "M_FORBIDDEN"),
)


@on_both_databases(ci_database="postgres")
class JunkRequestsGetStockAnswers(FederationTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.peer = self.make_fake_peer()
        (self.hs1,) = self.make_homeservers(["hs1"])
        self.alice = self.register(self.hs1, "alice")
        self.room_id = self.alice.create_room(preset="public_chat")
        self.register(self.hs1, "bob").join(self.room_id)
        joined = self.peer.join(self.room_id, self.hs1.server_name, omit_members=False)
        self.assertEqual(joined["send_join"]["status"], 200, joined)
        self.member = joined["server"]
        self.event_id = self.alice.send_message(self.room_id, "hello")
        self.other_room = self.alice.create_room(preset="public_chat")
        self.other_event = self.alice.send_message(self.other_room, "elsewhere")
        (self.outsider,) = self.peer.create_servers(1)
        joiner = f"@junk:{self.outsider}"
        make_join = self.peer.federation_request(
            self.outsider,
            self.hs1.server_name,
            "GET",
            f"{FED}/v1/make_join/{_q(self.room_id)}/{_q(joiner)}?ver=10&ver=11&ver=12",
        )
        self.assertEqual(make_join["status"], 200, make_join)
        #: A join as make_join proposes it: unsigned, without hashes.
        self.template: dict[str, Any] = make_join["body"]["event"]

    # -- the junk --------------------------------------------------------------

    def state_requests(self) -> dict[str, Request]:
        """``/state`` and ``/state_ids`` with junk event IDs, room IDs and query
        strings, by case; mostly from a server in the room, so that the junk,
        not the origin, decides the answer."""
        room, good = self.room_id, self.event_id
        long_room = "!" + "r" * 4000 + ":example.org"
        cases: dict[str, Request] = {}
        for endpoint in ("state", "state_ids"):
            base = f"{FED}/v1/{endpoint}/"
            at = state_path(room, None, endpoint) + "?event_id="
            junk: dict[str, str] = {
                "no event_id": state_path(room, None, endpoint),
                "empty event_id": at,
                "unknown event_id": at + _q("$nosuchevent"),
                "huge event_id": at + _q("$" + "e" * 4000),
                "non-ASCII event_id": at + _q("$événement"),
                "event_id not UTF-8": at + "%24%FF%FE",
                "NUL in event_id": at + "%24a%00b",
                "event_id of another room": at + _q(self.other_event),
                "a room ID as event_id": at + _q(room),
                "event_id twice, the good one first": at
                + _q(good)
                + "&event_id=%24nosuchevent",
                "event_id twice, the unknown one first": at
                + "%24nosuchevent&event_id="
                + _q(good),
                "unknown parameters": at + _q(good) + "&foo=bar&event_id%5B%5D=x",
                "very long room ID": base + _q(long_room) + "?event_id=" + _q(good),
                "non-ASCII room ID": base
                + _q("!salle:é.org")
                + "?event_id="
                + _q(good),
                "empty room ID": base + "?event_id=" + _q(good),
                "NUL in room ID": base + "%21a%00b%3Ax?event_id=" + _q(good),
                "unknown room": base
                + _q("!nosuchroom:example.org")
                + "?event_id="
                + _q(good),
                "the event's room is not the path's": base
                + _q(self.other_room)
                + "?event_id="
                + _q(good),
                f"{MEMBERS_ONLY_PARAM}=yes then true": at
                + _q(good)
                + f"&{MEMBERS_ONLY_PARAM}=yes&{MEMBERS_ONLY_PARAM}=true",
                f"{MEMBERS_ONLY_PARAM}=true then false": at
                + _q(good)
                + f"&{MEMBERS_ONLY_PARAM}=true&{MEMBERS_ONLY_PARAM}=false",
                f"{MEMBERS_ONLY_PARAM}=false then yes": at
                + _q(good)
                + f"&{MEMBERS_ONLY_PARAM}=false&{MEMBERS_ONLY_PARAM}=yes",
            }
            for value in ("yes", "TRUE", "1", "", "true%00"):
                junk[f"{MEMBERS_ONLY_PARAM}={value}"] = (
                    at + _q(good) + f"&{MEMBERS_ONLY_PARAM}={value}"
                )
            for name, path in junk.items():
                cases[f"{endpoint}: {name}"] = ("member", "GET", path, None)
            cases[f"{endpoint}: from a server not in the room"] = (
                "outsider",
                "GET",
                at + _q(good),
                None,
            )
            cases[
                f"{endpoint}: {MEMBERS_ONLY_PARAM}=yes from a server not in the room"
            ] = (
                "outsider",
                "GET",
                at + _q(good) + f"&{MEMBERS_ONLY_PARAM}=yes",
                None,
            )
        return cases

    def send_join_requests(self) -> dict[str, Request]:
        """``/send_join`` bodies and paths no fake server signed as events
        (unsigned joins, bodies that are no event at all), by case."""
        room, template = self.room_id, self.template

        def join(**changes: Any) -> dict[str, Any]:
            event = dict(template)
            event.update(changes)
            return event

        def put(
            path_room: str, body: Any, query: str = "?omit_members=true"
        ) -> Request:
            path = f"{FED}/v2/send_join/{_q(path_room)}/{_q('$junk')}{query}"
            return ("outsider", "PUT", path, body)

        bodies: dict[str, Any] = {
            "no body": None,
            "a list": [template],
            "a string": "join",
            "a number": 7,
            "null in a list": [None],
            "an empty object": {},
            "only room_id": {"room_id": room},
            "huge padding": {"room_id": room, "pad": "x" * HUGE},
            "huge content": join(content={"membership": "join", "pad": "x" * HUGE}),
            "many prev_events": join(prev_events=[f"$p{i}" for i in range(20000)]),
            "the wrong room": join(room_id=self.other_room),
            "not a membership": join(type="m.room.message"),
            "a leave": join(content={"membership": "leave"}),
            "a knock": join(content={"membership": "knock"}),
            "content not an object": join(content="join"),
            "no state_key": {k: v for k, v in template.items() if k != "state_key"},
            "state_key not a string": join(state_key=["@junk"]),
            "prev_events not a list": join(prev_events="$p"),
            "depth a string": join(depth="1"),
            "unsigned not an object": join(unsigned="x"),
            "unsigned (as make_join gives it)": template,
            "someone else's join": join(
                sender=self.alice.user_id, state_key=self.alice.user_id
            ),
            "forged signatures": join(
                signatures={self.outsider: {"ed25519:x": "AAAA"}},
                hashes={"sha256": "AAAA"},
            ),
        }
        cases = {f"send_join: {name}": put(room, body) for name, body in bodies.items()}
        cases["send_join: an unknown room"] = put(
            "!nosuchroom:example.org", join(room_id="!nosuchroom:example.org")
        )
        long_room = "!" + "r" * 4000 + ":example.org"
        cases["send_join: a very long room ID"] = put(
            long_room, join(room_id=long_room)
        )
        cases["send_join: omit_members=yes"] = put(room, template, "?omit_members=yes")
        cases["send_join: omit_members twice"] = put(
            room, template, "?omit_members=true&omit_members=false"
        )
        cases["send_join v1: a list"] = (
            "outsider",
            "PUT",
            f"{FED}/v1/send_join/{_q(room)}/{_q('$junk')}",
            [template],
        )
        cases["send_join v1: unsigned"] = (
            "outsider",
            "PUT",
            f"{FED}/v1/send_join/{_q(room)}/{_q('$junk')}",
            template,
        )
        return cases

    def signed_joins(self) -> dict[str, dict[str, Any]]:
        """Joins the fake peer signs (hashes and signatures right), junk
        otherwise: they get past the format checks to Synapse's later ones.
        ``peer.join`` arguments, by case."""
        big = {"membership": "join", "pad": "x" * 70_000}
        overrides: dict[str, dict[str, Any]] = {
            "a leave": {"content": {"membership": "leave"}},
            "a knock": {"content": {"membership": "knock"}},
            "not a membership": {"type": "m.room.message"},
            "the wrong room": {"room_id": self.other_room},
            "over the event size limit": {"content": big},
            "someone else's join": {
                "sender": self.alice.user_id,
                "state_key": self.alice.user_id,
            },
            "joining another user": {"state_key": f"@other:{self.outsider}"},
            "unknown prev_events": {"prev_events": ["$nosuchevent"]},
            "unknown auth_events": {"auth_events": ["$nosuchevent"]},
            "too many prev_events": {
                "prev_events": [f"$p{i}" for i in range(100)],
            },
        }
        cases: dict[str, dict[str, Any]] = {
            f"signed send_join: {name}": {
                "user_localpart": f"junk{index}",
                "event_overrides": changes,
            }
            for index, (name, changes) in enumerate(overrides.items())
        }
        cases["signed send_join: a bad signature"] = {
            "user_localpart": "forger",
            "bad_signature": True,
        }
        cases["signed send_join: omit_members=yes"] = {
            "user_localpart": "unsure",
            "omit_members": "yes",
        }
        return cases

    # -- running it ------------------------------------------------------------

    def outcomes(
        self, requests: dict[str, Request], joins: dict[str, dict[str, Any]]
    ) -> dict[str, Outcome]:
        servers = {"member": self.member, "outsider": self.outsider}
        answers = {}
        for name, (server, method, path, content) in requests.items():
            answers[name] = self.peer.federation_request(
                servers[server],
                self.hs1.server_name,
                method,
                path,
                content,
                timeout=BOUND_S * 4,
            )
        for name, kw in joins.items():
            result = self.peer.join(
                self.room_id, self.hs1.server_name, self.outsider, **kw
            )
            self.assertEqual(result["make_join"]["status"], 200, (name, result))
            answers[name] = result["send_join"]
        result = {}
        for name, answer in answers.items():
            body = answer["body"]
            errcode = body.get("errcode") if isinstance(body, dict) else None
            result[name] = (answer["status"], errcode, answer["seconds"])
        return result

    def members(self) -> dict[str, str]:
        """The room's current memberships (nothing may change)."""
        return {
            e["state_key"]: e["content"]["membership"]
            for e in self.alice.room_state(self.room_id)
            if e["type"] == MEMBER
        }

    def test_junk_gets_stock_status_codes_in_bounded_time(self) -> None:
        requests = self.state_requests() | self.send_join_requests()
        joins = self.signed_joins()
        before = self.members()
        module = self.outcomes(requests, joins)
        self.assertEqual(self.members(), before, "a junk request changed the room")
        self.hs1.with_module = False
        self.hs1.write_config()
        self.hs1.restart()
        stock = self.outcomes(requests, joins)
        self.assertEqual(self.members(), before, "a junk request changed the room")

        for name, (status, errcode, seconds) in module.items():
            self.assertLess(seconds, BOUND_S, f"module: {name}")
            self.assertLess(stock[name][2], BOUND_S, f"stock: {name}")
            if name in OURS:
                self.assertEqual(((status, errcode), stock[name][:2]), OURS[name], name)
                continue
            self.assertEqual((status, errcode), stock[name][:2], name)
        # Sanity: the junk is refused, the legitimate variants answered.
        self.assertEqual(module["state: unknown event_id"][:2], (404, "M_NOT_FOUND"))
        self.assertEqual(
            module["state: event_id twice, the good one first"][:2], (200, None)
        )
        for name, expected in {
            "send_join: a list": (400, "M_BAD_JSON"),
            "signed send_join: a leave": (400, "M_BAD_JSON"),
            "signed send_join: over the event size limit": (413, "M_TOO_LARGE"),
            "signed send_join: a bad signature": (403, "M_FORBIDDEN"),
            "signed send_join: unknown auth_events": (403, "M_FORBIDDEN"),
        }.items():
            self.assertEqual(module[name][:2], expected, name)
