"""The engine's inner loop (``joining/attempts.py``) with Synapse faked: which
errors of the state fetch blame the destination (fail over) and which are this
server's own faults (raised to the engine's fault back-off, no server skipped)."""

from __future__ import annotations

import sqlite3
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import attr
from synapse.api.errors import HttpResponseException, RequestSendFailed
from twisted.internet import defer, task
from twisted.trial import unittest

from synapse_partial_state.config import ResyncConfig
from synapse_partial_state.joining.attempts import EventAttempts
from synapse_partial_state.joining.jobs import Job, Phase
from synapse_partial_state.joining.wakeups import Wakeups

ROOM = "!room:a.test"


@attr.s(auto_attribs=True, frozen=True)
class FakeEvent:
    event_id: str = "$join"
    room_id: str = ROOM

    def prev_event_ids(self) -> list[str]:
        return ["$prev"]


class FakeOps:
    server_name = "joiner.test"

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.updated: list[tuple[str, str]] = []

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def call_later(self, delay_s: float, callback: Any) -> Any:
        return self.clock.callLater(delay_s, callback)

    async def resync_info(self, room_id: str) -> tuple[str, set[str]]:
        return "$join", {"a.test", "b.test"}

    async def recent_sender_servers(self, room_id: str) -> set[str]:
        return set()

    async def update_state_for_partial_state_event(
        self, destination: str, event: Any
    ) -> None:
        self.updated.append((destination, event.event_id))


class FakeMetrics:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def failure(self, reason: str) -> None:
        self.failures.append(reason)

    def event_done(self, phase: Any, seconds: float) -> None:
        pass

    def state_fetch(self, *args: Any) -> None:
        pass


class FakeKeys:
    async def wait(self, room_id: str) -> None:
        pass


class FailingOnce:
    """A state fetch that raises ``error`` at ``a.test`` and succeeds elsewhere."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.asked: list[str] = []

    async def fetch_state_before(
        self, destination: str, *args: Any, **kwargs: Any
    ) -> None:
        self.asked.append(destination)
        if destination == "a.test":
            raise self.error
        return None


class FetchErrorTests(unittest.TestCase):
    def run_attempts(self, error: Exception) -> tuple[Any, FailingOnce, FakeMetrics]:
        clock = task.Clock()
        ops = FakeOps(clock)
        metrics = FakeMetrics()
        fetcher = FailingOnce(error)
        saved: dict[str, Job] = {}

        async def save(job: Job) -> Job:
            saved[job.room_id] = job
            return job

        async def still_wanted(job: Job) -> None:
            pass

        attempts = EventAttempts(
            ResyncConfig(),
            ops,  # type: ignore[arg-type]
            metrics,  # type: ignore[arg-type]
            fetcher,  # type: ignore[arg-type]
            FakeKeys(),  # type: ignore[arg-type]
            Wakeups(ops),  # type: ignore[arg-type]
            save,
            saved.get,
            still_wanted,
        )
        job = Job(
            ROOM,
            Phase.FETCHING,
            0,
            0,
            join_event_id="$join",
            joined_via="a.test",
            destinations=("a.test", "b.test"),
            current_destination="a.test",
        )
        d = defer.ensureDeferred(
            attempts.update_event(job, FakeEvent())  # type: ignore[arg-type]
        )
        return d, fetcher, metrics

    def test_remote_errors_fail_over(self) -> None:
        for error in (
            RequestSendFailed(ConnectionError("refused"), can_retry=True),
            HttpResponseException(502, "Bad Gateway", b""),
            ValueError("not a /state answer"),
        ):
            d, fetcher, metrics = self.run_attempts(error)
            job = self.successResultOf(d)
            self.assertEqual(fetcher.asked, ["a.test", "b.test"], error)
            self.assertEqual(job.tried, ("a.test",))
            self.assertEqual(job.current_destination, "b.test")
            self.assertEqual(job.events_applied, 1)
            self.assertEqual(len(metrics.failures), 1)

    def test_local_faults_are_not_blamed_on_the_destination(self) -> None:
        psycopg2 = __import__("psycopg2")
        wrapped = RuntimeError("storing the state failed")
        wrapped.__cause__ = psycopg2.InterfaceError("connection already closed")
        for error in (
            sqlite3.OperationalError("database is locked"),
            psycopg2.InterfaceError("connection already closed"),
            psycopg2.OperationalError("server closed the connection unexpectedly"),
            BrokenProcessPool("a worker died"),
            wrapped,
        ):
            d, fetcher, metrics = self.run_attempts(error)
            failure = self.failureResultOf(d)
            # The engine's fault back-off sees the error itself; nobody failed over.
            self.assertIs(failure.value, error)
            self.assertEqual(fetcher.asked, ["a.test"])
            self.assertEqual(metrics.failures, [])
