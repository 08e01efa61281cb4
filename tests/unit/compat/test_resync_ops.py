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
