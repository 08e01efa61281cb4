"""Giving freed memory back to the system after a big resync.

A resync of a big room allocates and frees hundreds of MiB (the state's JSON,
events, signatures, rows). Python frees it, but glibc's allocator keeps most
of it mapped: the heap only shrinks from its top, so a process that has
stored a 100,000-member room keeps its peak size for the rest of its life.
``malloc_trim(0)`` hands every free page back (``madvise``), at no cost to
what is still in use. It runs in a thread (the allocator takes its own lock;
ctypes releases the GIL), on Linux with glibc only; elsewhere it does nothing.

A resync releases at completion, again two minutes later (once Synapse's
handlers have worked through the new members), and after storing a big state
(``joining/fetch.py``), before Synapse's finish: measured at 100,000 members,
100 MiB returned there, and the joiner's peak (the finish) 666 MiB instead of
741-778 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Any

logger = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MIB = 1024 * 1024


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def rss_bytes() -> int | None:
    """This process's resident set size (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def can_release() -> bool:
    return _TRIM is not None


def release_free_memory() -> tuple[int, int] | None:
    """Return freed heap pages to the system; (RSS before, RSS after) in
    bytes, or None where this is not possible. Blocking: call it in a thread."""
    if _TRIM is None:
        return None
    before = rss_bytes()
    _TRIM(0)
    after = rss_bytes()
    if before is None or after is None:
        return None
    return before, after


#: A second release this long after a resync's completion, once Synapse's
#: user directory, statistics and presence have worked through the new members.
SECOND_RELEASE_DELAY_S = 120.0


async def release_after_resync(api: Any, room_id: str) -> None:
    """:func:`release_free_memory` in a thread, logged, at once and again
    :data:`SECOND_RELEASE_DELAY_S` later (an engine complete listener)."""
    if _TRIM is None:
        return
    await _release(api, room_id, "at completion")

    async def later() -> None:
        await api.sleep(SECOND_RELEASE_DELAY_S)
        await _release(api, room_id, "after the new members' processing")

    api.run_as_background_process("sps_release_memory", later)


async def _release(api: Any, room_id: str, when: str) -> None:
    from synapse_partial_state.compat.patching import homeserver

    await release_in_thread(homeserver(api).get_reactor(), room_id, when)


async def release_in_thread(reactor: Any, room_id: str, when: str) -> None:
    """:func:`release_free_memory` in a thread of ``reactor``, logged."""
    from synapse.logging.context import defer_to_thread

    result = await defer_to_thread(reactor, release_free_memory)
    if result is None:
        return
    before, after = result
    logger.info(
        "Resync of %s: returned %d MiB of freed memory to the system %s "
        "(RSS %d -> %d MiB)",
        room_id,
        max(0, before - after) // MIB,
        when,
        before // MIB,
        after // MIB,
    )
