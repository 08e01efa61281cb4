"""Presence during a resync (synapse#13008).

Synapse routes a remote user's presence to the local users it shares a room
with, by the rooms' current state. While a room is partial that state lacks
most members, so the presence of the room's remote members reaches nobody
(Synapse stores it and drops it on the floor). The module, as a presence router
(Synapse's public presence-router callbacks), routes the presence of a remote
user no room shows us sharing, sent by a server of a partial room, to that
room's local members, and lets them see it in ``/sync`` until the room is
complete (then Synapse's own routing, by the full state, takes over). The
pairs (room, user) are kept in a table, so that every process serving
``/sync`` sees them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from synapse_partial_state.compat.device_lists import DeviceListOps
from synapse_partial_state.device_lists.store import DeviceListStore

logger = logging.getLogger(__name__)


class PresenceDuringResync:
    def __init__(self, ops: DeviceListOps, store: DeviceListStore) -> None:
        self._ops = ops
        self._store = store

    async def get_users_for_states(self, states: Iterable[Any]) -> dict[str, set[Any]]:
        """Presence-router callback: extra local recipients of ``states``."""
        partial = await self._ops.partial_rooms()
        if not partial:
            return {}
        routed: dict[str, set[Any]] = {}
        pairs: set[tuple[str, str]] = set()
        for state in states:
            user_id = state.user_id
            if self._ops.is_mine(user_id) or await self._ops.shares_room(user_id):
                continue
            server = user_id.split(":", 1)[1]
            for room_id in partial:
                if server not in await self._ops.hosts_of_partial_room(room_id):
                    continue
                pairs.add((room_id, user_id))
                for local in await self._ops.local_users_in_room(room_id):
                    routed.setdefault(local, set()).add(state)
        if pairs:
            await self._store.add_presence_interest(pairs)
        return routed

    async def get_interested_users(self, user_id: str) -> set[str]:
        """Presence-router callback: remote users whose presence ``user_id``
        sees besides those it shares a room with."""
        partial = await self._ops.partial_rooms()
        if not partial:
            return set()
        rooms = partial & await self._ops.rooms_of(user_id)
        if not rooms:
            return set()
        return await self._store.presence_interest(rooms)

    async def forget(self, room_id: str) -> None:
        """The room is complete or given up: Synapse's own routing applies."""
        await self._store.forget_presence_interest(room_id)
