"""The engine's state fetch (``joining/fetch.py``) with Synapse faked: what it
hands over to Synapse's own requests for the same state."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import attr
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
from twisted.internet import defer, task
from twisted.trial import unittest

from synapse_partial_state.joining.fetch import StateFetcher, StateIncomplete
from synapse_partial_state.joining.inflight import InflightFetches
from synapse_partial_state.joining.verify import VerifierPool

ROOM = "!room:a.test"
JOIN = "$join"
PREV = "$prev"
STATE = ["$create", "$alice", "$bob"]


@attr.s(auto_attribs=True, frozen=True)
class FakeEvent:
    event_id: str
    room_id: str = ROOM
    auth: tuple[str, ...] = ()
    prev: tuple[str, ...] = ()

    def auth_event_ids(self) -> list[str]:
        return list(self.auth)

    def prev_event_ids(self) -> list[str]:
        return list(self.prev)


class FakeFetchOps:
    """A resident that answers ``/state_ids`` at ``PREV`` with ``STATE`` and
    serves single events from ``servable``; a store that keeps what is
    persisted."""

    #: store each add at once (no bulk writer's chunks)
    store_at_least = 0

    def __init__(self, servable: Collection[str]) -> None:
        self.servable = set(servable)
        self.stored: set[str] = set()

    async def in_timeline(self, event_ids: Collection[str]) -> set[str]:
        return set()

    async def room_version(self, room_id: str) -> Any:
        return KNOWN_ROOM_VERSIONS["10"]

    async def state_ids(
        self, destination: str, room_id: str, event_id: str
    ) -> tuple[list[str], list[str]]:
        assert event_id == PREV
        return list(STATE), []

    async def have_seen(self, room_id: str, event_ids: Collection[str]) -> set[str]:
        return set(event_ids) & self.stored

    async def stored_not_rejected(self, event_ids: Collection[str]) -> set[str]:
        return set(event_ids) & self.stored

    async def fetch_event(
        self, destinations: Collection[str], event_id: str, room_version: Any
    ) -> tuple[FakeEvent, str] | None:
        if event_id not in self.servable:
            return None
        return FakeEvent(event_id), next(iter(destinations))

    async def persist_outliers(self, room_id: str, events: list[Any]) -> None:
        self.stored.update(e.event_id for e in events)

    async def refresh_planner_stats(self) -> bool:
        return False

    async def release_free_memory(self, room_id: str, when: str) -> None:
        pass


class HandOverTests(unittest.TestCase):
    def fetch(self, servable: Collection[str]) -> tuple[InflightFetches, Any]:
        inflight = InflightFetches(task.Clock())
        fetcher = StateFetcher(
            FakeFetchOps(servable),  # type: ignore[arg-type]
            VerifierPool(0),
            inflight,
        )
        event = FakeEvent(JOIN, prev=(PREV,))
        d = defer.ensureDeferred(
            fetcher.fetch_state_before("res.test", event, [])  # type: ignore[arg-type]
        )
        return inflight, d

    def reused(self, inflight: InflightFetches) -> Any:
        return self.successResultOf(
            defer.ensureDeferred(inflight.answer_for(ROOM, PREV))
        )

    def test_a_checked_answer_is_handed_to_synapse(self) -> None:
        inflight, d = self.fetch(servable=STATE + [PREV])
        self.successResultOf(d)
        self.assertEqual(self.reused(inflight), (STATE, []))

    def test_an_answer_that_failed_the_completeness_check_is_not(self) -> None:
        inflight, d = self.fetch(servable=[PREV, "$create"])
        self.failureResultOf(d, StateIncomplete)
        self.assertIsNone(self.reused(inflight))
