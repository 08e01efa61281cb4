"""One read of a big current-state delta for all of Synapse's delta consumers
(``compat/bulk/delta_reads.py``)."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from synapse_partial_state.compat.bulk import delta_reads
from synapse_partial_state.compat.bulk.delta_reads import (
    KEEP_S,
    SHARE_MIN_ROWS,
    SharedDeltaReads,
    install_shared_delta_reads,
)


class Stream:
    """The delta stream's reads, held open until :meth:`answer`."""

    def __init__(self) -> None:
        self.reads: list[tuple[int, int, int]] = []
        self.pending: list[defer.Deferred[tuple[int, list[Any]]]] = []

    async def read(
        self, prev_stream_id: int, max_stream_id: int, limit: int = 100
    ) -> tuple[int, list[Any]]:
        self.reads.append((prev_stream_id, max_stream_id, limit))
        d: defer.Deferred[tuple[int, list[Any]]] = defer.Deferred()
        self.pending.append(d)
        return await d

    def answer(self, rows: int, clipped: int = 7) -> list[Any]:
        deltas = [object() for _ in range(rows)]
        self.pending.pop(0).callback((clipped, deltas))
        return deltas


class SharedDeltaReadsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.stream = Stream()
        self.clock = task.Clock()
        self.shared = SharedDeltaReads(self.stream.read, self.clock.callLater)

    def get(self, prev: int = 1, max_id: int = 9, limit: int = 100) -> Any:
        return defer.ensureDeferred(self.shared.get(prev, max_id, limit))

    def test_callers_at_once_share_one_read(self) -> None:
        first, second = self.get(), self.get()
        with self.assertLogs(delta_reads.__name__, "INFO") as logs:
            deltas = self.stream.answer(SHARE_MIN_ROWS)
        self.assertEqual(len(logs.records), 1)
        self.assertIn(f"({SHARE_MIN_ROWS} rows): one read for 2 of", logs.output[0])
        a, b = self.successResultOf(first), self.successResultOf(second)
        self.assertEqual(self.stream.reads, [(1, 9, 100)])
        self.assertEqual(a, (7, deltas))
        self.assertEqual(b, (7, deltas))
        # each its own list, of the same (frozen) objects
        self.assertIsNot(a[1], b[1])
        self.assertIs(a[1][0], b[1][0])
        self.assertEqual((self.shared.reads, self.shared.shared), (1, 1))

    def test_a_big_answer_is_kept_for_later_callers(self) -> None:
        first = self.get()
        deltas = self.stream.answer(SHARE_MIN_ROWS)
        self.successResultOf(first)
        self.clock.advance(KEEP_S - 1)
        self.assertEqual(self.successResultOf(self.get()), (7, deltas))
        self.assertEqual(len(self.stream.reads), 1)
        self.clock.advance(1)
        later = self.get()
        self.assertEqual(len(self.stream.reads), 2)
        self.stream.answer(0)
        self.successResultOf(later)

    def test_a_small_answer_is_shared_only_in_flight(self) -> None:
        first, second = self.get(), self.get()
        self.stream.answer(SHARE_MIN_ROWS - 1)
        self.successResultOf(first)
        self.successResultOf(second)
        third = self.get()
        self.assertEqual(len(self.stream.reads), 2)
        self.stream.answer(3)
        self.assertEqual(len(self.successResultOf(third)[1]), 3)

    def test_other_ranges_are_read_on_their_own(self) -> None:
        a, b, c = self.get(1, 9), self.get(2, 9), self.get(1, 10)
        self.assertEqual(self.stream.reads, [(1, 9, 100), (2, 9, 100), (1, 10, 100)])
        for _ in range(3):
            self.stream.answer(SHARE_MIN_ROWS)
        for d in (a, b, c):
            self.successResultOf(d)

    def test_a_failed_read_fails_its_callers_and_is_not_kept(self) -> None:
        first, second = self.get(), self.get()
        self.stream.pending.pop(0).errback(RuntimeError("database gone"))
        self.failureResultOf(first, RuntimeError)
        self.failureResultOf(second, RuntimeError)
        again = self.get()
        self.assertEqual(len(self.stream.reads), 2)
        self.stream.answer(1)
        self.successResultOf(again)


class Store:
    def __init__(self, stream: Stream) -> None:
        self.get_partial_current_state_deltas = stream.read


class InstallTests(unittest.TestCase):
    def test_installed_on_the_store_instance_once(self) -> None:
        stream, clock = Stream(), task.Clock()
        store = Store(stream)
        shared = install_shared_delta_reads(store, clock.callLater)
        assert shared is not None
        self.assertIsNone(install_shared_delta_reads(store, clock.callLater))
        first = defer.ensureDeferred(store.get_partial_current_state_deltas(1, 9))
        second = defer.ensureDeferred(store.get_partial_current_state_deltas(1, 9))
        stream.answer(2)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(stream.reads, [(1, 9, 100)])
        self.assertEqual(shared.shared, 1)
