"""The joined-hosts warmer's seam (:mod:`synapse_partial_state.resident.warm`):
the rooms to warm, the Synapse call that warms one, and the hook telling us a room
stopped being partial-stated (checked in 1.163.2)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from synapse.module_api import ModuleApi

from synapse_partial_state.compat.patching import (
    homeserver,
    main_store,
    wrap_instance_method,
)
from synapse_partial_state.compat.runtime import call_later_s
from synapse_partial_state.compat.web import http_listeners

logger = logging.getLogger(__name__)


class JoinedHostsOps:
    """:class:`~synapse_partial_state.resident.warm.WarmOps` on a homeserver."""

    def __init__(self, api: ModuleApi) -> None:
        self._hs = homeserver(api)
        self._store: Any = main_store(api)

    async def rooms_to_warm(self, min_members: int) -> list[str]:
        # room_stats_current: kept by Synapse's stats handler from the current
        # state deltas (it may lag a resync that just finished; those rooms come
        # through on_room_resynced instead).
        rows = await self._store.db_pool.execute(
            "sps_rooms_to_warm",
            "SELECT s.room_id FROM room_stats_current AS s"
            " WHERE s.joined_members >= ? AND s.local_users_in_room > 0"
            " AND NOT EXISTS (SELECT 1 FROM partial_state_rooms AS p"
            " WHERE p.room_id = s.room_id)"
            " ORDER BY s.joined_members DESC",
            min_members,
        )
        return [room_id for (room_id,) in rows]

    async def joined_members(self, room_id: str) -> int:
        return await self._store.get_number_joined_users_in_room(room_id)

    async def warm(self, room_id: str) -> bool:
        if await self._store.is_partial_state_room(room_id):
            return False
        extremities = await self._store.get_latest_event_ids_in_room(room_id)
        if len(extremities) != 1:
            # A join's prev events are the forward extremities: with several,
            # its state is a resolution we do not run ahead of time.
            return False
        # What FederationServer.on_send_join_request and the federation sender
        # ask for an event whose prev events are these: the hosts at the state
        # group after them, cached per group and per room by Synapse.
        await self._hs.get_state_handler().get_hosts_in_room_at_events(
            room_id, event_ids=list(extremities)
        )
        return True

    def run_in_background(self, f: Callable[[], Awaitable[None]]) -> None:
        self._hs.run_as_background_process("sps_warm_joined_hosts", f)

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Any:
        return call_later_s(self._hs.get_clock(), delay_s, callback)


def handles_federation(api: ModuleApi) -> bool:
    """Whether this process answers federation requests (an HTTP listener with
    the ``federation`` resource) or sends to other servers: where Synapse asks for
    a room's hosts."""
    if homeserver(api).config.worker.send_federation:
        return True
    return serves_federation(api)


def serves_federation(api: ModuleApi) -> bool:
    """Whether this process answers federation requests (``/state`` among them):
    an HTTP listener with the ``federation`` resource."""
    return any(
        "federation" in resource.names
        for listener in http_listeners(api)
        for resource in listener.http_options.resources
    )


def install_un_partial_observer(api: ModuleApi, on_room: Callable[[str], None]) -> None:
    """Call ``on_room(room_id)`` after Synapse's notifier is told a room stopped
    being partial-stated (``Notifier.on_un_partial_stated_room``: called by the
    resync on the main process and by the replication client on workers)."""
    notifier = homeserver(api).get_notifier()

    def wrap(native: Callable[..., Awaitable[None]]) -> Callable[..., Any]:
        async def on_un_partial_stated_room(room_id: str, new_token: int) -> None:
            await native(room_id, new_token)
            try:
                on_room(room_id)
            except Exception:
                logger.exception("After %s stopped being partial-stated", room_id)

        return on_un_partial_stated_room

    wrap_instance_method(
        notifier,
        "on_un_partial_stated_room",
        wrap,
        "synapse.notifier.Notifier.on_un_partial_stated_room",
        "work out a big room's hosts once its resync ends, before a joiner asks",
    )
