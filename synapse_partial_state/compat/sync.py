"""The sync seam: the syncing signal in ``/sync`` and in sliding sync room objects.

Synapse (1.163.2, ``synapse/handlers/sync.py``) builds a sync in a
``SyncResultBuilder`` (``get_sync_result_builder``: the joined rooms, partial-state
rooms excluded from eager syncs, and for eager incremental syncs the rooms
un-partial-stated since the token as ``forced_newly_joined_room_ids``, which
resends them whole), then one ``JoinedSyncResult`` per room
(``_generate_room_entry``), which ``SyncRestServlet.encode_room`` encodes. The
module, for the decisions of :mod:`..clients.syncing`:

* ``get_sync_result_builder``: for an incremental *lazy-loading* sync, asks
  Synapse's un-partial-stated rooms stream for the joined rooms that completed
  between the token and now (the query eager syncs already make; none when the
  stream has not moved), and returns the builder as a subclass carrying them;
* ``_may_have_rooms_changed``: true when there are such rooms, so that a sync in
  which nothing else happened is not answered empty;
* ``_generate_room_entry``: includes such a room even if nothing changed in it
  (``always_include``, as for ``full_state``: its timeline and state are the
  ordinary incremental ones, nothing resent), then carries the field's value on
  the room's result (a subclass of ``JoinedSyncResult``) from Synapse's cached
  ``is_partial_state_room``: one cache lookup per joined room in the response
  (as Synapse's own ``compute_state_delta`` makes), no query;
* ``SyncRestServlet.encode_room``: adds the field to the room object;
* ``SlidingSyncRestServlet.encode_rooms``: adds ``true`` to the room objects of
  partial-state rooms (invites and knocks aside), from the cached
  ``is_partial_state_room_batched``, and ``false`` to the first object of such
  a room for the same client once complete (:class:`..clients.syncing.ToldSyncing`).

Every wrapper calls Synapse's own method unchanged; eager syncs are untouched.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attr

from synapse_partial_state.compat.patching import wrap_instance_method

if TYPE_CHECKING:
    from synapse.handlers.sync import (
        JoinedSyncResult,
        RoomSyncResultBuilder,
        SyncConfig,
        SyncHandler,
        SyncResultBuilder,
    )
    from synapse.types import StreamToken

logger = logging.getLogger(__name__)

#: (rooms un-partial-stated since the token, whether each is partial now, the
#: rooms the client's filter wants) -> the rooms to report as complete.
ResyncedRooms = Callable[
    [Iterable[str], Mapping[str, bool], Iterable[str] | None], frozenset[str]
]
#: (room ID, partial now, rooms to report as complete) -> the field's value or None.
SyncingFlag = Callable[[str, bool, frozenset[str]], bool | None]
#: (encoded room object, value or None) -> None: adds the field.
MarkRoom = Callable[[dict[str, Any], bool | None], None]
#: ((user ID, device ID), room ID, partial now) -> the sliding sync field's value.
SlidingFlag = Callable[[tuple[str, "str | None"], str, bool], bool | None]


@attr.s(auto_attribs=True, slots=True)
class _SyncingSignal:
    """The policy the wrappers call (see :func:`install_syncing_signal`)."""

    resynced_rooms: ResyncedRooms
    syncing_flag: SyncingFlag
    mark_room: MarkRoom
    sliding_flag: SlidingFlag


#: Set by :func:`install_syncing_signal`; read by the class-level wrappers.
_SIGNAL: list[_SyncingSignal] = []


@functools.cache
def _builder_class() -> type[SyncResultBuilder]:
    """``SyncResultBuilder`` carrying the rooms completed since the token."""
    from synapse.handlers.sync import SyncResultBuilder

    @attr.s(slots=True, auto_attribs=True)
    class ResyncAwareSyncResultBuilder(SyncResultBuilder):
        sps_resynced: frozenset[str] = frozenset()

    return ResyncAwareSyncResultBuilder


@functools.cache
def _joined_class() -> type[JoinedSyncResult]:
    """``JoinedSyncResult`` carrying the syncing field's value."""
    from synapse.handlers.sync import JoinedSyncResult

    @attr.s(slots=True, auto_attribs=True)
    class SyncingJoinedSyncResult(JoinedSyncResult):
        sps_syncing: bool | None = None

    return SyncingJoinedSyncResult


