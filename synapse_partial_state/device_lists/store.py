"""The device-list queues' own tables (prefixed ``sps_``) and every query on them.

Created idempotently on first use, with their own version row (independent of
the resync jobs' schema). No foreign keys into Synapse's tables. Portable SQL
(SQLite and PostgreSQL).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

import attr
from synapse.module_api import ModuleApi, make_deferred_yieldable
from twisted.internet import defer

from synapse_partial_state.schema import SchemaOnce, create_versioned_txn

if TYPE_CHECKING:
    from synapse.storage.database import LoggingTransaction

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = [
    """
    CREATE TABLE IF NOT EXISTS sps_device_lists_schema (
        lock CHAR(1) NOT NULL DEFAULT 'X' UNIQUE,
        version INTEGER NOT NULL
    )
    """,
    # One local device-list change (Synapse's device-list stream id) in one
    # partial-state room, with the servers it reached while the room was partial.
    """
    CREATE TABLE IF NOT EXISTS sps_device_outbound (
        room_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        device_id TEXT NOT NULL,
        stream_id BIGINT NOT NULL,
        reached TEXT NOT NULL,
        queued_ts BIGINT NOT NULL,
        UNIQUE (room_id, user_id, device_id, stream_id)
    )
    """,
    """
    CREATE INDEX IF NOT EXISTS sps_device_outbound_room
        ON sps_device_outbound (room_id, stream_id)
    """,
    # One device-list or signing-key EDU received while a room was partial, for
    # a user no room's (partial) state showed us sharing, in arrival order.
    """
    CREATE TABLE IF NOT EXISTS sps_device_inbound (
        seq BIGINT NOT NULL PRIMARY KEY,
        user_id TEXT NOT NULL,
        edu_type TEXT NOT NULL,
        origin TEXT NOT NULL,
        content TEXT NOT NULL,
        received_ts BIGINT NOT NULL
    )
    """,
    """
    CREATE INDEX IF NOT EXISTS sps_device_inbound_user
        ON sps_device_inbound (user_id, seq)
    """,
    # Remote members of a room given up during its resync (and purged), for the
    # local users who left it: /sync's device_lists.left, which Synapse computes
    # from the room's members, gone with the purge. ``position``: the local
    # user's leave (room stream ordering).
    """
    CREATE TABLE IF NOT EXISTS sps_device_left (
        user_id TEXT NOT NULL,
        left_user_id TEXT NOT NULL,
        position BIGINT NOT NULL
    )
    """,
    """
    CREATE INDEX IF NOT EXISTS sps_device_left_user
        ON sps_device_left (user_id, position)
    """,
    # Remote users whose presence arrived while a room was partial, from a
    # server of that room, not known to share a room yet: the room's local
    # members see their presence until the room is complete.
    """
    CREATE TABLE IF NOT EXISTS sps_presence_interest (
        room_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        UNIQUE (room_id, user_id)
    )
    """,
]


@attr.s(frozen=True, auto_attribs=True, slots=True)
class QueuedChange:
    """A local user's device-list change queued while its room was partial."""

    room_id: str
    user_id: str
    device_id: str
    stream_id: int
    reached: frozenset[str]
    queued_ts: int


def create_schema_txn(txn: LoggingTransaction) -> None:
    create_versioned_txn(
        txn, _SCHEMA, "sps_device_lists_schema", SCHEMA_VERSION, "device-list"
    )


def queue_outbound_txn(
    txn: LoggingTransaction,
    room_id: str,
    user_id: str,
    device_id: str,
    stream_id: int,
    hosts: Collection[str],
    now_ms: int,
) -> None:
    """Queue (or add ``hosts`` to the servers reached by) one change."""
    txn.execute(
        "SELECT reached FROM sps_device_outbound WHERE room_id = ? AND user_id = ?"
        " AND device_id = ? AND stream_id = ?",
        (room_id, user_id, device_id, stream_id),
    )
    row = txn.fetchone()
    if row is None:
        txn.execute(
            "INSERT INTO sps_device_outbound"
            " (room_id, user_id, device_id, stream_id, reached, queued_ts)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (room_id, user_id, device_id, stream_id, _encode(hosts), now_ms),
        )
        return
    reached = set(json.loads(row[0])) | set(hosts)
    txn.execute(
        "UPDATE sps_device_outbound SET reached = ? WHERE room_id = ?"
        " AND user_id = ? AND device_id = ? AND stream_id = ?",
        (_encode(reached), room_id, user_id, device_id, stream_id),
    )


