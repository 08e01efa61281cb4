"""Stores a fetched state's events as outliers as they come, auth events first.

The part of the engine's state fetch (:mod:`.fetch`) that writes: today through
Synapse's own ``_auth_and_persist_outliers`` in large batches, or the bulk
outlier writer (``compat/bulk/outliers.py``), whose batches it fills.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attr

from synapse_partial_state.compat.runtime import sorted_topologically

if TYPE_CHECKING:
    from synapse.events import EventBase

    from synapse_partial_state.compat.state_fetch import StateFetchOps

logger = logging.getLogger(__name__)

#: Events per outlier persistence call (progress is reported between calls).
PERSIST_BATCH = 2000
#: Events stored before the planner's statistics are first refreshed (then each
#: time the count doubles; see ``StateFetchOps.refresh_planner_stats``).
ANALYZE_FIRST_AT = 1000


@attr.s(slots=True, auto_attribs=True)
class FetchReport:
    """What one fetch did, for the engine's log line and job counters."""

    state_events: int = 0
    #: Events of the state and its auth chain already stored when this fetch
    #: began (partial state, or stored by an attempt before a restart).
    already_stored: int = 0
    #: Events this fetch had to store.
    to_store: int = 0
    fetched: int = 0
    verified: int = 0
    rechecked: int = 0
    one_by_one: int = 0
    repaired: int = 0
    persisted: int = 0
    members_only: bool = False
    stages: dict[str, float] = attr.Factory(dict)

    def describe(self) -> str:
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in self.stages.items())
        return (
            f"{self.state_events} state events, {self.fetched} fetched"
            f"{' (members only)' if self.members_only else ''}, {self.verified} "
            f"verified in bulk, {self.rechecked} checked one by one, "
            f"{self.one_by_one} fetched one by one ({self.repaired} from other "
            f"servers), {self.persisted} stored ({stages})"
        )


class Abandoned(Exception):
    """The attempt was given up (the room is being left): nothing more is stored."""


#: Called with the report as it grows: once the events to store are known, then
#: after each batch stored.
Progress = Callable[[FetchReport], Awaitable[None]]


class OutlierWriter:
    """Stores fetched events as outliers as they come, each once its auth events
    are stored (Synapse drops an outlier whose auth events it cannot find)."""

    def __init__(
        self,
        ops: StateFetchOps,
        room_id: str,
        missing: set[str],
        report: FetchReport,
        progress: Progress | None,
        abandoned: Callable[[], bool] = lambda: False,
    ) -> None:
        self._ops = ops
        self._room_id = room_id
        #: wanted and not stored yet
        self._pending = set(missing)
        self.size = len(missing)
        #: fetched and checked, waiting for their auth events
        self._held: dict[str, EventBase] = {}
        self._report = report
        self._progress = progress
        #: true once the attempt this fetch is part of was given up
        self._abandoned = abandoned
        #: refresh the planner's statistics once this many events are stored
        self._next_analyze = ANALYZE_FIRST_AT

    def wants(self, event_id: str) -> bool:
        return event_id in self._pending and event_id not in self._held

    def outstanding(self) -> set[str]:
        """Wanted events not fetched yet."""
        return self._pending - self._held.keys()

    async def add(self, events: list[EventBase]) -> None:
        for event in events:
            if self.wants(event.event_id):
                self._held[event.event_id] = event
        if len(self._held) < self._ops.store_at_least:
            # The bulk writer's transactions have a fixed cost: fill them
            # (what is held is stored by a later add, or by flush).
            return
        await self._store(self._ready())

    async def flush(self) -> None:
        """Store everything held, ready or not (Synapse drops those whose auth
        events are missing; the completeness check then fails the fetch)."""
        await self._store(self._ready(everything=True))

    async def refresh_stats_if_big(self) -> None:
        """Once everything is stored: the planner's statistics for what follows
        (Synapse's finish replaces the room's current state with all of it)."""
        if self._report.persisted >= ANALYZE_FIRST_AT:
            await self._refresh_stats()

    async def _refresh_stats(self) -> None:
        if await self._ops.refresh_planner_stats():
            logger.info(
                "Resync of %s: planner statistics refreshed (%d events stored)",
                self._room_id,
                self._report.persisted,
            )

    def _ready(self, everything: bool = False) -> list[EventBase]:
        """Held events whose auth events are stored or ready, auth events first."""
        held = self._held
        deps = {
            event_id: [a for a in event.auth_event_ids() if a in self._pending]
            for event_id, event in held.items()
        }
        ready: list[EventBase] = []
        ok: set[str] = set()
        graph = {k: [d for d in v if d in held] for k, v in deps.items()}
        for event_id in sorted_topologically(held, graph):
            if everything or all(d in ok for d in deps[event_id]):
                ok.add(event_id)
                ready.append(held[event_id])
        return ready

    async def _store(self, events: list[EventBase]) -> None:
        for start in range(0, len(events), PERSIST_BATCH):
            if self._abandoned():
                raise Abandoned(self._room_id)
            batch = events[start : start + PERSIST_BATCH]
            await self._ops.persist_outliers(self._room_id, batch)
            for event in batch:
                self._pending.discard(event.event_id)
                self._held.pop(event.event_id, None)
            self._report.persisted += len(batch)
            if self._report.persisted >= self._next_analyze:
                # The tables have doubled since the planner last looked.
                await self._refresh_stats()
                self._next_analyze = 2 * self._report.persisted
            if self._progress is not None:
                await self._progress(self._report)
