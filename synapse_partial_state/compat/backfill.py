"""The backfill seam: history from before the join, fetched from the resident
while the room is still partial, with the visibility it will have after the resync.

Stock Synapse (1.163.2) backfills a partial-state room only once it is complete:
``FederationHandler._maybe_backfill_inner`` checks its extremities against the
state at their successors and picks servers from the room's current hosts, both
of which wait for full state. :mod:`.partial_reads` runs that backfill in the
foreground of a ``/messages`` request instead, within a partial-read scope (those
reads answer from the partial state: for our own server, the check needs only
our own members, all known), and within :func:`backfilling` for the room.

Synapse then requests ``/backfill`` from the resident and processes the events
(``FederationEventHandler._process_pulled_events``). The oldest one's prev events
are not stored: Synapse computes the state before it from the resident's
``/state_ids`` at each missing prev event, and downloads every listed event it
does not have (in a big room, its whole membership: the resync's work a second
time). Within :func:`backfilling`, the module narrows that answer to a partial
state, the kind the join itself stored:

* ``/state_ids`` at the missing prev event P lists the full state there; the
  resident's ``/state_ids`` at our join event J lists the full state before the
  join (fetched once per room and join, alongside Synapse's own request at P);
* an event of the state at P that is also in the state before the join is left
  out unless the partial state stored at the join holds it (the join event's
  state group while the join is still partial, and the join's auth events) or it
  is a local user's current membership: the partial state at the join holds every
  non-member state event, so such an event is a remote member, which a partial
  state lacks. It is left out even when the resync has stored it already: the
  state at P is then as partial as the join's whatever the resync has reached,
  and an event Synapse persists on it does not make Synapse resolve a state of
  tens of thousands of members against the room's partial current state and
  rewrite that (seen in the 100,000-member benchmark: 11 s of state resolution
  and a 3.8 s rewrite of 59,868 members, holding the room's persistence queue
  and so the resync's own writes for 19 s). When the join's partial state is
  not to be had (the join already brought to full state), events this server
  has are kept, as the only way to tell partial from full;
* every other event is kept, and fetched if missing (through Synapse's own
  ``_get_events_and_persist``, as outliers): the state events replaced between
  P and the join, e.g. an earlier ``m.room.history_visibility``. The auth chain
  is narrowed the same way against the state and auth chain before the join
  (Synapse only checks that it has the listed auth events: those left out are
  stored already, or remote members' earlier memberships it does not need).

So the state at the backfilled events is complete in all that a local user's
view of history reads (history visibility, the user's own membership), and
lacks remote members only. The event's context is marked partial-state, as
events received during a resync are: Synapse stores it in
``partial_state_events`` and the resync brings it to full state with the others
(the room cannot be marked complete while one remains). If the room completes
meanwhile, Synapse's own retry (``PartialStateConflictError``) recomputes the
context, outside this narrowing (the room is no longer partial).

The same holds for every event Synapse *pulls* during the resync, not only
those of a backfill: ``get_missing_events`` fills the gap before an event it
receives (a fork older than the join, or events sent while the join ran), and
an event it fetched that way whose own prev events are not here needs the state
before it just the same. Stock downloads the room's whole state for it, while
the resync downloads the same; the bench at 10,000 members on PostgreSQL saw
two such downloads beside the resync's (46 s to a full member list instead of
about 20). So ``_process_pulled_event`` of a partial-state room runs within
:func:`backfilling` too. The state at events received meanwhile is completed by
the resync (Synapse's per-event de-partial-stating, which is not narrowed).

Synapse's ``/state_ids`` requests during the engine's fetch wait for it (up to
2 s, :mod:`..joining.inflight`); a narrowed request does not need the engine's
stored state, so :func:`skip_reuse_while_backfilling` lets it go at once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import attr
from synapse.logging.context import make_deferred_yieldable

from synapse_partial_state.compat.patching import wrap_instance_method
from synapse_partial_state.compat.state_fetch import have_seen

logger = logging.getLogger(__name__)

#: (state IDs, state and auth chain IDs) before a join, and the state events of
#: those the partial state at the join holds (None: not known, see :func:`narrow`).
JoinState = tuple[frozenset[str], frozenset[str], frozenset[str] | None]

#: Rooms whose backfill the current request runs during their resync.
_BACKFILLING: ContextVar[frozenset[str]] = ContextVar(
    "sps_backfilling", default=frozenset()
)


@attr.s(auto_attribs=True, slots=True)
class _Narrowing:
    """One event's context computation within a partial backfill."""

    room_id: str
    #: the state before the join: (state IDs, state and auth chain IDs), once
    #: fetched (None: not yet, or not to be had)
    join_state: JoinState | None
    #: its fetch, started with the context computation, alongside Synapse's own
    #: request for the state at the missing prev event
    fetching: Any = None
    #: whether a /state_ids answer was narrowed (the context is then partial)
    narrowed: bool = False

    async def state_before_join(self) -> JoinState | None:
        if self.join_state is None and self.fetching is not None:
            fetching, self.fetching = self.fetching, None
            self.join_state = await make_deferred_yieldable(fetching)
        return self.join_state


