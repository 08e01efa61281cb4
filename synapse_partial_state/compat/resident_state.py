"""The resident-state seam: what the ``/state`` server reads from Synapse
(:class:`ResidentStateOps`, with its two SQL transactions) and the hook that tells
it when Synapse drops an event from its own cache."""

from __future__ import annotations

import json
import logging
import re
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

    async def encoded_pdus(
        self, room_id: str, event_ids: Collection[str]
    ) -> dict[str, bytes]:
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
        the same encoder: so it is sent as stored, after the depth filter is
        applied to its text (:func:`stored_pdu_bytes`; parsed only where the
        text does not settle it, and for room versions 1 and 2, to check the
        ``event_id`` it carries). Unlike stock, a row whose content no longer
        matches its hash-derived ID (database corruption, a 500 from stock) is
        sent as stored; the joiner's hash check drops it. So is a row that is no
        JSON at all but whose text settles the depth (stock answers 500 for the
        whole request then; the joiner cannot read the answer either way), and
        one whose ``events`` row is missing while its ``event_json`` row is there
        (a hand-edited database). Everything else, events of another room than
        ``room_id``, and events already in Synapse's in-memory event cache
        (``_get_event_cache``), go through ``get_events_as_list`` itself. Rows as
        in ``EventsWorkerStore._fetch_event_rows`` (1.163.2), from ``event_json``
        (see :func:`_state_event_rows_txn`).
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
            version_id, rows = await self._store.db_pool.runInteraction(
                "sps_state_event_rows",
                _state_event_rows_txn,
                room_id,
                uncached[start : start + STATE_LOAD_BATCH],
            )
            version = KNOWN_ROOM_VERSIONS.get(version_id) if version_id else None
            for event_id, text, fmt, rejected, special in rows:
                if rejected is not None:
                    continue  # stock leaves rejected events out
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
    version 1/2 event whose ``event_id`` is not the row's).

    The text is parsed only when it does not settle this by itself
    (:func:`_depth_in_text`): at 100,000 events, parsing each cost half a second
    of the reactor and, by the million small objects it makes, several of
    Python's full garbage collections (one stalled the reactor 2.5 s)."""
    from synapse.api.room_versions import EventFormatVersions

    if fmt != EventFormatVersions.ROOM_V1_V2 and _REDACTION_TYPE not in text:
        if _depth_in_text(text):
            return text.encode("utf-8")
    return _parsed_pdu_bytes(event_id, text, fmt)


#: A redaction's type as Synapse's encoder writes it (it escapes no ASCII).
_REDACTION_TYPE = '"m.room.redaction"'
_DEPTH_KEY = '"depth"'
#: ``"depth":`` followed by a JSON integer, and then the end of the value.
_DEPTH_INT = re.compile(r'"depth":(-?(?:0|[1-9][0-9]*))(?=[,}])')


def _depth_in_text(text: str) -> bool:
    """Whether the text alone shows that stock's depth filter keeps the event
    (False: it does not tell).

    The filter keeps a top-level ``depth`` in canonical JSON's integer range.
    Every ``"depth"`` in the text must be written ``"depth":<integer>``,
    followed by ``,`` or ``}``: then each is a key whose value is a plain
    integer, the top-level one among them (a raw ``"`` in JSON text always
    delimits a string, and a stored event always has a top-level depth;
    Synapse's encoder writes keys unescaped and without spaces: anything else,
    such as ``"depth": 1``, a string value, or ``"depth"`` as a value, makes
    this False). If all are in range, the top-level one is; if one is out of
    range, the text is parsed (it may be nested)."""
    from synapse.api.constants import CANONICALJSON_MAX_INT, CANONICALJSON_MIN_INT

    found = text.count(_DEPTH_KEY)
    if found == 0:
        return False
    depths = _DEPTH_INT.findall(text)
    if len(depths) != found:
        return False
    return all(
        len(depth) <= 17
        and CANONICALJSON_MIN_INT <= int(depth) <= CANONICALJSON_MAX_INT
        for depth in depths
    )


def _parsed_pdu_bytes(event_id: str, text: str, fmt: int) -> bytes | None:
    """:func:`stored_pdu_bytes` by parsing the text."""
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


#: Events read from the database per transaction when building ``/state``
#: answers. Few and big: right after a join to a big room, Synapse's federation
#: sender fills the database pool with its per-server writes (thousands at
#: 2,000 servers), and each transaction of ours waits for a connection behind
#: them.
STATE_LOAD_BATCH = 5000
#: Such transactions run at once.
STATE_LOAD_CONCURRENCY = 4
#: Events per query in them: PostgreSQL takes the IDs as one array; SQLite
#: takes one bound parameter per ID.
STATE_QUERY_BATCH_PG = 5000
STATE_QUERY_BATCH_SQLITE = 1000


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
    txn: Any, room_id: str, event_ids: list[str]
) -> tuple[str | None, list[tuple[str, str, int, str | None, bool]]]:
    """The room's version, and per stored event: (event ID, stored JSON, format
    version, rejection, special).

    ``special``: the event is of another room, a redaction is recorded against
    it, or a MSC4293 redact-on-ban applies to its sender: stock's loader must
    decide how it is served.

    Only ``event_json`` is read per event (with ``rejections`` and
    ``redactions``, small tables, by their indexes), the room's version once, and
    the sender from ``events`` only in a room with redact-on-ban rows. Stock's
    join of ``events`` to ``event_json`` for a thousand random IDs makes
    PostgreSQL scan the whole ``events`` table each time (a hash join): at
    100,000 members that tripled the time to read a room's state."""
    from synapse.storage.database import make_in_list_sql_clause

    per_query = (
        STATE_QUERY_BATCH_PG
        if txn.database_engine.supports_using_any_list
        else STATE_QUERY_BATCH_SQLITE
    )
    txn.execute("SELECT room_version FROM rooms WHERE room_id = ?", (room_id,))
    row = txn.fetchone()
    version = row[0] if row else None
    txn.execute("SELECT user_id FROM room_ban_redactions WHERE room_id = ?", (room_id,))
    banned = {user_id for (user_id,) in txn}
    sender = (
        "(SELECT e.sender FROM events AS e WHERE e.event_id = ej.event_id)"
        if banned
        else "NULL"
    )
    result = []
    for start in range(0, len(event_ids), per_query):
        batch = event_ids[start : start + per_query]
        clause, args = make_in_list_sql_clause(
            txn.database_engine, "ej.event_id", batch
        )
        txn.execute(
            f"""
            SELECT ej.event_id, ej.json, ej.format_version, ej.room_id, rej.reason,
                EXISTS (SELECT 1 FROM redactions AS rd WHERE rd.redacts = ej.event_id),
                {sender}
            FROM event_json AS ej
            LEFT JOIN rejections AS rej USING (event_id)
            WHERE {clause}
            """,
            args,
        )
        for event_id, json_text, fmt, room, rejected, redacted, by in txn:
            special = room != room_id or bool(redacted) or by in banned
            result.append((event_id, json_text, fmt or 1, rejected, special))
    return version, result
