"""Pure policy of resync jobs: back-off, server order, ETA (no Synapse process)."""

from __future__ import annotations

import unittest

from synapse_partial_state.joining.jobs import (
    Job,
    Phase,
    backoff_ms,
    eta_seconds,
    memberships_to_keep,
    next_destination,
    order_destinations,
    start_or_resume,
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


class StartOrResumeTests(unittest.TestCase):
    SERVERS = ("a.test", "b.test")

    def test_new_job_at_its_first_server(self) -> None:
        job = start_or_resume(None, "!r:x", 7, "$join", "a.test", self.SERVERS)
        self.assertEqual(job.phase, Phase.FETCHING)
        self.assertEqual((job.created_ts, job.started_ts, job.updated_ts), (7, 7, 7))
        self.assertEqual((job.join_event_id, job.joined_via), ("$join", "a.test"))
        self.assertEqual(job.current_destination, "a.test")

    def test_unfinished_job_resumes_with_its_counters_and_a_fresh_round(self) -> None:
        existing = Job(
            room_id="!r:x",
            phase=Phase.RETRYING,
            created_ts=1,
            updated_ts=2,
            started_ts=1,
            join_event_id="$join",
            attempts=4,
            events_persisted=90,
            tried=("a.test",),
            destinations=("a.test",),
            next_attempt_ts=50,
        )
        job = start_or_resume(existing, "!r:x", 9, None, "a.test", self.SERVERS)
        self.assertEqual(job.phase, Phase.FETCHING)
        self.assertEqual((job.created_ts, job.updated_ts), (1, 9))
        self.assertEqual((job.attempts, job.events_persisted), (4, 90))
        self.assertEqual((job.tried, job.next_attempt_ts), ((), None))
        self.assertEqual(job.join_event_id, "$join")  # kept when not known now
        self.assertEqual(job.destinations, self.SERVERS)
        # No servers known now: the job's own list is kept.
        again = start_or_resume(existing, "!r:x", 9, None, None, ())
        self.assertEqual(again.destinations, ("a.test",))

    def test_finished_job_is_replaced(self) -> None:
        done = Job(room_id="!r:x", phase=Phase.DONE, created_ts=1, updated_ts=2)
        job = start_or_resume(done, "!r:x", 9, "$j", None, self.SERVERS)
        self.assertEqual((job.created_ts, job.phase), (9, Phase.FETCHING))


class MembershipsToKeepTests(unittest.TestCase):
    def test_what_a_purge_would_take_from_local_users(self) -> None:
        got = memberships_to_keep(
            [
                ("@a:x", "leave", "@a:x"),  # left: nothing to keep
                ("@b:x", "invite", "@mod:y"),
                ("@c:x", "knock", "@c:x"),
                ("@d:x", "leave", "@mod:y"),  # kicked
                ("@e:x", "ban", "@mod:y"),
            ]
        )
        self.assertEqual(
            got,
            [("@b:x", "invite"), ("@c:x", "knock"), ("@d:x", "leave"), ("@e:x", "ban")],
        )
        self.assertEqual(memberships_to_keep([("@a:x", "leave", "@a:x")]), [])
