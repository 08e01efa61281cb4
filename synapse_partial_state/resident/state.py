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
connection by a push producer in 1 MiB blocks; nothing joins the body in memory. A
new state group (the room changed since) costs its IDs, but reuses every event
already encoded: in a wave of joiners only the new member events are loaded. When
Synapse stored the new group as a delta of a group we hold an entry for (the room
one join later), its IDs come from that entry and the delta's rows
(:func:`~synapse_partial_state.resident.answer.state_by_delta`), not from the
room's whole state. Concurrent requests for the same entry wait for one
computation; entries of one room are built one at a time (the next starts from the
last one's result), and answers being prepared at once share the events they both
load. Synapse tells us
when an event's served form may change (redactions, censoring, rejection changes,
purges) through the hook that clears its own event cache; we drop our copy then.

Events not cached yet are built straight from their stored JSON, skipping the
parse-and-re-encode round trip of stock's loader (anything unusual goes through
stock's loader: see ``compat.resident_state.ResidentStateOps.encoded_pdus``). The auth chain
of a new state group is computed from that of the room's previous entry when they
differ by a few events (:func:`auth_chain_by_difference`), not from scratch.

Answers are prepared ahead, in the background, when a joiner is known to need them
soon: once a partial ``/send_join`` answer has been sent (the joiner's resync asks
for the state before its join's ``prev_events``), after a ``/state_ids`` for a
big state (the matching ``/state`` comes next, so this one goes at full speed),
and for a big room's state before its forward extremity with the joined-hosts
warm-up (:meth:`StateServer.prepare_room`). The other preparations pause between
steps (:data:`PREWARM_PAUSE_RATIO`) until a request waits for them, so that they
do not slow down the requests being served meanwhile (the joiner's own
``/state_ids``, a wave of joiners). Prometheus
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
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from synapse.module_api import ModuleApi

from synapse_partial_state.compat.resident_state import (
    ResidentStateOps,
    StateAdjustment,
)
from synapse_partial_state.compat.servlets import (
    StateQuery,
    encode_federation_json,
    write_json_response,
)
from synapse_partial_state.config import StateCacheConfig
from synapse_partial_state.resident.answer import (
    EVENT_OVERHEAD,
    EncodedEvent,
    StateAnswer,
    StateEntry,
    blocks,
    group_state_of,
    slices,
    split_state,
    state_before,
    state_body_parts,
    state_by_delta,
)
from synapse_partial_state.resident.cache import (
    ByteBudgetLRU,
    OnePerKey,
    SingleFlight,
)
from synapse_partial_state.resident.metrics import StateServerMetrics

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

logger = logging.getLogger(__name__)

#: Builds slower than this are logged at INFO.
SLOW_BUILD_SECONDS = 1.0
#: A ``/state_ids`` answer for a state at least this big starts encoding the
#: events of the matching ``/state`` in the background (joiners ask for both).
PREWARM_MIN_STATE = 1000
#: A new state entry whose state differs from the last one built for its room by
#: at most this many events gets its auth chain from that one's (see
#: :func:`auth_chain_by_difference`).
INCREMENTAL_AUTH_MAX_CHANGES = 1000
#: A room with more forward extremities than this is not prepared ahead.
PREPARE_MAX_EXTREMITIES = 5
#: Events loaded and encoded per step of building a ``/state`` answer (read
#: in transactions of ``compat.resident_state.STATE_LOAD_BATCH``, several at
#: once).
LOAD_STEP = 20000
#: A prewarm nobody waits for yet pauses this many times as long as each step
#: took: it then takes at most about half of the process's time, and leaves the
#: rest to the requests being served (such as the ``/send_join`` answers of a wave
#: of joiners). Once a ``/state`` request waits for it, it goes at full speed.
PREWARM_PAUSE_RATIO = 1.0

#: Awaited between the steps of a computation, with the seconds the step took.
Pause = Callable[[float], Awaitable[None]]


class StateServer:
    """Serves ``/state`` and ``/state_ids`` from the cache (see the module docstring)."""

    def __init__(
        self,
        api: ModuleApi,
        config: StateCacheConfig,
        access: ResidentStateOps | None = None,
        metrics: StateServerMetrics | None = None,
    ) -> None:
        self._api = api
        self._config = config
        self._access = access or ResidentStateOps(api)
        self._metrics = metrics or StateServerMetrics(
            api.server_name, CollectorRegistry()
        )
        self._cache: ByteBudgetLRU[tuple[Any, ...], Any] = ByteBudgetLRU(
            config.max_size_mib * 1024 * 1024
        )
        self._flights: SingleFlight[tuple[Any, ...], Any] = SingleFlight()
        #: Entry builds, one per room at a time.
        self._room_builds: OnePerKey[str] = OnePerKey()
        #: Events being loaded and encoded, by ID: the load (a flight) they are in.
        self._loading: dict[str, int] = {}
        self._load_counter = 0
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
            "states_by_delta": 0,
            "base_entries": 0,
        }

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
        new = self._cache.evictions - self._reported_evictions
        self._metrics.cache(self._cache.bytes, new)
        self._reported_evictions = self._cache.evictions

    # -- serving -----------------------------------------------------------------

    async def serve_state(self, request: SynapseRequest, query: StateQuery) -> bool:
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
        write_json_response(request, length, blocks(parts))
        return True

    async def serve_state_ids(self, request: SynapseRequest, query: StateQuery) -> bool:
        """``GET /state_ids``: write the answer, or decline (False)."""
        if not query.event_id:
            return False
        await self._access.check_origin(query.origin, query.room_id)
        started = time.monotonic()
        key, entry, hit = await self._entry(query.room_id, query.event_id)
        body = entry.state_ids_body
        if body is None:
            body = encode_federation_json(
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
        write_json_response(request, len(body), slices(body))
        return True

    def _maybe_prewarm(self, key: tuple[Any, ...], entry: StateEntry) -> None:
        """After ``/state_ids``, encode the events of the same ``/state`` in the
        background: a joiner resyncing asks for it next, and then waits for this
        computation instead of starting its own."""
        if self._needs_prewarm(key, entry):
            self.counts["prewarms"] += 1
            self._api.run_as_background_process(
                "sps_state_prewarm", self._prewarm, key, entry, False
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

    async def _prewarm(
        self, key: tuple[Any, ...], entry: StateEntry, paced: bool = True
    ) -> int:
        """Encode the events of ``entry``'s ``/state`` in the background; the
        number loaded (not already cached). ``paced``: pausing between steps
        until a request waits for it. Not after a ``/state_ids``: its ``/state``
        follows at once, and the joiner's request itself may reach us only
        late, behind the fan-out of its join (the database pool full of the
        federation sender's writes)."""
        flight = ("body", "full") + key

        async def pause(took: float) -> None:
            if not self._flights.has_foreground(flight):
                await self._api.sleep(took * PREWARM_PAUSE_RATIO)

        answer = await self._flights.run(
            flight,
            lambda: self._full_events(entry, pause if paced else None),
            background=True,
        )
        logger.debug(
            "state cache: prewarmed /state of %s at group %d: %d events loaded",
            entry.room_id,
            entry.state_group,
            answer.loaded,
        )
        return answer.loaded

    def after_partial_join(self, room_id: str, prev_event_ids: list[str]) -> None:
        """A server joined on top of ``prev_event_ids`` with partial state: its
        resync asks for the state before each of them once it has processed our
        answer. Build those answers in the background now, paced: the joiner's
        ``/state_ids`` comes first, and its ``/state`` (a real joiner's resync
        works through the IDs first: seconds at 100,000 members) finds them
        ready either way. At full speed, the load slowed the ``/state_ids``
        answer down (at 100,000 members, 0.8 s -> 2.2 s)."""
        if self._cache.max_bytes == 0 or room_id in self._warming_rooms:
            return
        self._warming_rooms.add(room_id)
        self._api.run_as_background_process(
            "sps_state_prewarm_join", self._prewarm_join, room_id, prev_event_ids
        )

    async def prepare_room(self, room_id: str, events: bool = True) -> None:
        """A big room's answers prepared before its next joiner asks: the state
        before each of its forward extremities (what that joiner's resync asks
        for, its join citing them; at most :data:`PREPARE_MAX_EXTREMITIES`),
        and with ``events`` that state's encoded events while
        at most half the cache's budget is in use. Called by the joined-hosts
        warmer after a start (with events) and after our own resync of the room
        (without); returns once prepared."""
        if self._cache.max_bytes == 0 or room_id in self._warming_rooms:
            return
        if await self._access.is_partial_state_room(room_id):
            return  # nothing to serve until its resync ends (then we are called)
        extremities = await self._access.forward_extremities(room_id)
        if not extremities or len(extremities) > PREPARE_MAX_EXTREMITIES:
            return
        half_full = self._cache.bytes >= self._cache.max_bytes // 2
        events = events and not half_full
        self._warming_rooms.add(room_id)
        started = time.monotonic()
        encoded = await self._prewarm_join(room_id, extremities, events=events)
        if encoded:
            what = f"and {encoded} events encoded"
        elif half_full:
            what = "event IDs only: the cache is half full"
        else:
            what = "event IDs only"
        logger.info(
            "state cache: prepared the state answers of %s ahead of its joiners "
            "in %.2f s (%s)",
            room_id,
            time.monotonic() - started,
            what,
        )

    async def _prewarm_join(
        self, room_id: str, prev_event_ids: list[str], events: bool = True
    ) -> int:
        """Build the entries before ``prev_event_ids`` and, with ``events``,
        encode their events; the number of events encoded."""
        encoded = 0
        try:
            for event_id in prev_event_ids:
                try:
                    key, entry, _ = await self._entry(room_id, event_id)
                except Exception as e:  # e.g. the room became partial-stated here
                    logger.debug("state cache: no prewarm at %s: %s", event_id, e)
                    continue
                if events and self._needs_prewarm(key, entry):
                    self.counts["prewarms"] += 1
                    encoded += await self._prewarm(key, entry)
        finally:
            self._warming_rooms.discard(room_id)
        return encoded

    def _served(self, endpoint: str, variant: str, hit: bool, length: int) -> None:
        self.counts["requests"] += 1
        self._metrics.served(endpoint, variant, hit, length)
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
        adjustment: StateAdjustment,
        event_id: str,
    ) -> StateEntry:
        self.counts["entry_misses"] += 1
        # One build per room at a time: the next one then starts from this one's
        # result (by delta, or its auth chain by difference) instead of doing the
        # same whole-room work beside it (a joiner's /state_ids arriving while
        # the prewarm after its /send_join builds the state before its prev
        # events).
        async with self._room_builds.hold(room_id):
            built = self._cache.get(key)
            if built is not None:  # by the build this one waited behind
                return built
            started = time.monotonic()
            all_ids, member_ids, how = await self._state_ids(
                room_id, state_group, adjustment, event_id
            )
            entry, auth_how = await self._new_entry(
                key, room_id, state_group, adjustment, all_ids, member_ids
            )
            self._log_build(entry, f"{how}, {auth_how}", time.monotonic() - started)
            return entry

    async def _state_ids(
        self,
        room_id: str,
        state_group: int,
        adjustment: StateAdjustment,
        event_id: str,
        build_base: bool = True,
    ) -> tuple[tuple[str, ...], tuple[str, ...], str]:
        """(all, member) IDs of the state before ``event_id`` (the group's
        whole state without ``adjustment``), by delta where it can be
        (:meth:`_state_by_delta`), else from the whole group; and which."""
        ids = await self._state_by_delta(
            room_id, state_group, adjustment, event_id, build_base
        )
        if ids is not None:
            self.counts["states_by_delta"] += 1
            return (*ids, "delta")
        group_state = await self._access.state_ids_of_group(state_group)
        state = state_before(group_state, adjustment, event_id)
        del group_state
        return (*split_state(state), "full")

    async def _new_entry(
        self,
        key: tuple[Any, ...],
        room_id: str,
        state_group: int,
        adjustment: StateAdjustment,
        all_ids: tuple[str, ...],
        member_ids: tuple[str, ...],
    ) -> tuple[StateEntry, str]:
        """The entry of these state IDs with their auth chain (by difference
        from the room's latest entry where it can), cached as ``key`` and made
        the room's latest; and how its auth chain was had."""
        auth_ids = None
        base = self._latest.get(room_id)
        if base is not None:
            auth_ids = await auth_chain_by_difference(
                self._access, room_id, base.state_ids, base.auth_ids, all_ids
            )
        if auth_ids is None:
            how = "auth chain full"
            auth_ids = await self._access.auth_chain_ids(room_id, all_ids)
        else:
            how = "auth chain by difference"
            self.counts["auth_chains_by_difference"] += 1
        entry = StateEntry(
            room_id=room_id,
            state_group=state_group,
            state_ids=all_ids,
            member_ids=member_ids,
            auth_ids=tuple(auth_ids),
            adjustment=adjustment,
        )
        self._remember_entry(key, entry)
        self._latest[room_id] = entry
        return entry, how

    def _log_build(self, entry: StateEntry, how: str, took: float) -> None:
        logger.log(
            logging.INFO if took >= SLOW_BUILD_SECONDS else logging.DEBUG,
            "state cache: built state of %s at group %d (%d state, %d auth chain; "
            "state %s) in %.3fs",
            entry.room_id,
            entry.state_group,
            len(entry.state_ids),
            len(entry.auth_ids),
            how,
            took,
        )

    async def _base_entry(self, room_id: str, state_group: int) -> StateEntry:
        """The entry of a whole state group (no adjustment), built and kept as
        the base of the groups stored as deltas of it: the joins of a wave of
        joiners each get their own group, a small delta of the same group (a
        fork each), and each joiner asks for the state at its join; built
        whole each, they took 2-13 s one after the other at 100,000 members
        (17 joins: a minute), by delta 0.1 s each."""
        started = time.monotonic()
        all_ids, member_ids, how = await self._state_ids(
            room_id, state_group, None, "", build_base=False
        )
        entry, auth_how = await self._new_entry(
            ("s", room_id, state_group, None),
            room_id,
            state_group,
            None,
            all_ids,
            member_ids,
        )
        self.counts["base_entries"] += 1
        self._log_build(
            entry, f"{how}, the base of a delta, {auth_how}", time.monotonic() - started
        )
        return entry

    async def _state_by_delta(
        self,
        room_id: str,
        state_group: int,
        adjustment: StateAdjustment,
        event_id: str,
        build_base: bool = True,
    ) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """(all, member) IDs from the entry of the group this one was stored
        as a delta of: the delta's rows and the old group's events at those
        keys, instead of the whole group. That entry is built and kept when
        it is not cached (``build_base``: see :meth:`_base_entry`, itself
        made by delta from a cached entry where it can be, one level only).
        None without it, or when the delta does not say enough
        (:func:`state_by_delta`)."""
        prev_group, delta = await self._access.state_group_delta(state_group)
        if prev_group is None or delta is None:
            return None
        if len(delta) > INCREMENTAL_AUTH_MAX_CHANGES:
            return None
        base = self._cache.get(("s", room_id, prev_group, None))
        if base is None:
            # The state before a state event of that group (a joiner's
            # /state_ids at its own join), when that is what we hold.
            latest = self._latest.get(room_id)
            if latest is not None and latest.state_group == prev_group:
                base = latest
            elif not build_base or (
                adjustment is not None and delta.get(adjustment[0]) != event_id
            ):
                # (the second: the delta cannot give this state, see
                # state_by_delta; no base built for nothing)
                return None
            else:
                # Built here (by delta where it can be), once, for this group
                # and its siblings.
                base = await self._base_entry(room_id, prev_group)
        keys = set(delta)
        if base.adjustment is not None:
            keys.add(base.adjustment[0])
        at_keys = dict(await self._access.state_ids_at_keys(prev_group, list(keys)))
        base_ids, base_members = base.state_ids, base.member_ids
        if base.adjustment is not None:
            unadjusted = group_state_of(
                base_ids, base_members, base.adjustment, at_keys
            )
            if unadjusted is None:
                return None
            base_ids, base_members = unadjusted
        return state_by_delta(
            base_ids,
            base_members,
            {key: at_keys[key] for key in delta if key in at_keys},
            dict(delta),
            adjustment,
            event_id,
        )

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
        self._metrics.events(cached=len(pieces) - len(wanted), loaded=0)
        missing: list[str] = []
        #: Events another answer is loading: by its load.
        theirs: dict[int, list[tuple[int, str]]] = {}
        took = 0.0
        loaded_count = 0
        for start in range(0, len(wanted), LOAD_STEP):
            if start and pause is not None:
                await pause(took)
            step: list[tuple[int, str]] = []
            for index, event_id in wanted[start : start + LOAD_STEP]:
                if start:  # cached meanwhile, by another answer?
                    cached = cache.get(("e", event_id))
                    if cached is not None:
                        pieces[index] = cached.data
                        continue
                load = self._loading.get(event_id)
                if load is not None:
                    theirs.setdefault(load, []).append((index, event_id))
                else:
                    step.append((index, event_id))
            if not step:
                continue
            began = time.monotonic()
            loaded_count += await self._load_step(room_id, step, pieces, missing)
            took = time.monotonic() - began
        # Then what other answers were loading: their events are cached as they
        # finish; any not (evicted, or not loadable) is loaded here.
        again: list[tuple[int, str]] = []
        for load, items in theirs.items():
            if ("load", load) in self._flights:
                try:
                    await self._flights.run(("load", load), _no_second_load)
                except Exception:
                    pass  # loaded again below
            for index, event_id in items:
                cached = cache.get(("e", event_id))
                if cached is not None:
                    pieces[index] = cached.data
                else:
                    again.append((index, event_id))
        if again:
            loaded_count += await self._load_step(room_id, again, pieces, missing)
        answer.loaded += loaded_count
        self.counts["events_loaded"] += loaded_count
        self.counts["events_unavailable"] += len(missing)
        self._metrics.events(cached=0, loaded=loaded_count)
        out.extend(p for p in pieces if p is not None)
        return missing

    async def _load_step(
        self,
        room_id: str,
        step: list[tuple[int, str]],
        pieces: list[bytes | None],
        missing: list[str],
    ) -> int:
        """Load and encode ``step``'s events into ``pieces`` and the cache (those
        that do not load into ``missing``); the number loaded. Meanwhile other
        answers wanting these events wait for this load instead of their own."""
        self._load_counter += 1
        load = self._load_counter
        ids = [event_id for _, event_id in step]
        for event_id in ids:
            self._loading[event_id] = load
        cache = self._cache

        async def compute() -> dict[str, bytes]:
            try:
                loaded = await self._access.encoded_pdus(room_id, ids)
                for event_id, data in loaded.items():
                    cache.put(
                        ("e", event_id),
                        EncodedEvent(room_id, data),
                        len(data) + EVENT_OVERHEAD,
                    )
                return loaded
            finally:
                for event_id in ids:
                    if self._loading.get(event_id) == load:
                        del self._loading[event_id]

        loaded = await self._flights.run(("load", load), compute)
        count = 0
        for index, event_id in step:
            data = loaded.get(event_id)
            if data is None:
                missing.append(event_id)
            else:
                pieces[index] = data
                count += 1
        return count


async def _no_second_load() -> dict[str, bytes]:
    # Only ever joined while its load is in flight (checked just before).
    raise AssertionError("state cache: a finished load was asked for again")


async def auth_chain_by_difference(
    access: ResidentStateOps,
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
