"""Fast ``/state`` and ``/state_ids`` for big rooms, and MSC2775's members-only ``/state``.

Every server that joins a big room hammers the resident with
``GET /_matrix/federation/v1/state_ids/{room}?event_id=X`` and then ``/state`` at the
same event, during its resync. Stock Synapse rebuilds the whole answer for every
request (loads every state event and its auth chain, copies each one into a dict,
encodes the lot), with a 30-second response cache keyed by (room, event).

Here the answer is assembled from two kinds of entries of one LRU cache with a byte
budget (``resident.state_cache.max_size_mib``):

* per **state group** (plus, for a state event X, which event X replaced: the state
  *before* X is its group minus X): the state event IDs (all, members, others), the
  auth chain IDs of the state as stock computes them, and the encoded ``/state_ids``
  answer;
* per **event**: the event as stock ``/state`` serialises it, encoded once.

A ``/state`` answer is the concatenation of the encoded events, written to the
connection by a push producer in 64 KiB blocks; nothing joins the body in memory. A
new state group (the room changed since) costs its IDs, but reuses every event
already encoded: in a wave of joiners only the new member events are loaded.
Concurrent requests for the same entry wait for one computation. Synapse tells us
when an event's served form may change (redactions, censoring, rejection changes,
purges) through the hook that clears its own event cache; we drop our copy then.

Events not cached yet are built straight from their stored JSON, skipping the
parse-and-re-encode round trip of stock's loader (anything unusual goes through
stock's loader: see ``_synapse.ResidentStateAccess.encoded_pdus``). The auth chain
of a new state group is computed from that of the room's previous entry when they
differ by a few events (:func:`auth_chain_by_difference`), not from scratch.

Answers are prepared ahead, in the background, when a joiner is known to need them
soon: once a partial ``/send_join`` answer has been sent (the joiner's resync asks
for the state before its join's ``prev_events``), and after a ``/state_ids`` for a
big state (the matching ``/state`` comes next). Such preparation pauses between
steps (:data:`PREWARM_PAUSE_RATIO`) until a request waits for it, so that it does
not slow down the requests being served meanwhile (a wave of joiners). Prometheus
metrics: ``synapse_partial_state_state_*``; :meth:`StateServer.stats` has the
counters.

Access checks, errors and answers are stock's: ``assert_host_in_room`` (403, and 403
``M_UNABLE_DUE_TO_PARTIAL_STATE`` while the room is partial here), the server ACL
(403), 404 for unknown, rejected or outlier events, stock's per-(origin, room)
linearizer for ``/state``. Stock ``/state`` applies no history visibility filter, and
neither do we. When a module tracks federation deliveries
(``on_event_delivered_over_federation``) we leave ``/state`` to Synapse, which then
reports the events it sends.

Members-only (MSC2775, unstable): ``/state?...&org.matrix.msc2775.members_only=true``
answers ``{"pdus": [the m.room.member state at X], "auth_chain": [their auth chain,
minus the pdus and the rest of the state at X], "org.matrix.msc2775.members_only":
true}``. A stock resident ignores the parameter and answers in full, without the
marker: the joiner tells by the marker.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import attr
from prometheus_client import Counter, Gauge
from synapse.api.constants import EventTypes
from synapse.module_api import ModuleApi, make_deferred_yieldable, run_in_background
from twisted.internet import defer
from twisted.python.failure import Failure

from synapse_partial_state import _synapse
from synapse_partial_state.config import StateCacheConfig

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest
    from synapse.types import StateMap

logger = logging.getLogger(__name__)

#: Marker field of a members-only ``/state`` answer.
MEMBERS_ONLY_FIELD = _synapse.MEMBERS_ONLY_PARAM

#: Bytes written to the connection per producer step.
WRITE_BLOCK = 64 * 1024
#: Approximate memory of one event ID held in a cached entry (str + slot).
ID_COST = 110
#: Approximate overhead of one cached encoded event besides its bytes.
EVENT_OVERHEAD = 160
#: Builds slower than this are logged at INFO.
SLOW_BUILD_SECONDS = 1.0
#: A ``/state_ids`` answer for a state at least this big starts encoding the
#: events of the matching ``/state`` in the background (joiners ask for both).
PREWARM_MIN_STATE = 1000
#: A new state entry whose state differs from the last one built for its room by
#: at most this many events gets its auth chain from that one's (see
#: :func:`auth_chain_by_difference`).
INCREMENTAL_AUTH_MAX_CHANGES = 1000
#: Events loaded and encoded per step of building a ``/state`` answer.
LOAD_STEP = 4000
#: A prewarm nobody waits for yet pauses this many times as long as each step
#: took: it then takes at most about half of the process's time, and leaves the
#: rest to the requests being served (such as the ``/send_join`` answers of a wave
#: of joiners). Once a ``/state`` request waits for it, it goes at full speed.
PREWARM_PAUSE_RATIO = 1.0

REQUESTS = Counter(
    "synapse_partial_state_state_requests_total",
    "/state and /state_ids answers served by the module, by endpoint, variant and "
    "whether the state-group entry was cached (hit) or built (miss)",
    ["server_name", "endpoint", "variant", "entry"],
)
EVENTS_LOADED = Counter(
    "synapse_partial_state_state_events_loaded_total",
    "Events loaded and encoded because they were not in the /state cache",
    ["server_name"],
)
EVENTS_CACHED = Counter(
    "synapse_partial_state_state_events_cached_total",
    "Events of /state answers taken already encoded from the cache",
    ["server_name"],
)
BYTES_SERVED = Counter(
    "synapse_partial_state_state_bytes_total",
    "Bytes of /state and /state_ids answers written by the module",
    ["server_name", "endpoint"],
)
CACHE_BYTES = Gauge(
    "synapse_partial_state_state_cache_bytes",
    "Memory accounted to the /state cache",
    ["server_name"],
)
CACHE_EVICTIONS = Counter(
    "synapse_partial_state_state_cache_evictions_total",
    "Entries evicted from the /state cache to stay within its byte budget",
    ["server_name"],
)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Awaited between the steps of a computation, with the seconds the step took.
Pause = Callable[[float], Awaitable[None]]


class ByteBudgetLRU(Generic[K, V]):
    """A least-recently-used map whose entries have sizes, kept under a byte budget.

    An entry larger than the whole budget is not stored (its caller still has it).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        """The value (now most recently used), or None."""
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V, size: int) -> bool:
        """Store (or replace) ``key``; evict the oldest entries beyond the budget.

        Returns whether the value was stored."""
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        if size > self.max_bytes:
            return False
        self._items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted_size) = self._items.popitem(last=False)
            self.bytes -= evicted_size
            self.evictions += 1
        return True

    def discard(self, key: K) -> bool:
        item = self._items.pop(key, None)
        if item is None:
            return False
        self.bytes -= item[1]
        return True

    def discard_where(self, predicate: Callable[[K, V], bool]) -> int:
        """Drop every entry for which ``predicate(key, value)`` holds."""
        doomed = [k for k, (v, _) in self._items.items() if predicate(k, v)]
        for key in doomed:
            self.discard(key)
        return len(doomed)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


