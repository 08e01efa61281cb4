"""The resync engine's own tables (prefixed ``sps_``) and every query on them.

Created idempotently on first use. No foreign keys into Synapse's tables: Synapse's
purge and delete paths do not know about us. Works on SQLite and PostgreSQL (only
portable SQL). :class:`JobStore` runs the ``*_txn`` functions through
:meth:`ModuleApi.run_db_interaction`.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from synapse.module_api import ModuleApi

from synapse_partial_state.joining.jobs import Job, Phase
from synapse_partial_state.schema import (
    SchemaOnce,
    create_versioned_txn,
    set_version_txn,
)

if TYPE_CHECKING:
    from synapse.storage.database import LoggingTransaction

logger = logging.getLogger(__name__)

#: 2: ``events_applied`` added; ``events_persisted`` counts the join's state events
#: stored (in version 1 it counted the events brought to full state).
SCHEMA_VERSION = 2

_SCHEMA = [
    """
    CREATE TABLE IF NOT EXISTS sps_schema_version (
        lock CHAR(1) NOT NULL DEFAULT 'X' UNIQUE,
        version INTEGER NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS sps_resync_jobs (
        room_id TEXT NOT NULL PRIMARY KEY,
        phase TEXT NOT NULL,
        join_event_id TEXT,
        joined_via TEXT,
        destinations TEXT NOT NULL,
        tried TEXT NOT NULL,
        current_destination TEXT,
        attempts INTEGER NOT NULL,
        next_attempt_ts BIGINT,
        last_error TEXT,
        events_fetched BIGINT NOT NULL,
        events_verified BIGINT NOT NULL,
        events_persisted BIGINT NOT NULL,
        events_applied BIGINT NOT NULL DEFAULT 0,
        events_remaining BIGINT,
        created_ts BIGINT NOT NULL,
        started_ts BIGINT,
        updated_ts BIGINT NOT NULL,
        completed_ts BIGINT
    )
    """,
    # The resident's MSC2775 summary from the latest partial /send_join of each
    # room (clients/summary.py), read while the room is partial.
    """
    CREATE TABLE IF NOT EXISTS sps_join_summaries (
        room_id TEXT NOT NULL PRIMARY KEY,
        join_event_id TEXT NOT NULL,
        summary TEXT NOT NULL,
        stored_ts BIGINT NOT NULL
    )
    """,
]

_COLUMNS = (
    "room_id",
    "phase",
    "join_event_id",
    "joined_via",
    "destinations",
    "tried",
    "current_destination",
    "attempts",
    "next_attempt_ts",
    "last_error",
    "events_fetched",
    "events_verified",
    "events_persisted",
    "events_applied",
    "events_remaining",
    "created_ts",
    "started_ts",
    "updated_ts",
    "completed_ts",
)


def create_schema_txn(txn: LoggingTransaction) -> None:
    """Create our tables if missing and record the schema version."""
    found = create_versioned_txn(
        txn, _SCHEMA, "sps_schema_version", SCHEMA_VERSION, "database"
    )
    if found is None or found == SCHEMA_VERSION:
        return
    if found < 2:
        _upgrade_to_2_txn(txn)
    set_version_txn(txn, "sps_schema_version", SCHEMA_VERSION)


def _upgrade_to_2_txn(txn: LoggingTransaction) -> None:
    """Version 1 counted in ``events_persisted`` the events brought to full state
    (now ``events_applied``); the join's state events it stored were last seen
    as ``events_verified``."""
    txn.execute(
        "ALTER TABLE sps_resync_jobs ADD COLUMN events_applied BIGINT NOT NULL DEFAULT 0"
    )
    txn.execute(
        "UPDATE sps_resync_jobs SET events_applied = events_persisted,"
        " events_persisted = events_verified"
    )


def _to_row(job: Job) -> tuple[Any, ...]:
    return (
        job.room_id,
        job.phase.value,
        job.join_event_id,
        job.joined_via,
        json.dumps(list(job.destinations)),
        json.dumps(list(job.tried)),
        job.current_destination,
        job.attempts,
        job.next_attempt_ts,
        job.last_error,
        job.events_fetched,
        job.events_verified,
        job.events_persisted,
        job.events_applied,
        job.events_remaining,
        job.created_ts,
        job.started_ts,
        job.updated_ts,
        job.completed_ts,
    )


def _from_row(row: tuple[Any, ...]) -> Job:
    d = dict(zip(_COLUMNS, row, strict=True))
    d["phase"] = Phase(d["phase"])
    d["destinations"] = tuple(json.loads(d["destinations"]))
    d["tried"] = tuple(json.loads(d["tried"]))
    return Job(**d)


def upsert_job_txn(txn: LoggingTransaction, job: Job) -> None:
    """Write the whole job row (insert or replace)."""
    txn.execute("DELETE FROM sps_resync_jobs WHERE room_id = ?", (job.room_id,))
    placeholders = ", ".join("?" for _ in _COLUMNS)
    txn.execute(
        f"INSERT INTO sps_resync_jobs ({', '.join(_COLUMNS)}) VALUES ({placeholders})",
        _to_row(job),
    )


def get_job_txn(txn: LoggingTransaction, room_id: str) -> Job | None:
    txn.execute(
        f"SELECT {', '.join(_COLUMNS)} FROM sps_resync_jobs WHERE room_id = ?",
        (room_id,),
    )
    row = txn.fetchone()
    return None if row is None else _from_row(row)


def list_jobs_txn(txn: LoggingTransaction, include_finished: bool) -> list[Job]:
    sql = f"SELECT {', '.join(_COLUMNS)} FROM sps_resync_jobs"
    if not include_finished:
        sql += " WHERE phase NOT IN ('done', 'aborted')"
    txn.execute(sql + " ORDER BY created_ts")
    return [_from_row(row) for row in txn.fetchall()]


class JobStore:
    """The job table, through Synapse's database pool (the schema is created on
    first use, once per process)."""

    def __init__(self, api: ModuleApi) -> None:
        self._api = api
        self._schema = SchemaOnce(
            api, "sps_create_schema", "module's tables", create_schema_txn
        )

    async def ensure_schema(self) -> None:
        """Create our tables once per process (idempotent, race-free here)."""
        await self._schema.ensure()

    async def save(self, job: Job) -> None:
        await self.ensure_schema()
        await self._api.run_db_interaction("sps_save_job", upsert_job_txn, job)

    async def get(self, room_id: str) -> Job | None:
        await self.ensure_schema()
        return await self._api.run_db_interaction("sps_get_job", get_job_txn, room_id)

    async def list(self, include_finished: bool) -> list[Job]:
        await self.ensure_schema()
        return await self._api.run_db_interaction(
            "sps_list_jobs", list_jobs_txn, include_finished
        )
