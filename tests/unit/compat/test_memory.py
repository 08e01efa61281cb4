"""Giving freed heap back to the system (glibc's malloc_trim, on this machine)."""

from __future__ import annotations

from twisted.trial import unittest

from synapse_partial_state.compat import memory

MIB = 1024 * 1024


class ReleaseTests(unittest.TestCase):
    def test_freed_heap_goes_back_to_the_system(self) -> None:
        """200 MiB of 1,000-byte objects (glibc's heap, not pymalloc's arenas
        or mmap) freed below one that stays: the heap cannot shrink from the
        top, so RSS stays up until the trim gives the free pages back."""
        if not memory.can_release():
            self.skipTest("no malloc_trim here (not glibc)")
        chunks = [bytes(1000) + bytes([i % 256]) for i in range(200_000)]
        keep = bytes(1000) + b"top"
        del chunks
        result = memory.release_free_memory()
        assert result is not None
        before, after = result
        self.assertGreater(before - after, 100 * MIB, (before // MIB, after // MIB))
        self.assertEqual(len(keep), 1003)

    def test_rss(self) -> None:
        rss = memory.rss_bytes()
        assert rss is not None
        self.assertGreater(rss, 10 * MIB)
