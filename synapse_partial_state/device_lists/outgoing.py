"""The outgoing queue: local device-list changes made while a room is partial.

While a room is partial Synapse sends each local device-list change to an
approximation of the room's servers (the servers named at the join and those of
the partial state). Each change (user, device, Synapse's device-list stream id)
is queued durably for the room with the servers it reached. When the full
state is stored (just before the partial flag is cleared) the queue is replayed
to every server the full state shows in the room during the resync that has not
had the change, once per (destination, stream id): a server that already has a
later poke of the device is skipped, so that a restart in the middle of a
replay sends nothing twice. After completion Synapse's own live path sends to
the full state's servers only.

When the room is given up instead (the last local user left, an admin abort),
its queued changes go to the servers of the other rooms the user shares that
have not had them (synapse#13894: a server that missed a change because it was
absent from the partial state, and shares another room with the user, would
keep a stale device list), then the queue is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from synapse_partial_state.compat.device_lists import DeviceListOps
from synapse_partial_state.device_lists.metrics import DeviceListMetrics
from synapse_partial_state.device_lists.plan import replay_targets
from synapse_partial_state.device_lists.store import DeviceListStore, QueuedChange

logger = logging.getLogger(__name__)


class OutgoingQueue:
    def __init__(
        self, ops: DeviceListOps, store: DeviceListStore, metrics: DeviceListMetrics
    ) -> None:
        self._ops = ops
        self._store = store
        self._metrics = metrics

    async def on_pokes(
        self,
        user_id: str,
        device_id: str,
        room_id: str,
        stream_id: int,
        hosts: Collection[str],
    ) -> None:
        """Synapse is about to send a local change to ``hosts`` for ``room_id``."""
        if not self._ops.is_mine(user_id):
            return
        if not await self._ops.is_partial_state_room(room_id):
            return
        await self._store.queue_outbound(
            room_id, user_id, device_id, stream_id, hosts, self._ops.now_ms()
        )
        self._metrics.queued("outgoing")
        logger.debug(
            "Queued device-list change %s/%s (%d) in partial room %s; reached %s",
            user_id,
            device_id,
            stream_id,
            room_id,
            sorted(hosts),
        )

    async def replay(self, room_id: str) -> None:
        """The room's full state is stored: send each queued change to the
        servers of the room that have not had it."""
        changes = await self._store.outbound_for_room(room_id)
        if not changes:
            logger.info("No queued device-list change to replay for %s", room_id)
            return
        candidates = await self._ops.hosts_of_room_during_resync(room_id)
        sent = await self._send(changes, lambda _c: candidates)
        logger.info(
            "Replayed %d queued device-list change(s) of %s: %d update(s) to "
            "servers that had not had them",
            len(changes),
            room_id,
            sent,
        )

    async def on_room_abandoned(self, room_id: str) -> None:
        """The room was given up before completion (see the module docstring)."""
        changes = await self._store.outbound_for_room(room_id)
        if not changes:
            return
        others: dict[str, set[str]] = {}
        for change in changes:
            if change.user_id not in others:
                others[change.user_id] = await self._ops.hosts_sharing_other_rooms(
                    change.user_id, room_id
                )
        sent = await self._send(changes, lambda c: others[c.user_id])
        logger.info(
            "Resync of %s given up: %d queued device-list change(s) sent to %d "
            "server(s) of other shared rooms that had not had them; queue dropped",
            room_id,
            len(changes),
            sent,
        )

    async def flush_stale(self) -> None:
        """At start-up: rooms with queued changes that are no longer partial
        (see :meth:`flush_room`)."""
        for room_id in await self._store.outbound_rooms():
            await self.flush_room(room_id)

    async def flush_room(self, room_id: str) -> None:
        """Changes queued for a room that is no longer partial: made between the
        replay and the clearing of the flag (Synapse sent them to the room's
        full-state servers already, its current state being whole by then), or
        left by a crash. Each goes to the servers of the user's rooms (this one
        included, if still joined) that have not had it."""
        if await self._ops.is_partial_state_room(room_id):
            return
        changes = await self._store.outbound_for_room(room_id)
        if not changes:
            return
        hosts: dict[str, set[str]] = {}
        for change in changes:
            if change.user_id not in hosts:
                hosts[change.user_id] = await self._ops.hosts_sharing_other_rooms(
                    change.user_id, ""
                )
        sent = await self._send(changes, lambda c: hosts[c.user_id])
        logger.info(
            "%d device-list change(s) left queued for %s (no longer partial): "
            "%d update(s) sent",
            len(changes),
            room_id,
            sent,
        )

    async def queued(self) -> dict[str, tuple[int, int | None]]:
        """room -> (changes queued, oldest queued_ts)."""
        return await self._store.outbound_rooms()

    async def _send(
        self,
        changes: list[QueuedChange],
        candidates_of: Callable[[QueuedChange], Collection[str]],
    ) -> int:
        sent = 0
        for change in changes:
            candidates: Collection[str] = candidates_of(change)
            later = await self._ops.hosts_with_later_poke(
                change.user_id,
                change.device_id,
                change.stream_id,
                set(candidates) - change.reached,
            )
            targets = replay_targets(
                candidates, change.reached, later, self._ops.server_name
            )
            if targets:
                await self._ops.add_pokes(
                    change.user_id, change.device_id, change.room_id, targets
                )
                sent += len(targets)
                self._metrics.replayed("outgoing", len(targets))
            await self._store.delete_outbound(change)
        return sent
