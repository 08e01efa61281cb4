"""The incoming queue: remote device-list and signing-key updates received
while a room is partial, for users whose membership is not known yet.

Synapse drops such an update when no room's current state shows us sharing a
room with its user, which during a resync is only the partial state: the user
may well be in the room. While any room is partial, the module keeps each such
EDU whole, durably, in arrival order. When a room's full state is stored (just
before its partial flag is cleared) the queued EDUs of users that now share a
room are handed to Synapse's own handlers as if they had just arrived (a
device-list update whose ``prev_id`` Synapse does not know makes it refetch
the user's devices), and local users are told of the change; when no partial
room is left, the EDUs of users who share no room are dropped and those users'
device lists are no longer tracked.

At completion, remote users whose membership differs between the state at the
join and the full state (joined or left during the resync, or wrongly
believed to be in the room: synapse#13887) have their cached device lists
marked stale and refetched, and users no room shows us sharing any more are no
longer tracked. When a room is given up, the queue is applied in the same way
(Synapse itself stops tracking the room's members when the last local user
leaves it).
"""

from __future__ import annotations

import logging
from typing import Any

from synapse_partial_state.compat.device_lists import DeviceListOps
from synapse_partial_state.device_lists.metrics import DeviceListMetrics
from synapse_partial_state.device_lists.store import DeviceListStore, QueuedEdu

logger = logging.getLogger(__name__)


class IncomingQueue:
    def __init__(
        self, ops: DeviceListOps, store: DeviceListStore, metrics: DeviceListMetrics
    ) -> None:
        self._ops = ops
        self._store = store
        self._metrics = metrics

    async def on_edu(self, edu_type: str, origin: str, content: dict[str, Any]) -> None:
        """A device-list or signing-key EDU, before Synapse handles it."""
        user_id = content.get("user_id")
        if not isinstance(user_id, str) or ":" not in user_id:
            return
        if user_id.split(":", 1)[1] != origin or self._ops.is_mine(user_id):
            return  # Synapse refuses it
        if not await self._ops.partial_rooms():
            return
        if await self._ops.shares_room(user_id):
            return  # Synapse handles it now
        await self._store.queue_inbound(
            user_id, edu_type, origin, content, self._ops.now_ms()
        )
        self._metrics.queued("incoming")
        logger.info(
            "Queued %s for %s during a resync (membership not known yet)",
            edu_type,
            user_id,
        )

    async def replay(self, room_id: str) -> None:
        """The room's full state is stored (its flag not cleared yet)."""
        changed = await self._ops.members_changed_during_resync(room_id)
        await self._ops.mark_stale(changed)
        await self._ops.untrack_if_sharing_no_room(changed)
        await self._apply(others_partial=await self._others_partial(room_id))

    async def on_room_abandoned(self, room_id: str) -> None:
        """The room was given up and purged."""
        await self._apply(others_partial=await self._others_partial(room_id))

    async def queued(self) -> int:
        return len(await self._store.inbound())

    async def _others_partial(self, room_id: str) -> bool:
        return bool(await self._ops.partial_rooms() - {room_id})

    async def _apply(self, others_partial: bool) -> None:
        by_user: dict[str, list[QueuedEdu]] = {}
        for edu in await self._store.inbound():
            by_user.setdefault(edu.user_id, []).append(edu)
        applied = dropped = 0
        for user_id, edus in by_user.items():
            if await self._ops.shares_room(user_id):
                for edu in edus:
                    await self._ops.refeed(edu.edu_type, edu.origin, edu.content)
                applied += len(edus)
                self._metrics.replayed("incoming", len(edus))
            elif others_partial:
                continue  # perhaps in another partial room: keep
            else:
                await self._ops.untrack_if_sharing_no_room([user_id])
                dropped += len(edus)
            await self._store.delete_inbound_user(user_id, edus[-1].seq)
        if applied or dropped:
            logger.info(
                "Queued device-list updates: %d applied, %d dropped (no shared room)",
                applied,
                dropped,
            )
