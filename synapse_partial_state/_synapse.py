"""The compat layer: every private Synapse access and every patch lives here.

The rest of the package imports only public names (``synapse.module_api``,
``synapse.api.*`` constants) and the typed helpers below. Each patch records what it
replaces and the Synapse versions it was checked against; the list of installed
patches is served by the status endpoint so that tests (and admins) can see it.

Checked against: matrix-synapse 1.163.2 (source read in the installed wheel).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attr
import synapse
from synapse.module_api import ModuleApi
from synapse.module_api.errors import ConfigError

if TYPE_CHECKING:
    from synapse.events import EventBase
    from synapse.federation.federation_server import FederationServer
    from synapse.server import HomeServer
    from synapse.storage.databases.main import DataStore
    from synapse.storage.roommember import MemberSummary
    from synapse.types import StateMap

logger = logging.getLogger(__name__)

#: The Synapse releases this module was tested against: (lowest, first excluded).
TESTED_SYNAPSE_RANGE = ((1, 163, 0), (1, 164, 0))


def synapse_version() -> tuple[int, int, int]:
    """The installed Synapse's version as a tuple of three integers."""
    parts = []
    for piece in synapse.__version__.split(".")[:3]:
        # Leading digits only: "0rc1" is 0.
        match = re.match(r"\d*", piece)
        parts.append(int(match.group(0) or 0) if match else 0)
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


def check_synapse_version(allow_untested: bool) -> None:
    """Refuse to start on a Synapse outside the tested range, unless told to."""
    low, high = TESTED_SYNAPSE_RANGE
    found = synapse_version()
    if low <= found < high:
        return
    tested = f"{'.'.join(map(str, low))} <= version < {'.'.join(map(str, high))}"
    if allow_untested:
        logger.warning(
            "synapse_partial_state: Synapse %s is outside the tested range (%s); "
            "starting anyway because allow_untested_synapse is set",
            synapse.__version__,
            tested,
        )
        return
    raise ConfigError(
        f"partial-state module: Synapse {synapse.__version__} is outside the range "
        f"this module was tested with ({tested}). Its patches reach into Synapse "
        "internals that may have changed. Upgrade the module, or set "
        "'allow_untested_synapse: true' in its config to start anyway."
    )


@attr.s(frozen=True, auto_attribs=True, slots=True)
class PatchRecord:
    """What one patch replaces, for the status endpoint and the start-up log."""

    target: str
    kind: str
    why: str
    checked: str = "1.163.2"


#: Patches installed in this process, in order.
INSTALLED_PATCHES: list[PatchRecord] = []


def _record(record: PatchRecord) -> None:
    if record not in INSTALLED_PATCHES:
        INSTALLED_PATCHES.append(record)


def homeserver(api: ModuleApi) -> HomeServer:
    """The ``HomeServer`` behind the module API (private attribute ``_hs``)."""
    return api._hs


def main_store(api: ModuleApi) -> DataStore:
    """Synapse's main data store (private: reached through the homeserver)."""
    return homeserver(api).get_datastores().main


# ---------------------------------------------------------------------------
# Joining side: the resync engine's hook and the native operations it uses
# ---------------------------------------------------------------------------

#: (initial destination, other destinations, room id) -> None; runs one resync.
ResyncEntry = Callable[[str | None, "Collection[str]", str], Awaitable[None]]


def install_resync_hook(entry: ResyncEntry) -> None:
    """Route Synapse's resyncs to our engine.

    Replaces ``FederationHandler._sync_partial_state_room`` (143 lines; 2 changes
    since 1.100; identical in 1.163.2). Native keeps doing what surrounds it:
    ``do_invite_join`` and the start-up resume both call
    ``_start_partial_state_room_sync``, whose in-memory de-duplication and
    "restart if still partial" logic then calls this method, now ours. The native
    loop gives up for good when every server fails (#13000); ours never does.
    """
    from synapse.handlers.federation import FederationHandler

    if getattr(FederationHandler._sync_partial_state_room, "_sps_wrapped", False):
        return

    async def _sync_partial_state_room(
        self: Any,
        initial_destination: str | None,
        other_destinations: Collection[str],
        room_id: str,
    ) -> None:
        await entry(initial_destination, other_destinations, room_id)

    _sync_partial_state_room._sps_wrapped = True  # type: ignore[attr-defined]
    FederationHandler._sync_partial_state_room = _sync_partial_state_room  # type: ignore[method-assign]
    _record(
        PatchRecord(
            "synapse.handlers.federation.FederationHandler._sync_partial_state_room",
            "replace",
            "durable, never-stuck resync engine (retries, failover, abort on leave)",
        )
    )