def _copy_as(cls: type, obj: Any, **extra: Any) -> Any:
    """``obj`` (an attrs instance) as an instance of its subclass ``cls``."""
    fields = {a.alias: getattr(obj, a.name) for a in attr.fields(type(obj))}
    return cls(**fields, **extra)


def _replace(results: list[Any], old: Any, new: Any) -> None:
    """Put ``new`` in place of ``old`` (by identity; searched from the end, where
    it is: rooms generated concurrently only append after it)."""
    for index in range(len(results) - 1, -1, -1):
        if results[index] is old:
            results[index] = new
            return


def resynced_of(builder: Any) -> frozenset[str]:
    """The rooms a sync reports as complete (none for Synapse's own builder)."""
    return getattr(builder, "sps_resynced", frozenset())


async def _resynced_since(
    handler: SyncHandler,
    builder: SyncResultBuilder,
    since_token: StreamToken,
    sync_config: SyncConfig,
) -> frozenset[str]:
    """The joined rooms un-partial-stated between ``since_token`` and the
    builder's ``now_token`` that the signal reports (see
    :func:`..clients.syncing.resynced_rooms`)."""
    joined = builder.joined_room_ids
    since = since_token.un_partial_stated_rooms_key
    now = builder.now_token.un_partial_stated_rooms_key
    if not joined or since >= now:
        return frozenset()
    store: Any = handler.store  # Any: @cached methods, mistyped without the plugin
    rooms = await store.get_un_partial_stated_rooms_between(since, now, joined)
    if not rooms:
        return frozenset()
    partial = await store.is_partial_state_room_batched(rooms)
    # The client's "rooms" / "not_rooms" (Synapse has no public accessor).
    wanted = sync_config.filter_collection._room_filter.filter_rooms(rooms)
    return _SIGNAL[0].resynced_rooms(rooms, partial, wanted)


def _wrap_get_sync_result_builder(native: Callable[..., Any]) -> Callable[..., Any]:
    async def get_sync_result_builder(
        self: SyncHandler,
        sync_config: SyncConfig,
        since_token: StreamToken | None = None,
        full_state: bool = False,
    ) -> SyncResultBuilder:
        builder = await native(self, sync_config, since_token, full_state)
        if since_token is None or not sync_config.filter_collection.lazy_load_members():
            return builder
        resynced = await _resynced_since(self, builder, since_token, sync_config)
        if not resynced:
            return builder
        return _copy_as(_builder_class(), builder, sps_resynced=resynced)

    return get_sync_result_builder


def _wrap_may_have_rooms_changed(native: Callable[..., bool]) -> Callable[..., bool]:
    def _may_have_rooms_changed(self: SyncHandler, builder: SyncResultBuilder) -> bool:
        return bool(resynced_of(builder)) or native(self, builder)

    return _may_have_rooms_changed


def _wrap_generate_room_entry(native: Callable[..., Any]) -> Callable[..., Any]:
    async def _generate_room_entry(
        self: SyncHandler,
        sync_result_builder: SyncResultBuilder,
        room_builder: RoomSyncResultBuilder,
        ephemeral: list[Any],
        tags: Any,
        account_data: Any,
        sticky_event_ids: list[str],
        always_include: bool = False,
    ) -> None:
        room_id = room_builder.room_id
        resynced = resynced_of(sync_result_builder)
        is_joined = room_builder.rtype == "joined"
        await native(
            self,
            sync_result_builder,
            room_builder,
            ephemeral,
            tags,
            account_data,
            sticky_event_ids,
            always_include or (is_joined and room_id in resynced),
        )
        # Native appends a joined room's result last, just before returning.
        joined = sync_result_builder.joined
        if not (is_joined and joined and joined[-1].room_id == room_id):
            return  # nothing to say about this room in this sync
        entry = joined[-1]
        store: Any = self.store  # Any: @cached methods, mistyped without the plugin
        is_partial = await store.is_partial_state_room(room_id)
        flag = _SIGNAL[0].syncing_flag(room_id, is_partial, resynced)
        if flag is not None:
            _replace(joined, entry, _copy_as(_joined_class(), entry, sps_syncing=flag))

    return _generate_room_entry


