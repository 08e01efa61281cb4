"""The resident-state seam: what the ``/state`` server reads from Synapse
(:class:`ResidentStateOps`, with its two SQL transactions) and the hook that tells
it when Synapse drops an event from its own cache."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from synapse.module_api import ModuleApi

from synapse_partial_state.compat.patching import (
    PatchRecord,
    homeserver,
    main_store,
    record_patch,
)

if TYPE_CHECKING:
    from synapse.events import EventBase
    from synapse.federation.federation_server import FederationServer
    from synapse.types import StateMap

logger = logging.getLogger(__name__)

#: How the state *before* an event differs from the state group stored for it:
#: None for a non-state event, else the event's ``(type, state_key)`` and the
#: event it replaced (``unsigned.replaces_state``, None if it replaced nothing).
StateAdjustment = tuple[tuple[str, str], str | None] | None


def install_event_invalidation_hook(
    api: ModuleApi,
    on_event: Callable[[str], None],
    on_room: Callable[[str], None],
) -> None:
    """Be told whenever Synapse drops an event from its own event cache.

    Wraps, on this homeserver's main data store *instance* only,
    ``EventsWorkerStore._invalidate_local_get_event_cache(event_id)`` and
    ``_invalidate_local_get_event_cache_room_id(room_id)`` (checked in 1.163.2).
    They are where every process (main or worker, through replication) forgets the
    cached form of an event whose served form may have changed: redactions (of the
    redacted event), censoring, rejection changes, purges, redact-on-ban. Both are
    looked up on ``self`` at call time (``txn.call_after(self._invalidate_...)``),
    so the instance attributes are what Synapse calls. The originals run first.
    """
    store: Any = main_store(api)
    if getattr(store._invalidate_local_get_event_cache, "_sps_wrapped", False):
        return
    native_event = store._invalidate_local_get_event_cache
    native_room = store._invalidate_local_get_event_cache_room_id

    def invalidate_event(event_id: str) -> None:
        native_event(event_id)
        on_event(event_id)

    def invalidate_room(room_id: str) -> None:
        native_room(room_id)
        on_room(room_id)

    invalidate_event._sps_wrapped = True  # type: ignore[attr-defined]
    store._invalidate_local_get_event_cache = invalidate_event
    store._invalidate_local_get_event_cache_room_id = invalidate_room
    record_patch(
        PatchRecord(
            "synapse.storage.databases.main.events_worker.EventsWorkerStore"
            "._invalidate_local_get_event_cache",
            "wrap (store instance)",
            "drop the module's encoded copy of an event whenever Synapse drops its own",
        )
    )
    record_patch(
        PatchRecord(
            "synapse.storage.databases.main.events_worker.EventsWorkerStore"
            "._invalidate_local_get_event_cache_room_id",
            "wrap (store instance)",
            "drop the module's encoded copies of a room's events (purges)",
        )
    )


class ResidentStateOps:
    """The private Synapse calls the ``/state`` server makes, with stock semantics.

    Each method names the stock code it mirrors (``FederationServer.
    on_room_state_request`` / ``on_state_ids_request`` /
    ``_on_context_state_request_compute_with_events`` and ``FederationHandler.
    get_state_ids_for_pdu``, 1.163.2).
    """

    def __init__(self, api: ModuleApi) -> None:
        self._api = api
        self._hs = homeserver(api)
        self._store: Any = self._hs.get_datastores().main
        self._state = self._hs.get_storage_controllers().state

    def _federation_server(self) -> FederationServer:
        # Built lazily by Synapse (at start_listening); only ask once serving.
        return self._hs.get_federation_server()

    async def check_origin(self, origin: str, room_id: str) -> None:
        """Stock's access checks, in stock's order.

        ``assert_host_in_room`` (403 "Host not in room."; 403
        ``M_UNABLE_DUE_TO_PARTIAL_STATE`` while the room is partial-stated here),
        then the room's server ACL on the origin's host (403)."""
        from synapse.util.stringutils import parse_server_name

        server = self._federation_server()
        await self._hs.get_event_auth_handler().assert_host_in_room(room_id, origin)
        origin_host, _ = parse_server_name(origin)
        await server.check_server_matches_acl(origin_host, room_id)

    def origin_room_queue(self, origin: str, room_id: str) -> Any:
        """Stock ``/state``'s per-(origin, room) linearizer (an async context manager)."""
        return self._federation_server()._server_linearizer.queue((origin, room_id))

    def deliveries_are_tracked(self) -> bool:
        """Whether a module registered ``on_event_delivered_over_federation``.

        Stock ``/state`` then skips its response cache and reports the events it
        sends; we decline such requests so that stock does exactly that."""
        callbacks = self._hs.get_module_api_callbacks().federation
        return bool(callbacks.interested_in_events_delivered_over_federation())

    async def state_group_before(
        self, room_id: str, event_id: str
    ) -> tuple[int, StateAdjustment]:
        """The state group at ``event_id`` and how the state before it differs.

        As ``get_state_ids_for_pdu``: 404 for an unknown or rejected event or one in
        another room, 404 "State not known at event" for an outlier; waits for full
        state at the event (stock's ``await_full_state=True``)."""
        from synapse.api.errors import NotFoundError

        event = await self._store.get_event(event_id, check_room_id=room_id)
        if event.internal_metadata.outlier:
            raise NotFoundError(f"State not known at event {event_id}")
        groups = await self._state.get_state_group_for_events([event_id])
        state_key = event.get_state_key()
        if state_key is None:
            return groups[event_id], None
        replaced = event.unsigned.get("replaces_state")
        return groups[event_id], ((event.type, state_key), replaced)

    async def state_ids_of_group(self, state_group: int) -> StateMap[str]:
        """All state of a state group (Synapse's state-group cache)."""
        return await self._state.get_state_ids_for_group(state_group)

    async def is_partial_state_room(self, room_id: str) -> bool:
        return bool(await self._store.is_partial_state_room(room_id))

    async def forward_extremities(self, room_id: str) -> list[str]:
        """The room's forward extremities (the prev events of its next event)."""
        return sorted(await self._store.get_latest_event_ids_in_room(room_id))

    async def state_group_delta(
        self, state_group: int
    ) -> tuple[int | None, StateMap[str] | None]:
        """The group this one was stored as a delta of, and the delta: Synapse's
        ``get_state_group_delta`` (``state_group_edges`` and the group's own
        rows); (None, None) for a group stored in full."""
        state_store: Any = self._hs.get_datastores().state
        delta = await state_store.get_state_group_delta(state_group)
        return delta.prev_group, delta.delta_ids

    async def state_ids_at_keys(
        self, state_group: int, keys: Collection[tuple[str, str]]
    ) -> StateMap[str]:
        """A group's state at the given keys only (Synapse's state-group cache,
        then its filtered query)."""
        from synapse.types.state import StateFilter

        return await self._state.get_state_ids_for_group(
            state_group, StateFilter.from_types(keys)
        )

    async def auth_chain_ids(
        self, room_id: str, event_ids: Collection[str]
    ) -> set[str]:
        """What ``get_auth_chain_ids(room_id, event_ids)`` returns: every event
        reachable from the given ones through one or more auth edges (a given
        event only if another one's chain holds it), stored events only.

        Synapse answers from its chain cover index, which for a room's whole
        state costs one chain per member: at 100,000 members the link walk took
        about 11 s. The chains of a room's state collapse after a step or two
        (every member event cites the same create, power-levels and join-rules
        events), so walking ``event_auth`` breadth-first in large batches (what
        Synapse itself does for rooms without a chain cover, in batches of 100)
        reads each edge once instead."""
        return await self._store.db_pool.runInteraction(
            "sps_auth_chain_ids", _auth_chain_ids_txn, list(event_ids)
        )

    async def encoded_pdus(self, event_ids: Collection[str]) -> dict[str, bytes]:
        """The events as stock ``/state`` serialises them, by event ID.

        Stock: ``get_events_as_list`` (rejected and unknown events left out,
        redacted ones pruned), ``get_pdu_json()`` without ``time_now``,
        ``filter_pdus_for_valid_depth``, Synapse's federation JSON encoder. Events
        the depth filter drops map to ``b""`` (loaded, not sent).

        Stock builds an event object from each stored JSON, only to encode it
        back: for a big room that is most of a ``/state`` (at 100,000 members a
        third of the reactor thread went to ``make_event_from_json`` alone). For a
        plain event (not rejected, no redaction recorded against it, not a
        redaction, no MSC4293 redact-on-ban for its sender, a known room version
        of the right event format) ``get_pdu_json()`` is exactly the stored JSON
        (Synapse stores ``get_dict()`` with ``redacted_because`` removed, and
        ``get_pdu_json`` without ``time_now`` changes nothing else), written by
        the same encoder: so it is sent as stored, once parsed to apply the depth
        filter (and, for room versions 1 and 2, to check the ``event_id`` it
        carries). Unlike stock, a row whose content no longer matches its
        hash-derived ID (database corruption, a 500 from stock) is sent as stored;
        the joiner's hash check drops it. Everything else, and events already in
        Synapse's in-memory event cache (``_get_event_cache``), go through
        ``get_events_as_list`` itself. Rows as in
        ``EventsWorkerStore._fetch_event_rows`` (1.163.2).
        """
        from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
        from synapse.util.async_helpers import concurrently_execute

        # Events Synapse holds in memory are served by its own loader at once.
        event_cache = self._store._get_event_cache
        slow: list[str] = []
        uncached: list[str] = []
        for event_id in event_ids:
            if event_cache.get_local((event_id,), update_metrics=False) is None:
                uncached.append(event_id)
            else:
                slow.append(event_id)
        encoded: dict[str, bytes] = {}

        async def load(start: int) -> None:
            rows = await self._store.db_pool.runInteraction(
                "sps_state_event_rows",
                _state_event_rows_txn,
                uncached[start : start + STATE_LOAD_BATCH],
            )
            for event_id, text, fmt, version_id, rejected, special in rows:
                if rejected is not None:
                    continue  # stock leaves rejected events out
                version = KNOWN_ROOM_VERSIONS.get(version_id) if version_id else None
                if special or version is None or version.event_format != fmt:
                    slow.append(event_id)
                    continue
                data = stored_pdu_bytes(event_id, text, fmt)
                if data is None:
                    slow.append(event_id)
                else:
                    encoded[event_id] = data

        # Reading rows is most of the work now (PostgreSQL side, and row
        # conversion, which releases the GIL while it waits): two queries at once.
        await concurrently_execute(
            load, range(0, len(uncached), STATE_LOAD_BATCH), STATE_LOAD_CONCURRENCY
        )
        if slow:
            for event in await self._store.get_events_as_list(slow):
                encoded[event.event_id] = _encode_pdu(event)
        return encoded


