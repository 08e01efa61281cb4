"""The device-list seam: local device-list changes made while a room is partial
are seen as Synapse turns them into outbound pokes, and the replay at the end of
a resync is the module's instead of Synapse's.

Checked against Synapse 1.163.2 (``synapse/handlers/device.py``,
``synapse/storage/databases/main/devices.py``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from synapse.module_api import ModuleApi

from synapse_partial_state.compat.patching import (
    PatchRecord,
    homeserver,
    record_patch,
    wrap_instance_method,
)
from synapse_partial_state.compat.resync import partial_join_event_id

logger = logging.getLogger(__name__)

#: (user ID, device ID, room ID, device-list stream id, hosts) -> None: a local
#: change about to become outbound pokes to ``hosts`` for ``room ID``.
PokesObserver = Callable[[str, str, str, int, Collection[str]], Awaitable[None]]

#: room ID -> None: the device-list replay at the end of a resync.
ReplayHook = Callable[[str], Awaitable[None]]

#: (EDU type, origin, content) -> None: a device-list or signing-key EDU, before
#: Synapse handles it (the content is the observer's copy).
EduObserver = Callable[[str, str, dict[str, Any]], Awaitable[None]]

#: The EDUs :func:`install_incoming_observer` watches.
DEVICE_EDU_TYPES = (
    "m.device_list_update",
    "m.signing_key_update",
    "org.matrix.signing_key_update",
)


def _device_writer(api: ModuleApi) -> Any | None:
    """This process's ``DeviceWriterHandler``, or None if it writes no device
    list (a worker that is not a device-list writer)."""
    from synapse.handlers.device import DeviceWriterHandler

    handler = homeserver(api).get_device_handler()
    return handler if isinstance(handler, DeviceWriterHandler) else None


def install_outgoing_observer(api: ModuleApi, observer: PokesObserver) -> bool:
    """Call ``observer`` for every local device-list change of a room just before
    Synapse records its outbound pokes; False on a process that writes no device
    list.

    Synapse's ``DeviceWriterHandler._handle_new_device_update_async`` (only on the
    main device-list writer) reads unconverted changes with
    ``get_uncoverted_outbound_room_pokes`` (user, device, room, stream id) and,
    for each in order, computes the hosts (for a partial-state room an
    approximation: the servers at join and the hosts of the partial current
    state) and calls ``add_device_list_outbound_pokes(user, device, room, hosts)``
    (without the stream id). Both store methods are wrapped on this homeserver's
    store: the first remembers each row's stream id, the second hands the change
    with its stream id and hosts to ``observer`` (before the pokes are written,
    so that a crash in between re-converts the change and the observer sees it
    again), then writes the pokes as native."""
    if _device_writer(api) is None:
        return False
    store = homeserver(api).get_datastores().main
    #: (user, device, room) -> stream ids read and not yet converted, in order
    pending: dict[tuple[str, str, str], deque[int]] = {}

    def wrap_read(native: Callable[..., Any]) -> Callable[..., Any]:
        async def get_uncoverted_outbound_room_pokes(*args: Any, **kw: Any) -> Any:
            rows = await native(*args, **kw)
            for user_id, device_id, room_id, stream_id, _ in rows:
                pending.setdefault((user_id, device_id, room_id), deque()).append(
                    stream_id
                )
            return rows

        return get_uncoverted_outbound_room_pokes

    def wrap_write(native: Callable[..., Any]) -> Callable[..., Any]:
        async def add_device_list_outbound_pokes(
            user_id: str,
            device_id: str,
            room_id: str,
            hosts: Collection[str],
            context: dict[str, str] | None,
        ) -> None:
            key = (user_id, device_id, room_id)
            ids = pending.get(key)
            if ids:
                stream_id = ids.popleft()
                if not ids:
                    del pending[key]
            else:
                stream_id = store.get_device_stream_token().stream
            await observer(user_id, device_id, room_id, stream_id, hosts)
            await native(
                user_id=user_id,
                device_id=device_id,
                room_id=room_id,
                hosts=hosts,
                context=context,
            )

        add_device_list_outbound_pokes._sps_native = native  # type: ignore[attr-defined]
        return add_device_list_outbound_pokes

    wrap_instance_method(
        store,
        "get_uncoverted_outbound_room_pokes",
        wrap_read,
        "synapse.storage.databases.main.devices.DeviceWorkerStore"
        ".get_uncoverted_outbound_room_pokes",
        "remember each local device-list change's stream id (for the replay queue)",
    )
    wrap_instance_method(
        store,
        "add_device_list_outbound_pokes",
        wrap_write,
        "synapse.storage.databases.main.devices.DeviceWorkerStore"
        ".add_device_list_outbound_pokes",
        "queue local device-list changes made while a room is partial, with the "
        "servers they reached",
    )
    return True


def install_replay_hook(api: ModuleApi, replay: ReplayHook) -> bool:
    """Replace the local half of Synapse's device-list replay at the end of a
    resync by ``replay``; False on a process that writes no device list.

    ``DeviceWriterHandler.handle_room_un_partial_stated`` (99 lines; 1 change
    since 1.100) first replays pending remote updates (its device-list
    updater's ``handle_room_un_partial_stated``: kept), then pokes every local
    change since the join to the hosts "potentially changed" minus every server
    known at the join, read again at the end. That misses servers added to the
    known list during the resync and changes a server missed for another
    reason, and resends to all; ``replay`` does it from the module's queue.
    Wrapped on the instance: ``DeviceHandler.handle_room_un_partial_stated``
    forwards to it over replication when the writer is a worker."""
    handler = _device_writer(api)
    if handler is None:
        return False

    def wrap(native: Callable[..., Any]) -> Callable[..., Any]:
        async def handle_room_un_partial_stated(room_id: str) -> None:
            await handler.device_list_updater.handle_room_un_partial_stated(room_id)
            await replay(room_id)

        return handle_room_un_partial_stated

    wrap_instance_method(
        handler,
        "handle_room_un_partial_stated",
        wrap,
        "synapse.handlers.device.DeviceWriterHandler.handle_room_un_partial_stated",
        "replay local device-list changes from the module's durable queue, once "
        "per destination, to every server the full state shows",
    )
    return True


def install_incoming_observer(api: ModuleApi, observer: EduObserver) -> bool:
    """Show ``observer`` every device-list and signing-key EDU this process
    handles, before Synapse does; False where Synapse handles none here.

    Synapse registers the handlers (``DeviceListUpdater.incoming_device_list_update``,
    ``SigningKeyEduUpdater.incoming_signing_key_update``) as bound methods in
    its federation registry's ``edu_handlers`` on the first device-list writer,
    so the registry's entries are wrapped (the native is kept as
    ``_sps_native`` for :meth:`DeviceListOps.refeed`). Both drop an update for a
    user that no room's (partial) current state shows us sharing; Synapse keeps
    only (user, device) of a dropped device-list update
    (``device_lists_remote_pending``) and nothing of a signing-key update."""
    hs = homeserver(api)
    if _device_writer(api) is None:
        return False
    # Build the handlers that register the EDU handlers, if not built yet.
    hs.get_e2e_keys_handler()
    registry = hs.get_federation_registry()
    installed = False
    for edu_type in DEVICE_EDU_TYPES:
        native = registry.edu_handlers.get(edu_type)
        if native is None or getattr(native, "_sps_wrapped", False):
            continue

        def make(native: Callable[..., Any], edu_type: str) -> Callable[..., Any]:
            async def handler(origin: str, content: Any) -> None:
                if isinstance(content, dict):
                    try:
                        await observer(edu_type, origin, dict(content))
                    except Exception:
                        logger.exception("Device-list EDU observer failed")
                await native(origin, content)

            handler._sps_wrapped = True  # type: ignore[attr-defined]
            handler._sps_native = native  # type: ignore[attr-defined]
            return handler

        registry.edu_handlers[edu_type] = make(native, edu_type)
        installed = True
    if installed:
        record_patch(
            PatchRecord(
                "synapse.federation.federation_server.FederationHandlerRegistry"
                ".edu_handlers[m.device_list_update, m.signing_key_update]",
                "wrap (registry entry)",
                "queue durably the device-list and signing-key updates of users "
                "not known to share a room while a room is partial",
            )
        )
    return True


#: (user ID, room stream position after, up to) -> remote users to add to
#: ``device_lists.left``.
LeftUsers = Callable[[str, int, int], Awaitable[set[str]]]


def install_left_users(api: ModuleApi, left_users: LeftUsers) -> None:
    """Add ``left_users`` to ``/sync``'s ``device_lists.left``, minus the users
    the syncing user still shares a joined room with.

    Wraps ``generate_sync_entry_for_device_list`` (``/sync``) and
    ``get_user_ids_changed`` (``/keys/changes``, sliding sync) on this process's
    device handler (every process that serves them has one; the sync handler
    holds the same instance). Synapse computes ``left`` from the members of the
    rooms the user left, which a purge has deleted."""
    handler = homeserver(api).get_device_handler()
    store: Any = homeserver(api).get_datastores().main

    async def add_left(result: Any, user_id: str, after: int, up_to: int) -> None:
        try:
            extra = await left_users(user_id, after, up_to)
            if not extra:
                return
            joined = set(await store.get_rooms_for_user(user_id))
            rooms = await store.get_rooms_for_users(extra)
            result.left.update(u for u in extra if not joined & set(rooms.get(u, ())))
            result.changed.difference_update(result.left)
        except Exception:
            logger.exception("Adding device_lists.left entries failed")

    def wrap_sync(native: Callable[..., Any]) -> Callable[..., Any]:
        async def generate_sync_entry_for_device_list(*args: Any, **kw: Any) -> Any:
            result = await native(*args, **kw)
            if not args:  # Synapse passes keywords
                await add_left(
                    result,
                    kw["user_id"],
                    kw["since_token"].room_key.stream,
                    kw["now_token"].room_key.stream,
                )
            return result

        return generate_sync_entry_for_device_list

    def wrap_changes(native: Callable[..., Any]) -> Callable[..., Any]:
        async def get_user_ids_changed(user_id: str, from_token: Any) -> Any:
            result = await native(user_id, from_token)
            await add_left(
                result,
                user_id,
                from_token.room_key.stream,
                store.get_room_max_stream_ordering(),
            )
            return result

        return get_user_ids_changed

    wrap_instance_method(
        handler,
        "generate_sync_entry_for_device_list",
        wrap_sync,
        "synapse.handlers.device.DeviceHandler.generate_sync_entry_for_device_list",
        "device_lists.left for the members of a room given up during its resync "
        "(purged: Synapse cannot read them any more)",
    )
    wrap_instance_method(
        handler,
        "get_user_ids_changed",
        wrap_changes,
        "synapse.handlers.device.DeviceHandler.get_user_ids_changed",
        "the same in /keys/changes and sliding sync's e2ee extension",
    )


class DeviceListOps:
    """The native Synapse reads and writes the device-list queues need."""

    def __init__(self, api: ModuleApi) -> None:
        hs = homeserver(api)
        self._hs = hs
        # Any: mypy without Synapse's own plugin mis-types @cached methods.
        self._store: Any = hs.get_datastores().main
        self._state: Any = hs.get_storage_controllers().state
        self.server_name: str = hs.hostname
        self._clock = hs.get_clock()

    def is_mine(self, user_id: str) -> bool:
        return self._hs.is_mine_id(user_id)

    def now_ms(self) -> int:
        return self._clock.time_msec()

    async def is_partial_state_room(self, room_id: str) -> bool:
        return await self._store.is_partial_state_room(room_id)

    async def hosts_of_room_during_resync(self, room_id: str) -> set[str]:
        """Servers the (now full) state shows in the room at some point since the
        join: those of members whose membership differs between the state at the
        join and the current state, and the current hosts (as Synapse's replay).
        Call once the full state is stored, before the flag is cleared."""
        from synapse.api.constants import EventTypes
        from synapse.types import get_domain_from_id

        hosts = set(await self._store.get_current_hosts_in_room(room_id))
        join_event_id = await self._join_event_id(room_id)
        if join_event_id is not None:
            at_join = await self._state.get_state_ids_for_event(
                join_event_id, await_full_state=False
            )
            now = await self._store.get_partial_current_state_ids(room_id)
            for key in set(at_join) | set(now):
                if key[0] == EventTypes.Member and at_join.get(key) != now.get(key):
                    hosts.add(get_domain_from_id(key[1]))
        hosts.discard(self.server_name)
        return hosts

    async def _join_event_id(self, room_id: str) -> str | None:
        return await partial_join_event_id(self._store, room_id)

    async def hosts_sharing_other_rooms(self, user_id: str, room_id: str) -> set[str]:
        """Servers in the rooms ``user_id`` is in, other than ``room_id``."""
        hosts: set[str] = set()
        for other in await self._store.get_rooms_for_user(user_id):
            if other == room_id:
                continue
            hosts.update(
                await self._state.get_current_hosts_in_room_or_partial_state_approximation(
                    other
                )
            )
        hosts.discard(self.server_name)
        return hosts

    async def hosts_with_later_poke(
        self, user_id: str, device_id: str, stream_id: int, hosts: Collection[str]
    ) -> set[str]:
        """Those of ``hosts`` with an outbound poke of this device after
        ``stream_id`` (``device_lists_outbound_pokes``): sent, or to be sent,
        this change or a later one (the update a destination gets carries the
        device as it is now)."""
        if not hosts:
            return set()

        def txn(t: Any) -> set[str]:
            t.execute(
                "SELECT DISTINCT destination FROM device_lists_outbound_pokes"
                " WHERE user_id = ? AND device_id = ? AND stream_id > ?",
                (user_id, device_id, stream_id),
            )
            return {row[0] for row in t.fetchall()} & set(hosts)

        return await self._store.db_pool.runInteraction("sps_dl_later_pokes", txn)

    async def add_pokes(
        self, user_id: str, device_id: str, room_id: str, hosts: Collection[str]
    ) -> None:
        """Queue the device's update for ``hosts`` (Synapse's own outbound pokes,
        bypassing the observer) and wake the federation sender."""
        add = self._store.add_device_list_outbound_pokes
        add = getattr(add, "_sps_native", add)
        await add(
            user_id=user_id,
            device_id=device_id,
            room_id=room_id,
            hosts=hosts,
            context=None,
        )
        self._hs.get_notifier().notify_replication()
        handler = self._hs.get_device_handler()
        sender = getattr(handler, "federation_sender", None)
        if sender is not None:
            await sender.send_device_messages(hosts, immediate=False)

    # -- incoming -------------------------------------------------------------

    async def partial_rooms(self) -> set[str]:
        """Rooms this server is partially joined to (``get_partial_rooms``, cached)."""
        return set(await self._store.get_partial_rooms())

    async def shares_room(self, user_id: str) -> bool:
        """Whether some room's current state (partial or not) has ``user_id``
        joined (Synapse's own test before handling such an EDU)."""
        return bool(await self._store.get_rooms_for_user(user_id))

    async def refeed(self, edu_type: str, origin: str, content: dict[str, Any]) -> None:
        """Hand a queued EDU to Synapse's own handler (not the observer)."""
        registry = self._hs.get_federation_registry()
        handler = registry.edu_handlers.get(edu_type)
        if handler is None:
            return
        handler = getattr(handler, "_sps_native", handler)
        await handler(origin, dict(content))

    async def untrack_if_sharing_no_room(self, user_ids: Collection[str]) -> None:
        """Stop tracking the device lists of those of ``user_ids`` no room
        shows us sharing any more (``handle_potentially_left_users``: deletes
        their ``device_lists_remote_extremeties`` row, so that their cached
        device list is not served and a later query asks their server)."""
        remote = {u for u in user_ids if not self.is_mine(u)}
        if remote:
            await self._store.handle_potentially_left_users(remote)

    async def members_changed_during_resync(self, room_id: str) -> set[str]:
        """Remote users whose membership of the room may have been misjudged
        while it was partial: those with a membership event received since the
        join (accepted or, once re-checked against the full state, rejected: a
        user wrongly believed to be in the room, synapse#13887), and those whose
        membership differs between the state at the join and the (now full)
        current state. Call before the flag is cleared."""
        from synapse.api.constants import EventTypes

        join_event_id = await self._join_event_id(room_id)
        if join_event_id is None:
            return set()

        def txn(t: Any) -> set[str]:
            t.execute(
                "SELECT DISTINCT e.state_key FROM events AS e"
                " INNER JOIN events AS j ON j.event_id = ?"
                " WHERE e.room_id = ? AND e.type = ?"
                " AND e.stream_ordering > j.stream_ordering",
                (join_event_id, room_id, EventTypes.Member),
            )
            return {row[0] for row in t.fetchall() if row[0]}

        users = await self._store.db_pool.runInteraction("sps_dl_members_since", txn)
        at_join = await self._state.get_state_ids_for_event(
            join_event_id, await_full_state=False
        )
        now = await self._store.get_partial_current_state_ids(room_id)
        users.update(
            key[1]
            for key in set(at_join) | set(now)
            if key[0] == EventTypes.Member and at_join.get(key) != now.get(key)
        )
        return {u for u in users if not self.is_mine(u)}

    async def mark_stale(self, user_ids: Collection[str]) -> None:
        """Mark the cached device lists of the tracked ones of ``user_ids`` as
        stale (``mark_remote_users_device_caches_as_stale``): Synapse refetches
        them from their servers (its retry loop, and the next key query) and
        tells local users in ``device_lists.changed`` if they changed."""
        if not user_ids:
            return
        tracked = []
        for user_id in user_ids:
            last = await self._store.get_device_list_last_stream_id_for_remote(user_id)
            if last is not None:
                tracked.append(user_id)
        if not tracked:
            return
        await self._store.mark_remote_users_device_caches_as_stale(tracked)
        handler = self._hs.get_device_handler()
        updater = getattr(handler, "device_list_updater", None)
        resync = getattr(updater, "multi_user_device_resync", None)
        if resync is None:
            return
        by_server: dict[str, list[str]] = {}
        for user_id in tracked:
            by_server.setdefault(user_id.split(":", 1)[1], []).append(user_id)
        for users in by_server.values():  # the resync takes one server's users
            self._hs.run_as_background_process(
                "sps_device_list_resync", resync, users, True
            )

    # -- presence -------------------------------------------------------------

    async def hosts_of_partial_room(self, room_id: str) -> set[str]:
        """The servers at the join and those of the partial state (what Synapse
        sends a partial room's events and EDUs to)."""
        return set(
            await self._state.get_current_hosts_in_room_or_partial_state_approximation(
                room_id
            )
        )

    async def local_users_in_room(self, room_id: str) -> set[str]:
        return set(await self._store.get_local_users_in_room(room_id))

    async def rooms_of(self, user_id: str) -> set[str]:
        return set(await self._store.get_rooms_for_user(user_id))

    # -- leaving ----------------------------------------------------------------

    async def left_rows(self, room_id: str) -> list[tuple[str, str, int]]:
        """(local user, remote member, the local user's leave position) for a
        room about to be purged: every remote user with a join of it on record,
        for every local user with a membership of it."""

        def members(t: Any) -> list[str]:
            # Every user with a join of the room on record: the current state
            # may no longer list them once the last local user has left.
            t.execute(
                "SELECT DISTINCT user_id FROM room_memberships"
                " WHERE room_id = ? AND membership = 'join'",
                (room_id,),
            )
            return [row[0] for row in t.fetchall()]

        joined = await self._store.db_pool.runInteraction("sps_dl_members", members)
        remote = [u for u in joined if not self.is_mine(u)]
        if not remote:
            return []

        def txn(t: Any) -> list[tuple[str, int]]:
            t.execute(
                "SELECT l.user_id, e.stream_ordering FROM local_current_membership AS l"
                " INNER JOIN events AS e USING (event_id) WHERE l.room_id = ?",
                (room_id,),
            )
            return [(row[0], int(row[1])) for row in t.fetchall()]

        locals_ = await self._store.db_pool.runInteraction("sps_dl_leavers", txn)
        return [(local, user, pos) for local, pos in locals_ for user in remote]
