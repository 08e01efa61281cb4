"""Pure policy of resync jobs: back-off, server order, ETA (no Synapse process)."""

from __future__ import annotations

import unittest

from synapse_partial_state.joining.jobs import (
    Job,
    Phase,
    backoff_ms,
    eta_seconds,
    next_destination,
    order_destinations,
)


class BackoffTests(unittest.TestCase):
    def test_doubles_then_caps(self) -> None:
        got = [backoff_ms(n, 5, 60) for n in range(0, 7)]
        self.assertEqual(got, [0, 5000, 10000, 20000, 40000, 60000, 60000])

    def test_huge_attempt_counts_do_not_overflow(self) -> None:
        self.assertEqual(backoff_ms(10_000, 1, 600), 600_000)


class DestinationTests(unittest.TestCase):
    def test_joined_via_first_then_room_then_learned_without_repeats(self) -> None:
        self.assertEqual(
            order_destinations("b", ["a", "b", "me", "c"], ["d", "a", "me"], "me"),
            ("b", "a", "c", "d"),
        )

    def test_no_joined_via(self) -> None:
        self.assertEqual(order_destinations(None, ["x"], [], "me"), ("x",))

    def test_next_destination_skips_tried(self) -> None:
        self.assertEqual(next_destination(("a", "b", "c"), ("a",)), "b")
        self.assertIsNone(next_destination(("a", "b"), ("b", "a")))
        self.assertIsNone(next_destination((), ()))


class JobTests(unittest.TestCase):
    def job(self, **kw: object) -> Job:
        base: dict[str, object] = {
            "room_id": "!r:x",
            "phase": Phase.APPLYING,
            "created_ts": 0,
            "updated_ts": 0,
        }
        base.update(kw)
        return Job(**base)  # type: ignore[arg-type]

    def test_final_phases(self) -> None:
        self.assertEqual({p for p in Phase if p.final}, {Phase.DONE, Phase.ABORTED})

    def test_evolve_stamps_update_time(self) -> None:
        job = self.job().evolve(42, attempts=3)
        self.assertEqual((job.updated_ts, job.attempts), (42, 3))

    def test_eta_from_rate(self) -> None:
        job = self.job(started_ts=0, events_persisted=100, events_remaining=50)
        self.assertAlmostEqual(eta_seconds(job, 10_000) or 0, 5.0)

    def test_eta_counts_stored_and_applied_events_alike(self) -> None:
        job = self.job(
            started_ts=0, events_persisted=80, events_applied=20, events_remaining=10
        )
        self.assertAlmostEqual(eta_seconds(job, 10_000) or 0, 1.0)

    def test_eta_none_once_nothing_remains(self) -> None:
        job = self.job(started_ts=0, events_persisted=80, events_remaining=0)
        self.assertIsNone(eta_seconds(job, 10_000))

    def test_eta_unknown_without_progress(self) -> None:
        self.assertIsNone(eta_seconds(self.job(started_ts=0, events_remaining=5), 1000))
        self.assertIsNone(
            eta_seconds(self.job(events_persisted=5, events_remaining=5), 1)
        )