class ResyncOps:
    """The native Synapse operations a resync is made of, typed, in one place.

    Each method says which Synapse code it calls. Nothing here retries or decides:
    that is the engine's job.
    """

    def __init__(self, api: ModuleApi) -> None:
        hs = homeserver(api)
        self._hs = hs
        # Any: mypy without Synapse's own plugin mis-types @cached methods.
        self._store: Any = hs.get_datastores().main
        self._clock = hs.get_clock()
        self.server_name: str = hs.hostname

    # -- read ---------------------------------------------------------------

    async def is_partial_state_room(self, room_id: str) -> bool:
        return await self._store.is_partial_state_room(room_id)

    async def resync_info(self, room_id: str) -> tuple[str | None, frozenset[str]]:
        """(joined_via, servers_in_room) from ``partial_state_rooms(_servers)``,
        for this room only (Synapse's ``get_partial_state_room_resync_info`` reads
        every partial room)."""

        def txn(t: Any) -> tuple[str | None, frozenset[str]]:
            t.execute(
                "SELECT joined_via FROM partial_state_rooms WHERE room_id = ?",
                (room_id,),
            )
            row = t.fetchone()
            if row is None:
                return None, frozenset()
            t.execute(
                "SELECT server_name FROM partial_state_rooms_servers WHERE room_id = ?",
                (room_id,),
            )
            return row[0], frozenset(r[0] for r in t.fetchall())

        return await self._store.db_pool.runInteraction("sps_resync_info", txn)

    async def join_event_id(self, room_id: str) -> str | None:
        def txn(t: Any) -> str | None:
            t.execute(
                "SELECT join_event_id FROM partial_state_rooms WHERE room_id = ?",
                (room_id,),
            )
            row = t.fetchone()
            return row[0] if row else None

        return await self._store.db_pool.runInteraction("sps_join_event_id", txn)

    async def local_users_in_room(self, room_id: str) -> Collection[str]:
        return await self._store.get_local_users_in_room(room_id)

    async def count_partial_state_events(self, room_id: str) -> int:
        def txn(t: Any) -> int:
            t.execute(
                "SELECT COUNT(*) FROM partial_state_events WHERE room_id = ?",
                (room_id,),
            )
            return int(t.fetchone()[0])

        return await self._store.db_pool.runInteraction("sps_count_partial", txn)

    async def recent_sender_servers(self, room_id: str, limit: int = 500) -> list[str]:
        """Servers of the senders of the room's latest events (servers learned
        since the join), most recent first."""

        def txn(t: Any) -> list[str]:
            t.execute(
                "SELECT sender FROM events WHERE room_id = ?"
                " ORDER BY stream_ordering DESC LIMIT ?",
                (room_id, limit),
            )
            return [row[0] for row in t.fetchall()]

        senders = await self._store.db_pool.runInteraction("sps_recent_senders", txn)
        seen: dict[str, None] = {}
        for sender in senders:
            server = sender.split(":", 1)[1] if ":" in sender else None
            if server:
                seen.setdefault(server, None)
        return list(seen)

    async def partial_state_events_batch(self, room_id: str) -> list[EventBase]:
        """Up to 100 partial-state events without partial-state prev events,
        in stream order (``get_partial_state_events_batch``)."""
        from synapse.storage.databases.main.events_worker import EventRedactBehaviour

        batch = await self._store.get_partial_state_events_batch(room_id)
        if not batch:
            return []
        return await self._store.get_events_as_list(
            batch, redact_behaviour=EventRedactBehaviour.as_is, allow_rejected=True
        )

    # -- write ----------------------------------------------------------------

    async def update_state_for_partial_state_event(
        self, destination: str, event: EventBase
    ) -> None:
        """Native per-event de-partial-stating: computes the full state before
        ``event`` (fetching from ``destination`` when its prev events are not
        local), re-checks its auth against it, repoints its state group and flips
        its rejection if needed. Raises ``FederationError`` /
        ``FederationPullAttemptBackoffError`` like native."""
        handler = self._hs.get_federation_event_handler()
        await handler.update_state_for_partial_state_event(destination, event)

    async def clear_pull_backoff(
        self, room_id: str, event_ids: Collection[str]
    ) -> None:
        """Forget Synapse's failed attempts to pull ``event_ids``
        (``event_failed_pull_attempts``, the rows Synapse itself deletes once an
        event is persisted), so its next computation of a context pulls them
        again instead of raising ``FederationPullAttemptBackoffError`` for hours."""
        if not event_ids:
            return
        await self._store.db_pool.simple_delete_many(
            table="event_failed_pull_attempts",
            column="event_id",
            iterable=list(event_ids),
            keyvalues={"room_id": room_id},
            desc="sps_clear_pull_backoff",
        )

    async def complete(self, room_id: str) -> bool:
        """The native end of a resync: recompute current state, replay device
        lists, clear the partial flag under Synapse's linearizer, wake waiters and
        replication. False if new partial-state events raced in (go round again)."""
        await self._hs.get_state_handler().update_current_state(room_id)
        if await has_partial_state_events(self._store, room_id):
            # Raced by new partial-state events (the current state was kept:
            # ``install_current_state_guard``); the clear would fail too.
            return False
        await self._hs.get_device_handler().handle_room_un_partial_stated(room_id)
        return await self._clear_and_notify(room_id)

    async def _clear_and_notify(self, room_id: str) -> bool:
        fed = self._hs.get_federation_handler()
        async with fed._is_partial_state_room_linearizer.queue(room_id):
            stream_id = await self._store.clear_partial_state_room(room_id)
        if stream_id is None:
            return False
        self._hs.get_storage_controllers().state.notify_room_un_partial_stated(room_id)
        await self._hs.get_notifier().on_un_partial_stated_room(room_id, stream_id)
        return True

    async def abort(self, room_id: str) -> bool:
        """Give up a partial-state room that no local user is in any more.

        Its local copy was never complete, and keeping it would be harmful: a later
        rejoin would build on its partial state as if it were whole. So the room is
        purged through Synapse's own ``PaginationHandler.purge_room`` (which refuses
        while a local user is joined, and deletes the partial-state tables in
        foreign-key order), then every waiter on the room or its events is woken.
        False if a local user is joined again (the resync must go on).
        """
        from synapse.api.errors import SynapseError

        def txn(t: Any) -> list[str]:
            t.execute(
                "SELECT event_id FROM partial_state_events WHERE room_id = ?",
                (room_id,),
            )
            return [row[0] for row in t.fetchall()]

        event_ids = await self._store.db_pool.runInteraction("sps_partial_events", txn)
        try:
            await self._hs.get_pagination_handler().purge_room(room_id, force=False)
        except SynapseError as e:
            logger.info("Not purging %s: %s", room_id, e)
            return False
        state_storage = self._hs.get_storage_controllers().state
        for event_id in event_ids:
            self._store.is_partial_state_event.invalidate((event_id,))
            state_storage.notify_event_un_partial_stated(event_id)
        self._store.is_partial_state_room.invalidate((room_id,))
        state_storage.notify_room_un_partial_stated(room_id)
        return True

    async def room_exists(self, room_id: str) -> bool:
        return await self._store.get_room(room_id) is not None

    async def prefetch_server_keys(
        self, servers: Collection[str], concurrency: int
    ) -> tuple[int, int]:
        """Fetch the signing keys of ``servers`` from the servers themselves, at
        most ``concurrency`` at once, into Synapse's key store, so that checking
        the signatures of the room's state later finds them locally instead of
        fetching them in waves. Uses ``ServerKeyFetcher.get_server_verify_keys_v2_direct``
        (which stores what it gets); failures are left for the normal path.
        Returns (servers fetched, servers failed)."""
        from synapse.crypto.keyring import ServerKeyFetcher
        from twisted.internet.defer import DeferredSemaphore

        fetchers = self._hs.get_keyring()._key_fetchers
        fetcher = next((f for f in fetchers if isinstance(f, ServerKeyFetcher)), None)
        if fetcher is None:
            return 0, 0
        semaphore = DeferredSemaphore(concurrency)
        outcome = {"ok": 0, "failed": 0}

        async def one(server: str) -> None:
            from synapse.logging.context import make_deferred_yieldable

            await make_deferred_yieldable(semaphore.acquire())
            try:
                await fetcher.get_server_verify_keys_v2_direct(server)
                outcome["ok"] += 1
            except Exception as e:  # a dead server: verification will say so later
                logger.debug("Key prefetch from %s failed: %s", server, e)
                outcome["failed"] += 1
            finally:
                semaphore.release()

        from synapse.util.async_helpers import yieldable_gather_results

        await yieldable_gather_results(one, servers)
        return outcome["ok"], outcome["failed"]

    def start_resync(self, room_id: str) -> None:
        """Start a resync the way Synapse does after a join (its de-duplication
        included), with the servers Synapse recorded for the room."""
        fed = self._hs.get_federation_handler()

        async def start() -> None:
            joined_via, servers = await self.resync_info(room_id)
            fed._start_partial_state_room_sync(
                initial_destination=joined_via,
                other_destinations=set(servers),
                room_id=room_id,
            )

        self._hs.run_as_background_process("sps_start_resync", start)

    def now_ms(self) -> int:
        return self._clock.time_msec()

    def call_later(self, delay_s: float, callback: Callable[[], object]) -> Any:
        """Synapse's clock ``call_later`` (takes a ``Duration`` since 1.144)."""
        from synapse.util.duration import Duration

        return self._clock.call_later(Duration(milliseconds=delay_s * 1000), callback)


