"""Generic helpers of the ``/state`` server: a least-recently-used map under a
byte budget, single-flight computations (concurrent askers share one), and work
serialised per key."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

from synapse.module_api import make_deferred_yieldable, run_in_background
from twisted.internet import defer
from twisted.python.failure import Failure

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteBudgetLRU(Generic[K, V]):
    """A least-recently-used map whose entries have sizes, kept under a byte budget.

    An entry larger than the whole budget is not stored (its caller still has it).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: K) -> V | None:
        """The value (now most recently used), or None."""
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V, size: int) -> bool:
        """Store (or replace) ``key``; evict the oldest entries beyond the budget.

        Returns whether the value was stored."""
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        if size > self.max_bytes:
            return False
        self._items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, evicted_size) = self._items.popitem(last=False)
            self.bytes -= evicted_size
            self.evictions += 1
        return True

    def discard(self, key: K) -> bool:
        item = self._items.pop(key, None)
        if item is None:
            return False
        self.bytes -= item[1]
        return True

    def discard_where(self, predicate: Callable[[K, V], bool]) -> int:
        """Drop every entry for which ``predicate(key, value)`` holds."""
        doomed = [k for k, (v, _) in self._items.items() if predicate(k, v)]
        for key in doomed:
            self.discard(key)
        return len(doomed)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


class SingleFlight(Generic[K, V]):
    """Concurrent callers asking for the same key share one computation.

    Follows Synapse's log-context rules: the computation runs with
    ``run_in_background``, callers wait with ``make_deferred_yieldable``."""

    def __init__(self) -> None:
        self._waiting: dict[K, list[defer.Deferred[V]]] = {}
        #: Keys with callers that are not background work.
        self._foreground: set[K] = set()

    def __contains__(self, key: object) -> bool:
        return key in self._waiting

    def has_foreground(self, key: K) -> bool:
        """Whether a caller other than background work waits for ``key``."""
        return key in self._foreground

    def run(
        self, key: K, compute: Callable[[], Awaitable[V]], background: bool = False
    ) -> Awaitable[V]:
        waiter: defer.Deferred[V] = defer.Deferred()
        waiters = self._waiting.get(key)
        if not background:
            self._foreground.add(key)
        if waiters is not None:
            waiters.append(waiter)
        else:
            self._waiting[key] = [waiter]
            done = run_in_background(compute)
            done.addBoth(self._finish, key)
        return make_deferred_yieldable(waiter)

    def _finish(self, result: Any, key: K) -> None:
        self._foreground.discard(key)
        for waiter in self._waiting.pop(key, []):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


class OnePerKey(Generic[K]):
    """Work on one key at a time, in arrival order (Synapse's log-context rules:
    each holder waits for its predecessor with ``make_deferred_yieldable``)."""

    def __init__(self) -> None:
        #: The last holder's "done" per key (each has exactly one waiter: the next).
        self._tails: dict[K, defer.Deferred[None]] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._tails

    @asynccontextmanager
    async def hold(self, key: K) -> AsyncIterator[None]:
        previous = self._tails.get(key)
        mine: defer.Deferred[None] = defer.Deferred()
        self._tails[key] = mine
        try:
            if previous is not None:
                await make_deferred_yieldable(previous)
            yield
        finally:
            if self._tails.get(key) is mine:
                del self._tails[key]
            mine.callback(None)
