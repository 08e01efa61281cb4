"""Reads that answer from a room's partial state instead of waiting for full state:
``/members`` and ``/joined_members`` (by policy: :mod:`..clients.members`) and the
children of a space in ``/hierarchy`` (always).

Synapse (1.163.2) makes these wait in one place:
``PartialCurrentStateTracker.await_full_state(room_id)``, which the state storage
controller calls before reading member state of a partial-state room
(``get_current_state_ids`` with a filter wanting remote members, or all state;
``get_users_in_room_with_profiles``). The module wraps it to return at once for
the rooms of a *scope* (a context variable: it follows the request's coroutine,
never another request), and opens a scope around:

* ``RoomMemberListRestServlet.on_GET`` and ``JoinedRoomMemberListRestServlet.on_GET``
  when the policy says so (never with an ``at`` token: state at an event waits on
  the event's own tracker, untouched), then marks the 200 answer; Synapse's own
  handler builds it, with its own access rules;
* ``RoomSummaryHandler._get_child_events``: it reads the room's whole current
  state only to keep the ``m.space.child`` events, which (non-member state) the
  partial state holds in full. The access checks around it (join rules, history
  visibility, the requester's own membership) read no remote member, so do not
  wait anyway.

History (``/messages``, ``/context``, ``/event``) of a partial-state room does not
wait either. For a local requester, what the visibility filter
(``filter_events_for_client``) reads at each event is exact in the partial state:
the event's ``m.room.history_visibility`` (non-member state, which the partial
state holds in full) and the requester's own ``m.room.member`` (a local member:
the joining server knows all of its own members; Synapse itself does not wait
for either, ``StateFilter.must_await_full_state``; a call invite adds the join
rules, non-member state too). The resync only adds remote members to the state
at the room's events, none of which the filter reads for a local user, so which
events the user sees is the same during the resync and after it. The module
reads nothing new: it only skips the waits below. What waited in stock is:

* ``/context``: the room state it returns, read at the last event with
  ``StateFilter.all()`` through ``PartialStateEventsTracker.await_full_state``.
  Within a scope opened around ``RoomEventContextServlet.on_GET`` that wait is
  skipped for the room's events: the answer carries the state known so far (all
  non-member state, the members known so far), marked syncing;
* ``/messages``: the foreground backfill (``FederationHandler.maybe_backfill``
  checks its extremities with ``filter_events_for_server``, which reads every
  member at them, and picks servers from the room's current hosts). Within a
  scope opened around ``PaginationHandler.get_messages``, these read the
  partial state (the check, for this server, reads only its own members, all
  known), and the backfill runs in the foreground from the resident, with the
  state it fetches narrowed to a partial state (:mod:`.backfill`): the
  visibility of each backfilled event for a local user is then what it will be
  after the resync. Lazy-loaded members come from the partial state.

``/event`` did not wait in stock (its filter reads only the above).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Collection, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import attr

from synapse_partial_state.compat.backfill import backfilling
from synapse_partial_state.compat.history_budget import (
    FOREGROUND_BACKFILL_BUDGET_S,
    backfill_within_budget,
    page_within_budget,
)
from synapse_partial_state.compat.patching import wrap_instance_method
from synapse_partial_state.wire import SYNCING_FIELD

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest

#: room ID -> whether a members request answers from partial state.
AnswersAtOnce = Callable[[str], Awaitable[bool]]
#: (200 answer, room ID) -> None: marks the answer.
MarkMembers = Callable[[dict[str, Any], str], Awaitable[None]]

#: Rooms whose partial state the current request reads without waiting.
_PARTIAL_READS: ContextVar[frozenset[str]] = ContextVar(
    "sps_partial_reads", default=frozenset()
)


@attr.s(auto_attribs=True, slots=True)
class _MembersPolicy:
    answers_at_once: AnswersAtOnce
    mark: MarkMembers
    #: ``clients.history_wait_seconds`` (see :mod:`.history_budget`)
    history_wait_s: float = FOREGROUND_BACKFILL_BUDGET_S


#: Set by :func:`install_partial_reads`; read by the class-level wrappers.
_POLICY: list[_MembersPolicy] = []


@contextmanager
def reading_partial_state(room_id: str) -> Iterator[None]:
    """Within the block (and what it awaits), ``room_id``'s current state is
    read as it is, partial or not."""
    previous = _PARTIAL_READS.get()
    _PARTIAL_READS.set(previous | {room_id})
    try:
        yield
    finally:
        # set, not reset: the coroutine may resume in a copy of the context.
        _PARTIAL_READS.set(previous)


def _wrap_await_full_state(native: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(native)
    async def await_full_state(self: Any, room_id: str) -> None:
        if room_id in _PARTIAL_READS.get():
            return
        await native(self, room_id)

    return await_full_state


def _wrap_await_events_state(native: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(native)  # keeps @cancellable's flag
    async def await_full_state(self: Any, event_ids: Collection[str]) -> None:
        """Wait for the full state at the events outside the scope's rooms
        (events the store does not know: wait, as stock)."""
        scope = _PARTIAL_READS.get()
        if scope:
            events = await self._store.get_events(event_ids, allow_rejected=True)
            event_ids = [
                e
                for e in event_ids
                if e not in events or events[e].room_id not in scope
            ]
        if event_ids:
            await native(self, event_ids)

    return await_full_state


def _wrap_get_messages(native: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(native)
    async def get_messages(
        self: Any, requester: Any, room_id: str, *a: Any, **kw: Any
    ) -> Any:
        """/messages (also the admin API's) of a partial-state room within a
        scope: its lazy-loaded members as known so far, its backfill deferred."""
        if not await self.store.is_partial_state_room(room_id):
            return await native(self, requester, room_id, *a, **kw)

        async def page() -> Any:
            with reading_partial_state(room_id):
                return await native(self, requester, room_id, *a, **kw)

        wait_s = _POLICY[0].history_wait_s if _POLICY else None
        return await page_within_budget(page, wait_s)

    return get_messages


def _wrap_maybe_backfill(native: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(native)
    async def maybe_backfill(self: Any, room_id: str, *a: Any, **kw: Any) -> bool:
        """Within a /messages scope of a partial-state room: stock's backfill,
        in the foreground, from the resident, during the resync (stock waits
        for its end): its extremity checks read the partial state (for this
        server, only its own members: all known) and the state it fetches is
        narrowed to a partial state (:mod:`.backfill`)."""
        if room_id not in _PARTIAL_READS.get() or not (
            await self.store.is_partial_state_room(room_id)
        ):
            return await native(self, room_id, *a, **kw)
        with backfilling(room_id):
            # Created here: the backfill keeps this scope wherever it runs.
            return await backfill_within_budget(
                self, room_id, lambda: native(self, room_id, *a, **kw)
            )

    return maybe_backfill


def _wrap_context_on_get(native: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(native)  # keeps @cancellable's flag
    async def on_GET(
        self: Any, request: SynapseRequest, room_id: str, event_id: str
    ) -> tuple[int, Any]:
        """/context of a partial-state room: its events exactly as after the
        resync, its ``state`` the state known so far, marked syncing."""
        store = self._hs.get_datastores().main
        if not await store.is_partial_state_room(room_id):
            return await native(self, request, room_id, event_id)
        with reading_partial_state(room_id):
            code, body = await native(self, request, room_id, event_id)
        if code == 200 and isinstance(body, dict):
            body[SYNCING_FIELD] = True  # its "state": the state known so far
        return code, body

    return on_GET


def _wrap_members_on_get(native: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(native)  # keeps @cancellable's flag
    async def on_GET(
        self: Any, request: SynapseRequest, room_id: str
    ) -> tuple[int, Any]:
        policy = _POLICY[0] if _POLICY else None
        if (
            policy is None
            or b"at" in (request.args or {})
            or not await policy.answers_at_once(room_id)
        ):
            return await native(self, request, room_id)
        with reading_partial_state(room_id):
            code, body = await native(self, request, room_id)
        if code == 200 and isinstance(body, dict):
            await policy.mark(body, room_id)
        return code, body

    return on_GET


def _wrap_get_child_events(native: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(native)
    async def _get_child_events(self: Any, room_id: str) -> Any:
        with reading_partial_state(room_id):
            return await native(self, room_id)

    return _get_child_events


def install_partial_reads(
    answers_at_once: AnswersAtOnce,
    mark: MarkMembers,
    history_wait_s: float = FOREGROUND_BACKFILL_BUDGET_S,
) -> None:
    """The wrappers of the module docstring, each installed once; installing
    again replaces the members policy and the history wait."""
    _POLICY[:] = [_MembersPolicy(answers_at_once, mark, history_wait_s)]
    for owner, name, wrap, why in _wrappers():
        target = f"{owner.__module__}.{owner.__name__}.{name}"
        wrap_instance_method(owner, name, wrap, target, why, kind="wrap")


def _wrappers() -> list[tuple[type, str, Callable[..., Any], str]]:
    """(class, method, wrapper factory, why) of every wrapper."""
    from synapse.handlers.federation import FederationHandler
    from synapse.handlers.pagination import PaginationHandler
    from synapse.handlers.room_summary import RoomSummaryHandler
    from synapse.rest.client.room import (
        JoinedRoomMemberListRestServlet,
        RoomEventContextServlet,
        RoomMemberListRestServlet,
    )
    from synapse.storage.util.partial_state_events_tracker import (
        PartialCurrentStateTracker,
        PartialStateEventsTracker,
    )

    members_why = (
        "clients.members_during_resync: partial: answer from the members known "
        "so far in an unencrypted partial-state room, marked syncing"
    )
    return [
        (
            PartialCurrentStateTracker,
            "await_full_state",
            _wrap_await_full_state,
            "do not wait for full state within a partial-read scope",
        ),
        (
            PartialStateEventsTracker,
            "await_full_state",
            _wrap_await_events_state,
            "do not wait for the full state at the scope's rooms' events",
        ),
        (
            PaginationHandler,
            "get_messages",
            _wrap_get_messages,
            "/messages: history of a partial-state room without waiting",
        ),
        (
            FederationHandler,
            "maybe_backfill",
            _wrap_maybe_backfill,
            "/messages: backfill of a partial-state room from the resident "
            "during the resync, instead of waiting for its end",
        ),
        (
            RoomEventContextServlet,
            "on_GET",
            _wrap_context_on_get,
            "/context: answer from the partial state, marked syncing",
        ),
        (RoomMemberListRestServlet, "on_GET", _wrap_members_on_get, members_why),
        (
            JoinedRoomMemberListRestServlet,
            "on_GET",
            _wrap_members_on_get,
            members_why,
        ),
        (
            RoomSummaryHandler,
            "_get_child_events",
            _wrap_get_child_events,
            "/hierarchy: a space's children from its partial state (non-member "
            "state, complete) instead of waiting for full state",
        ),
    ]