@attr.s(slots=True, auto_attribs=True)
class StatePdus:
    """A ``/state`` answer as federation JSON (not yet events): each pdu as its
    canonical JSON bytes, a fifth of the memory of the parsed dict."""

    pdus: list[bytes] = attr.Factory(list)
    auth_chain: list[bytes] = attr.Factory(list)
    #: The resident answered the members-only variant (MSC2775, unstable).
    members_only: bool = False


class _StatePdusParser:
    """Stream-parses a ``/state`` body with ijson as it arrives, like Synapse's
    ``_StateParser``, but keeps each pdu as canonical JSON for the bulk checks
    instead of building events one by one on the reactor thread. ``on_pdu`` sees
    each pdu's dict first (e.g. to collect the signing keys it needs)."""

    CONTENT_TYPE = "application/json"
    MAX_RESPONSE_SIZE = 500 * 1024 * 1024  # as Synapse's /state parser

    def __init__(self, on_pdu: Callable[[dict[str, Any]], None] | None) -> None:
        import ijson

        self._result = StatePdus()
        self._on_pdu = on_pdu
        self._coros = [
            ijson.items_coro(
                self._collect(self._result.pdus), "pdus.item", use_float=True
            ),
            ijson.items_coro(
                self._collect(self._result.auth_chain),
                "auth_chain.item",
                use_float=True,
            ),
            ijson.items_coro(self._marker(), MEMBERS_ONLY_PARAM, use_float=True),
        ]

    def _collect(self, out: list[bytes]) -> Any:
        import ijson
        from canonicaljson import encode_canonical_json

        on_pdu = self._on_pdu

        @ijson.coroutine  # type: ignore[misc]
        def sink() -> Any:
            while True:
                value = yield
                if not isinstance(value, dict):
                    continue
                if on_pdu is not None:
                    on_pdu(value)
                try:
                    out.append(encode_canonical_json(value))
                except Exception:
                    continue  # not JSON an event can be made of: leave it out

        return sink()

    def _marker(self) -> Any:
        import ijson

        result = self._result

        @ijson.coroutine  # type: ignore[misc]
        def sink() -> Any:
            while True:
                value = yield
                result.members_only = value is True

        return sink()

    def write(self, data: bytes) -> int:
        for coro in self._coros:
            coro.send(data)
        return len(data)

    def finish(self) -> StatePdus:
        for coro in self._coros:
            coro.close()
        return self._result


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

    def __init__(self, api: ModuleApi) -> None:
        hs = homeserver(api)
        self._hs = hs
        self._store: Any = hs.get_datastores().main
        self._federation_client: Any = hs.get_federation_client()
        #: (room, event) -> the /state_ids answer the engine fetched and checked
        self._remembered_state_ids: dict[
            tuple[str, str], tuple[list[str], list[str]]
        ] = {}
        #: (room, event) the engine is fetching the state at -> who waits for it
        #: (room, None): the join's state, expected but not yet begun
        self._in_flight: dict[tuple[str, str | None], list[Any]] = {}

    async def room_version(self, room_id: str) -> Any:
        return await self._store.get_room_version(room_id)

    async def in_timeline(self, event_ids: Collection[str]) -> set[str]:
        """IDs of ``event_ids`` stored as part of the room's timeline (not
        outliers): Synapse's test for "prev event missing"."""
        if not event_ids:
            return set()
        return set(await self._store.have_events_in_timeline(event_ids))

    async def have_seen(self, room_id: str, event_ids: Collection[str]) -> set[str]:
        """IDs of ``event_ids`` stored (rejected ones included)."""
        if not event_ids:
            return set()
        return set(await self._store.have_seen_events(room_id, event_ids))

    async def state_ids(
        self, destination: str, room_id: str, event_id: str
    ) -> tuple[list[str], list[str]]:
        """``GET /_matrix/federation/v1/state_ids/{room}?event_id=``, as
        ``FederationClient.get_room_state_ids`` does (same path, same checks on
        the answer) but ignoring Synapse's per-destination back-off: the engine
        has its own, and a resident that was down a minute ago is worth asking.
        The answer is remembered for Synapse's own request for the same state
        that follows (see :func:`install_state_ids_reuse`)."""
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
        state_ids = body.get("pdu_ids") if isinstance(body, dict) else None
        auth_ids = body.get("auth_chain_ids", []) if isinstance(body, dict) else None
        for name, ids in (("pdu_ids", state_ids), ("auth_chain_ids", auth_ids)):
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise InvalidResponseError(f"invalid {name!r} in /state_ids answer")
        assert state_ids is not None and auth_ids is not None
        result = (state_ids, auth_ids)
        self._remembered_state_ids[(room_id, event_id)] = result
        return result

    def remembered_state_ids(
        self, room_id: str, event_id: str
    ) -> tuple[list[str], list[str]] | None:
        return self._remembered_state_ids.get((room_id, event_id))

    def forget_state_ids(self, room_id: str) -> None:
        """Drop what :meth:`state_ids` remembered for ``room_id`` (its resync is
        over)."""
        for key in [k for k in self._remembered_state_ids if k[0] == room_id]:
            del self._remembered_state_ids[key]

    def expect_fetch(self, room_id: str) -> None:
        """The engine is about to fetch the state at ``room_id``'s join: until
        :meth:`settle` (when that fetch ends), Synapse's own requests for the
        state at *any* event of the room wait, then find the room's state stored
        and fetch only the few events that differ (instead of downloading and
        storing the whole state a second time, alongside the engine)."""
        self._in_flight.setdefault((room_id, None), [])

    def settle(self, room_id: str) -> None:
        """The join's state is stored (or will not be fetched by the engine now):
        release whoever waits for it."""
        for waiter in self._in_flight.pop((room_id, None), []):
            fire(waiter)

    def begin_fetch(self, room_id: str, event_ids: Collection[str]) -> None:
        """The engine starts fetching the state at ``event_ids``: Synapse's own
        requests for the same state wait for it (:func:`install_state_ids_reuse`)."""
        for event_id in event_ids:
            self._in_flight.setdefault((room_id, event_id), [])

    def end_fetch(self, room_id: str, event_ids: Collection[str]) -> None:
        for event_id in event_ids:
            for waiter in self._in_flight.pop((room_id, event_id), []):
                fire(waiter)

    async def wait_for_fetch(self, room_id: str, event_id: str) -> None:
        """Wait while the engine fetches the state at ``event_id``, or the state
        at the room's join (:meth:`expect_fetch`)."""
        from synapse.logging.context import make_deferred_yieldable
        from twisted.internet import defer

        while True:
            waiters = self._in_flight.get((room_id, event_id))
            if waiters is None:
                waiters = self._in_flight.get((room_id, None))
            if waiters is None:
                return
            waiter: defer.Deferred[None] = defer.Deferred()
            waiters.append(waiter)
            await make_deferred_yieldable(waiter)

    async def state_pdus(
        self,
        destination: str,
        room_id: str,
        event_id: str,
        members_only: bool,
        timeout_ms: int = 600_000,
        on_pdu: Callable[[dict[str, Any]], None] | None = None,
    ) -> StatePdus:
        """``GET /_matrix/federation/v1/state/{room}?event_id=`` through Synapse's
        federation HTTP client (signed request, 500 MiB cap as native; native's
        timeout is 10 minutes whatever the size), asking for the members-only
        variant if told to (a stock resident ignores the parameter). Ignores
        the per-destination back-off, as :meth:`state_ids`."""
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
            parser=_StatePdusParser(on_pdu),
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
        as outliers, as native does with a fetched state."""
        handler = self._hs.get_federation_event_handler()
        await handler._auth_and_persist_outliers(room_id, events)

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


def banned_signing_keys() -> frozenset[str]:
    """The verify keys Synapse refuses (``keyring.BANNED_SERVER_SIGNING_KEYS``)."""
    from synapse.crypto.keyring import BANNED_SERVER_SIGNING_KEYS

    return frozenset(BANNED_SERVER_SIGNING_KEYS)


def install_state_ids_reuse(ops: StateFetchOps) -> None:
    """Let Synapse reuse the engine's fetch of the state at an event.

    Two of Synapse's paths ask for the state before a partial join's prev event:
    its per-event de-partial-stating (which the engine calls right after its own
    fetch), and, racing with the engine, the handling of events that arrived
    during the join (whose prev events are not stored either): stock then
    downloads and stores the room's whole state a second time. With this, a
    request for the state at an event the engine is fetching waits for the engine
    and gets its checked ``/state_ids`` answer; every event listed is then
    stored, so Synapse asks for nothing more. A request for the state at another
    event of the room (an event that arrived during the resync on a fork older
    than the join) waits until the engine has stored the state at the join
    (:meth:`StateFetchOps.expect_fetch`), then asks natively: all but the few
    events that differ are stored by then, so the whole state is not downloaded
    a second time.

    Wraps ``FederationClient.get_room_state_ids`` on this homeserver's instance
    (unchanged in 1.163)."""

    def wrap(native: Callable[..., Any]) -> Callable[..., Any]:
        async def get_room_state_ids(
            destination: str, room_id: str, event_id: str
        ) -> tuple[list[str], list[str]]:
            await ops.wait_for_fetch(room_id, event_id)
            remembered = ops.remembered_state_ids(room_id, event_id)
            if remembered is not None:
                return remembered
            return await native(destination, room_id, event_id=event_id)

        return get_room_state_ids

    _wrap_instance_method(
        ops._federation_client,
        "get_room_state_ids",
        wrap,
        "synapse.federation.federation_client.FederationClient.get_room_state_ids",
        "reuse the /state_ids answer the resync engine has just fetched",
    )


def _wrap_instance_method(
    owner: Any,
    name: str,
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
    target: str,
    why: str,
) -> None:
    """Replace ``owner.name`` by ``wrap(native method)`` once, and record it."""
    native = getattr(owner, name)
    if getattr(native, "_sps_wrapped", False):
        return
    wrapper = wrap(native)
    wrapper._sps_wrapped = True  # type: ignore[attr-defined]
    setattr(owner, name, wrapper)
    _record(PatchRecord(target, "wrap (instance)", why))


def identical_state_sets(state_sets: Sequence[Mapping[Any, str]]) -> bool:
    """Whether there are at least two state maps and all are equal."""
    if len(state_sets) < 2:
        return False
    first = state_sets[0]
    return all(other == first for other in state_sets[1:])


def install_identical_state_shortcut(api: ModuleApi) -> None:
    """Resolve identical state sets without running state resolution.

    After a resync, events received during it often sit in state groups that hold
    exactly the same state (one from the engine's fetch, one from a ``/state_ids``
    Synapse asked for an event with missing prev events), and a later event with
    both as prev events makes Synapse resolve them: state resolution v2 of two
    100,000-member states took 9.5 s, holding the room's persistence queue (a
    joiner's ``/send_join`` waited behind it). Resolving any number of identical
    state maps gives that map (every key unconflicted, auth difference empty, in
    every room version), so this returns a copy of it at once; Synapse then
    reuses the matching state group (``_make_state_cache_entry``).

    Wraps ``StateResolutionHandler.resolve_events_with_store`` on this
    homeserver's instance (signature unchanged in 1.163)."""

    def wrap(native: Callable[..., Any]) -> Callable[..., Any]:
        async def resolve_events_with_store(
            room_id: str,
            room_version: str,
            state_sets: Sequence[StateMap[str]],
            event_map: dict[str, EventBase] | None,
            state_res_store: Any,
        ) -> StateMap[str]:
            if identical_state_sets(state_sets):
                logger.info(
                    "State resolution in %s skipped: %d identical state sets of %d "
                    "entries",
                    room_id,
                    len(state_sets),
                    len(state_sets[0]),
                )
                return dict(state_sets[0])
            return await native(
                room_id, room_version, state_sets, event_map, state_res_store
            )

        return resolve_events_with_store

    _wrap_instance_method(
        homeserver(api).get_state_resolution_handler(),
        "resolve_events_with_store",
        wrap,
        "synapse.state.StateResolutionHandler.resolve_events_with_store",
        "identical state sets resolve to themselves without state resolution",
    )


