"""The resync's first request, asked while the join itself is still going on.

A resync begins with ``/state_ids`` before the join event's prev events, at
the server that answered the partial ``/send_join``. Synapse starts the resync
only once ``/join`` has returned, and the engine then leaves the joining user's
first requests a moment (``resync.start_delay_seconds``), so the request went
out ~1.5 s after the ``/send_join`` answer had arrived, behind the join's
fan-out and key fetches on a busy reactor (10,000 members through a real
resident: 1.1-1.3 s from the resync's start to the answer).

:class:`EarlyStateIds` asks for it as soon as the partial ``/send_join``
answer has arrived (``compat.make_join``), while Synapse checks and stores the
answer, and hands the engine that answer for the same server, room and event
(:meth:`take`). The request and the answer's checks are the engine's own
(``StateFetchOps.state_ids``); an answer that failed, or one the engine never
takes (it asked another server first, or the prev event turned out stored),
leaves nothing behind: the engine asks as before, and an untaken answer is
dropped after :data:`EARLY_KEEP_S`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from twisted.internet import defer

from synapse_partial_state.compat.runtime import (
    make_deferred_yieldable,
    wake_waiter,
)
from synapse_partial_state.joining.inflight import StateIds

logger = logging.getLogger(__name__)

#: How long an answer nobody took is kept (seconds): well past the resync's
#: start, which follows ``/join``'s return.
EARLY_KEEP_S = 120.0

#: (destination, room ID, event ID) -> the ``/state_ids`` answer.
FetchStateIds = Callable[[str, str, str], Awaitable[StateIds]]
#: (description, async function) -> None: runs it in the background.
RunInBackground = Callable[[str, Callable[[], Awaitable[None]]], object]
#: (seconds, callback) -> a delayed call.
CallLater = Callable[[float, Callable[[], object]], Any]


class EarlyStateIds:
    def __init__(
        self,
        fetch: FetchStateIds,
        run_in_background: RunInBackground,
        call_later: CallLater,
    ) -> None:
        self._fetch = fetch
        self._run = run_in_background
        self._call_later = call_later
        #: (destination, room, event) -> fires with the answer, or None if the
        #: request failed
        self._pending: dict[tuple[str, str, str], defer.Deferred[StateIds | None]] = {}

    def start(self, destination: str, room_id: str, event_ids: Iterable[str]) -> None:
        """A partial ``/send_join`` answer for ``room_id`` came from
        ``destination``: ask it now for the state before each of the join's
        prev events ``event_ids``."""
        for event_id in event_ids:
            key = (destination, room_id, event_id)
            if key in self._pending:
                continue
            done: defer.Deferred[StateIds | None] = defer.Deferred()
            self._pending[key] = done
            self._run("sps_early_state_ids", self._fetcher(key, done))

            def forget(key: tuple[str, str, str] = key, done: Any = done) -> None:
                if self._pending.get(key) is done:
                    del self._pending[key]

            self._call_later(EARLY_KEEP_S, forget)

    def _fetcher(
        self, key: tuple[str, str, str], done: defer.Deferred[StateIds | None]
    ) -> Callable[[], Awaitable[None]]:
        async def fetch() -> None:
            destination, room_id, event_id = key
            answer: StateIds | None = None
            try:
                answer = await self._fetch(destination, room_id, event_id)
            except Exception as e:
                logger.info(
                    "Join of %s: early /state_ids from %s failed (the resync "
                    "asks again): %s",
                    room_id,
                    destination,
                    e,
                )
            finally:
                wake_waiter(done, answer)

        return fetch

    async def take(
        self, destination: str, room_id: str, event_id: str
    ) -> StateIds | None:
        """The early answer for this server, room and event (waiting for it if
        it is still on its way), once; None if there is none or it failed."""
        done = self._pending.pop((destination, room_id, event_id), None)
        if done is None:
            return None
        ready = done.called
        answer = await make_deferred_yieldable(done)
        if answer is not None:
            logger.info(
                "Resync of %s: /state_ids from %s asked during the join (%s)",
                room_id,
                destination,
                "answered already" if ready else "answer on its way",
            )
        return answer
