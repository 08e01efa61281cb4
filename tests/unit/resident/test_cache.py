"""The ``/state`` server's generic helpers (``resident/cache.py``)."""

from __future__ import annotations

import unittest
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest as trial

from synapse_partial_state.resident.cache import ByteBudgetLRU, OnePerKey, SingleFlight


class ByteBudgetLRUTests(unittest.TestCase):
    def test_evicts_least_recently_used_beyond_the_budget(self) -> None:
        lru: ByteBudgetLRU[str, str] = ByteBudgetLRU(100)
        self.assertTrue(lru.put("a", "A", 40))
        self.assertTrue(lru.put("b", "B", 40))
        self.assertEqual(lru.get("a"), "A")  # a is now the most recent
        self.assertTrue(lru.put("c", "C", 40))  # 120 > 100: b goes
        self.assertNotIn("b", lru)
        self.assertEqual((lru.get("a"), lru.get("c")), ("A", "C"))
        self.assertEqual((lru.bytes, lru.evictions, len(lru)), (80, 1, 2))

    def test_replacing_resizes_and_oversized_is_not_stored(self) -> None:
        lru: ByteBudgetLRU[str, str] = ByteBudgetLRU(100)
        lru.put("a", "A", 30)
        lru.put("a", "A2", 60)
        self.assertEqual((lru.get("a"), lru.bytes), ("A2", 60))
        self.assertFalse(lru.put("big", "X", 101))
        self.assertNotIn("big", lru)
        self.assertEqual(lru.bytes, 60)
        # Replacing with an oversized value drops the old one.
        self.assertFalse(lru.put("a", "A3", 500))
        self.assertEqual((len(lru), lru.bytes), (0, 0))

    def test_zero_budget_keeps_nothing(self) -> None:
        lru: ByteBudgetLRU[str, str] = ByteBudgetLRU(0)
        self.assertFalse(lru.put("a", "A", 1))
        self.assertIsNone(lru.get("a"))

    def test_discard(self) -> None:
        lru: ByteBudgetLRU[str, int] = ByteBudgetLRU(1000)
        for i in range(10):
            lru.put(f"k{i}", i, 10)
        self.assertTrue(lru.discard("k0"))
        self.assertFalse(lru.discard("k0"))
        self.assertEqual(lru.discard_where(lambda k, v: v % 2 == 1), 5)
        self.assertEqual(len(lru), 4)
        self.assertEqual(lru.bytes, 40)


class SingleFlightTests(unittest.TestCase):
    def test_background_work_is_foreground_once_a_request_waits(self) -> None:
        flight: SingleFlight[str, int] = SingleFlight()
        gate: defer.Deferred[int] = defer.Deferred()

        async def compute() -> int:
            return await gate

        flight.run("k", compute, background=True)
        self.assertFalse(flight.has_foreground("k"))
        flight.run("k", compute)
        self.assertTrue(flight.has_foreground("k"))
        gate.callback(1)
        self.assertFalse(flight.has_foreground("k"))
        self.assertNotIn("k", flight)

    def test_concurrent_callers_share_one_computation(self) -> None:
        flight: SingleFlight[str, int] = SingleFlight()
        gate: defer.Deferred[int] = defer.Deferred()
        calls = []

        async def compute() -> int:
            calls.append(1)
            return await gate

        first = defer.ensureDeferred(_await(flight.run("k", compute)))
        second = defer.ensureDeferred(_await(flight.run("k", compute)))
        self.assertIn("k", flight)
        gate.callback(5)
        results: list[int] = []
        first.addCallback(results.append)
        second.addCallback(results.append)
        self.assertEqual((results, len(calls)), ([5, 5], 1))
        self.assertNotIn("k", flight)


class OnePerKeyTests(trial.TestCase):
    def test_holders_of_a_key_take_turns_in_arrival_order(self) -> None:
        lock: OnePerKey[str] = OnePerKey()
        gates: dict[str, defer.Deferred[None]] = {
            name: defer.Deferred() for name in ("a1", "a2", "a3", "b")
        }
        log: list[str] = []

        async def work(key: str, name: str) -> None:
            async with lock.hold(key):
                log.append(f"+{name}")
                await gates[name]
                log.append(f"-{name}")

        done = [
            defer.ensureDeferred(work(k, n))
            for k, n in (("a", "a1"), ("a", "a2"), ("b", "b"), ("a", "a3"))
        ]
        # a1 and b (another key) run at once; a2 and a3 wait.
        self.assertEqual(log, ["+a1", "+b"])
        gates["a1"].callback(None)
        self.assertEqual(log[-2:], ["-a1", "+a2"])
        gates["a3"].callback(None)  # a3 still waits its turn
        self.assertNotIn("+a3", log)
        gates["a2"].callback(None)
        self.assertEqual(log[-3:], ["-a2", "+a3", "-a3"])
        gates["b"].callback(None)
        self.assertNotIn("a", lock)
        self.assertNotIn("b", lock)
        for d in done:
            self.assertIsNone(self.successResultOf(d))

    def test_a_failing_holder_lets_the_next_one_in(self) -> None:
        lock: OnePerKey[str] = OnePerKey()
        gate: defer.Deferred[None] = defer.Deferred()
        entered: list[str] = []

        async def failing() -> None:
            async with lock.hold("k"):
                await gate
                raise RuntimeError("gone")

        async def next_one() -> None:
            async with lock.hold("k"):
                entered.append("next")

        first = defer.ensureDeferred(failing())
        second = defer.ensureDeferred(next_one())
        self.assertEqual(entered, [])
        gate.callback(None)
        self.failureResultOf(first, RuntimeError)
        self.successResultOf(second)
        self.assertEqual(entered, ["next"])


async def _await(awaitable: Any) -> Any:
    return await awaitable