_NARROWING: ContextVar[_Narrowing | None] = ContextVar("sps_narrowing", default=None)

#: room ID -> (join event ID, the state before the join, as listed by the
#: resident): one room (the latest to backfill during its resync).
_JOIN_STATE: dict[str, tuple[str, JoinState]] = {}


@contextmanager
def backfilling(room_id: str) -> Iterator[None]:
    """Within the block, a backfill of the partial-state ``room_id`` narrows
    the state it fetches (see the module docstring)."""
    previous = _BACKFILLING.get()
    _BACKFILLING.set(previous | {room_id})
    try:
        yield
    finally:
        _BACKFILLING.set(previous)  # set, not reset: see partial_reads


def in_partial_backfill(room_id: str) -> bool:
    """Whether the current coroutine narrows the state it fetches for
    ``room_id`` (a backfill during its resync)."""
    narrowing = _NARROWING.get()
    return narrowing is not None and narrowing.room_id == room_id


StateIdsReuse = Callable[[str, str], Coroutine[Any, Any, Any]]


def skip_reuse_while_backfilling(reuse: StateIdsReuse) -> StateIdsReuse:
    """``reuse`` (the engine's answers for Synapse's own ``/state_ids``
    requests), except within a partial backfill, which asks at once."""

    async def answer_for(room_id: str, event_id: str) -> Any:
        if in_partial_backfill(room_id):
            return None
        return await reuse(room_id, event_id)

    return answer_for


def narrow(
    answer: dict[str, Any], seen: set[str], join_state: JoinState
) -> dict[str, Any]:
    """A ``/state_ids`` answer at an event before the join, as a partial state.

    When the partial state at the join is known (``join_state[2]``), left out:
    events of the state before the join (``join_state[0]``) that it does not
    hold, and of the auth chain, events of the state or auth chain before the
    join (``join_state[1]``) that it does not hold (Synapse only checks that it
    has the listed auth events; those are stored or not needed). ``seen`` is not
    read. When it is not known: the same, with what this server has (``seen``)
    in its place."""
    state_before_join, all_before_join, partial_at_join = join_state
    held = seen if partial_at_join is None else partial_at_join
    pdu_ids = [
        e for e in answer.get("pdu_ids", []) if e in held or e not in state_before_join
    ]
    auth_ids = [
        e
        for e in answer.get("auth_chain_ids", [])
        if e in held or e not in all_before_join
    ]
    return {**answer, "pdu_ids": pdu_ids, "auth_chain_ids": auth_ids}


def _ids(answer: dict[str, Any], key: str) -> list[str]:
    value = answer.get(key, [])
    return [e for e in value if isinstance(e, str)] if isinstance(value, list) else []


class _Seams:
    """What the wrappers read from Synapse, per homeserver."""

    def __init__(self, hs: Any) -> None:
        self.hs = hs
        self.store: Any = hs.get_datastores().main
        self.transport: Any = hs.get_federation_transport_client()
        self.events = _EventFetcher(hs)


class _EventFetcher:
    """Synapse's own fetch of missing state and auth events (as outliers)."""

    def __init__(self, hs: Any) -> None:
        self._hs = hs

    async def fetch_and_persist(
        self, destination: str, room_id: str, event_ids: list[str]
    ) -> None:
        handler: Any = self._hs.get_federation_event_handler()
        await handler._get_events_and_persist(
            destination=destination, room_id=room_id, event_ids=event_ids
        )


