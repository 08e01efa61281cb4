"""The resync's first ``/state_ids``, asked while the join is going on
(``joining/early.py``), and the engine's state fetch taking it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from synapse_partial_state.joining import early as early_module
from synapse_partial_state.joining.early import EARLY_KEEP_S, EarlyStateIds
from synapse_partial_state.joining.fetch import StateFetcher
from synapse_partial_state.joining.inflight import InflightFetches, StateIds
from synapse_partial_state.joining.verify import VerifierPool
from tests.unit.joining.test_fetch import DESTINATION, ROOM, FakeJoin, FakeOps


class Resident:
    """``/state_ids`` requests held open until :meth:`answer` or :meth:`fail`."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, str]] = []
        self.pending: dict[str, defer.Deferred[StateIds]] = {}

    async def fetch(self, destination: str, room_id: str, event_id: str) -> StateIds:
        self.asked.append((destination, room_id, event_id))
        d: defer.Deferred[StateIds] = defer.Deferred()
        self.pending[event_id] = d
        return await d

    def answer(self, event_id: str, state: list[str]) -> None:
        self.pending.pop(event_id).callback((state, ["$auth"]))

    def fail(self, event_id: str) -> None:
        self.pending.pop(event_id).errback(RuntimeError("resident went away"))


def _run(description: str, func: Callable[[], Awaitable[None]]) -> None:
    defer.ensureDeferred(func())  # type: ignore[arg-type]


def _early(resident: Resident, clock: task.Clock) -> EarlyStateIds:
    return EarlyStateIds(resident.fetch, _run, clock.callLater)


class EarlyStateIdsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.resident = Resident()
        self.clock = task.Clock()
        self.early = _early(self.resident, self.clock)

    def take(self, event_id: str, destination: str = DESTINATION) -> Any:
        return defer.ensureDeferred(self.early.take(destination, ROOM, event_id))

    def test_asked_at_once_and_taken_once(self) -> None:
        self.early.start(DESTINATION, ROOM, ["$prev"])
        self.assertEqual(self.resident.asked, [(DESTINATION, ROOM, "$prev")])
        self.resident.answer("$prev", ["$a", "$b"])
        self.assertEqual(
            self.successResultOf(self.take("$prev")), (["$a", "$b"], ["$auth"])
        )
        self.assertIsNone(self.successResultOf(self.take("$prev")))

    def test_taken_while_on_its_way(self) -> None:
        self.early.start(DESTINATION, ROOM, ["$prev"])
        taken = self.take("$prev")
        self.assertNoResult(taken)
        self.resident.answer("$prev", ["$a"])
        self.assertEqual(self.successResultOf(taken), (["$a"], ["$auth"]))

    def test_another_server_or_event_is_not_answered(self) -> None:
        self.early.start(DESTINATION, ROOM, ["$prev"])
        self.resident.answer("$prev", ["$a"])
        self.assertIsNone(self.successResultOf(self.take("$prev", "other.test")))
        self.assertIsNone(self.successResultOf(self.take("$other")))

    def test_a_failed_request_gives_none(self) -> None:
        self.early.start(DESTINATION, ROOM, ["$prev"])
        taken = self.take("$prev")
        with self.assertLogs(early_module.__name__, "INFO"):
            self.resident.fail("$prev")
        self.assertIsNone(self.successResultOf(taken))

    def test_started_twice_asks_once(self) -> None:
        self.early.start(DESTINATION, ROOM, ["$prev"])
        self.early.start(DESTINATION, ROOM, ["$prev"])
        self.assertEqual(len(self.resident.asked), 1)

    def test_an_answer_nobody_takes_is_dropped(self) -> None:
        self.early.start(DESTINATION, ROOM, ["$prev"])
        self.resident.answer("$prev", ["$a"])
        self.clock.advance(EARLY_KEEP_S)
        self.assertIsNone(self.successResultOf(self.take("$prev")))


class FetcherTakesTheEarlyAnswer(unittest.TestCase):
    def fetch(self, ops: FakeOps, early: EarlyStateIds) -> Any:
        fetcher = StateFetcher(
            ops,  # type: ignore[arg-type]
            VerifierPool(0),
            InflightFetches(),
            early,
        )
        return defer.ensureDeferred(
            fetcher.fetch_state_before(DESTINATION, FakeJoin("$prev"), [])  # type: ignore[arg-type]
        )

    def test_the_early_answer_replaces_the_request(self) -> None:
        """The early answer names the state; the engine does not ask again
        (FakeOps would answer with ``$late``): everything it names is stored
        already, so the fetch is over with nothing to store."""
        resident, clock = Resident(), task.Clock()
        early = _early(resident, clock)
        ops = FakeOps(state=["$late"])
        asked: list[str] = []
        native = ops.state_ids

        async def state_ids(destination: str, room_id: str, event_id: str) -> StateIds:
            asked.append(event_id)
            return await native(destination, room_id, event_id)

        ops.state_ids = state_ids  # type: ignore[method-assign]
        ops.stored = {"$early", "$auth", "$prev"}
        early.start(DESTINATION, ROOM, ["$prev"])
        resident.answer("$prev", ["$early"])
        report = self.successResultOf(self.fetch(ops, early))
        self.assertEqual(asked, [])
        self.assertEqual(report.state_events, 1)
        self.assertEqual(report.to_store, 0)

    def test_without_an_early_answer_the_engine_asks(self) -> None:
        resident, clock = Resident(), task.Clock()
        early = _early(resident, clock)
        ops = FakeOps(state=["$late"])
        ops.stored = {"$late", "$prev"}
        early.start("other.test", ROOM, ["$prev"])  # another server answered
        report = self.successResultOf(self.fetch(ops, early))
        self.assertEqual(report.state_events, 1)
        self.assertEqual(report.already_stored, 2)