class SingleFlight(Generic[K, V]):
    """Concurrent callers asking for the same key share one computation.

    Follows Synapse's log-context rules: the computation runs with
    ``run_in_background``, callers wait with ``make_deferred_yieldable``."""

    def __init__(self) -> None:
        self._waiting: dict[K, list[defer.Deferred[V]]] = {}
        #: Keys with callers that are not background work.
        self._foreground: set[K] = set()

    def __contains__(self, key: object) -> bool:
        return key in self._waiting

    def has_foreground(self, key: K) -> bool:
        """Whether a caller other than background work waits for ``key``."""
        return key in self._foreground

    def run(
        self, key: K, compute: Callable[[], Awaitable[V]], background: bool = False
    ) -> Awaitable[V]:
        waiter: defer.Deferred[V] = defer.Deferred()
        waiters = self._waiting.get(key)
        if not background:
            self._foreground.add(key)
        if waiters is not None:
            waiters.append(waiter)
        else:
            self._waiting[key] = [waiter]
            done = run_in_background(compute)
            done.addBoth(self._finish, key)
        return make_deferred_yieldable(waiter)

    def _finish(self, result: Any, key: K) -> None:
        self._foreground.discard(key)
        for waiter in self._waiting.pop(key, []):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


@attr.s(auto_attribs=True, slots=True, eq=False)
class StateEntry:
    """The state before one event, as event IDs (one per state group + adjustment)."""

    room_id: str
    state_group: int
    #: All state event IDs, in the state map's order.
    state_ids: tuple[str, ...]
    #: The ``m.room.member`` ones (same order).
    member_ids: tuple[str, ...]
    #: ``get_auth_chain_ids(room, state_ids)``: stock's ``/state_ids``
    #: ``auth_chain_ids``, and stock ``/state``'s auth chain whenever every state
    #: event loads.
    auth_ids: tuple[str, ...]
    #: The encoded ``/state_ids`` answer, once asked for.
    state_ids_body: bytes | None = None
    #: Auth chain of the member events minus all state at X, once asked for.
    member_auth_ids: tuple[str, ...] | None = None

    def size(self) -> int:
        ids = len(self.state_ids) + len(self.auth_ids)
        ids += len(self.member_auth_ids or ())
        # member_ids shares the strings of state_ids: slots only.
        slots = 8 * len(self.member_ids)
        return ID_COST * ids + slots + len(self.state_ids_body or b"") + 200


