"""Waits that end early when something changes for their room: back-off sleeps
(:meth:`Wakeups.poke` ends them) and in-flight attempts (:meth:`Wakeups.interrupt`
cancels them: a request hanging at a resident must not keep a room its last local
user has left)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from synapse.module_api import make_deferred_yieldable, run_in_background
from twisted.internet import defer
from twisted.python.failure import Failure

from synapse_partial_state.compat.resync import ResyncOps
from synapse_partial_state.compat.runtime import PreserveLoggingContext, wake_waiter

T = TypeVar("T")


class Interrupted(Exception):
    """The attempt was cancelled by :meth:`Wakeups.interrupt`."""


class Wakeups:
    """Per room: a sleep that :meth:`poke` ends at once, and whether the room was
    poked since :meth:`clear`."""

    def __init__(self, ops: ResyncOps) -> None:
        self._ops = ops
        #: rooms whose sleep should end now (retry now, new server, leave)
        self._sleeping: dict[str, defer.Deferred[None]] = {}
        #: rooms poked since their back-off began
        self._poked: set[str] = set()
        #: per room, the attempt in flight: (what its wait waits on, the
        #: attempt, its abandoned flag)
        self._attempts: dict[
            str, tuple[defer.Deferred[Any], defer.Deferred[Any], _Abandoned]
        ] = {}

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

    async def interruptible(
        self, room_id: str, attempt: Callable[[Callable[[], bool]], Awaitable[T]]
    ) -> T:
        """Run ``attempt(abandoned)``; :meth:`interrupt` ends the wait at once
        with :class:`Interrupted`.

        Synapse's federation client retries a request whose wait is cancelled,
        so the attempt cannot be stopped from outside: it is abandoned. It is
        cancelled (best effort) and left to end on its own; ``abandoned()`` turns
        true, and the attempt checks it before writing anything (so nothing is
        stored for a room about to be purged). Its outcome is dropped."""
        flag = _Abandoned()
        d: defer.Deferred[T] = run_in_background(attempt, flag.is_set)
        done: defer.Deferred[tuple[bool, object]] = defer.Deferred()

        def hand_over(result: object) -> None:
            wake_waiter(done, (False, result))
            return None  # the outcome is handed over (or dropped) here

        d.addBoth(hand_over)
        self._attempts[room_id] = (done, d, flag)  # type: ignore[assignment]
        try:
            interrupted, result = await make_deferred_yieldable(done)
        finally:
            if self._attempts.get(room_id, (None,))[0] is done:  # type: ignore[index]
                del self._attempts[room_id]
        if interrupted:
            raise Interrupted()
        if isinstance(result, Failure):
            result.raiseException()
        return result  # type: ignore[return-value]

    def interrupt(self, room_id: str) -> bool:
        """End the room's wait on its attempt in flight, if any (see
        :meth:`interruptible`); also :meth:`poke` it."""
        self.poke(room_id)
        entry = self._attempts.pop(room_id, None)
        if entry is None:
            return False
        done, d, flag = entry
        flag.set()
        wake_waiter(done, (True, None))
        with PreserveLoggingContext():
            d.cancel()
        return True


class _Abandoned:
    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set