def stored_pdu_bytes(event_id: str, text: str, fmt: int) -> bytes | None:
    """A plain event's stored JSON as stock ``/state`` sends it (see
    :meth:`ResidentStateOps.encoded_pdus`): the stored text itself; ``b""``
    when stock's depth filter drops it; None when it needs stock's loader (not
    JSON, not an object, a depth that is not an integer, a redaction, or a room
    version 1/2 event whose ``event_id`` is not the row's)."""
    from synapse.api.constants import EventTypes
    from synapse.api.room_versions import EventFormatVersions
    from synapse.federation.units import filter_pdus_for_valid_depth

    try:
        pdu = json.loads(text)
    except ValueError:
        return None
    if not isinstance(pdu, dict):
        return None
    depth = pdu.get("depth")
    if (
        type(depth) is not int
        or pdu.get("type") == EventTypes.Redaction
        or (fmt == EventFormatVersions.ROOM_V1_V2 and pdu.get("event_id") != event_id)
    ):
        return None
    if not filter_pdus_for_valid_depth([pdu]):
        return b""
    return text.encode("utf-8")


#: Events read from the database per query when building ``/state`` answers.
STATE_LOAD_BATCH = 1000
#: Such queries run at once.
STATE_LOAD_CONCURRENCY = 2


def _encode_pdu(event: EventBase) -> bytes:
    """One event as stock ``serialize_and_filter_pdus`` + encoder send it."""
    from synapse.federation.units import filter_pdus_for_valid_depth
    from synapse.util.json import json_encoder

    pdu = event.get_pdu_json()
    if not filter_pdus_for_valid_depth([pdu]):
        return b""
    return json_encoder.encode(pdu).encode("utf-8")


