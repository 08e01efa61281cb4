"""The module in worker mode against stock: the resident's answers, the joiner's reads.

A stock resident and a module resident in worker mode serve the same answers.

The resident is a :class:`~tests.fedkit.workers.WorkerHomeserver` (main, two
federation workers behind nginx, ...). As in the single-process comparisons
(``test_resident_state``, ``test_resident_send_join``, ``test_resident_access``),
"stock" is the *same* deployment on the same database restarted without the
module: the same room, the same events. Every answer compared here was served by
a federation worker (each request's line in the workers' logs, none in main's),
and the state answers by *each* of the two (each has its own state cache).

The joiner's side on workers, during a held resync: ``/context`` and
``/hierarchy`` through nginx on the client reader, at once, then stock's answers.

PostgreSQL only; skipped when PostgreSQL, Redis or nginx is missing.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any, cast
from urllib.parse import quote

from synapse.api.room_versions import KNOWN_ROOM_VERSIONS

from synapse_partial_state.wire import SUMMARY_FIELD, SYNCING_FIELD
from tests.blackbox.resync_case import STATE_PATHS, wait_until
from tests.blackbox.test_clients import endpoint as progress_path
from tests.blackbox.test_clients_partial_reads import (
    PartialReadsCase,
    hierarchy_path,
)
from tests.blackbox.test_resident_state import _StateRoom, pdus_by_id, state_path
from tests.blackbox.test_workers import WorkerCase
from tests.fedkit.homeserver import Homeserver
from tests.fedkit.process import read_from
from tests.fedkit.workers import WorkerHomeserver

MEMBER = "m.room.member"
#: The module's log line for each /state and /state_ids it answers.
MODULE_STATE_LINE = "state cache: /state"


def processed(method: str, path: str, origin: str) -> re.Pattern[str]:
    """Synapse's access-log line of ``origin``'s request for exactly ``path``."""
    return re.compile(
        rf"\{{{re.escape(origin)}\}} Processed request: .* "
        rf"\"{method} {re.escape(path)} HTTP"
    )


def log_since(hs: WorkerHomeserver, name: str, offset: int) -> str:
    path = hs.log_path if name == "main" else hs.workers[name].log_path
    return read_from(path, offset)


def without_age(value: Any) -> Any:
    """``value`` (events, answers) without ``unsigned.age``, which is the time
    since the event was sent, at the moment of the answer."""
    value = copy.deepcopy(value)

    def strip(v: Any) -> None:
        if isinstance(v, dict):
            unsigned = v.get("unsigned")
            if isinstance(unsigned, dict):
                unsigned.pop("age", None)
            for item in v.values():
                strip(item)
        elif isinstance(v, list):
            for item in v:
                strip(item)

    strip(value)
    return value


class ResidentOnWorkersMatchesStock(WorkerCase, _StateRoom):
    """The room of ``test_resident_state`` (bans, a kick, an invite, a power
    change, messages, a topic, a fake member: the asker) on a worker
    deployment."""

    def make_homeservers(
        self, names: Iterable[str] | int, with_module: bool = True, **kw: Any
    ) -> list[Homeserver]:
        """Worker deployments (started one after the other)."""
        if isinstance(names, int):
            names = [f"hs{i + 1}" for i in range(names)]
        return [self.make_worker_homeserver(n, with_module, **kw) for n in names]

    @property
    def hs(self) -> WorkerHomeserver:
        """hs1, the resident deployment."""
        return cast(WorkerHomeserver, self.hs1)

    # -- requests, each answered by a known process ----------------------------

    def answered_by(
        self, method: str, path: str, origin: str, offsets: dict[str, int]
    ) -> str:
        """The process whose log has ``origin``'s request for ``path`` since
        ``offsets``: a federation worker, alone (never main)."""
        line = processed(method, path, origin)
        names = ("main", *self.hs.FEDERATION_WORKERS)

        def who() -> list[str]:
            return [n for n in names if line.search(log_since(self.hs, n, offsets[n]))]

        by = wait_until(who, 15, f"the log line of {method} {path}")
        self.assertEqual(len(by), 1, f"{path}: answered by {by}")
        self.assertNotEqual(by[0], "main", f"main answered {path}")
        return str(by[0])

    def offsets(self) -> dict[str, int]:
        return {
            n: self.hs.worker_log_offset(n)
            for n in ("main", *self.hs.FEDERATION_WORKERS)
        }

    def each_worker(self, path: str, check: bool = True) -> dict[str, Any]:
        """``GET path`` through nginx, as the asker, until each federation worker
        has answered it once: {worker: (status, body)} (``check``: 200 each,
        then {worker: body})."""
        got: dict[str, Any] = {}
        for _ in range(8):
            offsets = self.offsets()
            result = self.fed_get(path)
            by = self.answered_by("GET", path, self.asker, offsets)
            got.setdefault(by, (result["status"], result["body"]))
            if len(got) == len(self.hs.FEDERATION_WORKERS):
                break
        self.assertEqual(set(got), set(self.hs.FEDERATION_WORKERS), path)
        if not check:
            return got
        for name, (status, body) in got.items():
            self.assertEqual(status, 200, (name, path, body))
        return {name: body for name, (_, body) in got.items()}

    def answers(self, events: dict[str, str]) -> dict[tuple[str, str], Any]:
        """(event name, endpoint) -> {worker: body} of /state and /state_ids."""
        return {
            (name, endpoint): self.each_worker(
                state_path(self.room_id, event_id, endpoint)
            )
            for name, event_id in events.items()
            for endpoint in ("state", "state_ids")
        }

    def make_join(self, server: str) -> dict[str, Any]:
        """A ``/make_join`` template for ``@joiner:<server>``, from a federation
        worker."""
        vers = "&".join(f"ver={v}" for v in KNOWN_ROOM_VERSIONS)
        path = (
            f"/_matrix/federation/v1/make_join/{quote(self.room_id, safe='')}/"
            f"{quote(f'@joiner:{server}', safe='')}?{vers}"
        )
        offsets = self.offsets()
        result = self.peer.federation_request(server, self.hs.server_name, "GET", path)
        self.assertEqual(result["status"], 200, result)
        self.answered_by("GET", path, server, offsets)
        body: dict[str, Any] = result["body"]
        return body

    def send_join(
        self, server: str, template: dict[str, Any], omit_members: bool
    ) -> dict[str, Any]:
        """``server``'s join from ``template``: the ``/send_join`` answer (from a
        federation worker)."""
        offsets = self.offsets()
        result = self.peer.join(
            self.room_id,
            self.hs.server_name,
            server,
            omit_members=omit_members,
            template=template,
        )
        send_join = result["send_join"]
        self.assertEqual(send_join["status"], 200, send_join)
        self.answered_by("PUT", send_join["uri"], server, offsets)
        body: dict[str, Any] = send_join["body"]
        return body

    def topic_redacted_everywhere(self, event_id: str) -> bool:
        """Both workers answer /state at ``event_id`` with the topic pruned."""
        got = self.each_worker(state_path(self.room_id, event_id), check=False)
        for status, body in got.values():
            if status != 200:
                return False
            (topic,) = [p for p in body["pdus"] if p["type"] == "m.room.topic"]
            if topic["content"] != {}:
                return False
        return True

    def module_lines(self, offsets: dict[str, int]) -> dict[str, int]:
        """How many /state and /state_ids the module answered, by worker."""
        return {
            n: log_since(self.hs, n, offsets[n]).count(MODULE_STATE_LINE)
            for n in self.hs.FEDERATION_WORKERS
        }

    def ids(self, pdus: list[dict[str, Any]]) -> set[str]:
        return set(pdus_by_id(pdus, self.room_version))

    # -- the test --------------------------------------------------------------

    def test_state_and_send_join_answers_equal_stock(self) -> None:
        self.build_room()
        hs, alice = self.hs, self.users["alice"]
        events = {
            "message": self.message_id,
            "power levels (replaces state)": self.power_id,
            "fake join (new state key)": self.fake_join_id,
            "last": self.last_id,
        }
        # Four joining servers, whose /make_join templates are all taken now:
        # the same prev_events, so each /send_join answer (one full and one
        # partial from each variant) is about the same state before the join.
        joiners = self.peer.create_servers(4)
        templates = {server: self.make_join(server) for server in joiners}
        prev = {tuple(t["event"]["prev_events"]) for t in templates.values()}
        self.assertEqual(len(prev), 1, prev)

        # Warm both workers' caches with every event's state, unredacted.
        offsets = self.offsets()
        for event_id in events.values():
            self.each_worker(state_path(self.room_id, event_id))
        for worker, lines in self.module_lines(offsets).items():
            self.assertGreaterEqual(lines, len(events), worker)
        topic_id = alice._call(
            "GET",
            f"/_matrix/client/v3/rooms/{quote(self.room_id, safe='')}/state/"
            "m.room.topic/",
            params={"format": "event"},
        )["event_id"]
        events["redaction"] = self.redact(alice, topic_id)
        # The redaction reaches both workers through replication.
        wait_until(
            lambda: self.topic_redacted_everywhere(events["redaction"]),
            30,
            "both federation workers serving the topic redacted",
        )

        offsets = self.offsets()
        module = self.answers(events)
        # The module answered each (its log line on each worker for each).
        for worker, lines in self.module_lines(offsets).items():
            self.assertGreaterEqual(lines, 2 * len(events), worker)
        for name in events:
            for worker, body in module[(name, "state")].items():
                pdus = pdus_by_id(body["pdus"], self.room_version)
                self.assertEqual(pdus[topic_id]["content"], {}, (name, worker))
        current = {
            (e["type"], e["state_key"]): e["event_id"]
            for e in alice.room_state(self.room_id)
        }
        for body in module[("last", "state")].values():
            self.assertEqual(self.ids(body["pdus"]), set(current.values()))
        module_joins = {
            "full": self.send_join(joiners[0], templates[joiners[0]], False),
            "partial": self.send_join(joiners[1], templates[joiners[1]], True),
        }

        self.switch_to_stock()
        offsets = self.offsets()
        stock = self.answers(events)
        stock_joins = {
            "full": self.send_join(joiners[2], templates[joiners[2]], False),
            "partial": self.send_join(joiners[3], templates[joiners[3]], True),
        }
        # Stock indeed: no module line on any process since the restart.
        self.assertEqual(
            self.module_lines(offsets), dict.fromkeys(hs.FEDERATION_WORKERS, 0)
        )
        self.assertNotIn(MODULE_STATE_LINE, log_since(hs, "main", offsets["main"]))

        # /state and /state_ids: every worker's answer, module or stock, alike.
        for (name, endpoint), by_worker in module.items():
            for worker, got in by_worker.items():
                for stock_worker, want in stock[(name, endpoint)].items():
                    what = f"{name}, /{endpoint}: {worker} vs stock {stock_worker}"
                    if endpoint == "state":
                        self.assert_same_state(got, want, what)
                    else:
                        self.assert_same_state_ids(got, want, what)

        # A full /send_join: the same state and auth chain.
        got, want = module_joins["full"], stock_joins["full"]
        for body in (got, want):
            self.assertFalse(body.get("members_omitted", False))
            self.assertNotIn("servers_in_room", body)
            self.assertNotIn(SUMMARY_FIELD, body)
        for field in ("state", "auth_chain"):
            self.assertEqual(
                without_age(pdus_by_id(got[field], self.room_version)),
                without_age(pdus_by_id(want[field], self.room_version)),
                f"full /send_join: {field}",
            )
        full_state = self.ids(want["state"])

        # A partial /send_join: MSC3706's fields as stock's; the module's state
        # is stock's plus member events (the essentials), all in the state
        # before the join; both auth chains complete, without the state.
        got, want = module_joins["partial"], stock_joins["partial"]
        self.assertIs(got["members_omitted"], True)
        self.assertIs(want["members_omitted"], True)
        self.assertEqual(set(got["servers_in_room"]), set(want["servers_in_room"]))
        self.assertEqual(
            set(want["servers_in_room"]),
            {hs.server_name, self.asker},
        )
        self.assertIn(SUMMARY_FIELD, got)
        self.assertNotIn(SUMMARY_FIELD, want)
        got_state = pdus_by_id(got["state"], self.room_version)
        want_state = pdus_by_id(want["state"], self.room_version)
        self.assertLessEqual(set(want_state), set(got_state))
        extra = set(got_state) - set(want_state)
        self.assertTrue(extra, "no essentials beyond stock's")
        self.assertEqual({got_state[i]["type"] for i in extra}, {MEMBER})
        self.assertLessEqual(set(got_state), full_state)
        # The essentials of this room: the power user (bob), the ban (dave),
        # the kick (erin), the invite (henry).
        extra_members = {got_state[i]["state_key"] for i in extra}
        for name in ("bob", "dave", "erin", "henry"):
            self.assertIn(self.users[name].user_id, extra_members, name)
        for body in (got, want):
            state = self.ids(body["state"])
            chain = self.ids(body["auth_chain"])
            self.assertFalse(state & chain)
            for pdu in body["state"] + body["auth_chain"] + [body["event"]]:
                for auth_id in pdu["auth_events"]:
                    self.assertIn(auth_id, state | chain, pdu["type"])
        # Stock's events, as stock sends them.
        self.assertEqual(
            without_age(want_state),
            without_age({i: got_state[i] for i in want_state}),
        )


def room_path(room_id: str, *rest: str) -> str:
    tail = "/".join(quote(p, safe="") for p in rest)
    return f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/{tail}"


def context_view(body: dict[str, Any]) -> dict[str, Any]:
    """A /context answer to compare: ``unsigned.age`` aside, its state by event
    ID (its order is the store's)."""
    view = without_age(body)
    view["state"] = {e["event_id"]: e for e in view.get("state", [])}
    return view


def joined_in(state: list[dict[str, Any]]) -> set[str]:
    return {
        e["state_key"]
        for e in state
        if e["type"] == MEMBER and e["content"].get("membership") == "join"
    }


class ContextAndHierarchyOnWorkersDuringResync(WorkerCase, PartialReadsCase):
    """hs2, a module joiner on workers, joins a space of the fake resident (60
    members, three m.space.child events) with its resync held: ``/context`` and
    ``/hierarchy``, routed by nginx to the client reader, answer at once from
    the partial state; once complete, the answers of the same deployment
    restarted without the module (stock)."""

    ROOM_TYPE = "m.space"
    CHILDREN = 3

    def make_homeserver(  # type: ignore[override]
        self, name: str = "hs", with_module: bool = True, start: bool = True, **kw: Any
    ) -> WorkerHomeserver:
        return self.make_worker_homeserver(name, with_module, start, **kw)

    def join_held(self, held: str = STATE_PATHS) -> str:
        """bob joins (through the client reader, handed to main) with the
        resync held; returns the hold's rule once the client reader says the
        room is syncing (it learns bob's membership through replication)."""
        rule = self.peer.add_behaviour(held, "hold")
        since = self.hs2.log_offset()
        self.bob.join(self.room_id, via=[self.resident])
        self.hs2.wait_for_log(
            rf"Starting resync of {re.escape(self.room_id)}", since=since
        )

        def syncing() -> bool:
            status, body = self.bob.get(progress_path(self.room_id))
            return status == 200 and body["syncing"] is True

        wait_until(syncing, 30, "the client reader: the room syncing")
        return rule

    def say(self, body: str) -> str:
        sent = self.peer.send_event(
            self.room_id, "m.room.message", {"msgtype": "m.text", "body": body}
        )
        return str(sent["event_id"])

    def space_children(self, body: dict[str, Any]) -> set[str]:
        space = body["rooms"][0]
        self.assertEqual(space["room_id"], self.room_id)
        return {
            e["state_key"]
            for e in space["children_state"]
            if e["type"] == "m.space.child"
        }

    def test_context_and_hierarchy_at_once_on_the_client_reader(self) -> None:
        self.setup_room()
        hs2 = cast(WorkerHomeserver, self.hs2)
        children = {f"!child{n}:{self.resident}" for n in range(self.CHILDREN)}
        for child in sorted(children):
            self.peer.send_event(
                self.room_id, "m.space.child", {"via": [self.resident]}, state_key=child
            )
        rule = self.join_held()
        sent = [self.say(f"during {n}") for n in range(3)]
        last = room_path(self.room_id, "event", sent[-1])
        wait_until(lambda: self.bob.get(last)[0] == 200, 30, "the messages at hs2")
        context_path = room_path(self.room_id, "context", sent[1])
        full = self.room["member_count"] + 1

        # During the held resync, on the client reader: at once.
        during = self.get_at_once(context_path)
        hierarchy = self.get_at_once(hierarchy_path(self.room_id))
        self.assertTrue(self.partial())  # still held: nothing waited for it
        self.assertIs(during[SYNCING_FIELD], True)
        self.assertEqual(during["event"]["event_id"], sent[1])
        self.assertEqual([e["event_id"] for e in during["events_before"]][:1], sent[:1])
        self.assertEqual([e["event_id"] for e in during["events_after"]], sent[2:])
        members = joined_in(during["state"])
        self.assertIn(self.bob.user_id, members)
        self.assertLess(len(members), full)  # the members known so far
        self.assertEqual(self.space_children(hierarchy), children)
        self.assert_routed(
            hs2, "/_matrix/client/v3/rooms/.*/context/", {"client_reader"}
        )
        self.assert_routed(
            hs2, "/_matrix/client/v1/rooms/.*/hierarchy", {"client_reader"}
        )

        # Complete (the client reader learns it through replication).
        self.release(rule)

        def complete() -> Any:
            body = self.get_at_once(context_path)
            return SYNCING_FIELD not in body and body

        after = wait_until(complete, 30, "/context without the marker")
        self.assertEqual(len(joined_in(after["state"])), full)
        for field in ("event", "events_before", "events_after"):
            self.assertEqual(
                without_age(after[field]), without_age(during[field]), field
            )

        # The space's num_joined_members is the room's stats, which the
        # background worker updates from the completion's state deltas (it
        # reads them through replication, asynchronously, as for any event):
        # it comes to count every member, without a restart.
        def stats_caught_up() -> Any:
            body = self.get_at_once(hierarchy_path(self.room_id))
            return body["rooms"][0]["num_joined_members"] == full and body

        hierarchy_after = wait_until(stats_caught_up, 60, "the space's member count")
        self.assertEqual(self.space_children(hierarchy_after), children)
        self.assertEqual(
            [r["room_id"] for r in hierarchy_after["rooms"]],
            [r["room_id"] for r in hierarchy["rooms"]],
        )

        # Stock's answers: the same deployment without the module.
        hs2.with_module = False
        hs2.write_config()
        hs2.restart()
        stock = self.get_at_once(context_path)
        self.assertEqual(context_view(after), context_view(stock))
        self.assertEqual(
            hierarchy_after, self.get_at_once(hierarchy_path(self.room_id))
        )
        self.assert_routed(
            hs2, "/_matrix/client/v3/rooms/.*/context/", {"client_reader"}
        )
