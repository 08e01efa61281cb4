"""One read of a big current-state delta for all of Synapse's delta consumers.

Five of Synapse's handlers follow the current-state delta stream, each from its
own position (1.163.2: the user directory, room statistics, presence, delayed
events and the room forgetter), each through
``StateDeltasStore.get_partial_current_state_deltas(prev, max, limit=100)``.
A stream position's deltas are never split: the finish of a resync writes the
whole room's membership at one position, so each handler reads that room's
every member, 100,000 rows at 100,000 members, turned into as many
``StateDelta`` objects, all five at about the same moment (notified by the same
event). In the 100,000-member benchmark the joiner's resident size rose by
~200 MiB in the two seconds after the finish, its peak of the whole join.

Here callers asking for the same range at the same time share one read: the
database is asked once, and every caller gets its own list of the same
``StateDelta`` objects (frozen). An answer of at least :data:`SHARE_MIN_ROWS`
rows is kept :data:`KEEP_S` seconds for the handlers still busy with the
previous position; smaller answers are shared only while the read is in
flight. Sharing changes nothing a caller sees: the rows of a range of stream
positions up to ``max`` (persisted) do not change, and each caller gets the
answer Synapse would give it for those same arguments.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from synapse.logging.context import make_deferred_yieldable, run_in_background
from synapse.util.async_helpers import ObservableDeferred

from synapse_partial_state.compat.patching import wrap_instance_method

logger = logging.getLogger(__name__)

#: Answers at least this big are kept after the read for callers still to come.
SHARE_MIN_ROWS = 1000
#: How long such an answer is kept (seconds).
KEEP_S = 30.0
#: A shared answer of at least this many rows (above the handlers' own limit
#: per read: one stream position's group, such as a finish) is logged once.
LOG_MIN_ROWS = 100

#: (prev stream id, max stream id, limit) -> (clipped stream id, deltas)
ReadDeltas = Callable[[int, int, int], Awaitable[tuple[int, list[Any]]]]
#: (seconds, callback) -> a delayed call
CallLater = Callable[[float, Callable[[], object]], Any]


class SharedDeltaReads:
    def __init__(self, native: ReadDeltas, call_later: CallLater) -> None:
        self._native = native
        self._call_later = call_later
        self._entries: dict[tuple[int, int, int], ObservableDeferred[Any]] = {}
        #: per read in flight: the callers sharing it
        self._sharers: dict[tuple[int, int, int], int] = {}
        #: reads made, and answers given from another caller's read
        self.reads = 0
        self.shared = 0

    async def get(
        self, prev_stream_id: int, max_stream_id: int, limit: int = 100
    ) -> tuple[int, list[Any]]:
        key = (prev_stream_id, max_stream_id, limit)
        entry = self._entries.get(key)
        if entry is None:
            self.reads += 1
            entry = ObservableDeferred(
                run_in_background(self._native, prev_stream_id, max_stream_id, limit),
                consumeErrors=True,
            )
            self._entries[key] = entry
            entry.observe().addBoth(self._settled, key, entry)
        else:
            self.shared += 1
            if not entry.has_called():
                self._sharers[key] = self._sharers.get(key, 0) + 1
        clipped, deltas = await make_deferred_yieldable(entry.observe())
        return clipped, list(deltas)

    def _settled(
        self, result: Any, key: tuple[int, int, int], entry: ObservableDeferred[Any]
    ) -> None:
        def forget() -> None:
            if self._entries.get(key) is entry:
                del self._entries[key]

        sharers = self._sharers.pop(key, 0)
        if isinstance(result, tuple) and sharers and len(result[1]) >= LOG_MIN_ROWS:
            logger.info(
                "Current-state deltas after stream position %d (%d rows): one read "
                "for %d of Synapse's handlers",
                key[0],
                len(result[1]),
                sharers + 1,
            )
        if isinstance(result, tuple) and len(result[1]) >= SHARE_MIN_ROWS:
            self._call_later(KEEP_S, forget)
        else:  # small, or failed: shared while in flight only
            forget()


def install_shared_delta_reads(
    store: Any, call_later: CallLater
) -> SharedDeltaReads | None:
    """Route the main store's ``get_partial_current_state_deltas`` (on this
    instance) through a :class:`SharedDeltaReads` (None: installed already)."""
    shared: list[SharedDeltaReads] = []

    def wrap(native: Callable[..., Any]) -> Callable[..., Any]:
        reads = SharedDeltaReads(native, call_later)
        shared.append(reads)

        async def get_partial_current_state_deltas(
            prev_stream_id: int, max_stream_id: int, limit: int = 100
        ) -> tuple[int, list[Any]]:
            return await reads.get(prev_stream_id, max_stream_id, limit)

        return get_partial_current_state_deltas

    wrap_instance_method(
        store,
        "get_partial_current_state_deltas",
        wrap,
        "synapse.storage.databases.main.state_deltas.StateDeltasStore"
        ".get_partial_current_state_deltas",
        "callers reading the same range at once share one read (a resync's "
        "finish is one position of 100,000 rows at 100,000 members, read by "
        "five handlers)",
    )
    return shared[0] if shared else None
