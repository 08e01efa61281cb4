"""ResyncOps' read of the next partial-state events (pure logic: a fake store
with an event cache that can hold a stale outlier copy)."""

from __future__ import annotations

from typing import Any

from twisted.trial import unittest

from synapse_partial_state.compat.resync import ResyncOps
from tests.unit.sync_run import run


class Metadata:
    def __init__(self, outlier: bool) -> None:
        self.outlier = outlier

    def is_outlier(self) -> bool:
        return self.outlier


class Event:
    def __init__(self, event_id: str, outlier: bool) -> None:
        self.event_id = event_id
        self.internal_metadata = Metadata(outlier)


class FakeStore:
    """The database says no event is an outlier; the cache may say otherwise
    until invalidated."""

    def __init__(self, batch: list[str], cached_outliers: set[str]) -> None:
        self.batch = batch
        self.cached_outliers = set(cached_outliers)
        self.invalidated: list[tuple[str, str]] = []

    async def get_partial_state_events_batch(self, room_id: str) -> list[str]:
        return list(self.batch)

    async def get_events_as_list(self, event_ids: list[str], **kw: Any) -> list[Event]:
        return [Event(e, e in self.cached_outliers) for e in event_ids]

    def _invalidate_local_get_event_cache(self, event_id: str) -> None:
        self.invalidated.append(("local", event_id))
        self.cached_outliers.discard(event_id)

    async def _invalidate_async_get_event_cache(self, event_id: str) -> None:
        self.invalidated.append(("external", event_id))


class FakeHomeserver:
    hostname = "joiner"

    def __init__(self, store: FakeStore) -> None:
        self._store = store

    def get_datastores(self) -> Any:
        return type("Stores", (), {"main": self._store})()

    def get_clock(self) -> None:
        return None


def ops(store: FakeStore) -> ResyncOps:
    api: Any = type("Api", (), {"_hs": FakeHomeserver(store)})()
    return ResyncOps(api)


class PartialStateEventsBatchTests(unittest.TestCase):
    def test_stale_outlier_copies_are_read_again(self) -> None:
        store = FakeStore(["$a", "$b", "$c"], cached_outliers={"$b"})
        events = run(ops(store).partial_state_events_batch("!r"))
        self.assertEqual([e.event_id for e in events], ["$a", "$b", "$c"])
        self.assertFalse(any(e.internal_metadata.is_outlier() for e in events))
        self.assertEqual(store.invalidated, [("local", "$b"), ("external", "$b")])

    def test_nothing_invalidated_when_the_cache_is_right(self) -> None:
        store = FakeStore(["$a", "$b"], cached_outliers=set())
        events = run(ops(store).partial_state_events_batch("!r"))
        self.assertEqual([e.event_id for e in events], ["$a", "$b"])
        self.assertEqual(store.invalidated, [])

    def test_empty_batch(self) -> None:
        store = FakeStore([], cached_outliers=set())
        self.assertEqual(run(ops(store).partial_state_events_batch("!r")), [])


class FinishingStore(FakeStore):
    """A SQLite store whose partial-state events and flag clearing are given."""

    def __init__(self, partial_events: bool, cleared: bool) -> None:
        from synapse.storage.engines import Sqlite3Engine

        super().__init__([], set())
        self.database_engine = Sqlite3Engine({"args": {"database": ":memory:"}})
        self._clock = type("Clock", (), {"time": lambda self: 1.0})()
        self.partial_events = partial_events
        self.cleared = cleared
        store = self

        class Pool:
            async def runInteraction(self, desc: str, *a: Any) -> Any:  # noqa: N802
                assert desc == "sps_has_partial_state_events", desc
                return store.partial_events

        self.db_pool = Pool()

    async def clear_partial_state_room(self, room_id: str) -> int | None:
        return 5 if self.cleared else None


class FinishingHomeserver(FakeHomeserver):
    """Records whether the room was held when the finish wrote its current
    state."""

    def __init__(self, store: FinishingStore) -> None:
        super().__init__(store)
        self.held_while_writing: list[bool] = []
        hs = self

        class Handler:
            async def update_current_state(self, room_id: str) -> None:
                from synapse_partial_state.compat.bulk.deltas import finish_hold

                hold = finish_hold(store)
                hs.held_while_writing.append(hold is not None and hold.held(room_id))

            async def handle_room_un_partial_stated(self, room_id: str) -> None:
                pass

            async def on_un_partial_stated_room(self, *args: Any) -> None:
                pass

            def notify_room_un_partial_stated(self, room_id: str) -> None:
                pass

            @property
            def state(self) -> Any:
                return self

            @property
            def _is_partial_state_room_linearizer(self) -> Any:
                return self

            def queue(self, key: str) -> Any:
                return self

            async def __aenter__(self) -> None:
                pass

            async def __aexit__(self, *exc: Any) -> None:
                pass

        handler = Handler()
        self.get_state_handler = self.get_device_handler = lambda: handler
        self.get_federation_handler = self.get_notifier = lambda: handler
        self.get_storage_controllers = lambda: handler


class FinishHoldTests(unittest.TestCase):
    """On SQLite the finish holds the room's user-directory write until the
    partial-state flag is cleared (compat/bulk/deltas.FinishHold)."""

    def finish(self, store: FinishingStore) -> tuple[bool, list[bool], bool]:
        from synapse_partial_state.compat.bulk.deltas import finish_hold

        hs = FinishingHomeserver(store)
        api: Any = type("Api", (), {"_hs": hs})()
        done = run(ResyncOps(api).complete("!r"))
        hold = finish_hold(store)
        assert hold is not None
        return done, hs.held_while_writing, hold.held("!r")

    def test_released_once_the_flag_is_cleared(self) -> None:
        self.assertEqual(
            self.finish(FinishingStore(partial_events=False, cleared=True)),
            (True, [True], False),
        )

    def test_kept_while_the_finish_must_go_round_again(self) -> None:
        for store in (
            FinishingStore(partial_events=True, cleared=True),
            FinishingStore(partial_events=False, cleared=False),
        ):
            self.assertEqual(self.finish(store), (False, [True], True))