def _has_partial_state_events_txn(txn: Any, room_id: str) -> bool:
    txn.execute(
        "SELECT 1 FROM partial_state_events WHERE room_id = ? LIMIT 1", (room_id,)
    )
    return txn.fetchone() is not None


async def has_partial_state_events(store: Any, room_id: str) -> bool:
    """Whether any event of ``room_id`` still has partial state."""
    return bool(
        await store.db_pool.runInteraction(
            "sps_has_partial_state_events", _has_partial_state_events_txn, room_id
        )
    )


def current_state_guard(
    native: Callable[..., Awaitable[None]],
    has_partial_state_events: Callable[[str], Awaitable[bool]],
) -> Callable[..., Awaitable[None]]:
    """``native`` (the persistence controller's ``_update_current_state``), run
    only for rooms without partial-state events."""

    async def _update_current_state(room_id: str, task: Any) -> None:
        if await has_partial_state_events(room_id):
            logger.info(
                "Current state of %s not recalculated: events with partial state "
                "arrived meanwhile (the resync brings them to full state first)",
                room_id,
            )
            return
        await native(room_id, task)

    return _update_current_state


def install_current_state_guard(api: ModuleApi) -> None:
    """Never recalculate a room's current state from partial state.

    Synapse recalculates a partial-state room's current state once every event
    has full state, just before clearing the flag. An event that arrived a moment
    earlier (its context computed while its prev events were still partial) can
    be persisted with partial state in between, and be a forward extremity: the
    recalculation then replaces the room's full current state by that event's
    partial state (seen: 30,000 members -> 1 joined, 84 s spent deleting the
    members and unsubscribing from each member's device list), the clear fails
    because of the new partial-state event, and the next round puts the whole
    state back (21 s more). Clients see the member list collapse meanwhile.

    The recalculation runs in the room's event persistence queue, after every
    event queued before it, so checking ``partial_state_events`` there is
    exact: while any is left the current state is kept, and the resync goes
    round again. Stock's resync hits the same race; only the resync calls this
    (``update_current_state`` has no other caller in 1.163, besides the
    replication endpoint workers use for the same purpose).

    Wraps ``EventsPersistenceStorageController._update_current_state`` on this
    homeserver's instance (processes that persist events; signature unchanged
    in 1.163)."""
    controller = homeserver(api).get_storage_controllers().persistence
    if controller is None:
        return  # this process does not persist events
    store = homeserver(api).get_datastores().main

    async def room_has_partial_state_events(room_id: str) -> bool:
        return await has_partial_state_events(store, room_id)

    _wrap_instance_method(
        controller,
        "_update_current_state",
        lambda native: current_state_guard(native, room_has_partial_state_events),
        "synapse.storage.controllers.persist_events."
        "EventsPersistenceStorageController._update_current_state",
        "a room's current state is not recalculated while it has partial-state "
        "events (it would become their partial state)",
    )


