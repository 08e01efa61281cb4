"""The engine's own state fetch (``joining/fetch.py``, ``StateFetcher``) with
Synapse's side faked (``StateFetchOps``): what a hostile answer costs, and when the
fetched state counts as complete."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import Any

from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from synapse.events import EventBase, make_event_from_dict
from synapse.federation.federation_base import event_from_pdu_json
from twisted.internet import defer, task
from twisted.trial import unittest

from synapse_partial_state.joining import fetch as fetch_module
from synapse_partial_state.joining.fetch import StateFetcher, StateIncomplete
from synapse_partial_state.joining.inflight import (
    STATE_REQUEST_WAIT_S,
    InflightFetches,
)
from synapse_partial_state.joining.verify import VerifierPool, key_ids_needed
from synapse_partial_state.joining.writer import FetchReport
from tests.unit.joining.test_verify import held, key_id, make_pdu

ROOM = "!room:a.test"
VERSION = KNOWN_ROOM_VERSIONS["10"]
DESTINATION = "res.test"


class FakeJoin:
    """The partial-state event whose state is fetched (only its room and prev
    events are read)."""

    def __init__(self, prev: str) -> None:
        self.room_id = ROOM
        self._prev = prev

    def prev_event_ids(self) -> list[str]:
        return [self._prev]


class FakeOps:
    """A resident answering ``/state_ids`` with ``state``, ``/state`` with
    ``answer`` and single events from ``served``; a store that keeps what is
    persisted, rejecting (as Synapse's auth checks may) ``reject_on_store``."""

    def __init__(self, state: Collection[str]) -> None:
        self.state = list(state)
        self.answer = b'{"pdus": []}'
        self.served: dict[str, EventBase] = {}
        self.stored: set[str] = set()
        self.rejected: set[str] = set()
        self.reject_on_store: set[str] = set()
        #: the keys held, and those the fetch asked for
        self.keys: dict[tuple[str, str], tuple[bytes, int]] = {}
        self.keys_asked: set[tuple[str, str]] = set()
        #: events asked for one by one, and checked one by one
        self.fetched: list[str] = []
        self.checked: list[str] = []
        #: when freed memory was given back
        self.released: list[str] = []

    async def in_timeline(self, event_ids: Collection[str]) -> set[str]:
        return set()

    async def room_version(self, room_id: str) -> Any:
        return VERSION

    async def state_ids(
        self, destination: str, room_id: str, event_id: str
    ) -> tuple[list[str], list[str]]:
        return list(self.state), []

    async def have_seen(self, room_id: str, event_ids: Collection[str]) -> set[str]:
        return set(event_ids) & self.stored

    async def stored_not_rejected(self, event_ids: Collection[str]) -> set[str]:
        return (set(event_ids) & self.stored) - self.rejected

    async def state_pdus(
        self,
        destination: str,
        room_id: str,
        event_id: str,
        members_only: bool,
        timeout_ms: int,
        parser: Any,
    ) -> Any:
        for start in range(0, len(self.answer), 100):
            parser.write(self.answer[start : start + 100])
        return parser.finish()

    async def signing_keys(
        self, wanted: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[bytes, int]]:
        self.keys_asked |= set(wanted)
        return {k: v for k, v in self.keys.items() if k in wanted}

    async def needs_per_event_checks(self, room_id: str) -> bool:
        return False

    def event_from_pdu(self, pdu: bytes, room_version: Any) -> EventBase:
        return event_from_pdu_json(json.loads(pdu), room_version)

    async def check_event(
        self, event: EventBase, origin: str, room_version: Any
    ) -> EventBase | None:
        self.checked.append(event.event_id)
        return None

    async def fetch_event(
        self, destinations: Sequence[str], event_id: str, room_version: Any
    ) -> tuple[EventBase, str] | None:
        self.fetched.append(event_id)
        event = self.served.get(event_id)
        return None if event is None else (event, destinations[0])

    #: events the writer holds before storing (the bulk writer's chunk)
    store_at_least = 0

    async def persist_outliers(self, room_id: str, events: list[EventBase]) -> None:
        for event in events:
            self.stored.add(event.event_id)
            if event.event_id in self.reject_on_store:
                self.rejected.add(event.event_id)

    async def refresh_planner_stats(self) -> bool:
        return False

    async def release_free_memory(self, room_id: str, when: str) -> None:
        self.released.append(when)


def member(name: str) -> EventBase:
    """A member event (unsigned: events fetched one by one come checked)."""
    return make_event_from_dict(
        {
            "room_id": ROOM,
            "type": "m.room.member",
            "state_key": f"@{name}:a.test",
            "sender": f"@{name}:a.test",
            "content": {"membership": "join"},
            "auth_events": [],
            "prev_events": [],
            "depth": 1,
            "origin_server_ts": 1,
            "hashes": {"sha256": "x"},
            "signatures": {},
        },
        VERSION,
    )


class _FetchCase(unittest.TestCase):
    def fetch(self, ops: FakeOps, prev: str) -> defer.Deferred[FetchReport | None]:
        fetcher = StateFetcher(
            ops,  # type: ignore[arg-type]
            VerifierPool(0),
            InflightFetches(),
        )
        return defer.ensureDeferred(
            fetcher.fetch_state_before(DESTINATION, FakeJoin(prev), ["other.test"])  # type: ignore[arg-type]
        )


class HostileAnswerTests(_FetchCase):
    def test_a_pdu_whose_signatures_is_a_list_spoils_nothing(
        self,
    ) -> defer.Deferred[None]:
        """A ``/state`` answer with, among genuine events, a pdu whose
        ``signatures`` is a list (and junk): the genuine events are checked in
        bulk and stored, the fetch completes, and one line says what was left
        out. (Such a pdu used to abort the whole answer.)"""
        self.patch(fetch_module, "SINGLE_FETCH_MAX", 0)  # /state even for three
        goods = [
            make_pdu("10", sender="@alice:a.test"),
            make_pdu("10", sender="@bob:b.test"),
            make_pdu("10", sender="@carol:a.test"),
        ]
        bad = make_pdu("10", sender="@mallory:b.test")
        bad["signatures"] = list(bad["signatures"])
        self.assertEqual(key_ids_needed(bad, False, True), set())
        ids = [event_from_pdu_json(dict(p), VERSION).event_id for p in goods]
        prev = member("prev")
        ops = FakeOps(state=ids)
        ops.served[prev.event_id] = prev
        ops.keys = held("a.test", "b.test")
        ops.answer = json.dumps(
            {"pdus": [goods[0], bad, goods[1], {}], "auth_chain": [goods[2], bad]}
        ).encode()

        async def go() -> None:
            with self.assertLogs(fetch_module.__name__, "WARNING") as logs:
                report = await self.fetch(ops, prev.event_id)
            assert report is not None
            self.assertEqual(ops.stored, {*ids, prev.event_id})
            self.assertEqual(report.verified, 3)
            self.assertEqual(ops.checked, [])
            self.assertEqual(ops.fetched, [prev.event_id])
            self.assertEqual(
                ops.keys_asked,
                {("a.test", key_id("a.test")), ("b.test", key_id("b.test"))},
            )
            [line] = logs.output
            self.assertIn(f"3 item(s) of the /state answer from {DESTINATION}", line)

        return defer.ensureDeferred(go())


class CheckAheadTests(_FetchCase):
    def test_the_check_runs_a_bounded_way_ahead_of_the_store(
        self,
    ) -> defer.Deferred[None]:
        """The bulk check is fed the answer as the store goes, at most
        ``CHECK_AHEAD`` events ahead (the events it builds wait in memory until
        stored), and everything is stored in the end."""
        from synapse_partial_state.joining import verify as verify_module

        self.patch(fetch_module, "SINGLE_FETCH_MAX", 0)
        self.patch(fetch_module, "CHECK_AHEAD", 6)
        self.patch(verify_module, "CHUNK", 2)
        goods = [make_pdu("10", sender=f"@u{i}:a.test") for i in range(30)]
        ids = [event_from_pdu_json(dict(p), VERSION).event_id for p in goods]
        prev = member("prev")

        class Pool(VerifierPool):
            submitted = 0
            calls: list[int] = []

            def verify_chunks(  # type: ignore[override]
                self, version: str, pdus: Any, *a: Any, **kw: Any
            ) -> Any:
                self.submitted += len(pdus)
                self.calls.append(len(pdus))
                return super().verify_chunks(version, pdus, *a, **kw)

        pool = Pool(0)
        ahead: list[int] = []

        class Ops(FakeOps):
            async def persist_outliers(inner, room_id: str, events: Any) -> None:  # noqa: N805
                ahead.append(pool.submitted - len(inner.stored & set(ids)))
                await super().persist_outliers(room_id, events)

        ops = Ops(state=ids)
        ops.served[prev.event_id] = prev
        ops.keys = held("a.test")
        ops.answer = json.dumps({"pdus": goods, "auth_chain": []}).encode()

        async def go() -> None:
            fetcher = StateFetcher(ops, pool, InflightFetches())  # type: ignore[arg-type]
            report = await fetcher.fetch_state_before(
                DESTINATION,
                FakeJoin(prev.event_id),  # type: ignore[arg-type]
                ["other.test"],
            )
            assert report is not None
            self.assertEqual(ops.stored, {*ids, prev.event_id})
            self.assertEqual(report.verified, 30)
            self.assertEqual(pool.submitted, 30)
            self.assertEqual(pool.calls[0], 6)
            self.assertGreater(len(pool.calls), 5)
            self.assertLessEqual(max(ahead), 6 + 2)

        return defer.ensureDeferred(go())


class CompletenessTests(_FetchCase):
    """Every state event must end up stored and not rejected; the prev events
    stored, rejected or not."""

    def setUp(self) -> None:
        self.events = {name: member(name) for name in ("create", "alice", "bob")}
        self.prev = member("prev")
        self.ops = FakeOps(state=[e.event_id for e in self.events.values()])
        self.ops.served = {e.event_id: e for e in self.events.values()}
        self.ops.served[self.prev.event_id] = self.prev

    def test_complete(self) -> defer.Deferred[None]:
        async def go() -> None:
            report = await self.fetch(self.ops, self.prev.event_id)
            assert report is not None
            self.assertEqual(report.persisted, 4)
            self.assertEqual(self.ops.released, [])  # a small store

        return defer.ensureDeferred(go())

    def test_freed_memory_given_back_after_a_big_store(
        self,
    ) -> defer.Deferred[None]:
        self.patch(fetch_module, "RELEASE_MIN_EVENTS", 4)

        async def go() -> None:
            report = await self.fetch(self.ops, self.prev.event_id)
            assert report is not None
            self.assertEqual(self.ops.released, ["after storing the state"])

        return defer.ensureDeferred(go())

    def test_a_state_event_stored_as_rejected_is_missing(
        self,
    ) -> defer.Deferred[None]:
        """Synapse rejects one of the state events as it stores it: it is stored
        (``have_seen`` says so) but not part of the state."""
        bob = self.events["bob"].event_id
        self.ops.reject_on_store = {bob}

        async def go() -> None:
            with self.assertRaises(StateIncomplete) as raised:
                await self.fetch(self.ops, self.prev.event_id)
            self.assertEqual(raised.exception.missing, 1)
            self.assertIn("1 of 4 state event(s)", str(raised.exception))
            self.assertIn("1 of them stored as rejected", str(raised.exception))
            self.assertIn(bob, self.ops.stored)

        return defer.ensureDeferred(go())

    def test_rejected_events_are_not_fetched_again_but_still_missing(
        self,
    ) -> defer.Deferred[None]:
        """A state event stored as rejected before (e.g. by an earlier attempt)
        is not fetched again, which would change nothing; it still counts as
        missing when other events had to be fetched."""
        alice = self.events["alice"].event_id
        self.ops.stored = {alice}
        self.ops.rejected = {alice}

        async def go() -> None:
            with self.assertRaises(StateIncomplete) as raised:
                await self.fetch(self.ops, self.prev.event_id)
            self.assertEqual(raised.exception.missing, 1)
            self.assertNotIn(alice, self.ops.fetched)
            self.assertEqual(len(self.ops.fetched), 3)

        return defer.ensureDeferred(go())

    def test_a_rejected_prev_event_is_no_gap(self) -> defer.Deferred[None]:
        """The prev event need only be stored: rejected or not, it is part of
        the room's graph, and Synapse takes the state after a rejected event as
        the state before it."""
        self.ops.reject_on_store = {self.prev.event_id}

        async def go() -> None:
            report = await self.fetch(self.ops, self.prev.event_id)
            assert report is not None
            self.assertEqual(report.persisted, 4)

        return defer.ensureDeferred(go())

    def test_an_event_not_stored_at_all_is_missing(self) -> defer.Deferred[None]:
        del self.ops.served[self.events["create"].event_id]
        del self.ops.served[self.prev.event_id]

        async def go() -> None:
            with self.assertRaises(StateIncomplete) as raised:
                await self.fetch(self.ops, self.prev.event_id)
            self.assertEqual(raised.exception.missing, 2)
            self.assertNotIn("rejected", str(raised.exception))

        return defer.ensureDeferred(go())


class SynapsesOwnRequestsTests(unittest.TestCase):
    """Synapse's own state request for another event of the room (an event
    that arrived during the join) while the engine fetches the join's state:
    bounded by ``STATE_REQUEST_WAIT_S`` while the engine waits for a server, but
    waiting for the storing once the engine holds the state (asking then would
    download the whole state a second time)."""

    def test_waits_for_the_storing_not_for_a_server(self) -> defer.Deferred[None]:
        self.patch(fetch_module, "SINGLE_FETCH_MAX", 0)  # /state even for three
        clock = task.Clock()
        inflight = InflightFetches(clock)
        goods = [make_pdu("10", sender=f"@{n}:a.test") for n in ("a", "b", "c")]
        ids = [event_from_pdu_json(dict(p), VERSION).event_id for p in goods]
        prev = member("prev")
        seen: dict[str, Any] = {}
        test = self

        def ask_and_wait_past_the_bound() -> defer.Deferred[Any]:
            asked = defer.ensureDeferred(inflight.answer_for(ROOM, "$fork"))
            clock.advance(STATE_REQUEST_WAIT_S + 1)
            return asked

        class Observed(FakeOps):
            async def state_pdus(self, *args: Any) -> Any:
                # Waiting for the resident: Synapse asks natively past the bound.
                asked = ask_and_wait_past_the_bound()
                test.assertIsNone(test.successResultOf(asked))
                return await super().state_pdus(*args)

            async def fetch_event(self, *args: Any) -> Any:
                # Fetching single events: a server again, the bound again.
                asked = ask_and_wait_past_the_bound()
                test.assertIsNone(test.successResultOf(asked))
                return await super().fetch_event(*args)

            async def persist_outliers(self, room_id: str, events: list[Any]) -> None:
                # Storing what it holds: Synapse waits on.
                seen.setdefault("while_storing", ask_and_wait_past_the_bound())
                test.assertNoResult(seen["while_storing"])
                await super().persist_outliers(room_id, events)

        ops = Observed(state=ids)
        ops.served[prev.event_id] = prev
        ops.keys = held("a.test")
        ops.answer = json.dumps({"pdus": goods, "auth_chain": []}).encode()
        fetcher = StateFetcher(ops, VerifierPool(0), inflight)  # type: ignore[arg-type]
        fetcher.expect_join_state(ROOM)

        async def go() -> None:
            await fetcher.fetch_state_before(DESTINATION, FakeJoin(prev.event_id), [])  # type: ignore[arg-type]
            # Stored: the waiting request goes ahead (natively: another event).
            self.assertIsNone(self.successResultOf(seen["while_storing"]))
            self.assertEqual(ops.stored, {*ids, prev.event_id})
            self.assertEqual(clock.getDelayedCalls(), [])

        return defer.ensureDeferred(go())
