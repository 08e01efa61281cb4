"""The sync seam's wrappers, around fake native methods: which rooms an
incremental lazy-loading sync reports as complete, that they are included,
and that the field reaches the encoded room objects."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from synapse.handlers.sync import JoinedSyncResult, SyncResultBuilder
from twisted.internet import defer
from twisted.trial import unittest

from synapse_partial_state.clients import syncing
from synapse_partial_state.compat import patching
from synapse_partial_state.compat import sync as sync_seam
from synapse_partial_state.wire import SYNCING_FIELD


def requester(user_id: str, device_id: str) -> Any:
    return SimpleNamespace(
        user=SimpleNamespace(to_string=lambda: user_id), device_id=device_id
    )


def token(key: int) -> Any:
    return SimpleNamespace(un_partial_stated_rooms_key=key)


def builder(joined: set[str], now: int) -> SyncResultBuilder:
    return SyncResultBuilder(
        sync_config=None,  # type: ignore[arg-type]
        full_state=False,
        since_token=token(0),
        now_token=token(now),
        joined_room_ids=frozenset(joined),
        excluded_room_ids=frozenset(),
        forced_newly_joined_room_ids=frozenset(),
        membership_change_events=[],
    )


def joined_result(room_id: str) -> JoinedSyncResult:
    return JoinedSyncResult(
        room_id=room_id,
        timeline=None,  # type: ignore[arg-type]
        state={},
        ephemeral=[],
        account_data=[],
        sticky=[],
        unread_notifications={},
        unread_thread_notifications={},
        summary={},
        unread_count=0,
    )


class Store:
    def __init__(self, completed: set[str], partial: set[str]) -> None:
        self.completed, self.partial = completed, partial
        self.queries: list[tuple[int, int, frozenset[str]]] = []
        self.looked_up: list[str] = []
        self.on_lookup: list[Any] = []

    async def get_un_partial_stated_rooms_between(
        self, last: int, current: int, room_ids: Any
    ) -> set[str]:
        self.queries.append((last, current, frozenset(room_ids)))
        return self.completed & set(room_ids)

    async def is_partial_state_room_batched(self, room_ids: Any) -> dict[str, bool]:
        return {r: r in self.partial for r in room_ids}

    async def is_partial_state_room(self, room_id: str) -> bool:
        self.looked_up.append(room_id)
        for hook in self.on_lookup:
            hook()
        return room_id in self.partial


def sync_config(lazy: bool, rooms: list[str] | None = None) -> Any:
    def filter_rooms(room_ids: Any) -> set[str]:
        return set(room_ids) if rooms is None else set(room_ids) & set(rooms)

    return SimpleNamespace(
        filter_collection=SimpleNamespace(
            lazy_load_members=lambda: lazy,
            _room_filter=SimpleNamespace(filter_rooms=filter_rooms),
        )
    )


class SyncSeamCase(unittest.TestCase):
    def setUp(self) -> None:
        signal = list(sync_seam._SIGNAL)
        self.addCleanup(sync_seam._SIGNAL.__setitem__, slice(None), signal)
        sync_seam._SIGNAL[:] = [
            sync_seam._SyncingSignal(
                syncing.resynced_rooms,
                syncing.syncing_flag,
                syncing.mark_room,
                syncing.ToldSyncing().flag,
            )
        ]

    def run_async(self, coroutine: Any) -> Any:
        return self.successResultOf(defer.ensureDeferred(coroutine))


class BuilderTests(SyncSeamCase):
    def built(self, config: Any, since: int | None, now: int, store: Store) -> Any:
        async def native(handler: Any, *args: Any) -> SyncResultBuilder:
            return builder({"!a:x", "!b:x", "!c:x"}, now)

        wrapped = sync_seam._wrap_get_sync_result_builder(native)
        handler = SimpleNamespace(store=store)
        since_token = None if since is None else token(since)
        return self.run_async(wrapped(handler, config, since_token, False))

    def test_incremental_lazy_sync_carries_rooms_completed_since(self) -> None:
        store = Store(completed={"!a:x", "!b:x", "!z:x"}, partial={"!b:x"})
        got = self.built(sync_config(lazy=True), 3, 7, store)
        self.assertEqual(sync_seam.resynced_of(got), {"!a:x"})
        self.assertIsInstance(got, SyncResultBuilder)
        self.assertEqual(got.joined_room_ids, {"!a:x", "!b:x", "!c:x"})
        self.assertEqual(store.queries, [(3, 7, frozenset({"!a:x", "!b:x", "!c:x"}))])

    def test_the_client_room_filter_applies(self) -> None:
        store = Store(completed={"!a:x", "!b:x"}, partial=set())
        got = self.built(sync_config(lazy=True, rooms=["!b:x"]), 3, 7, store)
        self.assertEqual(sync_seam.resynced_of(got), {"!b:x"})

    def test_no_query_when_the_stream_has_not_moved(self) -> None:
        store = Store(completed={"!a:x"}, partial=set())
        got = self.built(sync_config(lazy=True), 7, 7, store)
        self.assertEqual(sync_seam.resynced_of(got), frozenset())
        self.assertIs(type(got), SyncResultBuilder)
        self.assertEqual(store.queries, [])

    def test_initial_and_eager_syncs_are_left_to_synapse(self) -> None:
        store = Store(completed={"!a:x"}, partial=set())
        for config, since in ((sync_config(lazy=True), None), (sync_config(False), 3)):
            got = self.built(config, since, 7, store)
            self.assertIs(type(got), SyncResultBuilder)
        self.assertEqual(store.queries, [])

    def test_may_have_rooms_changed(self) -> None:
        native_says: list[bool] = [False]
        wrapped = sync_seam._wrap_may_have_rooms_changed(lambda h, b: native_says[0])
        plain = builder({"!a:x"}, 7)
        resynced = sync_seam._copy_as(
            sync_seam._builder_class(), plain, sps_resynced=frozenset({"!a:x"})
        )
        self.assertFalse(wrapped(None, plain))
        self.assertTrue(wrapped(None, resynced))
        native_says[0] = True
        self.assertTrue(wrapped(None, plain))


class RoomEntryTests(SyncSeamCase):
    def entry(
        self,
        room_id: str,
        rtype: str,
        resynced: frozenset[str],
        partial: set[str],
        result: bool = True,
    ) -> tuple[Any, list[bool]]:
        """The wrapped ``_generate_room_entry`` for one room; returns the builder
        and the ``always_include`` native was called with. Native appends a
        result for the room (unless ``result`` is false: nothing to send),
        after another room's, as concurrent entries do."""
        always: list[bool] = []

        async def native(handler: Any, srb: Any, room_builder: Any, *rest: Any) -> None:
            always.append(rest[-1])
            if result:
                srb.joined.append(joined_result(room_id))

        built = sync_seam._copy_as(
            sync_seam._builder_class(), builder(set(), 7), sps_resynced=resynced
        )
        built.joined.append(joined_result("!other:x"))
        wrapped = sync_seam._wrap_generate_room_entry(native)
        self.store = Store(set(), partial)
        handler = SimpleNamespace(store=self.store)
        room_builder = SimpleNamespace(room_id=room_id, rtype=rtype)
        self.run_async(wrapped(handler, built, room_builder, [], None, {}, [], False))
        return built, always

    def test_partial_room_carries_true(self) -> None:
        built, always = self.entry("!r:x", "joined", frozenset(), {"!r:x"})
        self.assertEqual(always, [False])
        self.assertIs(built.joined[-1].sps_syncing, True)
        self.assertEqual(built.joined[-1].room_id, "!r:x")
        self.assertFalse(hasattr(built.joined[0], "sps_syncing"))

    def test_room_completed_since_is_included_with_false(self) -> None:
        built, always = self.entry("!r:x", "joined", frozenset({"!r:x"}), set())
        self.assertEqual(always, [True])
        self.assertIs(built.joined[-1].sps_syncing, False)

    def test_other_rooms_are_left_alone(self) -> None:
        built, always = self.entry("!r:x", "joined", frozenset({"!s:x"}), set())
        self.assertEqual(always, [False])
        self.assertIs(type(built.joined[-1]), JoinedSyncResult)

    def test_no_lookup_for_a_room_without_a_result(self) -> None:
        """Incremental syncs go through every joined room; only those in the
        response cost a (cached) lookup."""
        built, _ = self.entry("!r:x", "joined", frozenset(), {"!r:x"}, result=False)
        self.assertEqual([r.room_id for r in built.joined], ["!other:x"])
        self.assertFalse(hasattr(built.joined[0], "sps_syncing"))
        self.assertEqual(self.store.looked_up, [])

    def test_rooms_appended_during_the_lookup_are_not_marked(self) -> None:
        """Other rooms' entries may be appended while the lookup waits."""
        always: list[bool] = []

        async def native(handler: Any, srb: Any, room_builder: Any, *rest: Any) -> None:
            always.append(rest[-1])
            srb.joined.append(joined_result("!r:x"))

        built = sync_seam._copy_as(sync_seam._builder_class(), builder(set(), 7))
        store = Store(set(), {"!r:x", "!late:x"})
        store.on_lookup.append(lambda: built.joined.append(joined_result("!late:x")))
        wrapped = sync_seam._wrap_generate_room_entry(native)
        room_builder = SimpleNamespace(room_id="!r:x", rtype="joined")
        self.run_async(
            wrapped(
                SimpleNamespace(store=store),
                built,
                room_builder,
                [],
                None,
                {},
                [],
                False,
            )
        )
        self.assertEqual([r.room_id for r in built.joined], ["!r:x", "!late:x"])
        self.assertIs(built.joined[0].sps_syncing, True)
        self.assertIs(type(built.joined[1]), JoinedSyncResult)

    def test_archived_rooms_are_left_alone(self) -> None:
        built, always = self.entry("!r:x", "archived", frozenset({"!r:x"}), {"!r:x"})
        self.assertEqual(always, [False])
        self.assertIs(type(built.joined[-1]), JoinedSyncResult)

    def test_marked_result_keeps_every_field(self) -> None:
        original = joined_result("!r:x")
        original.unread_count = 4
        marked = sync_seam._copy_as(
            sync_seam._joined_class(), original, sps_syncing=True
        )
        self.assertEqual(marked.unread_count, 4)
        self.assertEqual(marked.room_id, "!r:x")
        self.assertFalse(marked)  # Synapse's emptiness test is kept