@attr.s(auto_attribs=True, slots=True)
class StateAnswer:
    """The encoded events of one ``/state`` answer, shared by concurrent askers."""

    pdus: list[bytes] = attr.Factory(list)
    auth: list[bytes] = attr.Factory(list)
    #: How many of them were not cached (loaded from the database).
    loaded: int = 0


@attr.s(auto_attribs=True, slots=True, frozen=True)
class EncodedEvent:
    """One event as stock ``/state`` serialises it (``b""``: loaded, never sent)."""

    room_id: str
    data: bytes


def state_before(
    state: StateMap[str], adjustment: _synapse.StateAdjustment, event_id: str
) -> dict[tuple[str, str], str]:
    """The state before an event, from the state group stored for it.

    Stock's ``get_state_ids_for_pdu``: a state event is in its own group; the state
    before it has the event it replaced (``unsigned.replaces_state``) instead, or
    nothing at its key."""
    result = dict(state)
    if adjustment is None:
        return result
    key, replaced = adjustment
    if result.get(key) != event_id:
        raise AssertionError("State at event did not include event itself")
    if replaced is not None:
        result[key] = replaced
    else:
        del result[key]
    return result


def split_state(
    state: dict[tuple[str, str], str],
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(all, ``m.room.member``) event IDs of a state map, in its order."""
    members = tuple(
        event_id
        for (event_type, _), event_id in state.items()
        if event_type == EventTypes.Member
    )
    return tuple(state.values()), members


def state_body_parts(
    pdus: Sequence[bytes], auth_chain: Sequence[bytes], members_only: bool
) -> tuple[int, list[bytes]]:
    """The pieces of a ``/state`` answer, in order, and their total length.

    ``pdus`` and ``auth_chain`` are encoded events (empty ones are skipped)."""
    parts: list[bytes] = [b'{"pdus":[']
    for group_index, group in enumerate((pdus, auth_chain)):
        if group_index:
            parts.append(b'],"auth_chain":[')
        first = True
        for data in group:
            if not data:
                continue
            if not first:
                parts.append(b",")
            parts.append(data)
            first = False
    parts.append(
        b'],"' + MEMBERS_ONLY_FIELD.encode() + b'":true}' if members_only else b"]}"
    )
    return sum(len(p) for p in parts), parts


def blocks(parts: Iterable[bytes], size: int = WRITE_BLOCK) -> Iterator[bytes]:
    """Join small pieces into blocks of about ``size`` bytes, lazily."""
    pending: list[bytes] = []
    pending_len = 0
    for part in parts:
        pending.append(part)
        pending_len += len(part)
        if pending_len >= size:
            yield b"".join(pending)
            pending = []
            pending_len = 0
    if pending:
        yield b"".join(pending)


class StateServer:
    """Serves ``/state`` and ``/state_ids`` from the cache (see the module docstring)."""

    def __init__(
        self,
        api: ModuleApi,
        config: StateCacheConfig,
        access: _synapse.ResidentStateAccess | None = None,
    ) -> None:
        self._api = api
        self._config = config
        self._access = access or _synapse.ResidentStateAccess(api)
        self._server_name = api.server_name
        self._cache: ByteBudgetLRU[tuple[Any, ...], Any] = ByteBudgetLRU(
            config.max_size_mib * 1024 * 1024
        )
        self._flights: SingleFlight[tuple[Any, ...], Any] = SingleFlight()
        #: Rooms with a partial-join prewarm under way.
        self._warming_rooms: set[str] = set()
        #: The last state entry built for each room, while something holds it.
        self._latest: weakref.WeakValueDictionary[str, StateEntry] = (
            weakref.WeakValueDictionary()
        )
        self._reported_evictions = 0
        self.counts: dict[str, int] = {
            "entry_hits": 0,
            "entry_misses": 0,
            "events_cached": 0,
            "events_loaded": 0,
            "events_unavailable": 0,
            "requests": 0,
            "prewarms": 0,
            "auth_chains_by_difference": 0,
        }

    @classmethod
    def install_if_enabled(
        cls, api: ModuleApi, config: StateCacheConfig
    ) -> StateServer | None:
        """Create and install the server, unless ``state_cache.enabled`` is off."""
        if not config.enabled:
            return None
        server = cls(api, config)
        server.install()
        return server

    def install(self) -> None:
        _synapse.install_state_servlets(self.serve_state, self.serve_state_ids)
        _synapse.install_event_invalidation_hook(
            self._api, self.forget_event, self.forget_room
        )
        _synapse.install_partial_join_observer(self.after_partial_join)

    # -- invalidation ------------------------------------------------------------

    def forget_event(self, event_id: str) -> None:
        """Synapse dropped its cached copy of ``event_id``: drop ours."""
        self._cache.discard(("e", event_id))

    def forget_room(self, room_id: str) -> None:
        """Synapse dropped its cached copies of a room's events (a purge)."""
        self._latest.pop(room_id, None)
        dropped = self._cache.discard_where(
            lambda key, value: getattr(value, "room_id", None) == room_id
        )
        if dropped:
            logger.info("state cache: forgot %d entries of purged %s", dropped, room_id)
        self._update_gauges()

    # -- stats -------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters and cache occupancy (for status pages and tests)."""
        return {
            **self.counts,
            "cache_bytes": self._cache.bytes,
            "cache_max_bytes": self._cache.max_bytes,
            "cache_entries": len(self._cache),
            "cache_evictions": self._cache.evictions,
        }

    def _update_gauges(self) -> None:
        CACHE_BYTES.labels(self._server_name).set(self._cache.bytes)
        new = self._cache.evictions - self._reported_evictions
        if new:
            CACHE_EVICTIONS.labels(self._server_name).inc(new)
            self._reported_evictions = self._cache.evictions

    # -- serving -----------------------------------------------------------------

    async def serve_state(
        self, request: SynapseRequest, query: _synapse.StateQuery
    ) -> bool:
        """``GET /state``: write the answer, or decline (False) to let stock answer."""
        if not query.event_id or self._access.deliveries_are_tracked():
            return False
        members_only = query.members_only and self._config.members_only
        await self._access.check_origin(query.origin, query.room_id)
        started = time.monotonic()
        variant = "members_only" if members_only else "full"
        async with self._access.origin_room_queue(query.origin, query.room_id):
            key, entry, hit = await self._entry(query.room_id, query.event_id)
            if members_only:
                compute = lambda: self._members_only_events(key, entry)  # noqa: E731
            else:
                compute = lambda: self._full_events(entry)  # noqa: E731
            answer = await self._flights.run(("body", variant) + key, compute)
        length, parts = state_body_parts(answer.pdus, answer.auth, members_only)
        self._served("state", variant, hit, length)
        logger.debug(
            "state cache: /state %s room=%s event=%s group=%d entry=%s pdus=%d "
            "auth_chain=%d loaded=%d bytes=%d in %.3fs",
            variant,
            query.room_id,
            query.event_id,
            entry.state_group,
            "hit" if hit else "miss",
            len(answer.pdus),
            len(answer.auth),
            answer.loaded,
            length,
            time.monotonic() - started,
        )
        _synapse.write_json_response(request, length, blocks(parts))
        return True

    async def serve_state_ids(
        self, request: SynapseRequest, query: _synapse.StateQuery
    ) -> bool:
        """``GET /state_ids``: write the answer, or decline (False)."""
        if not query.event_id:
            return False
        await self._access.check_origin(query.origin, query.room_id)
        started = time.monotonic()
        key, entry, hit = await self._entry(query.room_id, query.event_id)
        body = entry.state_ids_body
        if body is None:
            body = _synapse.encode_federation_json(
                {
                    "pdu_ids": list(entry.state_ids),
                    "auth_chain_ids": list(entry.auth_ids),
                }
            )
            entry.state_ids_body = body
            self._remember_entry(key, entry)
        self._served("state_ids", "full", hit, len(body))
        self._maybe_prewarm(key, entry)
        logger.debug(
            "state cache: /state_ids room=%s event=%s group=%d entry=%s pdu_ids=%d "
            "auth_chain_ids=%d bytes=%d in %.3fs",
            query.room_id,
            query.event_id,
            entry.state_group,
            "hit" if hit else "miss",
            len(entry.state_ids),
            len(entry.auth_ids),
            len(body),
            time.monotonic() - started,
        )
        _synapse.write_json_response(request, len(body), _slices(body, WRITE_BLOCK))
        return True

    def _maybe_prewarm(self, key: tuple[Any, ...], entry: StateEntry) -> None:
        """After ``/state_ids``, encode the events of the same ``/state`` in the
        background: a joiner resyncing asks for it next, and then waits for this
        computation instead of starting its own."""
        if self._needs_prewarm(key, entry):
            self.counts["prewarms"] += 1
            self._api.run_as_background_process(
                "sps_state_prewarm", self._prewarm, key, entry
            )

    def _needs_prewarm(self, key: tuple[Any, ...], entry: StateEntry) -> bool:
        return not (
            len(entry.state_ids) < PREWARM_MIN_STATE
            or self._cache.max_bytes == 0  # nothing would be kept for /state
            or ("body", "full") + key in self._flights
            or (
                ("e", entry.state_ids[0]) in self._cache
                and ("e", entry.state_ids[-1]) in self._cache
            )
        )

    async def _prewarm(self, key: tuple[Any, ...], entry: StateEntry) -> None:
        flight = ("body", "full") + key

        async def pause(took: float) -> None:
            if not self._flights.has_foreground(flight):
                await self._api.sleep(took * PREWARM_PAUSE_RATIO)

        answer = await self._flights.run(
            flight, lambda: self._full_events(entry, pause), background=True
        )
        logger.debug(
            "state cache: prewarmed /state of %s at group %d: %d events loaded",
            entry.room_id,
            entry.state_group,
            answer.loaded,
        )

    def after_partial_join(self, room_id: str, prev_event_ids: list[str]) -> None:
        """A server joined on top of ``prev_event_ids`` with partial state: its
        resync asks for the state before each of them once it has processed our
        answer. Build those answers in the background now."""
        if self._cache.max_bytes == 0 or room_id in self._warming_rooms:
            return
        self._warming_rooms.add(room_id)
        self._api.run_as_background_process(
            "sps_state_prewarm_join", self._prewarm_join, room_id, prev_event_ids
        )

    async def _prewarm_join(self, room_id: str, prev_event_ids: list[str]) -> None:
        try:
            for event_id in prev_event_ids:
                try:
                    key, entry, _ = await self._entry(room_id, event_id)
                except Exception as e:  # e.g. the room became partial-stated here
                    logger.debug("state cache: no prewarm at %s: %s", event_id, e)
                    continue
                if self._needs_prewarm(key, entry):
                    self.counts["prewarms"] += 1
                    await self._prewarm(key, entry)
        finally:
            self._warming_rooms.discard(room_id)

    def _served(self, endpoint: str, variant: str, hit: bool, length: int) -> None:
        self.counts["requests"] += 1
        REQUESTS.labels(
            self._server_name, endpoint, variant, "hit" if hit else "miss"
        ).inc()
        BYTES_SERVED.labels(self._server_name, endpoint).inc(length)
        self._update_gauges()

    # -- entries -----------------------------------------------------------------

    async def _entry(
        self, room_id: str, event_id: str
    ) -> tuple[tuple[Any, ...], StateEntry, bool]:
        """The cached state before ``event_id``, built if needed; and whether it was
        cached. Raises stock's errors (404 unknown event, ...)."""
        state_group, adjustment = await self._access.state_group_before(
            room_id, event_id
        )
        key = ("s", room_id, state_group, adjustment)
        entry = self._cache.get(key)
        if entry is not None:
            self.counts["entry_hits"] += 1
            return key, entry, True
        entry = await self._flights.run(
            key,
            lambda: self._build_entry(key, room_id, state_group, adjustment, event_id),
        )
        return key, entry, False

    async def _build_entry(
        self,
        key: tuple[Any, ...],
        room_id: str,
        state_group: int,
        adjustment: _synapse.StateAdjustment,
        event_id: str,
    ) -> StateEntry:
        self.counts["entry_misses"] += 1
        started = time.monotonic()
        group_state = await self._access.state_ids_of_group(state_group)
        state = state_before(group_state, adjustment, event_id)
        del group_state
        all_ids, member_ids = split_state(state)
        del state
        auth_ids = None
        base = self._latest.get(room_id)
        if base is not None:
            auth_ids = await auth_chain_by_difference(
                self._access, room_id, base.state_ids, base.auth_ids, all_ids
            )
        if auth_ids is None:
            how = "full"
            auth_ids = await self._access.auth_chain_ids(room_id, all_ids)
        else:
            how = "by difference"
            self.counts["auth_chains_by_difference"] += 1
        entry = StateEntry(
            room_id=room_id,
            state_group=state_group,
            state_ids=all_ids,
            member_ids=member_ids,
            auth_ids=tuple(auth_ids),
        )
        self._remember_entry(key, entry)
        self._latest[room_id] = entry
        took = time.monotonic() - started
        logger.log(
            logging.INFO if took >= SLOW_BUILD_SECONDS else logging.DEBUG,
            "state cache: built state of %s at group %d (%d state, %d auth chain "
            "%s) in %.3fs",
            room_id,
            state_group,
            len(all_ids),
            len(auth_ids),
            how,
            took,
        )
        return entry

    def _remember_entry(self, key: tuple[Any, ...], entry: StateEntry) -> None:
        self._cache.put(key, entry, entry.size())
        self._update_gauges()

    # -- events ------------------------------------------------------------------

    async def _full_events(
        self, entry: StateEntry, pause: Pause | None = None
    ) -> StateAnswer:
        """Stock ``/state``: the state events that load, then the auth chain of those."""
        answer = StateAnswer()
        missing = await self._encoded(
            entry.room_id, entry.state_ids, answer.pdus, answer, pause
        )
        auth_ids: Iterable[str] = entry.auth_ids
        if missing:
            # Stock computes the auth chain of the events it could load.
            gone = set(missing)
            loaded = [e for e in entry.state_ids if e not in gone]
            auth_ids = await self._access.auth_chain_ids(entry.room_id, loaded)
        await self._encoded(entry.room_id, auth_ids, answer.auth, answer, pause)
        return answer

    async def _members_only_events(
        self, key: tuple[Any, ...], entry: StateEntry
    ) -> StateAnswer:
        """The member state, and its auth chain minus everything in the state."""
        answer = StateAnswer()
        await self._encoded(entry.room_id, entry.member_ids, answer.pdus, answer)
        member_auth_ids = entry.member_auth_ids
        if member_auth_ids is None:
            chain = await self._access.auth_chain_ids(entry.room_id, entry.member_ids)
            chain.difference_update(entry.state_ids)
            member_auth_ids = entry.member_auth_ids = tuple(chain)
            self._remember_entry(key, entry)
        await self._encoded(entry.room_id, member_auth_ids, answer.auth, answer)
        return answer

    async def _encoded(
        self,
        room_id: str,
        event_ids: Iterable[str],
        out: list[bytes],
        answer: StateAnswer,
        pause: Pause | None = None,
    ) -> list[str]:
        """Append the encoded events to ``out``, in order; return the IDs of those
        that did not load.

        Cached ones come from the cache; the others are loaded in steps of
        :data:`LOAD_STEP`, encoded and cached (``pause(seconds the step took)`` is
        awaited between steps). Events that do not load (unknown, rejected) are
        left out, as stock leaves them out."""
        pieces: list[bytes | None] = []
        wanted: list[tuple[int, str]] = []
        cache = self._cache
        for event_id in event_ids:
            cached = cache.get(("e", event_id))
            if cached is None:
                wanted.append((len(pieces), event_id))
                pieces.append(None)
            else:
                pieces.append(cached.data)
        self.counts["events_cached"] += len(pieces) - len(wanted)
        EVENTS_CACHED.labels(self._server_name).inc(len(pieces) - len(wanted))
        missing: list[str] = []
        took = 0.0
        for start in range(0, len(wanted), LOAD_STEP):
            if start and pause is not None:
                await pause(took)
            step = wanted[start : start + LOAD_STEP]
            began = time.monotonic()
            loaded = await self._access.encoded_pdus([e for _, e in step])
            for index, event_id in step:
                data = loaded.get(event_id)
                if data is None:
                    missing.append(event_id)
                    continue
                pieces[index] = data
                cache.put(
                    ("e", event_id),
                    EncodedEvent(room_id, data),
                    len(data) + EVENT_OVERHEAD,
                )
            del loaded
            took = time.monotonic() - began
        loaded_count = len(wanted) - len(missing)
        answer.loaded += loaded_count
        self.counts["events_loaded"] += loaded_count
        self.counts["events_unavailable"] += len(missing)
        EVENTS_LOADED.labels(self._server_name).inc(loaded_count)
        out.extend(p for p in pieces if p is not None)
        return missing


async def auth_chain_by_difference(
    access: _synapse.ResidentStateAccess,
    room_id: str,
    base_state: Sequence[str],
    base_auth: Iterable[str],
    state: Sequence[str],
) -> set[str] | None:
    """The auth chain of ``state`` from that of a close state, or None.

    The auth chain of a set of events is the union of their auth chains, so for
    ``state = base - removed + added``: ``chain(state) = chain(base - removed) |
    chain(added)``. When every removed event is in ``chain(added)`` (a new member
    event cites the membership it replaces, a new power-levels event the old one),
    the chains of the removed events are in ``chain(added)`` too, and so
    ``chain(state) = chain(base) | chain(added)`` exactly: one small query instead
    of the chain of the whole state. None when the states differ by more than
    :data:`INCREMENTAL_AUTH_MAX_CHANGES` events or the condition does not hold.
    """
    before = set(base_state)
    after = set(state)
    added = after - before
    removed = before - after
    if len(added) + len(removed) > INCREMENTAL_AUTH_MAX_CHANGES:
        return None
    chain = await access.auth_chain_ids(room_id, added) if added else set()
    if not removed <= chain:
        return None
    chain.update(base_auth)
    return chain


def _slices(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