#: Events whose auth events one query reads (PostgreSQL: one array parameter).
AUTH_WALK_BATCH_PG = 5000
#: The same on SQLite (one bound parameter per event).
AUTH_WALK_BATCH_SQLITE = 500


def _auth_chain_ids_txn(txn: Any, event_ids: list[str]) -> set[str]:
    """Breadth-first walk of ``event_auth`` from ``event_ids`` (see
    :meth:`ResidentStateOps.auth_chain_ids`)."""
    from synapse.storage.database import make_in_list_sql_clause
    from synapse.storage.engines import PostgresEngine

    batch_size = (
        AUTH_WALK_BATCH_PG
        if isinstance(txn.database_engine, PostgresEngine)
        else AUTH_WALK_BATCH_SQLITE
    )
    results: set[str] = set()
    front = set(event_ids)
    while front:
        found: set[str] = set()
        pending = list(front)
        for start in range(0, len(pending), batch_size):
            clause, args = make_in_list_sql_clause(
                txn.database_engine,
                "a.event_id",
                pending[start : start + batch_size],
            )
            # As Synapse's own walk: auth events it has not stored are left out.
            txn.execute(
                "SELECT DISTINCT a.auth_id FROM event_auth AS a"
                " INNER JOIN events AS e ON (e.event_id = a.auth_id)"
                f" WHERE {clause}",
                args,
            )
            found.update(auth_id for (auth_id,) in txn)
        front = found - results
        results |= front
    return results