class EncodeTests(SyncSeamCase):
    def test_encode_room_adds_the_field_to_joined_rooms(self) -> None:
        async def native(servlet: Any, config: Any, room: Any, *rest: Any) -> dict:
            return {"timeline": {}}

        wrapped = sync_seam._wrap_encode_room(native)
        marked = SimpleNamespace(sps_syncing=False)
        for room, joined, expected in (
            (marked, True, {"timeline": {}, SYNCING_FIELD: False}),
            (
                SimpleNamespace(sps_syncing=True),
                True,
                {"timeline": {}, SYNCING_FIELD: True},
            ),
            (SimpleNamespace(), True, {"timeline": {}}),
            (marked, False, {"timeline": {}}),
        ):
            got = self.run_async(wrapped(None, None, room, 0, joined, None))
            self.assertEqual(got, expected)

    def test_sliding_sync_marks_partial_rooms(self) -> None:
        async def native(servlet: Any, requester: Any, rooms: Any) -> dict:
            return {room_id: {"name": "x"} for room_id in rooms}

        wrapped = sync_seam._wrap_encode_rooms(native)
        store = Store(set(), {"!p:x", "!invited:x"})
        servlet = SimpleNamespace(store=store)
        rooms = {
            "!p:x": SimpleNamespace(stripped_state=None),
            "!full:x": SimpleNamespace(stripped_state=[]),
            "!invited:x": SimpleNamespace(stripped_state=[{"type": "m.room.name"}]),
        }
        bob = requester("@bob:x", "BOB")
        got = self.run_async(wrapped(servlet, bob, rooms))
        self.assertEqual(
            got,
            {
                "!p:x": {"name": "x", SYNCING_FIELD: True},
                "!full:x": {"name": "x"},
                "!invited:x": {"name": "x"},
            },
        )
        # complete: false once for the client told true, then nothing
        store.partial = {"!invited:x"}
        other = requester("@bob:x", "OTHER")
        self.assertNotIn(
            SYNCING_FIELD, self.run_async(wrapped(servlet, other, rooms))["!p:x"]
        )
        got = self.run_async(wrapped(servlet, bob, rooms))
        self.assertIs(got["!p:x"][SYNCING_FIELD], False)
        self.assertNotIn(SYNCING_FIELD, got["!full:x"])
        got = self.run_async(wrapped(servlet, bob, rooms))
        self.assertNotIn(SYNCING_FIELD, got["!p:x"])


