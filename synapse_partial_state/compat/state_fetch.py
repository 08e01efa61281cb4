"""The state-fetch seam: the native operations the engine's own fetch of a join's
state is made of (:class:`StateFetchOps`), the streamed ``/state`` parser, and
Synapse's own ``/state_ids`` request made to reuse the engine's answer."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any

from synapse.module_api import ModuleApi

from synapse_partial_state.compat.patching import homeserver, wrap_instance_method
from synapse_partial_state.wire import MEMBERS_ONLY_PARAM, WireError, parse_state_ids

if TYPE_CHECKING:
    from synapse.events import EventBase

    from synapse_partial_state.compat.bulk.outliers import BulkOutlierWriter

logger = logging.getLogger(__name__)

#: Tables whose size a big resync multiplies, in queries whose plan depends on it.
PLANNER_STATS_TABLES = (
    "events",
    "event_json",
    "state_events",
    "event_auth",
    "event_auth_chains",
    "event_auth_chain_links",
    "room_memberships",
    "rejections",
    "redactions",
    "current_state_events",
)


class StateFetchOps:
    """The native operations the engine's own state fetch is made of
    (``joining/fetch.py``): federation requests, key lookups, Synapse's per-event
    checks for the events the bulk check leaves to it, and outlier persistence."""

    def __init__(self, api: ModuleApi, bulk: BulkOutlierWriter | None = None) -> None:
        hs = homeserver(api)
        self._hs = hs
        #: the bulk outlier writer, where the bulk gate allows it
        self._bulk = bulk
        #: events the outlier writer holds before storing (0: store what is
        #: ready at once): the bulk writer's chunk, to fill its transactions
        self.store_at_least = 0 if bulk is None else bulk.chunk
        self._store: Any = hs.get_datastores().main
        self._federation_client: Any = hs.get_federation_client()

    async def room_version(self, room_id: str) -> Any:
        return await self._store.get_room_version(room_id)

    async def in_timeline(self, event_ids: Collection[str]) -> set[str]:
        """IDs of ``event_ids`` stored as part of the room's timeline (not
        outliers): Synapse's test for "prev event missing"."""
        if not event_ids:
            return set()
        return set(await self._store.have_events_in_timeline(event_ids))

    async def have_seen(self, room_id: str, event_ids: Collection[str]) -> set[str]:
        """IDs of ``event_ids`` stored (rejected ones included): :func:`have_seen`."""
        return await have_seen(self._store, room_id, event_ids)

    async def stored_not_rejected(self, event_ids: Collection[str]) -> set[str]:
        """IDs of ``event_ids`` stored and not rejected.

        :meth:`have_seen` (Synapse's ``have_seen_events``) counts rejected events
        too; but a state event Synapse stored as rejected (it failed the auth
        checks against its own auth events) is not part of the state it stands
        for. Reads ``events`` and ``rejections`` as Synapse's event loader does
        (``EventsWorkerStore._fetch_event_rows``, 1.163.2)."""
        if not event_ids:
            return set()
        return await self._store.db_pool.runInteraction(
            "sps_stored_not_rejected", _stored_txn, list(event_ids), True
        )

    async def state_ids(
        self, destination: str, room_id: str, event_id: str
    ) -> tuple[list[str], list[str]]:
        """``GET /_matrix/federation/v1/state_ids/{room}?event_id=``, as
        ``FederationClient.get_room_state_ids`` does (same path, same checks on
        the answer) but ignoring Synapse's per-destination back-off: the engine
        has its own, and a resident that was down a minute ago is worth asking.
        The answer is checked by :func:`~synapse_partial_state.wire.parse_state_ids`
        (a malformed one raises ``InvalidResponseError``: the engine fails over)."""
        from synapse.federation.federation_client import InvalidResponseError
        from synapse.federation.transport.client import _create_v1_path

        transport: Any = self._hs.get_federation_transport_client()
        body = await transport.client.get_json(
            destination,
            path=_create_v1_path("/state_ids/%s", room_id),
            args={"event_id": event_id},
            try_trailing_slash_on_400=True,
            ignore_backoff=True,
        )
        try:
            return parse_state_ids(body)
        except WireError as e:
            raise InvalidResponseError(str(e)) from e

    async def state_pdus(
        self,
        destination: str,
        room_id: str,
        event_id: str,
        members_only: bool,
        timeout_ms: int,
        parser: Any,
    ) -> Any:
        """``GET /_matrix/federation/v1/state/{room}?event_id=`` through Synapse's
        federation HTTP client (signed request, 500 MiB cap as native; native's
        timeout is 10 minutes whatever the size), asking for the members-only
        variant if told to (a stock resident ignores the parameter). Ignores
        the per-destination back-off, as :meth:`state_ids`. ``parser`` reads the
        body as it arrives (Synapse's ``ByteParser`` interface: ``CONTENT_TYPE``,
        ``MAX_RESPONSE_SIZE``, ``write``, ``finish``); its ``finish()`` is returned."""
        from synapse.federation.transport.client import _create_v1_path

        args = {"event_id": event_id}
        if members_only:
            args[MEMBERS_ONLY_PARAM] = "true"
        transport: Any = self._hs.get_federation_transport_client()
        return await transport.client.get_json(
            destination,
            path=_create_v1_path("/state/%s", room_id),
            args=args,
            timeout=timeout_ms,
            ignore_backoff=True,
            parser=parser,
        )

    async def signing_keys(
        self, wanted: Collection[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[bytes, int]]:
        """The verify keys Synapse holds for ``wanted`` (server, key id) pairs:
        ``KeyStore.get_server_keys_json`` (what the keyring's store fetcher
        reads), as raw key bytes and valid-until ms."""
        if not wanted:
            return {}
        found = await self._store.get_server_keys_json(list(wanted))
        keys: dict[tuple[str, str], tuple[bytes, int]] = {}
        for pair, result in found.items():
            if result is not None:
                keys[pair] = (bytes(result.verify_key), int(result.valid_until_ts))
        return keys

    def event_from_pdu(self, pdu: bytes, room_version: Any) -> EventBase:
        """``event_from_pdu_json`` (as native for pulled events) of a pdu's JSON;
        raises on a pdu that is not an event."""
        from synapse.federation.federation_base import event_from_pdu_json
        from synapse.util.json import json_decoder

        return event_from_pdu_json(
            json_decoder.decode(pdu.decode("utf-8")), room_version
        )

    async def needs_per_event_checks(self, room_id: str) -> bool:
        """Whether Synapse's per-event check does more than signatures and hashes
        here: a policy server in the room, or a spam-checker module."""
        callbacks = self._hs.get_module_api_callbacks().spam_checker
        if getattr(callbacks, "_check_event_for_spam_callbacks", None):
            return True
        policy = self._hs.get_room_policy_handler()
        return await policy._get_policy_server(room_id) is not None

    async def check_event(
        self, event: EventBase, origin: str, room_version: Any
    ) -> EventBase | None:
        """Native per-event check of a pulled event
        (``FederationClient._check_sigs_and_hash_and_fetch_one``): signatures
        (fetching keys as needed), hash (redacting on mismatch), policy server and
        spam checker; on a bad signature it asks the sender's server for a genuine
        copy. None if no good copy was found."""
        return await self._federation_client._check_sigs_and_hash_and_fetch_one(
            pdu=event, origin=origin, room_version=room_version
        )

    async def fetch_event(
        self, destinations: Collection[str], event_id: str, room_version: Any
    ) -> tuple[EventBase, str] | None:
        """``FederationClient.get_pdu``: each destination in turn, checked; the
        event and the server that gave it.

        Native skips, for a minute, every destination that failed to give this
        event (``pdu_destination_tried``, a plain dict in 1.163); the engine has
        its own back-off between attempts, so that memory is dropped first and a
        retry really asks again (otherwise a resync whose servers came back stays
        failed for that minute without asking anyone)."""
        self._federation_client.pdu_destination_tried.pop(event_id, None)
        pulled = await self._federation_client.get_pdu(
            destinations, event_id, room_version, timeout=30_000
        )
        return None if pulled is None else (pulled.pdu, pulled.pull_origin)

    async def persist_outliers(self, room_id: str, events: list[EventBase]) -> None:
        """``FederationEventHandler._auth_and_persist_outliers``: auth each event
        against its own auth events (rejecting those that fail) and persist them
        as outliers, as native does with a fetched state. Through the bulk
        outlier writer (same verdicts and rows, large transactions) where it is
        on and this process persists the room's events."""
        if self._bulk is not None and self._bulk.persists_here(room_id):
            await self._bulk.persist_outliers(room_id, events)
            return
        handler = self._hs.get_federation_event_handler()
        await handler._auth_and_persist_outliers(room_id, events)

    async def release_free_memory(self, room_id: str, when: str) -> None:
        """Freed heap pages back to the system (glibc; elsewhere nothing).
        Never fails the fetch: a release that goes wrong is logged."""
        from synapse_partial_state.compat.memory import release_in_thread

        try:
            await release_in_thread(self._hs.get_reactor(), room_id, when)
        except Exception:
            logger.exception("Resync of %s: releasing freed memory failed", room_id)

    async def refresh_planner_stats(self) -> bool:
        """``ANALYZE`` the tables a big resync fills, on PostgreSQL.

        A homeserver that joins its first big room has these tables near empty,
        and autovacuum analyzes them only a minute or more later: meanwhile the
        planner assumes they are tiny and scans them whole in queries run once
        per chunk of events (the chain cover's recursive links query, the
        membership sub-selects of the final current-state update), which makes
        storing the state quadratic (10,000 members: most of 18 s of storing,
        and 6 s of Synapse's finish). False where it is not done (SQLite, or a
        database user not allowed to)."""
        from synapse.storage.engines import PostgresEngine

        if not isinstance(self._store.database_engine, PostgresEngine):
            return False

        def txn(t: Any) -> None:
            for table in PLANNER_STATS_TABLES:
                t.execute(f"ANALYZE {table}")

        try:
            await self._store.db_pool.runInteraction("sps_analyze", txn)
        except Exception as e:  # e.g. not the owner of a table
            logger.info("Could not refresh the planner's statistics: %s", e)
            return False
        return True


#: Events looked up per query by ``have_seen`` and ``stored_not_rejected``
#: (PostgreSQL: one array parameter; SQLite: one bound parameter per event).
STORED_CHECK_BATCH_PG = 5000
STORED_CHECK_BATCH_SQLITE = 500
#: Up to this many IDs, ``have_seen`` asks Synapse's ``have_seen_events`` (one
#: transaction, and its cache); more are looked up in one transaction here.
HAVE_SEEN_VIA_SYNAPSE_MAX = 500


async def have_seen(store: Any, room_id: str, event_ids: Collection[str]) -> set[str]:
    """IDs of ``event_ids`` stored (rejected ones included), as Synapse's
    ``have_seen_events``. A big list is looked up in one transaction:
    Synapse's takes one per 500 IDs, one after the other, and at the start of a
    big resync each waited behind the join's fan-out queries in the database
    pool (200 transactions for a 100,000-event state, most of 19 s in the
    benchmark); it would also fill its ``have_seen_event`` cache with every ID."""
    if not event_ids:
        return set()
    if len(event_ids) <= HAVE_SEEN_VIA_SYNAPSE_MAX:
        return set(await store.have_seen_events(room_id, event_ids))
    return await store.db_pool.runInteraction(
        "sps_have_seen", _stored_txn, list(event_ids), False
    )


def _stored_txn(txn: Any, event_ids: list[str], not_rejected: bool) -> set[str]:
    """Those of ``event_ids`` in ``events`` (and, if ``not_rejected``, not in
    ``rejections``): :meth:`StateFetchOps.have_seen` and
    :meth:`StateFetchOps.stored_not_rejected`."""
    from synapse.storage.database import make_in_list_sql_clause
    from synapse.storage.engines import PostgresEngine

    batch_size = (
        STORED_CHECK_BATCH_PG
        if isinstance(txn.database_engine, PostgresEngine)
        else STORED_CHECK_BATCH_SQLITE
    )
    sql = (
        "SELECT e.event_id FROM events AS e"
        " LEFT JOIN rejections AS r ON (r.event_id = e.event_id)"
        " WHERE {} AND r.event_id IS NULL"
        if not_rejected
        else "SELECT e.event_id FROM events AS e WHERE {}"
    )
    found: set[str] = set()
    for start in range(0, len(event_ids), batch_size):
        clause, args = make_in_list_sql_clause(
            txn.database_engine, "e.event_id", event_ids[start : start + batch_size]
        )
        txn.execute(sql.format(clause), args)
        found.update(event_id for (event_id,) in txn)
    return found


def banned_signing_keys() -> frozenset[str]:
    """The verify keys Synapse refuses (``keyring.BANNED_SERVER_SIGNING_KEYS``)."""
    from synapse.crypto.keyring import BANNED_SERVER_SIGNING_KEYS

    return frozenset(BANNED_SERVER_SIGNING_KEYS)


#: (room ID, event ID) -> the engine's ``/state_ids`` answer for the state at that
#: event, once any fetch of it by the engine is over; None: ask natively.
StateIdsReuse = Callable[[str, str], Awaitable["tuple[list[str], list[str]] | None"]]


def install_state_ids_reuse(api: ModuleApi, reuse: StateIdsReuse) -> None:
    """Let Synapse reuse the engine's fetch of the state at an event.

    Two of Synapse's paths ask for the state before a partial join's prev event:
    its per-event de-partial-stating (which the engine calls right after its own
    fetch), and, racing with the engine, the handling of events that arrived
    during the join (whose prev events are not stored either): stock then
    downloads and stores the room's whole state a second time. With this,
    Synapse's request first asks ``reuse`` (the engine's
    ``joining.inflight.InflightFetches.answer_for``), which waits while the
    engine fetches that state and hands over its checked answer; otherwise
    Synapse asks natively.

    Wraps ``FederationClient.get_room_state_ids`` on this homeserver's instance
    (unchanged in 1.163)."""

    def wrap(native: Callable[..., Any]) -> Callable[..., Any]:
        async def get_room_state_ids(
            destination: str, room_id: str, event_id: str
        ) -> tuple[list[str], list[str]]:
            answer = await reuse(room_id, event_id)
            if answer is not None:
                return answer
            return await native(destination, room_id, event_id=event_id)

        return get_room_state_ids

    wrap_instance_method(
        homeserver(api).get_federation_client(),
        "get_room_state_ids",
        wrap,
        "synapse.federation.federation_client.FederationClient.get_room_state_ids",
        "reuse the /state_ids answer the resync engine has just fetched",
    )


def uses_v1_event_ids(room_version: Any) -> bool:
    """Whether events of ``room_version`` carry their own ``event_id`` (room
    versions 1 and 2) instead of one derived from their hash."""
    from synapse.api.room_versions import EventFormatVersions

    return bool(room_version.event_format == EventFormatVersions.ROOM_V1_V2)