def fire(d: Any, value: object = None) -> None:
    """Fire a Deferred others wait on through ``make_deferred_yieldable`` without
    handing them this log context (Synapse's ``PreserveLoggingContext`` idiom)."""
    from synapse.logging.context import PreserveLoggingContext

    if not d.called:
        with PreserveLoggingContext():
            d.callback(value)


def is_pull_backoff(error: BaseException) -> int | None:
    """``retry_after_ms`` if ``error`` is Synapse's pull-attempt back-off."""
    from synapse.api.errors import FederationPullAttemptBackoffError

    if isinstance(error, FederationPullAttemptBackoffError):
        return int(error.retry_after_ms)
    return None


def is_federation_failure(error: BaseException) -> bool:
    """Whether ``error`` is how native says "this server could not give us state"."""
    from synapse.api.errors import FederationError

    return isinstance(error, FederationError)


# ---------------------------------------------------------------------------
# Resident side: federation servlets that know their request
# ---------------------------------------------------------------------------

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

#: The request a patched federation servlet is serving in this task: set by the
#: servlet's ``_wrap`` before Synapse authenticates the request, read by the
#: handlers below it (which Synapse calls with the parsed request, never the
#: request itself).
_FEDERATION_REQUEST: contextvars.ContextVar[SynapseRequest | None] = (
    contextvars.ContextVar("sps_federation_request", default=None)
)


