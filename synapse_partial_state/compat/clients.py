"""What the client endpoint and the members policy read (:class:`ClientOps`): a
room's partial-state flag, a user's joined rooms, the room's member summary (each
from Synapse's caches) and whether the room is encrypted.

Works on every process that serves the client API (main or workers): these
caches are invalidated over replication. Checked against 1.163.2.
"""

from __future__ import annotations

from typing import Any

import attr
from synapse.api.constants import EventTypes, Membership
from synapse.api.errors import StoreError
from synapse.module_api import ModuleApi
from synapse.types.state import StateFilter

from synapse_partial_state.clients.summary import (
    JoinSummaries,
    ResidentSummary,
    for_user,
)
from synapse_partial_state.compat.patching import homeserver, main_store
from synapse_partial_state.compat.send_join import get_room_summary, heroes_from_summary


@attr.s(frozen=True, auto_attribs=True, slots=True)
class MemberSummary:
    """A room's summary as Synapse computes it for ``/sync`` (from the current
    state this server has: while the room is partial, the members known so far)."""

    heroes: tuple[str, ...]
    joined_member_count: int
    invited_member_count: int


class ClientOps:
    """Synapse's room facts, for the client endpoint."""

    def __init__(self, api: ModuleApi, summaries: JoinSummaries | None = None) -> None:
        self._hs = homeserver(api)
        # Any: mypy without Synapse's own plugin mis-types @cached methods.
        self._store: Any = main_store(api)
        self._api = api
        self._summaries = summaries

    async def is_joined(self, user_id: str, room_id: str) -> bool:
        """Whether the local ``user_id`` is joined to ``room_id`` (Synapse's cached
        ``get_rooms_for_user``; false for a room this server does not know)."""
        return room_id in await self._store.get_rooms_for_user(user_id)

    async def is_partial_state(self, room_id: str) -> bool:
        """Synapse's cached ``is_partial_state_room``."""
        return bool(await self._store.is_partial_state_room(room_id))

    async def is_encrypted(self, room_id: str) -> bool:
        """Whether the room's current state has an ``m.room.encryption`` event (a
        non-member state event: present in partial state, read without waiting)."""
        state_ids = (
            await self._hs.get_storage_controllers().state.get_current_state_ids(
                room_id,
                state_filter=StateFilter.from_types([(EventTypes.RoomEncryption, "")]),
                await_full_state=False,
            )
        )
        return bool(state_ids)

    async def member_summary(self, room_id: str, user_id: str) -> MemberSummary:
        """The room's heroes (for ``user_id``) and member counts: while the room
        is partial, the resident's from the partial join's ``/send_join`` if it
        gave one (:mod:`..clients.summary`), else Synapse's from the members
        known so far."""
        resident = await self._resident_summary(room_id)
        if resident is not None:
            mine = for_user(resident, user_id)
            return MemberSummary(
                heroes=mine.heroes,
                joined_member_count=mine.joined_member_count,
                invited_member_count=mine.invited_member_count,
            )
        summary = await get_room_summary(self._api, room_id)
        joined = summary.get(Membership.JOIN)
        invited = summary.get(Membership.INVITE)
        return MemberSummary(
            heroes=tuple(heroes_from_summary(summary, user_id)),
            joined_member_count=joined.count if joined else 0,
            invited_member_count=invited.count if invited else 0,
        )

    async def _resident_summary(self, room_id: str) -> ResidentSummary | None:
        """The resident's summary for the room's current partial join, if any."""
        if self._summaries is None or not await self.is_partial_state(room_id):
            return None
        try:
            (
                join_event_id,
                _,
            ) = await self._store.get_join_event_id_and_device_lists_stream_id_for_partial_state(
                room_id
            )
        except StoreError:  # completed meanwhile
            return None
        return await self._summaries.get(room_id, join_event_id)

    def now_ms(self) -> int:
        """Synapse's clock, in milliseconds (the job rows' time base)."""
        return self._hs.get_clock().time_msec()