def _wrap_compute_context(native: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(native)
    async def _compute_event_context_with_maybe_missing_prevs(
        self: Any, dest: str, event: Any
    ) -> Any:
        room_id = event.room_id
        if room_id not in _BACKFILLING.get() or _NARROWING.get() is not None:
            return await native(self, dest, event)
        store: Any = self._store
        if not await store.is_partial_state_room(room_id):
            _JOIN_STATE.pop(room_id, None)  # complete: not needed any more
            return await native(self, dest, event)
        prevs = set(event.prev_event_ids())
        if not prevs - set(await store.have_events_in_timeline(prevs)):
            return await native(self, dest, event)  # Synapse fetches nothing
        # Alongside Synapse's own request, in its own log context (it may end
        # after this event's, when Synapse's request fails).
        fetching = _SEAMS[0].hs.run_as_background_process(
            "sps_backfill_join_state", _join_state, dest, room_id
        )
        narrowing = _Narrowing(room_id, None, fetching)
        previous = _NARROWING.get()
        _NARROWING.set(narrowing)
        try:
            context = await native(self, dest, event)
        finally:
            _NARROWING.set(previous)
        if narrowing.narrowed and not context.partial_state:
            # Its state lacks remote members: the resync completes it.
            context.partial_state = True
        return context

    return _compute_event_context_with_maybe_missing_prevs


async def _join_state(dest: str, room_id: str) -> JoinState | None:
    """The state before the room's partial join, as ``dest`` lists it (cached
    for the room's current join); None if it cannot be had (Synapse then
    fetches the state at the backfilled event in full, as stock)."""
    seams = _SEAMS[0]
    try:
        (
            join_event_id,
            _,
        ) = await seams.store.get_join_event_id_and_device_lists_stream_id_for_partial_state(
            room_id
        )
    except Exception:  # the room completed meanwhile
        return None
    cached = _JOIN_STATE.get(room_id)
    if cached is not None and cached[0] == join_event_id:
        return cached[1]
    try:
        answer = await seams.transport.get_room_state_ids(
            dest, room_id, event_id=join_event_id
        )
    except Exception as e:
        logger.info(
            "Backfill of partial-state room %s: no state before the join from %s "
            "(%s): fetching the state at the backfilled events in full",
            room_id,
            dest,
            e,
        )
        return None
    state = frozenset(_ids(answer, "pdu_ids"))
    join_state = (
        state,
        state | frozenset(_ids(answer, "auth_chain_ids")),
        await _partial_state_at_join(seams, room_id, join_event_id),
    )
    _JOIN_STATE.clear()  # one room at a time: the memory of one state list
    _JOIN_STATE[room_id] = (join_event_id, join_state)
    return join_state


async def _partial_state_at_join(
    seams: _Seams, room_id: str, join_event_id: str
) -> frozenset[str] | None:
    """The state events the partial state at the join holds: the join's state
    group while the join is partial (its auth events too: the joining user's
    earlier membership, which the join replaced), and the current membership
    of this server's users in the room (an invite received before the join).
    None once the join has full state (its group is then the whole state)."""
    store = seams.store
    try:
        if not await store.is_partial_state_event(join_event_id):
            return None
        state = await seams.hs.get_storage_controllers().state.get_state_ids_for_event(
            join_event_id, await_full_state=False
        )
        join = await store.get_event(join_event_id, allow_none=True)
        local = await store.db_pool.simple_select_onecol(
            table="local_current_membership",
            keyvalues={"room_id": room_id},
            retcol="event_id",
            desc="sps_backfill_local_members",
        )
    except Exception as e:  # keep the answer's stored events, as before
        logger.info(
            "Backfill of partial-state room %s: the partial state at the join "
            "could not be read (%s): keeping the state events stored here",
            room_id,
            e,
        )
        return None
    held = set(state.values()) | set(local)
    if join is not None:
        held.update(join.auth_event_ids())
    return frozenset(held)


def _wrap_get_room_state_ids(native: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(native)
    async def get_room_state_ids(
        self: Any, destination: str, room_id: str, event_id: str
    ) -> Any:
        answer = await native(self, destination, room_id, event_id=event_id)
        narrowing = _NARROWING.get()
        if narrowing is None or narrowing.room_id != room_id:
            return answer
        if not isinstance(answer, dict):
            return answer  # Synapse's own parsing says what is wrong
        join_state = await narrowing.state_before_join()
        if join_state is None:
            return answer  # Synapse fetches the state at the event, as stock
        seams = _SEAMS[0]
        if join_state[2] is None:
            listed = _ids(answer, "pdu_ids") + _ids(answer, "auth_chain_ids")
            seen = await have_seen(seams.store, room_id, listed + [event_id])
            narrowed = narrow(answer, seen, join_state)
        else:
            # Only what is kept is looked up (Synapse's have_seen_events of a
            # whole big state took 2.3 s of the reactor in a 100,000-member
            # run, and filled its cache with every ID).
            narrowed = narrow(answer, set(), join_state)
            kept = _ids(narrowed, "pdu_ids") + _ids(narrowed, "auth_chain_ids")
            seen = await have_seen(seams.store, room_id, kept + [event_id])
        # Fetched here, not by Synapse: it would count them against the narrowed
        # answer and, past 10 %, download the whole state at the event instead.
        # The event itself too: Synapse stores it as an outlier with the state.
        wanted = narrowed["pdu_ids"] + narrowed["auth_chain_ids"] + [event_id]
        missing = [e for e in dict.fromkeys(wanted) if e not in seen]
        if missing:
            await seams.events.fetch_and_persist(destination, room_id, missing)
        narrowing.narrowed = True
        logger.info(
            "Backfill of partial-state room %s: state at %s narrowed to %d of %d "
            "state events, %d fetched (the rest: remote members, completed by the "
            "resync)",
            room_id,
            event_id,
            len(narrowed["pdu_ids"]),
            len(_ids(answer, "pdu_ids")),
            len(missing),
        )
        return narrowed

    return get_room_state_ids


def _wrap_process_pulled_event(native: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(native)
    async def _process_pulled_event(
        self: Any, origin: str, event: Any, *a: Any, **kw: Any
    ) -> Any:
        """Every pulled event of a partial-state room (backfilled, or fetched
        by ``get_missing_events`` to fill a gap before a received event) is
        processed within :func:`backfilling`: the state at it, when its prev
        events are not here, is narrowed to a partial state (see the module
        docstring) instead of downloaded whole alongside the resync."""
        room_id = event.room_id
        if room_id in _BACKFILLING.get() or not (
            await self._store.is_partial_state_room(room_id)
        ):
            return await native(self, origin, event, *a, **kw)
        with backfilling(room_id):
            return await native(self, origin, event, *a, **kw)

    return _process_pulled_event


def _wrap_hosts_ordered(native: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(native)
    async def get_current_hosts_in_room_ordered(self: Any, room_id: str) -> Any:
        """The servers to backfill from during the resync: the one joined via,
        the others in the room at the join (``/send_join``'s list), then those
        of the members known so far (stock's list, which waits for full state
        and, read from the partial state, may lack the resident)."""
        if room_id not in _BACKFILLING.get() or not _SEAMS:
            return await native(self, room_id)
        store: Any = _SEAMS[0].store
        if not await store.is_partial_state_room(room_id):
            return await native(self, room_id)
        joined_via = await store.db_pool.simple_select_one_onecol(
            table="partial_state_rooms",
            keyvalues={"room_id": room_id},
            retcol="joined_via",
            allow_none=True,
            desc="sps_backfill_joined_via",
        )
        at_join = await store.get_partial_state_servers_at_join(room_id) or ()
        known = await store.get_current_hosts_in_room_ordered(room_id)
        hosts = [joined_via] if joined_via else []
        hosts += sorted(at_join) + list(known)
        return tuple(dict.fromkeys(hosts))

    return get_current_hosts_in_room_ordered


#: Set by :func:`install_backfill`; read by the class-level wrappers.
_SEAMS: list[_Seams] = []


def install_backfill(hs: Any) -> None:
    """The class-level wrappers of the module docstring, each installed once."""
    from synapse.federation.transport.client import TransportLayerClient
    from synapse.handlers.federation_event import FederationEventHandler
    from synapse.storage.controllers.state import StateStorageController

    _SEAMS[:] = [_Seams(hs)]
    for owner, name, wrap, why in (
        (
            FederationEventHandler,
            "_compute_event_context_with_maybe_missing_prevs",
            _wrap_compute_context,
            "backfill during a resync: the state before the oldest backfilled "
            "event as a partial state (no remote member downloaded), marked "
            "partial so that the resync completes it",
        ),
        (
            FederationEventHandler,
            "_process_pulled_event",
            _wrap_process_pulled_event,
            "a pulled event (backfill, get_missing_events) during a resync: the "
            "state before it narrowed as in a backfill, not downloaded whole "
            "alongside the resync",
        ),
        (
            StateStorageController,
            "get_current_hosts_in_room_ordered",
            _wrap_hosts_ordered,
            "backfill during a resync: the servers to ask, from the join (stock's "
            "list waits for full state)",
        ),
        (
            TransportLayerClient,
            "get_room_state_ids",
            _wrap_get_room_state_ids,
            "backfill during a resync: leave out of /state_ids at a pre-join "
            "event the remote members this server does not have",
        ),
    ):
        target = f"{owner.__module__}.{owner.__name__}.{name}"
        wrap_instance_method(owner, name, wrap, target, why, kind="wrap")