def _state_event_rows_txn(
    txn: Any, event_ids: list[str]
) -> list[tuple[str, str, int, str | None, str | None, bool]]:
    """(event ID, stored JSON, format version, room version, rejection, special).

    ``special``: a redaction is recorded against the event, or a MSC4293
    redact-on-ban applies to its sender (or its sender is unknown): stock's loader
    must decide how it is served."""
    from synapse.storage.database import make_in_list_sql_clause

    result = []
    for start in range(0, len(event_ids), STATE_LOAD_BATCH):
        batch = event_ids[start : start + STATE_LOAD_BATCH]
        clause, args = make_in_list_sql_clause(txn.database_engine, "e.event_id", batch)
        txn.execute(
            f"""
            SELECT e.event_id, ej.json, ej.format_version, r.room_version,
                rej.reason, e.room_id, e.sender,
                EXISTS (SELECT 1 FROM redactions AS rd WHERE rd.redacts = e.event_id)
            FROM events AS e
            JOIN event_json AS ej USING (event_id)
            LEFT JOIN rooms AS r ON r.room_id = e.room_id
            LEFT JOIN rejections AS rej USING (event_id)
            WHERE {clause}
            """,
            args,
        )
        rows = txn.fetchall()
        rooms = {row[5] for row in rows}
        banned: set[tuple[str, str]] = set()
        if rooms:
            clause, args = make_in_list_sql_clause(
                txn.database_engine, "room_id", list(rooms)
            )
            txn.execute(
                f"SELECT room_id, user_id FROM room_ban_redactions WHERE {clause}", args
            )
            banned = {(room_id, user_id) for room_id, user_id in txn}
        for event_id, json_text, fmt, version, rejected, room, sender, redacted in rows:
            special = bool(redacted) or sender is None or (room, sender) in banned
            result.append((event_id, json_text, fmt or 1, version, rejected, special))
    return result
