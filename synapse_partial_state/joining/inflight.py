"""Who waits for the engine's state fetch, and the answers Synapse may reuse.

Synapse itself asks for the state at events of a room the engine is resyncing:
its per-event de-partial-stating (right after the engine's own fetch, at the same
events), and the handling of events that arrived during the join, whose prev
events are not stored either. Stock then downloads and stores the room's whole
state a second time, alongside its resync. Events Synapse *pulls* (the gap before
a received event, a backfill) get a narrowed partial state instead and do not
wait (``compat.backfill``); the other requests wait for the engine
(``compat.state_fetch.install_state_ids_reuse`` asks
:meth:`InflightFetches.answer_for`):

* a request for the state at an event the engine is fetching waits for that fetch
  and gets the engine's ``/state_ids`` answer: every event listed is stored by
  then, so Synapse asks for nothing more;
* a request for the state at another event of the room (on a fork older than the
  join) waits until the engine has stored the state at the join
  (:meth:`InflightFetches.expect_join_state`), then asks natively: all but the few
  events that differ are stored by then.

Either wait lasts at most :data:`STATE_REQUEST_WAIT_S` while the engine waits
for a remote server: an event that arrived during the resync must not wait for
all of it (a slow or hanging resident would keep it out of the timeline). Past
that, Synapse asks natively.

Once the engine holds the room's state, though (:meth:`InflightFetches.
local_work`: downloaded, and only checking and storing it left), the wait goes
on until it is stored, at most :data:`LOCAL_WORK_WAIT_S`: asking natively then
would download the same state a second time and store it alongside the engine,
which only makes both later (the benchmark at 10,000 members: the module's
resync took 15-24 s with that second download, 7.7 s without).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from synapse.module_api import make_deferred_yieldable
from twisted.internet import defer

from synapse_partial_state.compat.runtime import wake_waiter

#: A ``/state_ids`` answer: (state event IDs, auth chain event IDs).
StateIds = tuple[list[str], list[str]]

#: Longest wait of Synapse's own state request for the engine's fetch (seconds),
#: while the engine waits for a remote server.
STATE_REQUEST_WAIT_S = 2.0

#: Longest wait while the engine has the state in hand and only checks and
#: stores it (seconds): a safety bound, far above the time the storing takes
#: (about a minute at 100,000 members).
LOCAL_WORK_WAIT_S = 300.0


class InflightFetches:
    def __init__(self, clock: Any = None) -> None:
        """``clock``: Twisted's ``IReactorTime`` (default: the reactor)."""
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        #: (room, event) -> the /state_ids answer the engine fetched
        self._answers: dict[tuple[str, str], StateIds] = {}
        #: (room, event) the engine is fetching the state at -> who waits for it;
        #: (room, None): the join's state, expected but not yet begun
        self._waiters: dict[tuple[str, str | None], list[defer.Deferred[None]]] = {}
        #: rooms whose fetched state the engine is checking and storing, with
        #: no remote request outstanding
        self._local_work: set[str] = set()

    def remember(self, room_id: str, event_id: str, answer: StateIds) -> None:
        """The engine's ``/state_ids`` answer at ``event_id``, for Synapse's own
        request for the same state."""
        self._answers[(room_id, event_id)] = answer

    def forget(self, room_id: str) -> None:
        """Drop what was remembered for ``room_id`` (its resync is over)."""
        for key in [k for k in self._answers if k[0] == room_id]:
            del self._answers[key]

    def expect_join_state(self, room_id: str) -> None:
        """The engine is about to fetch the state at ``room_id``'s join: until
        :meth:`release_join_state`, Synapse's own requests for the state at *any*
        event of the room wait."""
        self._waiters.setdefault((room_id, None), [])

    def release_join_state(self, room_id: str) -> None:
        """The join's state is stored (or will not be fetched by the engine now):
        release whoever waits for it."""
        self._local_work.discard(room_id)
        for waiter in self._waiters.pop((room_id, None), []):
            wake_waiter(waiter)

    def local_work(self, room_id: str, only_local: bool) -> None:
        """Whether the engine's fetch for ``room_id`` now only checks and stores
        what it downloaded (True), or waits for a remote server again (False).
        While True, :meth:`wait`'s bound is :data:`LOCAL_WORK_WAIT_S`."""
        if only_local:
            self._local_work.add(room_id)
        else:
            self._local_work.discard(room_id)

    def begin(self, room_id: str, event_ids: Collection[str]) -> None:
        """The engine starts fetching the state at ``event_ids``."""
        for event_id in event_ids:
            self._waiters.setdefault((room_id, event_id), [])

    def end(self, room_id: str, event_ids: Collection[str]) -> None:
        """The engine's fetch of the state at ``event_ids`` is over."""
        for event_id in event_ids:
            for waiter in self._waiters.pop((room_id, event_id), []):
                wake_waiter(waiter)

    async def wait(
        self, room_id: str, event_id: str, timeout_s: float | None = None
    ) -> bool:
        """Wait while the engine fetches the state at ``event_id``, or the state
        at the room's join (:meth:`expect_join_state`), at most ``timeout_s``
        seconds (None: as long as it takes), or :data:`LOCAL_WORK_WAIT_S` while
        the engine only stores (:meth:`local_work`). False if the time ran
        out."""
        started = self._clock.seconds()
        while True:
            waiters = self._waiters.get((room_id, event_id))
            if waiters is None:
                waiters = self._waiters.get((room_id, None))
            if waiters is None:
                return True
            waiter: defer.Deferred[None] = defer.Deferred()
            waiters.append(waiter)
            if timeout_s is None:
                await make_deferred_yieldable(waiter)
                continue
            bound = timeout_s
            if room_id in self._local_work:
                bound = max(bound, LOCAL_WORK_WAIT_S)
            left = started + bound - self._clock.seconds()
            if left <= 0:
                waiters.remove(waiter)
                return False
            call = self._clock.callLater(left, wake_waiter, waiter)
            try:
                await make_deferred_yieldable(waiter)
            finally:
                if call.active():
                    call.cancel()

    async def answer_for(self, room_id: str, event_id: str) -> StateIds | None:
        """For Synapse's own ``/state_ids`` request: wait (see :meth:`wait`, at
        most :data:`STATE_REQUEST_WAIT_S`), then the engine's answer at
        ``event_id`` if it has one (else Synapse asks)."""
        await self.wait(room_id, event_id, STATE_REQUEST_WAIT_S)
        return self._answers.get((room_id, event_id))
