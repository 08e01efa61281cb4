"""The module's own tables: created on first use, versioned, in Synapse's database.

Each part with tables of its own (the resync jobs, the device-list queues) keeps
a list of ``CREATE ... IF NOT EXISTS`` statements and a one-row version table;
:func:`create_versioned_txn` applies them and :class:`SchemaOnce` runs that once
per process, before the first query.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from synapse.module_api import ModuleApi, make_deferred_yieldable
from twisted.internet import defer

if TYPE_CHECKING:
    from synapse.storage.database import LoggingTransaction

logger = logging.getLogger(__name__)

#: Tries at creating a schema. Another process (a worker serving the clients'
#: endpoint, the main process starting a resync) or another store of this one may
#: create it at the same moment, which PostgreSQL's ``CREATE TABLE IF NOT EXISTS``
#: does not tolerate (a unique violation in its catalog; seen when a client asked
#: for a room's progress just as its resync wrote the first job); once the other
#: has committed, trying again finds the tables.
SCHEMA_TRIES = 3


def create_versioned_txn(
    txn: LoggingTransaction,
    statements: Sequence[str],
    version_table: str,
    version: int,
    what: str,
) -> int | None:
    """Run ``statements`` (the first creates ``version_table``: ``lock`` and
    ``version`` columns), record ``version`` if none is; refuse a newer one.
    Returns the version found before (None: the tables are new), for the caller's
    upgrades; the caller then records ``version`` with :func:`set_version_txn`."""
    for statement in statements:
        txn.execute(statement)
    txn.execute(f"SELECT version FROM {version_table}")
    row = txn.fetchone()
    if row is None:
        txn.execute(
            f"INSERT INTO {version_table} (lock, version) VALUES ('X', ?)", (version,)
        )
        return None
    found = int(row[0])
    if found > version:
        raise RuntimeError(
            f"synapse_partial_state: {what} schema version {found} is newer than "
            f"this module's ({version}); upgrade the module"
        )
    return found


def set_version_txn(txn: LoggingTransaction, version_table: str, version: int) -> None:
    txn.execute(f"UPDATE {version_table} SET version = ?", (version,))


class SchemaOnce:
    """Runs ``create_txn`` once per process before the first query of a store
    (idempotent, race-free in this process; retried against other processes)."""

    def __init__(
        self,
        api: ModuleApi,
        desc: str,
        what: str,
        create_txn: Callable[[LoggingTransaction], object],
    ) -> None:
        self._api = api
        self._desc = desc
        self._what = what
        self._create_txn = create_txn
        self._ready = False
        self._lock = defer.DeferredLock()

    async def ensure(self) -> None:
        if self._ready:
            return
        await make_deferred_yieldable(self._lock.acquire())
        try:
            if not self._ready:
                await self._create()
                self._ready = True
        finally:
            self._lock.release()

    async def _create(self) -> None:
        for attempt in range(1, SCHEMA_TRIES + 1):
            try:
                await self._api.run_db_interaction(self._desc, self._create_txn)
                return
            except Exception as e:
                if attempt == SCHEMA_TRIES:
                    raise
                logger.info(
                    "Creating the %s failed (%s), perhaps concurrently elsewhere; "
                    "trying again",
                    self._what,
                    e,
                )
                await self._api.sleep(0.2 * attempt)
