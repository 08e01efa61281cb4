"""The federation sender's wake-ups held while /send_join answers are prepared
(pure logic, a fake clock)."""

from __future__ import annotations

import unittest
from typing import Any

from synapse_partial_state.resident.fanout import FanOutHold


class _Clock:
    """``call_later`` with a hand-driven time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[list[Any]] = []  # [at, callback, cancelled]

    def call_later(self, seconds: float, callback: Any) -> Any:
        entry = [self.now + seconds, callback, False]
        self.calls.append(entry)

        class _Call:
            def cancel(self) -> None:
                entry[2] = True

        return _Call()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for entry in list(self.calls):
            if not entry[2] and entry[0] <= self.now:
                entry[2] = True
                entry[1]()

    def pending(self) -> int:
        return sum(1 for e in self.calls if not e[2])


class _HoldCase(unittest.TestCase):
    """A hold of 2 s on a hand-driven clock, waking ``self.woken``."""

    def setUp(self) -> None:
        self.clock = _Clock()
        self.woken: list[int] = []
        self.hold = self.make(2.0)

    def make(self, max_hold_s: float) -> FanOutHold:
        return FanOutHold(self.woken.append, self.clock.call_later, max_hold_s, int)


class FanOutHoldTests(_HoldCase):
    def test_no_answer_in_progress_passes_wake_ups_on_at_once(self) -> None:
        self.hold.notify(5)
        self.hold.notify(6)
        self.assertEqual(self.woken, [5, 6])
        self.assertEqual(self.hold.held_total, 0)

    def test_held_until_the_answer_is_sent_then_the_largest_token(self) -> None:
        done = self.hold.answer_started()
        self.hold.notify(7)
        self.hold.notify(9)
        self.hold.notify(8)  # out of order: the largest is what counts
        self.assertEqual(self.woken, [])
        done()
        self.assertEqual(self.woken, [9])
        self.assertEqual(self.hold.held_total, 3)
        self.assertEqual(self.clock.pending(), 0, "the deadline is cancelled")
        # Nothing more is held, nor woken again.
        self.clock.advance(10)
        self.assertEqual(self.woken, [9])

    def test_released_only_when_the_last_of_overlapping_answers_is_sent(self) -> None:
        first = self.hold.answer_started()
        second = self.hold.answer_started()
        self.hold.notify(3)
        first()
        self.assertEqual(self.woken, [])
        self.assertEqual(self.hold.answers_in_progress, 1)
        second()
        self.assertEqual(self.woken, [3])

    def test_an_answer_with_nothing_held_wakes_nothing(self) -> None:
        done = self.hold.answer_started()
        done()
        self.assertEqual(self.woken, [])

    def test_finishing_twice_counts_once(self) -> None:
        first = self.hold.answer_started()
        second = self.hold.answer_started()
        first()
        first()
        self.assertEqual(self.hold.answers_in_progress, 1)
        self.hold.notify(4)
        self.assertEqual(self.woken, [])
        second()
        self.assertEqual(self.woken, [4])

    def test_deadline_wakes_the_sender_while_answers_go_on(self) -> None:
        done = self.hold.answer_started()
        self.hold.notify(1)
        self.clock.advance(1.9)
        self.assertEqual(self.woken, [])
        self.clock.advance(0.2)
        self.assertEqual(self.woken, [1])
        self.assertEqual(self.hold.deadline_releases, 1)
        # Still answering: the next wake-up is held again, with a new deadline.
        self.hold.notify(2)
        self.assertEqual(self.woken, [1])
        self.clock.advance(2.0)
        self.assertEqual(self.woken, [1, 2])
        done()
        self.assertEqual(self.woken, [1, 2])

    def test_a_wave_cannot_starve_the_sender(self) -> None:
        # Answers overlapping for 10 s, a wake-up every 0.1 s: the sender still
        # runs at least every 2 s.
        answers = [self.hold.answer_started()]
        for step in range(100):
            if step % 5 == 0:
                answers.append(self.hold.answer_started())
                answers.pop(0)()
            self.hold.notify(step)
            self.clock.advance(0.1)
        self.assertGreaterEqual(len(self.woken), 4)
        self.assertEqual(self.woken, sorted(self.woken))
        answers[0]()
        self.assertEqual(self.woken[-1], 99)

    def test_zero_disables(self) -> None:
        hold = self.make(0)
        hold.answer_started()
        hold.notify(1)
        self.assertEqual(self.woken, [1])

    def test_a_failing_wake_up_is_logged_not_raised(self) -> None:
        def wake(token: int) -> None:
            raise RuntimeError("boom")

        hold = FanOutHold(wake, self.clock.call_later, 2.0, int)
        done = hold.answer_started()
        hold.notify(1)
        with self.assertLogs("synapse_partial_state.resident.fanout", "ERROR"):
            done()


class GraceTests(_HoldCase):
    """A partial ``/send_join`` answer counts as in progress a moment after it
    is sent; the joiner's state request, answered meanwhile, holds on."""

    def test_the_next_request_starts_before_the_sender_is_woken(self) -> None:
        send_join = self.hold.answer_started()
        self.hold.notify(5)  # the join persisted: its fan-out is held
        send_join(0.5)
        self.clock.advance(0.3)
        state_ids = self.hold.answer_started()  # the joiner's /state_ids
        self.clock.advance(0.3)  # the grace is over; the answer goes on
        self.assertEqual(self.woken, [])
        state_ids()
        self.assertEqual(self.woken, [5])

    def test_without_a_next_request_the_grace_ends_the_hold(self) -> None:
        send_join = self.hold.answer_started()
        self.hold.notify(5)
        send_join(0.5)
        self.clock.advance(0.4)
        self.assertEqual(self.woken, [])
        self.clock.advance(0.1)
        self.assertEqual(self.woken, [5])
        self.assertEqual(self.hold.answers_in_progress, 0)

    def test_the_deadline_still_bounds_the_hold(self) -> None:
        send_join = self.hold.answer_started()
        self.hold.notify(5)
        send_join(0.5)
        state = self.hold.answer_started()  # a long /state answer
        self.clock.advance(2.0)
        self.assertEqual(self.woken, [5])
        state()
        self.assertEqual(self.woken, [5])