class InstallTests(unittest.TestCase):
    def test_installs_once_and_records_each_wrapper(self) -> None:
        from synapse.handlers.sync import SyncHandler
        from synapse.rest.client.sync import SlidingSyncRestServlet, SyncRestServlet

        owners = {
            (SyncHandler, "get_sync_result_builder"),
            (SyncHandler, "_may_have_rooms_changed"),
            (SyncHandler, "_generate_room_entry"),
            (SyncRestServlet, "encode_room"),
            (SlidingSyncRestServlet, "encode_rooms"),
        }
        for owner, name in owners:
            self.addCleanup(setattr, owner, name, getattr(owner, name))
        patches, signal = list(patching.INSTALLED_PATCHES), list(sync_seam._SIGNAL)

        def restore() -> None:
            patching.INSTALLED_PATCHES[:] = patches
            sync_seam._SIGNAL[:] = signal

        self.addCleanup(restore)
        sync_seam.install_syncing_signal(
            syncing.resynced_rooms,
            syncing.syncing_flag,
            syncing.mark_room,
            syncing.ToldSyncing().flag,
        )
        wrapped = {(o, n): getattr(o, n) for o, n in owners}
        sync_seam.install_syncing_signal(
            syncing.resynced_rooms,
            syncing.syncing_flag,
            syncing.mark_room,
            syncing.ToldSyncing().flag,
        )
        for (owner, name), wrapper in wrapped.items():
            self.assertTrue(getattr(wrapper, "_sps_wrapped", False), name)
            self.assertIs(getattr(owner, name), wrapper)
        targets = {p.target for p in patching.INSTALLED_PATCHES}
        for owner, name in owners:
            self.assertIn(f"{owner.__module__}.{owner.__name__}.{name}", targets)
