"""Who waits for the engine's state fetch (``joining/inflight.py``)."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial import unittest

from synapse_partial_state.joining.inflight import (
    LOCAL_WORK_WAIT_S,
    STATE_REQUEST_WAIT_S,
    InflightFetches,
)

ROOM = "!r:x"
ANSWER = (["$s1", "$s2"], ["$a1"])


class InflightFetchesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.inflight = InflightFetches(self.clock)

    def ask(self, event_id: str) -> defer.Deferred[object]:
        return defer.ensureDeferred(self.inflight.answer_for(ROOM, event_id))

    def test_nothing_in_flight_answers_at_once(self) -> None:
        self.assertIsNone(self.successResultOf(self.ask("$e")))

    def test_request_at_a_fetched_event_waits_and_gets_the_engines_answer(
        self,
    ) -> None:
        self.inflight.begin(ROOM, ["$prev"])
        asked = self.ask("$prev")
        self.assertNoResult(asked)
        self.inflight.remember(ROOM, "$prev", ANSWER)
        self.inflight.end(ROOM, ["$prev"])
        self.assertEqual(self.successResultOf(asked), ANSWER)

    def test_request_at_another_event_waits_for_the_join_state_then_asks(
        self,
    ) -> None:
        self.inflight.expect_join_state(ROOM)
        asked = self.ask("$fork")
        other_room = defer.ensureDeferred(self.inflight.answer_for("!s:x", "$fork"))
        self.assertIsNone(self.successResultOf(other_room))
        self.assertNoResult(asked)
        self.inflight.release_join_state(ROOM)
        self.assertIsNone(self.successResultOf(asked))  # asks natively

    def test_waits_for_the_join_state_then_for_a_fetch_begun_meanwhile(
        self,
    ) -> None:
        self.inflight.expect_join_state(ROOM)
        asked = self.ask("$prev")
        self.inflight.begin(ROOM, ["$prev"])
        self.inflight.release_join_state(ROOM)
        self.assertNoResult(asked)
        self.inflight.remember(ROOM, "$prev", ANSWER)
        self.inflight.end(ROOM, ["$prev"])
        self.assertEqual(self.successResultOf(asked), ANSWER)

    def test_forget_drops_a_rooms_answers_only(self) -> None:
        self.inflight.remember(ROOM, "$prev", ANSWER)
        self.inflight.remember("!s:x", "$prev", ANSWER)
        self.inflight.forget(ROOM)
        self.assertIsNone(self.successResultOf(self.ask("$prev")))
        other = defer.ensureDeferred(self.inflight.answer_for("!s:x", "$prev"))
        self.assertEqual(self.successResultOf(other), ANSWER)

    def test_synapse_waits_a_bounded_time_then_asks_itself(self) -> None:
        """An event that arrived during the resync is not kept out of the
        timeline by a slow fetch: past the bound, Synapse asks natively."""
        self.inflight.expect_join_state(ROOM)
        self.inflight.begin(ROOM, ["$prev"])
        at_fork = self.ask("$fork")
        at_prev = self.ask("$prev")
        self.clock.advance(STATE_REQUEST_WAIT_S - 0.1)
        self.assertNoResult(at_fork)
        self.assertNoResult(at_prev)
        self.clock.advance(0.2)
        self.assertIsNone(self.successResultOf(at_fork))
        self.assertIsNone(self.successResultOf(at_prev))
        # The engine's fetch goes on; its answer is handed over to later asks.
        self.inflight.remember(ROOM, "$prev", ANSWER)
        self.inflight.end(ROOM, ["$prev"])
        self.inflight.release_join_state(ROOM)
        self.assertEqual(self.successResultOf(self.ask("$prev")), ANSWER)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_while_the_engine_only_stores_synapse_waits_for_it(self) -> None:
        """Once the engine holds the state (only checking and storing left), a
        request waits past the server bound: asking natively would download the
        same state again. Up to a safety bound; the engine's release ends it."""
        self.inflight.expect_join_state(ROOM)
        early = self.ask("$fork")
        self.clock.advance(STATE_REQUEST_WAIT_S - 1)
        self.inflight.local_work(ROOM, True)  # the download arrived
        self.clock.advance(5)
        self.assertNoResult(early)
        late = self.ask("$fork")
        self.clock.advance(STATE_REQUEST_WAIT_S * 10)
        self.assertNoResult(late)
        self.inflight.release_join_state(ROOM)
        self.assertIsNone(self.successResultOf(early))
        self.assertIsNone(self.successResultOf(late))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waiting_for_a_server_again_brings_the_bound_back(self) -> None:
        self.inflight.expect_join_state(ROOM)
        self.inflight.local_work(ROOM, True)
        self.inflight.local_work(ROOM, False)  # e.g. single events fetched
        asked = self.ask("$fork")
        self.clock.advance(STATE_REQUEST_WAIT_S + 0.1)
        self.assertIsNone(self.successResultOf(asked))

    def test_storing_that_never_ends_is_waited_for_a_bounded_time(self) -> None:
        self.inflight.expect_join_state(ROOM)
        self.inflight.local_work(ROOM, True)
        asked = self.ask("$fork")
        self.clock.advance(LOCAL_WORK_WAIT_S - 1)
        self.assertNoResult(asked)
        self.clock.advance(2)
        self.assertIsNone(self.successResultOf(asked))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_release_ends_the_local_work(self) -> None:
        self.inflight.expect_join_state(ROOM)
        self.inflight.local_work(ROOM, True)
        self.inflight.release_join_state(ROOM)
        self.inflight.begin(ROOM, ["$prev"])  # a later fetch, waiting for a server
        asked = self.ask("$prev")
        self.clock.advance(STATE_REQUEST_WAIT_S + 0.1)
        self.assertIsNone(self.successResultOf(asked))
