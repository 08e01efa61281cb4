"""What a ``/state`` or ``/state_ids`` answer is made of, and how it is assembled.

Pure: state maps and encoded events in, the pieces of the body out, in blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import attr
from synapse.api.constants import EventTypes

from synapse_partial_state.wire import MEMBERS_ONLY_PARAM

if TYPE_CHECKING:
    from synapse.types import StateMap

    from synapse_partial_state.compat.resident_state import StateAdjustment

#: Bytes written to the connection per producer step. Twisted pauses the producer
#: once a write leaves more than 64 KiB buffered, and resumes it on a later turn
#: of the reactor: blocks of 64 KiB made a 66 MiB ``/state`` take ~1,000 turns,
#: each behind whatever else the reactor had to do (at 100,000 members, the
#: fan-out of the joiner's own join to 2,000 servers: 3.4 s for an answer that
#: takes 0.2 s otherwise).
WRITE_BLOCK = 1024 * 1024
#: Approximate memory of one event ID held in a cached entry (str + slot).
ID_COST = 110
#: Approximate overhead of one cached encoded event besides its bytes.
EVENT_OVERHEAD = 160


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
    #: How the state differs from its group's (:func:`state_before`).
    adjustment: StateAdjustment = None

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
    state: StateMap[str], adjustment: StateAdjustment, event_id: str
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


def group_state_of(
    ids: Sequence[str],
    member_ids: Sequence[str],
    adjustment: StateAdjustment,
    group_at_keys: dict[tuple[str, str], str],
) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(all, member) IDs of the group an adjusted state came from: the
    adjustment undone (:func:`state_before` took the group's event at its key out
    and put back the one it replaced). ``group_at_keys`` holds the group's event
    at the adjusted key; None without it."""
    if adjustment is None:
        return tuple(ids), tuple(member_ids)
    key, replaced = adjustment
    event_id = group_at_keys.get(key)
    if event_id is None:
        return None
    is_member = key[0] == EventTypes.Member
    all_ids = [e for e in ids if e != replaced] + [event_id]
    members = (
        [e for e in member_ids if e != replaced] if is_member else list(member_ids)
    )
    if is_member:
        members.append(event_id)
    return tuple(all_ids), tuple(members)


def state_by_delta(
    base_ids: Sequence[str],
    base_member_ids: Sequence[str],
    replaced_at_keys: dict[tuple[str, str], str],
    delta: dict[tuple[str, str], str],
    adjustment: StateAdjustment,
    event_id: str,
) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(all, ``m.room.member``) event IDs before ``event_id``, from a close state.

    The state group stored for ``event_id`` is ``base``'s group with ``delta``
    applied (Synapse's ``state_group_edges``: the new group's rows are the keys
    that changed); ``replaced_at_keys`` is the base group's state at those keys.
    Then the adjustment as in :func:`state_before`. None when the answer needs the
    whole group (the adjusted key is not in the delta, so its event is unknown
    here): the caller loads it."""
    removed: set[str] = set()
    added: list[str] = []
    added_members: list[str] = []
    for key, new in delta.items():
        old = replaced_at_keys.get(key)
        if old == new:
            continue  # the delta repeats the base's event there
        if old is not None:
            removed.add(old)
        added.append(new)
        if key[0] == EventTypes.Member:
            added_members.append(new)
    if adjustment is not None:
        key, replaced = adjustment
        if delta.get(key) != event_id:
            return None
        if replaced_at_keys.get(key) == event_id:
            return None  # not a change: the group's event there is the base's
        removed.add(event_id)
        added.remove(event_id)
        if key[0] == EventTypes.Member:
            added_members.remove(event_id)
        if replaced is not None:
            added.append(replaced)
            if key[0] == EventTypes.Member:
                added_members.append(replaced)
    all_ids = tuple([e for e in base_ids if e not in removed] + added)
    members = tuple([e for e in base_member_ids if e not in removed] + added_members)
    return all_ids, members


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
        b'],"' + MEMBERS_ONLY_PARAM.encode() + b'":true}' if members_only else b"]}"
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


def slices(data: bytes, size: int = WRITE_BLOCK) -> Iterator[bytes]:
    """``data`` in pieces of ``size`` bytes."""
    for start in range(0, len(data), size):
        yield data[start : start + size]
