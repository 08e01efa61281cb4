"""PostgreSQL ``COPY`` for the bulk outlier writer's biggest inserts.

The bulk outlier writer (:mod:`.outliers`) stores a resync's state through
Synapse's own ``_persist_events_txn``, which inserts every table's rows with
``DatabasePool.simple_insert_many_txn``: on PostgreSQL an ``INSERT ... VALUES``
statement per 100 rows (psycopg2's ``execute_values``), each parsed and planned
by the server. Within the bulk writer's transactions, and only there, the rows
of the per-event tables in :data:`COPY_TABLES` are sent with one ``COPY ...
FROM STDIN`` per table instead: the same rows, in the same transaction, through
PostgreSQL's bulk-load path. Anything else (another table, a transaction of
Synapse's own, SQLite, a value of a type this module does not encode) goes
through Synapse's insert unchanged.

Only the transport changes: the rows are Synapse's, built by Synapse's code;
the differential test (``tests/blackbox/test_bulk_outliers.py``) compares the
tables written through Synapse's path and the bulk path. One table's big inserts
are copied in any transaction (:data:`ALWAYS_COPY_TABLES`): a whole state group
of a big room.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

#: The tables whose inserts in the bulk writer's transactions are copied: the
#: per-event rows of ``_persist_events_txn`` (Synapse 1.163.2) for outliers.
COPY_TABLES = frozenset(
    {
        "events",
        "event_json",
        "state_events",
        "event_auth",
        "event_auth_chains",
        "event_auth_chain_links",
        "room_memberships",
        "event_edges",
    }
)
#: Fewer rows than this go through Synapse's insert (COPY's fixed cost).
COPY_MIN_ROWS = 50
#: Tables whose big inserts are copied in any transaction: a whole state group
#: (``StateGroupDataStore.store_state_group``, 1.163.2), written when Synapse
#: is handed a state with no group to store it as a delta of: at a resync, the
#: first state of a big room with full state (every member: 100,000 rows at
#: 100,000 members, 100 per ``INSERT`` statement otherwise).
ALWAYS_COPY_TABLES = frozenset({"state_groups_state"})
#: Rows from which an insert into :data:`ALWAYS_COPY_TABLES` is copied.
ALWAYS_COPY_MIN_ROWS = 5000

_local = threading.local()
#: Rows sent with COPY by this process (for the writer's log line).
COPIED = {"rows": 0}


@contextmanager
def copying() -> Iterator[None]:
    """Within the block, on this thread (a database thread running one of the
    bulk writer's transactions), inserts into :data:`COPY_TABLES` use COPY."""
    previous = getattr(_local, "active", False)
    _local.active = True
    try:
        yield
    finally:
        _local.active = previous


def active() -> bool:
    return bool(getattr(_local, "active", False))


class Unencodable(Exception):
    """A value of a type :func:`encode_value` does not write."""


def _escape(text: str) -> str:
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        return (
            text.replace("\\", "\\\\")
            .replace("\t", "\\t")
            .replace("\n", "\\n")
            .replace("\r", "\\r")
        )
    return text


def encode_value(value: Any) -> str:
    """One value in ``COPY``'s text format: ``\\N`` for NULL, ``t``/``f`` for
    booleans, integers in decimal, strings with backslash, tab, newline and
    carriage return escaped. Other types raise :class:`Unencodable`."""
    if value.__class__ is str:
        return _escape(value)
    if value is None:
        return "\\N"
    if value is True:
        return "t"
    if value is False:
        return "f"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, str):
        return _escape(str(value))
    raise Unencodable(type(value).__name__)


def encode_rows(rows: Iterable[Iterable[Any]]) -> str:
    """Rows in ``COPY``'s text format (a line each, tab-separated): the rule of
    :func:`encode_value`, inlined for plain strings (most values; a hundred
    thousand events' rows are millions of values)."""
    lines = []
    for row in rows:
        lines.append(
            "\t".join(
                (_escape(v) if v.__class__ is str else encode_value(v)) for v in row
            )
        )
    lines.append("")
    return "\n".join(lines)


Insert = Callable[[Any, str, Sequence[str], Collection[Iterable[Any]]], None]


def wrap_insert_many(native: Insert) -> Insert:
    """``DatabasePool.simple_insert_many_txn``, copying within :func:`copying`."""

    def simple_insert_many_txn(
        txn: Any, table: str, keys: Sequence[str], values: Collection[Iterable[Any]]
    ) -> None:
        if (
            (active() and table in COPY_TABLES and len(values) >= COPY_MIN_ROWS)
            or (table in ALWAYS_COPY_TABLES and len(values) >= ALWAYS_COPY_MIN_ROWS)
        ) and _is_postgres(txn):
            rows = [tuple(row) for row in values]
            try:
                body = encode_rows(rows)
            except Unencodable as e:
                logger.debug("COPY of %s skipped: a value of type %s", table, e)
                return native(txn, table, keys, rows)
            txn.txn.copy_expert(
                f"COPY {table} ({', '.join(keys)}) FROM STDIN", io.StringIO(body)
            )
            COPIED["rows"] += len(rows)
            if table in ALWAYS_COPY_TABLES:
                logger.info("%d rows of %s written with COPY", len(rows), table)
            return None
        return native(txn, table, keys, values)

    return simple_insert_many_txn


def install_copy() -> None:
    """Wrap ``DatabasePool.simple_insert_many_txn`` (a static method) once."""
    from synapse.storage.database import DatabasePool

    from synapse_partial_state.compat.patching import PatchRecord, record_patch

    native = DatabasePool.__dict__["simple_insert_many_txn"].__func__
    if getattr(native, "_sps_wrapped", False):
        return
    wrapper: Any = wrap_insert_many(native)
    wrapper._sps_wrapped = True
    DatabasePool.simple_insert_many_txn = staticmethod(wrapper)  # type: ignore[method-assign]
    record_patch(
        PatchRecord(
            "synapse.storage.database.DatabasePool.simple_insert_many_txn",
            "wrap",
            "within the bulk outlier writer's transactions on PostgreSQL, the "
            "per-event tables' rows sent with COPY, and a big room's whole state "
            "groups in any transaction (other inserts unchanged)",
        )
    )


def _is_postgres(txn: Any) -> bool:
    from synapse.storage.engines import PostgresEngine

    return isinstance(txn.database_engine, PostgresEngine)