def _request_aware_servlet(native: type[Any]) -> type[Any]:
    """A subclass of the federation servlet class ``native``, of the same name (Synapse
    labels its request metrics and traces with it), whose handlers run with the
    request in :data:`_FEDERATION_REQUEST`.

    It overrides only ``BaseFederationServlet._wrap`` (checked in 1.163.2), and keeps
    everything it does (signature check, origin, per-origin rate limit, tracing)."""
    import functools

    def with_request(inner: Callable[..., Awaitable[Any]]) -> Any:
        @functools.wraps(inner)
        async def wrapped(request: SynapseRequest, *args: Any, **kwargs: Any) -> Any:
            token = _FEDERATION_REQUEST.set(request)
            try:
                return await inner(request, *args, **kwargs)
            finally:
                _FEDERATION_REQUEST.reset(token)

        return wrapped

    class Servlet(native):  # type: ignore[valid-type,misc]
        def _wrap(self, func: Callable[..., Awaitable[tuple[int, Any]]]) -> Any:
            return with_request(super()._wrap(func))

    Servlet.__name__ = Servlet.__qualname__ = native.__name__
    return Servlet


def _replace_federation_servlets(replacements: Mapping[type[Any], type[Any]]) -> None:
    """Put ``replacements`` in ``SERVLET_GROUPS["federation"]`` in place of their
    keys. ``register_servlets`` reads that dict when a federation listener (main
    process or worker) builds its ``TransportLayerServer``, in
    ``hs.start_listening()``, which runs after modules are created: every listener
    gets the replacements."""
    from synapse.federation.transport import server as transport_server

    group = tuple(transport_server.SERVLET_GROUPS["federation"])
    transport_server.SERVLET_GROUPS["federation"] = tuple(
        replacements.get(cls, cls) for cls in group
    )


def _after_response(callback: Callable[[], None], what: str) -> None:
    """Call ``callback`` once the response to the federation request being served
    in this task has been written (at once if that request is unknown); its errors
    are logged and swallowed."""

    def call(_: object = None) -> None:
        try:
            callback()
        except Exception:
            logger.exception("%s failed", what)

    request = _FEDERATION_REQUEST.get()
    if request is None:
        call()
    else:
        # Fires on finish() (the whole body handed to the connection) or when
        # the connection is lost.
        request.notifyFinish().addBoth(call)


# ---------------------------------------------------------------------------
# Resident side: partial /send_join answers
# ---------------------------------------------------------------------------

#: Extra membership state keys (user IDs), in priority order, chosen for the
#: ``/send_join`` being answered in this task. Set by the ``on_send_join_request``
#: wrapper before native code runs, read by the state selector it calls.
_SEND_JOIN_EXTRAS: contextvars.ContextVar[tuple[str, ...] | None] = (
    contextvars.ContextVar("sps_send_join_extras", default=None)
)

#: (room_id, joining user id) -> member user IDs to add to the partial state.
ExtrasProvider = Callable[[str, str], Awaitable[tuple[str, ...]]]
#: (room_id, joining user id) -> extra top-level fields for the partial answer.
ResponseDecorator = Callable[[str, str], Awaitable[Mapping[str, Any]]]
#: (join event, state before the join, room summary, extra user IDs) -> state IDs.
StateSelector = Callable[
    ["EventBase", "StateMap[str]", "Mapping[str, MemberSummary]", tuple[str, ...]],
    Collection[str],
]
#: (room ID, the ``prev_events`` of a join we answered with partial state).
PartialJoinObserver = Callable[[str, list[str]], None]


@attr.s(auto_attribs=True, slots=True)
class _SendJoinHooks:
    """What the one ``on_send_join_request`` wrapper calls (None: not installed)."""

    extras_provider: ExtrasProvider | None = None
    decorate_response: ResponseDecorator | None = None
    observer: PartialJoinObserver | None = None


_SEND_JOIN_HOOKS = _SendJoinHooks()

_ON_SEND_JOIN_TARGET = (
    "synapse.federation.federation_server.FederationServer.on_send_join_request"
)


def _wrap_on_send_join_request() -> None:
    """Wrap ``FederationServer.on_send_join_request`` once, calling the hooks
    registered in :data:`_SEND_JOIN_HOOKS`, and (re)record what the wrapper does.

    ``on_send_join_request`` is a class method of 123 lines in 1.163.2; the
    servlets look it up on the instance at call time. For a partial answer the
    wrapper:

    1. asks ``extras_provider`` which member events to add (async, from the
       database) and keeps them in a context variable for the state selector;
    2. calls the native method;
    3. when the answer has ``members_omitted``: adds ``decorate_response``'s
       fields, and once the answer has been sent (see
       :func:`install_partial_join_observer`) tells ``observer(room_id,
       join["prev_events"])`` (which must not block; its errors are logged and
       swallowed).

    Full answers go through the native method untouched.
    """
    from synapse.federation import federation_server as fs

    hooks = _SEND_JOIN_HOOKS
    native_on_send_join = fs.FederationServer.on_send_join_request
    if not getattr(native_on_send_join, "_sps_wrapped", False):

        async def on_send_join_request(
            self: FederationServer,
            origin: str,
            content: dict[str, Any],
            room_id: str,
            caller_supports_partial_state: bool = False,
        ) -> dict[str, Any]:
            joiner = content.get("state_key")
            extras_provider = hooks.extras_provider
            if (
                not caller_supports_partial_state
                or extras_provider is None
                # Malformed join: native code produces its usual error.
                or not isinstance(joiner, str)
            ):
                resp = await native_on_send_join(
                    self, origin, content, room_id, caller_supports_partial_state
                )
            else:
                token = _SEND_JOIN_EXTRAS.set(await extras_provider(room_id, joiner))
                try:
                    resp = await native_on_send_join(
                        self, origin, content, room_id, True
                    )
                finally:
                    _SEND_JOIN_EXTRAS.reset(token)
            if not resp.get("members_omitted"):
                return resp
            if hooks.decorate_response is not None and isinstance(joiner, str):
                resp.update(await hooks.decorate_response(room_id, joiner))
            observer = hooks.observer
            if observer is not None:
                prev_events = content.get("prev_events")
                prev = (
                    [e for e in prev_events if isinstance(e, str)]
                    if isinstance(prev_events, list)
                    else []
                )
                _after_response(
                    lambda: observer(room_id, prev),
                    f"partial join observer for {room_id}",
                )
            return resp

        on_send_join_request._sps_wrapped = True  # type: ignore[attr-defined]
        fs.FederationServer.on_send_join_request = on_send_join_request  # type: ignore[method-assign]

    duties = []
    if hooks.extras_provider is not None:
        duties.append(
            "choose MSC2775 essentials before, add the summary after the native answer"
        )
    if hooks.observer is not None:
        duties.append(
            "once a partial answer has been sent, prepare the /state the joiner's "
            "resync asks for next, in the background"
        )
    _record_replacing(PatchRecord(_ON_SEND_JOIN_TARGET, "wrap", "; ".join(duties)))


