"""Our tables on SQLite (pure logic: the SQL is portable and also runs on
PostgreSQL in every black-box resync test)."""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from synapse_partial_state import schema as schema_module
from synapse_partial_state.joining.jobs import Job, Phase
from synapse_partial_state.joining.store import (
    SCHEMA_VERSION,
    JobStore,
    create_schema_txn,
    get_job_txn,
    list_jobs_txn,
    upsert_job_txn,
)

#: The job table as version 1 of the module created it.
V1_TABLE = """
CREATE TABLE sps_resync_jobs (
    room_id TEXT NOT NULL PRIMARY KEY, phase TEXT NOT NULL, join_event_id TEXT,
    joined_via TEXT, destinations TEXT NOT NULL, tried TEXT NOT NULL,
    current_destination TEXT, attempts INTEGER NOT NULL, next_attempt_ts BIGINT,
    last_error TEXT, events_fetched BIGINT NOT NULL,
    events_verified BIGINT NOT NULL, events_persisted BIGINT NOT NULL,
    events_remaining BIGINT, created_ts BIGINT NOT NULL, started_ts BIGINT,
    updated_ts BIGINT NOT NULL, completed_ts BIGINT
)
"""


class StorageTests(unittest.TestCase):
    def setUp(self) -> None:
        self.db = sqlite3.connect(":memory:")
        self.txn: Any = self.db.cursor()

    def version(self) -> int:
        self.txn.execute("SELECT version FROM sps_schema_version")
        return int(self.txn.fetchone()[0])

    def test_fresh_schema_round_trips_a_job(self) -> None:
        create_schema_txn(self.txn)
        create_schema_txn(self.txn)  # idempotent
        self.assertEqual(self.version(), SCHEMA_VERSION)
        job = Job(
            room_id="!r:x",
            phase=Phase.APPLYING,
            created_ts=1,
            updated_ts=2,
            destinations=("a", "b"),
            tried=("a",),
            events_fetched=10,
            events_verified=9,
            events_persisted=8,
            events_applied=3,
            events_remaining=4,
        )
        upsert_job_txn(self.txn, job)
        upsert_job_txn(self.txn, job.evolve(5, events_applied=4))
        self.assertEqual(get_job_txn(self.txn, "!r:x"), job.evolve(5, events_applied=4))
        self.assertEqual(len(list_jobs_txn(self.txn, include_finished=False)), 1)
        upsert_job_txn(self.txn, job.evolve(6, phase=Phase.DONE))
        self.assertEqual(list_jobs_txn(self.txn, include_finished=False), [])
        self.assertEqual(len(list_jobs_txn(self.txn, include_finished=True)), 1)

    def test_version_1_rows_are_upgraded(self) -> None:
        """Version 1 counted the events brought to full state as persisted."""
        self.txn.execute(V1_TABLE)
        self.txn.execute(
            "CREATE TABLE sps_schema_version (lock CHAR(1) NOT NULL DEFAULT 'X'"
            " UNIQUE, version INTEGER NOT NULL)"
        )
        self.txn.execute("INSERT INTO sps_schema_version VALUES ('X', 1)")
        self.txn.execute(
            "INSERT INTO sps_resync_jobs VALUES ('!r:x', 'applying', NULL, NULL,"
            " '[]', '[]', NULL, 0, NULL, NULL, 500, 500, 7, 2, 1, 1, 1, NULL)"
        )
        create_schema_txn(self.txn)
        self.assertEqual(self.version(), SCHEMA_VERSION)
        job = get_job_txn(self.txn, "!r:x")
        assert job is not None
        self.assertEqual(
            (job.events_persisted, job.events_applied, job.events_remaining),
            (500, 7, 2),
        )
        create_schema_txn(self.txn)  # and not upgraded twice
        self.assertEqual(get_job_txn(self.txn, "!r:x"), job)

    def test_a_newer_schema_is_refused(self) -> None:
        create_schema_txn(self.txn)
        self.txn.execute("UPDATE sps_schema_version SET version = ?", (99,))
        with self.assertRaisesRegex(RuntimeError, "newer than this module's"):
            create_schema_txn(self.txn)


class SchemaCreationTests(unittest.TestCase):
    """The schema is created once per store, and again when another process
    created it at the same moment (PostgreSQL's unique violation)."""

    def store(self, failures: int) -> tuple[Any, list[float], list[str]]:
        calls: list[str] = []
        sleeps: list[float] = []

        async def run_db_interaction(desc: str, func: Any, *args: Any) -> None:
            calls.append(desc)
            if len(calls) <= failures:
                raise RuntimeError("duplicate key value violates unique constraint")

        async def sleep(seconds: float) -> None:
            sleeps.append(seconds)

        api = SimpleNamespace(run_db_interaction=run_db_interaction, sleep=sleep)
        return JobStore(api), sleeps, calls  # type: ignore[arg-type]

    def ensure(self, store: Any) -> Any:
        return defer.ensureDeferred(store.ensure_schema())

    def test_created_once(self) -> None:
        store, sleeps, calls = self.store(failures=0)
        self.successResultOf(self.ensure(store))
        self.successResultOf(self.ensure(store))
        self.assertEqual((calls, sleeps), (["sps_create_schema"], []))

    def test_a_concurrent_creation_is_tried_again(self) -> None:
        store, sleeps, calls = self.store(failures=2)
        with self.assertLogs(schema_module.logger, "INFO"):
            self.successResultOf(self.ensure(store))
        self.assertEqual(len(calls), 3)
        self.assertEqual(sleeps, [0.2, 0.4])

    def test_gives_up_after_a_few_tries(self) -> None:
        store, sleeps, calls = self.store(failures=10)
        self.failureResultOf(self.ensure(store), RuntimeError)
        self.assertEqual(len(calls), 3)
        # ...and tries again on the next call
        self.failureResultOf(self.ensure(store), RuntimeError)
        self.assertEqual(len(calls), 6)