def _wrap_encode_room(native: Callable[..., Any]) -> Callable[..., Any]:
    async def encode_room(
        self: Any,
        sync_config: SyncConfig,
        room: Any,
        time_now: int,
        joined: bool,
        serialize_options: Any,
    ) -> dict[str, Any]:
        result = await native(
            self, sync_config, room, time_now, joined, serialize_options
        )
        if joined:
            _SIGNAL[0].mark_room(result, getattr(room, "sps_syncing", None))
        return result

    return encode_room


def _wrap_encode_rooms(native: Callable[..., Any]) -> Callable[..., Any]:
    async def encode_rooms(self: Any, requester: Any, rooms: Mapping[str, Any]) -> Any:
        serialized = await native(self, requester, rooms)
        # Invites and knocks (stripped state) are no partial-state rooms of theirs.
        room_ids = [r for r, result in rooms.items() if not result.stripped_state]
        if room_ids:
            partial = await self.store.is_partial_state_room_batched(room_ids)
            signal = _SIGNAL[0]
            client = (requester.user.to_string(), requester.device_id)
            for room_id in room_ids:
                flag = signal.sliding_flag(client, room_id, partial.get(room_id, False))
                signal.mark_room(serialized[room_id], flag)
        return serialized

    return encode_rooms


def install_syncing_signal(
    resynced_rooms: ResyncedRooms,
    syncing_flag: SyncingFlag,
    mark_room: MarkRoom,
    sliding_flag: SlidingFlag,
) -> None:
    """The ``org.matrix.msc2775.syncing`` field in ``/sync`` and sliding sync
    (see the module docstring): five class-level wrappers, each installed once;
    installing again replaces the policy."""
    _SIGNAL[:] = [_SyncingSignal(resynced_rooms, syncing_flag, mark_room, sliding_flag)]
    for owner, name, wrap, why in _wrappers():
        target = f"{owner.__module__}.{owner.__name__}.{name}"
        wrap_instance_method(owner, name, wrap, target, why, kind="wrap")


def _wrappers() -> list[tuple[type, str, Callable[..., Any], str]]:
    """(class, method, wrapper factory, why) of every wrapper of the signal."""
    from synapse.handlers.sync import SyncHandler
    from synapse.rest.client.sync import SlidingSyncRestServlet, SyncRestServlet

    return [
        (
            SyncHandler,
            "get_sync_result_builder",
            _wrap_get_sync_result_builder,
            "incremental lazy-loading syncs: note the joined rooms whose resync "
            "completed since the token (Synapse's un-partial-stated rooms stream)",
        ),
        (
            SyncHandler,
            "_may_have_rooms_changed",
            _wrap_may_have_rooms_changed,
            "a sync with rooms completed since the token is not empty",
        ),
        (
            SyncHandler,
            "_generate_room_entry",
            _wrap_generate_room_entry,
            "include joined rooms completed since the token; carry the syncing "
            "field's value on each joined room's result",
        ),
        (
            SyncRestServlet,
            "encode_room",
            _wrap_encode_room,
            "add org.matrix.msc2775.syncing to joined room objects",
        ),
        (
            SlidingSyncRestServlet,
            "encode_rooms",
            _wrap_encode_rooms,
            "add org.matrix.msc2775.syncing: true to partial-state rooms, false "
            "once to the client once complete",
        ),
    ]
