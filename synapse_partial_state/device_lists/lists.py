"""The device-list queues of one process, wired to Synapse by the module."""

from __future__ import annotations

import logging

from synapse.module_api import ModuleApi

from synapse_partial_state.compat.device_lists import (
    DeviceListOps,
    install_incoming_observer,
    install_left_users,
    install_outgoing_observer,
    install_replay_hook,
)
from synapse_partial_state.device_lists.incoming import IncomingQueue
from synapse_partial_state.device_lists.metrics import DeviceListMetrics
from synapse_partial_state.device_lists.outgoing import OutgoingQueue
from synapse_partial_state.device_lists.presence import PresenceDuringResync
from synapse_partial_state.device_lists.store import DeviceListStore

logger = logging.getLogger(__name__)

#: After a room's replay, when to look for changes queued before its flag was
#: cleared (the clearing follows the replay at once).
FLUSH_AFTER_MS = 5000


class DeviceLists:
    """Installs the queues on a device-list writer (None elsewhere: see
    :meth:`install`)."""

    def __init__(self, api: ModuleApi) -> None:
        self._api = api
        self.ops = DeviceListOps(api)
        self.store = DeviceListStore(api)
        self.metrics = DeviceListMetrics(api.server_name)
        self.outgoing = OutgoingQueue(self.ops, self.store, self.metrics)
        self.incoming = IncomingQueue(self.ops, self.store, self.metrics)
        self.presence = PresenceDuringResync(self.ops, self.store)

    @classmethod
    def install(cls, api: ModuleApi) -> DeviceLists | None:
        """Presence routing on every process; the queues on the process that
        writes device lists (the main process unless
        ``stream_writers.device_lists`` names workers), else None."""
        lists = cls(api)
        api.register_presence_router_callbacks(
            get_users_for_states=lists.presence.get_users_for_states,
            get_interested_users=lists.presence.get_interested_users,
        )
        install_left_users(api, lists.store.left_between)
        if not install_outgoing_observer(api, lists.outgoing.on_pokes):
            return None
        install_incoming_observer(api, lists.incoming.on_edu)
        install_replay_hook(api, lists.replay)
        api.delayed_background_call(
            1000, lists._flush_stale, desc="sps_device_lists_flush"
        )
        return lists

    async def _flush_stale(self) -> None:
        try:
            await self.outgoing.flush_stale()
        except Exception:
            logger.exception("Flushing stale device-list queues failed")

    async def replay(self, room_id: str) -> None:
        """The room's full state is stored; its partial flag is cleared next."""
        await self.incoming.replay(room_id)
        await self.outgoing.replay(room_id)
        await self.presence.forget(room_id)
        # A change queued between now and the clearing of the flag.
        self._api.delayed_background_call(
            FLUSH_AFTER_MS, self._flush_room, room_id, desc="sps_device_lists_flush"
        )

    async def _flush_room(self, room_id: str) -> None:
        try:
            await self.outgoing.flush_room(room_id)
        except Exception:
            logger.exception("Flushing the device-list queue of %s failed", room_id)

    async def before_purge(self, room_id: str) -> None:
        """A room given up is about to be purged: remember its remote members
        for the ``device_lists.left`` of the local users who left it."""
        rows = await self.ops.left_rows(room_id)
        if rows:
            await self.store.add_left(rows)

    async def on_room_abandoned(self, room_id: str) -> None:
        await self.outgoing.on_room_abandoned(room_id)
        await self.incoming.on_room_abandoned(room_id)
        await self.presence.forget(room_id)