def _record_replacing(record: PatchRecord) -> None:
    """Record ``record``, in place of an earlier record of the same target."""
    for index, old in enumerate(INSTALLED_PATCHES):
        if old.target == record.target:
            INSTALLED_PATCHES[index] = record
            return
    INSTALLED_PATCHES.append(record)


def install_send_join_hooks(
    extras_provider: ExtrasProvider,
    selector: StateSelector,
    decorate_response: ResponseDecorator,
) -> None:
    """Enrich partial ``/send_join`` answers (MSC3706 + MSC2775 essentials).

    Two patches, working together:

    * the ``FederationServer.on_send_join_request`` wrapper (see
      :func:`_wrap_on_send_join_request`, shared with
      :func:`install_partial_join_observer`) asks ``extras_provider`` which member
      events to add before the native method runs, and adds ``decorate_response``'s
      fields to partial answers;
    * the module-level ``_get_event_ids_for_partial_state_join`` (46 lines,
      unchanged since 1.100), which native looks up by global name at call time, is
      replaced by ``selector``. It sees the exact state before the join, so only
      member events really in that state are ever returned; the native auth-chain
      computation and deduplication then apply to them unchanged.

    Installing again replaces the hooks.
    """
    from synapse.federation import federation_server as fs

    def select(
        join_event: EventBase,
        prev_state_ids: StateMap[str],
        summary: Mapping[str, MemberSummary],
    ) -> Collection[str]:
        extras = _SEND_JOIN_EXTRAS.get()
        return selector(join_event, prev_state_ids, summary, extras or ())

    _SEND_JOIN_HOOKS.extras_provider = extras_provider
    _SEND_JOIN_HOOKS.decorate_response = decorate_response
    _wrap_on_send_join_request()
    fs._get_event_ids_for_partial_state_join = select
    _record(
        PatchRecord(
            "synapse.federation.federation_server._get_event_ids_for_partial_state_join",
            "replace",
            "partial state = native choice + MSC2775 essential members",
        )
    )


def install_partial_join_observer(observer: PartialJoinObserver) -> None:
    """Tell ``observer`` when a server got a partial ``/send_join`` answer from us.

    Registers ``observer`` with the one ``FederationServer.on_send_join_request``
    wrapper (:func:`_wrap_on_send_join_request`), which calls it with the room ID
    and the join's ``prev_events`` for every answer with ``members_omitted``, once
    the answer has been written (so that what it starts does not compete with
    sending it). Such a joiner resyncs next: it asks for ``/state_ids`` and
    ``/state`` at those events once it has processed the answer. Installing again
    replaces it.

    To know when the answer has been written, ``FederationV2SendJoinServlet`` (the
    only ``/send_join`` with partial answers; unchanged since 1.100 but for type
    hints, checked in 1.163.2) is replaced by a subclass of the same name that
    only puts the request in a context variable (:func:`_request_aware_servlet`).
    """
    from synapse.federation.transport import server as transport_server
    from synapse.federation.transport.server import federation as fed_servlets

    _SEND_JOIN_HOOKS.observer = observer
    _wrap_on_send_join_request()
    group = transport_server.SERVLET_GROUPS["federation"]
    if not any(getattr(cls, "_sps_send_join_servlet", False) for cls in group):
        native = fed_servlets.FederationV2SendJoinServlet
        servlet = _request_aware_servlet(native)
        servlet._sps_send_join_servlet = True  # type: ignore[attr-defined]
        _replace_federation_servlets({native: servlet})
        _record(
            PatchRecord(
                "synapse.federation.transport.server.SERVLET_GROUPS[federation]"
                ".FederationV2SendJoinServlet",
                "replace",
                "know when a partial /send_join answer has been sent",
            )
        )


async def get_room_summary(api: ModuleApi, room_id: str) -> Mapping[str, MemberSummary]:
    """Synapse's cached member summary of the room's current state."""
    # Any: mypy without Synapse's own plugin mis-types @cached methods.
    store: Any = main_store(api)
    return await store.get_room_summary(room_id)


def heroes_from_summary(summary: Mapping[str, MemberSummary], me: str) -> list[str]:
    """The room's heroes as Synapse computes them for ``/sync`` summaries."""
    from synapse.storage.databases.main.roommember import (
        extract_heroes_from_room_summary,
    )

    return extract_heroes_from_room_summary(summary, me)


async def get_current_state_event_content(
    api: ModuleApi, room_id: str, event_type: str, state_key: str
) -> Mapping[str, Any] | None:
    """Content of a current (non-member) state event, or None."""
    storage = homeserver(api).get_storage_controllers()
    event = await storage.state.get_current_state_event(room_id, event_type, state_key)
    return None if event is None else event.content


# ---------------------------------------------------------------------------
# Resident side: /state and /state_ids serving
# ---------------------------------------------------------------------------

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Unstable (MSC2775) query parameter of ``GET /state``: member events only.
MEMBERS_ONLY_PARAM = "org.matrix.msc2775.members_only"