def _encode(hosts: Iterable[str]) -> str:
    return json.dumps(sorted(set(hosts)))


_OUT_COLUMNS = "room_id, user_id, device_id, stream_id, reached, queued_ts"


def _change(row: tuple[Any, ...]) -> QueuedChange:
    return QueuedChange(
        room_id=row[0],
        user_id=row[1],
        device_id=row[2],
        stream_id=int(row[3]),
        reached=frozenset(json.loads(row[4])),
        queued_ts=int(row[5]),
    )


def outbound_for_room_txn(txn: LoggingTransaction, room_id: str) -> list[QueuedChange]:
    txn.execute(
        f"SELECT {_OUT_COLUMNS} FROM sps_device_outbound WHERE room_id = ?"
        " ORDER BY stream_id, user_id, device_id",
        (room_id,),
    )
    return [_change(row) for row in txn.fetchall()]


def outbound_rooms_txn(
    txn: LoggingTransaction,
) -> dict[str, tuple[int, int | None]]:
    """room -> (changes queued, oldest queued_ts)."""
    txn.execute(
        "SELECT room_id, COUNT(*), MIN(queued_ts) FROM sps_device_outbound"
        " GROUP BY room_id"
    )
    return {row[0]: (int(row[1]), int(row[2])) for row in txn.fetchall()}


def delete_outbound_txn(txn: LoggingTransaction, change: QueuedChange) -> None:
    txn.execute(
        "DELETE FROM sps_device_outbound WHERE room_id = ? AND user_id = ?"
        " AND device_id = ? AND stream_id = ?",
        (change.room_id, change.user_id, change.device_id, change.stream_id),
    )


@attr.s(frozen=True, auto_attribs=True, slots=True)
class QueuedEdu:
    """A remote user's device-list or signing-key EDU queued during a resync."""

    seq: int
    user_id: str
    edu_type: str
    origin: str
    content: dict[str, Any]
    received_ts: int


def queue_inbound_txn(
    txn: LoggingTransaction,
    user_id: str,
    edu_type: str,
    origin: str,
    content: dict[str, Any],
    now_ms: int,
) -> None:
    txn.execute("SELECT MAX(seq) FROM sps_device_inbound")
    row = txn.fetchone()
    seq = (row[0] if row and row[0] is not None else 0) + 1
    txn.execute(
        "INSERT INTO sps_device_inbound"
        " (seq, user_id, edu_type, origin, content, received_ts)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (seq, user_id, edu_type, origin, json.dumps(content), now_ms),
    )


def inbound_txn(txn: LoggingTransaction) -> list[QueuedEdu]:
    txn.execute(
        "SELECT seq, user_id, edu_type, origin, content, received_ts"
        " FROM sps_device_inbound ORDER BY seq"
    )
    return [
        QueuedEdu(
            seq=int(row[0]),
            user_id=row[1],
            edu_type=row[2],
            origin=row[3],
            content=json.loads(row[4]),
            received_ts=int(row[5]),
        )
        for row in txn.fetchall()
    ]


def delete_inbound_user_txn(
    txn: LoggingTransaction, user_id: str, up_to_seq: int
) -> None:
    txn.execute(
        "DELETE FROM sps_device_inbound WHERE user_id = ? AND seq <= ?",
        (user_id, up_to_seq),
    )


def add_presence_interest_txn(
    txn: LoggingTransaction, pairs: Collection[tuple[str, str]]
) -> None:
    for room_id, user_id in pairs:
        txn.execute(
            "SELECT 1 FROM sps_presence_interest WHERE room_id = ? AND user_id = ?",
            (room_id, user_id),
        )
        if txn.fetchone() is None:
            txn.execute(
                "INSERT INTO sps_presence_interest (room_id, user_id) VALUES (?, ?)",
                (room_id, user_id),
            )


def presence_interest_txn(
    txn: LoggingTransaction, room_ids: Collection[str]
) -> set[str]:
    users: set[str] = set()
    for room_id in room_ids:
        txn.execute(
            "SELECT user_id FROM sps_presence_interest WHERE room_id = ?", (room_id,)
        )
        users.update(row[0] for row in txn.fetchall())
    return users


def forget_presence_interest_txn(txn: LoggingTransaction, room_id: str) -> None:
    txn.execute("DELETE FROM sps_presence_interest WHERE room_id = ?", (room_id,))


