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

Everything else (sends, /state, /sync's eager path, ...) waits as stock.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import attr

from synapse_partial_state.compat.patching import wrap_instance_method

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


def install_partial_reads(answers_at_once: AnswersAtOnce, mark: MarkMembers) -> None:
    """The wrappers of the module docstring, each installed once; installing
    again replaces the members policy."""
    _POLICY[:] = [_MembersPolicy(answers_at_once, mark)]
    for owner, name, wrap, why in _wrappers():
        target = f"{owner.__module__}.{owner.__name__}.{name}"
        wrap_instance_method(owner, name, wrap, target, why, kind="wrap")


def _wrappers() -> list[tuple[type, str, Callable[..., Any], str]]:
    """(class, method, wrapper factory, why) of every wrapper."""
    from synapse.handlers.room_summary import RoomSummaryHandler
    from synapse.rest.client.room import (
        JoinedRoomMemberListRestServlet,
        RoomMemberListRestServlet,
    )
    from synapse.storage.util.partial_state_events_tracker import (
        PartialCurrentStateTracker,
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