#: How the state *before* an event differs from the state group stored for it:
#: None for a non-state event, else the event's ``(type, state_key)`` and the
#: event it replaced (``unsigned.replaces_state``, None if it replaced nothing).
StateAdjustment = tuple[tuple[str, str], str | None] | None


@attr.s(frozen=True, auto_attribs=True, slots=True)
class StateQuery:
    """One authenticated ``/state`` or ``/state_ids`` request, parsed as Synapse does."""

    origin: str
    room_id: str
    event_id: str
    #: ``org.matrix.msc2775.members_only=true`` (``/state`` only).
    members_only: bool = False


#: Serves a request by writing the response itself (True), or declines (False)
#: and lets Synapse's own servlet answer. Raising a ``SynapseError`` answers
#: with that error, as Synapse's servlets do.
StateHandler = Callable[["SynapseRequest", StateQuery], Awaitable[bool]]


def install_state_servlets(
    serve_state: StateHandler, serve_state_ids: StateHandler
) -> None:
    """Serve ``GET /_matrix/federation/v1/state{,_ids}/{roomId}`` through the module.

    Replaces ``FederationStateV1Servlet`` and ``FederationStateIdsServlet`` (only
    type-hint changes since 1.100; checked in 1.163.2) in
    ``synapse.federation.transport.server.SERVLET_GROUPS["federation"]`` with
    subclasses of the same names (see :func:`_replace_federation_servlets`).

    The subclasses are request-aware (:func:`_request_aware_servlet`), because
    ``on_GET`` is called with the query, not the request. ``on_GET`` parses
    ``event_id`` exactly as
    Synapse does (400 ``M_MISSING_PARAM`` when absent) and hands over to the
    module, which writes the response itself and returns None (the documented
    "already handled" return of ``BaseFederationServlet`` callbacks), or declines:
    then the stock ``on_GET`` answers, as if the module were not there.
    """
    from synapse.federation.transport import server as transport_server
    from synapse.federation.transport.server import federation as fed_servlets
    from synapse.http.servlet import parse_boolean_from_args, parse_string_from_args

    group = tuple(transport_server.SERVLET_GROUPS["federation"])
    if any(getattr(cls, "_sps_state_servlet", False) for cls in group):
        return
    native_state = fed_servlets.FederationStateV1Servlet
    native_state_ids = fed_servlets.FederationStateIdsServlet

    def module_servlet(
        native: type[Any], serve: StateHandler, members_only_variant: bool
    ) -> type[Any]:
        """A subclass of ``native`` of the same name, served by ``serve``."""

        class Servlet(_request_aware_servlet(native)):  # type: ignore[misc]
            _sps_state_servlet = True

            async def on_GET(
                self,
                origin: str,
                content: None,
                query: dict[bytes, list[bytes]],
                room_id: str,
            ) -> tuple[int, Any] | None:
                request = _FEDERATION_REQUEST.get()
                event_id = parse_string_from_args(
                    query, "event_id", None, required=True
                )
                members_only = members_only_variant and parse_boolean_from_args(
                    query, MEMBERS_ONLY_PARAM, False
                )
                if request is not None and await serve(
                    request, StateQuery(origin, room_id, event_id, members_only)
                ):
                    return None
                return await super().on_GET(origin, content, query, room_id)

        Servlet.__name__ = Servlet.__qualname__ = native.__name__
        return Servlet

    _replace_federation_servlets(
        {
            native_state: module_servlet(native_state, serve_state, True),
            native_state_ids: module_servlet(native_state_ids, serve_state_ids, False),
        }
    )
    _record(
        PatchRecord(
            "synapse.federation.transport.server.SERVLET_GROUPS[federation]"
            ".FederationStateV1Servlet",
            "replace",
            "serve /state from the module's state-group cache, streamed; "
            "MSC2775 members-only variant",
        )
    )
    _record(
        PatchRecord(
            "synapse.federation.transport.server.SERVLET_GROUPS[federation]"
            ".FederationStateIdsServlet",
            "replace",
            "serve /state_ids from the module's state-group cache",
        )
    )


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
    _record(
        PatchRecord(
            "synapse.storage.databases.main.events_worker.EventsWorkerStore"
            "._invalidate_local_get_event_cache",
            "wrap (store instance)",
            "drop the module's encoded copy of an event whenever Synapse drops its own",
        )
    )
    _record(
        PatchRecord(
            "synapse.storage.databases.main.events_worker.EventsWorkerStore"
            "._invalidate_local_get_event_cache_room_id",
            "wrap (store instance)",
            "drop the module's encoded copies of a room's events (purges)",
        )
    )


class ResidentStateAccess:
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
    :meth:`ResidentStateAccess.encoded_pdus`): the stored text itself; ``b""``
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
    :meth:`ResidentStateAccess.auth_chain_ids`)."""
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


def encode_federation_json(value: Any) -> bytes:
    """Synapse's federation response encoding (``JsonResource(canonical_json=False)``)."""
    from synapse.util.json import json_encoder

    return json_encoder.encode(value).encode("utf-8")


def write_json_response(
    request: SynapseRequest, length: int, chunks: Iterator[bytes]
) -> None:
    """Write a 200 JSON body of ``length`` bytes from ``chunks``, as Synapse does.

    The headers of ``respond_with_json_bytes`` (Content-Type, Content-Length,
    Cache-Control unless set, CORS as ``JsonResource`` sends), then Synapse's own
    push producer (``synapse.http.server._ByteProducer``, 1.163.2), which pulls the
    chunks lazily, pauses on back-pressure and finishes the request, so the body is
    never joined in memory."""
    from synapse.http.server import _ByteProducer, set_cors_headers

    request.setResponseCode(200)
    if request._disconnected:
        logger.info("Not sending response to %s: already disconnected", request)
        return
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", b"%d" % (length,))
    if not request.responseHeaders.hasHeader(b"Cache-Control"):
        request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")
    set_cors_headers(request)
    _ByteProducer(request, chunks)
