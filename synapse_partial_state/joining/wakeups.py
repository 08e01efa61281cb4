"""Back-off sleeps that end early when something changes for their room."""

from __future__ import annotations

from synapse.module_api import make_deferred_yieldable
from twisted.internet import defer

from synapse_partial_state.compat.resync import ResyncOps
from synapse_partial_state.compat.runtime import wake_waiter


class Wakeups:
    """Per room: a sleep that :meth:`poke` ends at once, and whether the room was
    poked since :meth:`clear`."""

    def __init__(self, ops: ResyncOps) -> None:
        self._ops = ops
        #: rooms whose sleep should end now (retry now, new server, leave)
        self._sleeping: dict[str, defer.Deferred[None]] = {}
        #: rooms poked since their back-off began
        self._poked: set[str] = set()

    def poke(self, room_id: str) -> None:
        self._poked.add(room_id)
        waiter = self._sleeping.pop(room_id, None)
        if waiter is not None:
            wake_waiter(waiter)

    def poked(self, room_id: str) -> bool:
        return room_id in self._poked

    def clear(self, room_id: str) -> None:
        self._poked.discard(room_id)

    async def sleep(self, room_id: str, delay_ms: int) -> None:
        """Sleep up to ``delay_ms``; :meth:`poke` ends it early."""
        waiter: defer.Deferred[None] = defer.Deferred()
        self._sleeping[room_id] = waiter

        def wake() -> None:
            wake_waiter(waiter)

        call = self._ops.call_later(delay_ms / 1000, wake)
        try:
            await make_deferred_yieldable(waiter)
        finally:
            if call.active():
                call.cancel()
            if self._sleeping.get(room_id) is waiter:
                del self._sleeping[room_id]