class DeferredWakeUpTests(_HoldCase):
    """Other wake-ups that carry nothing (Synapse's presence handler's), held
    with the sender's."""

    def setUp(self) -> None:
        super().setUp()
        self.presence: list[str] = []

    def wake_presence(self) -> None:
        self.presence.append("woken")

    def test_called_at_once_when_no_answer_is_in_progress(self) -> None:
        self.hold.defer("presence", self.wake_presence)
        self.assertEqual(self.presence, ["woken"])
        self.assertEqual(self.clock.pending(), 0)

    def test_held_until_the_answer_is_sent_and_called_once(self) -> None:
        done = self.hold.answer_started()
        self.hold.notify(3)  # the join persisted: both wake-ups come
        self.hold.defer("presence", self.wake_presence)
        self.hold.defer("presence", self.wake_presence)
        self.assertEqual((self.woken, self.presence), ([], []))
        with self.assertLogs("synapse_partial_state.resident.fanout", "DEBUG") as logs:
            done()
        self.assertEqual((self.woken, self.presence), ([3], ["woken"]))
        self.assertIn("Federation sender and presence woken after", logs.output[0])
        self.assertEqual(self.hold.held_total, 3)
        self.assertEqual(self.clock.pending(), 0, "the deadline is cancelled")
        done()
        self.clock.advance(10)
        self.assertEqual(self.presence, ["woken"])

    def test_the_deadline_bounds_it_alone(self) -> None:
        done = self.hold.answer_started()
        self.hold.defer("presence", self.wake_presence)
        self.clock.advance(1.9)
        self.assertEqual(self.presence, [])
        self.clock.advance(0.2)
        self.assertEqual(self.presence, ["woken"])
        self.assertEqual(self.woken, [], "nothing of the sender's was held")
        self.assertEqual(self.hold.deadline_releases, 1)
        done()
        self.assertEqual(self.presence, ["woken"])

    def test_a_failing_one_is_logged_and_the_others_still_woken(self) -> None:
        def broken() -> None:
            raise RuntimeError("boom")

        done = self.hold.answer_started()
        self.hold.defer("broken", broken)
        self.hold.notify(4)
        self.hold.defer("presence", self.wake_presence)
        with self.assertLogs("synapse_partial_state.resident.fanout", "ERROR"):
            done()
        self.assertEqual((self.woken, self.presence), ([4], ["woken"]))

    def test_zero_disables(self) -> None:
        hold = self.make(0)
        hold.answer_started()
        hold.defer("presence", self.wake_presence)
        self.assertEqual(self.presence, ["woken"])