def add_left_txn(
    txn: LoggingTransaction, rows: Collection[tuple[str, str, int]]
) -> None:
    for row in rows:
        txn.execute(
            "INSERT INTO sps_device_left (user_id, left_user_id, position)"
            " VALUES (?, ?, ?)",
            row,
        )


def left_between_txn(
    txn: LoggingTransaction, user_id: str, after: int, up_to: int
) -> set[str]:
    txn.execute(
        "SELECT left_user_id FROM sps_device_left WHERE user_id = ?"
        " AND position > ? AND position <= ?",
        (user_id, after, up_to),
    )
    return {row[0] for row in txn.fetchall()}


class DeviceListStore:
    """The queues, through Synapse's database pool (schema created on first use)."""

    def __init__(self, api: ModuleApi) -> None:
        self._api = api
        self._schema = SchemaOnce(
            api, "sps_device_lists_schema", "device-list tables", create_schema_txn
        )
        #: one inbound insert at a time (each takes the next ``seq``; Synapse
        #: handles a transaction's EDUs concurrently, and only the first
        #: device-list writer handles them)
        self._inbound_lock = defer.DeferredLock()

    async def ensure_schema(self) -> None:
        await self._schema.ensure()

    async def queue_outbound(
        self,
        room_id: str,
        user_id: str,
        device_id: str,
        stream_id: int,
        hosts: Collection[str],
        now_ms: int,
    ) -> None:
        await self.ensure_schema()
        await self._api.run_db_interaction(
            "sps_queue_device_outbound",
            queue_outbound_txn,
            room_id,
            user_id,
            device_id,
            stream_id,
            hosts,
            now_ms,
        )

    async def outbound_for_room(self, room_id: str) -> list[QueuedChange]:
        await self.ensure_schema()
        return await self._api.run_db_interaction(
            "sps_device_outbound_for_room", outbound_for_room_txn, room_id
        )

    async def outbound_rooms(self) -> dict[str, tuple[int, int | None]]:
        await self.ensure_schema()
        return await self._api.run_db_interaction(
            "sps_device_outbound_rooms", outbound_rooms_txn
        )

    async def queue_inbound(
        self,
        user_id: str,
        edu_type: str,
        origin: str,
        content: dict[str, Any],
        now_ms: int,
    ) -> None:
        await self.ensure_schema()
        await make_deferred_yieldable(self._inbound_lock.acquire())
        try:
            await self._api.run_db_interaction(
                "sps_queue_device_inbound",
                queue_inbound_txn,
                user_id,
                edu_type,
                origin,
                content,
                now_ms,
            )
        finally:
            self._inbound_lock.release()

    async def inbound(self) -> list[QueuedEdu]:
        await self.ensure_schema()
        return await self._api.run_db_interaction("sps_device_inbound", inbound_txn)

    async def delete_inbound_user(self, user_id: str, up_to_seq: int) -> None:
        await self.ensure_schema()
        await self._api.run_db_interaction(
            "sps_delete_device_inbound", delete_inbound_user_txn, user_id, up_to_seq
        )

    async def add_presence_interest(self, pairs: Collection[tuple[str, str]]) -> None:
        await self.ensure_schema()
        await make_deferred_yieldable(self._inbound_lock.acquire())
        try:
            await self._api.run_db_interaction(
                "sps_add_presence_interest", add_presence_interest_txn, pairs
            )
        finally:
            self._inbound_lock.release()

    async def presence_interest(self, room_ids: Collection[str]) -> set[str]:
        await self.ensure_schema()
        return await self._api.run_db_interaction(
            "sps_presence_interest", presence_interest_txn, room_ids
        )

    async def forget_presence_interest(self, room_id: str) -> None:
        await self.ensure_schema()
        await self._api.run_db_interaction(
            "sps_forget_presence_interest", forget_presence_interest_txn, room_id
        )

    async def add_left(self, rows: Collection[tuple[str, str, int]]) -> None:
        await self.ensure_schema()
        await self._api.run_db_interaction("sps_add_device_left", add_left_txn, rows)

    async def left_between(self, user_id: str, after: int, up_to: int) -> set[str]:
        await self.ensure_schema()
        return await self._api.run_db_interaction(
            "sps_device_left", left_between_txn, user_id, after, up_to
        )

    async def delete_outbound(self, change: QueuedChange) -> None:
        await self.ensure_schema()
        await self._api.run_db_interaction(
            "sps_delete_device_outbound", delete_outbound_txn, change
        )
