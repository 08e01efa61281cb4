"""The hosts in a big room, worked out before a joiner asks.

A partial ``/send_join`` answer names the servers in the room
(``servers_in_room``, MSC3706), and Synapse's federation sender needs the same set
for every event it sends. Synapse computes it per state group and keeps the last
result per room, so that the next group costs only its delta. But after a start,
or after our own resync of the room, nothing has asked yet, and the first asker
pays for the whole room: every membership of the state (100,000 at 100,000
members) read and grouped by server, 0.6-0.7 s of the reactor (profiled), inside
the first joiner's ``/send_join``.

:class:`JoinedHostsWarmer` asks first, once the server is up and whenever one of
our rooms stops being partial-stated, for rooms with at least ``min_members``
joined members, one room at a time. It computes exactly what the first asker
would have (the same Synapse call, at the room's current state), only earlier,
and not while a joiner waits. Then (``then``) the ``/state`` server prepares the
room's state answers the same way (:meth:`~synapse_partial_state.resident.state.
StateServer.prepare_room`): after a start with the events, after our own resync
the event IDs only (whether anyone will join through a server that has just
joined is unknown; the events would cost it ~10 s, paced, in its busy minute after
the resync, and their 66 MiB in the cache at 100,000 members).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class WarmOps(Protocol):
    """What the warmer needs from Synapse (``compat.joined_hosts``)."""

    async def rooms_to_warm(self, min_members: int) -> list[str]:
        """Rooms with a local member, not partial-stated, with at least
        ``min_members`` joined members (by Synapse's room statistics)."""

    async def joined_members(self, room_id: str) -> int:
        """The room's joined members in its current state."""

    async def warm(self, room_id: str) -> bool:
        """Compute the room's hosts at its current state through Synapse's
        cached path; False if the room cannot be warmed now (partial state, or
        several forward extremities, whose resolution is not done ahead)."""

    def run_in_background(self, f: Callable[[], Awaitable[None]]) -> None:
        """Start ``f()`` as a background process."""

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Any:
        """Call ``callback()`` in ``delay_s`` seconds."""


class JoinedHostsWarmer:
    """Warms Synapse's joined-hosts cache for big rooms (see the module
    docstring): at start, after ``start_delay_s``, and after each resync."""

    def __init__(
        self,
        ops: WarmOps,
        min_members: int,
        start_delay_s: float = 10.0,
        then: Callable[[str, bool], Awaitable[None]] | None = None,
    ) -> None:
        self._ops = ops
        #: Awaited with each room warmed and whether it was found by the pass
        #: after a start (the state cache prepares its answers).
        self._then = then
        self._min_members = min_members
        self._start_delay_s = start_delay_s
        #: Rooms waiting, in order, each with whether the start pass found it.
        self._queue: dict[str, bool] = {}
        self._running = False
        #: Rooms warmed since start (for tests and the log).
        self.warmed: list[str] = []

    @property
    def enabled(self) -> bool:
        return self._min_members > 0

    def start(self) -> None:
        """Warm this server's big rooms once it has started."""
        if self.enabled:
            self._ops.call_later(
                self._start_delay_s,
                lambda: self._ops.run_in_background(self._queue_big_rooms),
            )

    def on_room_resynced(self, room_id: str) -> None:
        """``room_id`` has just stopped being partial-stated."""
        if self.enabled:
            self._enqueue([room_id], at_start=False)

    async def _queue_big_rooms(self) -> None:
        try:
            rooms = await self._ops.rooms_to_warm(self._min_members)
        except Exception:
            logger.exception("Could not list the rooms whose hosts to work out")
            return
        self._enqueue(rooms, at_start=True)

    def _enqueue(self, rooms: list[str], at_start: bool) -> None:
        for room_id in rooms:
            self._queue[room_id] = at_start or self._queue.get(room_id, False)
        if self._queue and not self._running:
            self._running = True
            self._ops.run_in_background(self._drain)

    async def _drain(self) -> None:
        try:
            while self._queue:
                room_id = next(iter(self._queue))
                at_start = self._queue.pop(room_id)
                await self._warm_one(room_id, at_start)
        finally:
            self._running = False

    async def _warm_one(self, room_id: str, at_start: bool) -> None:
        try:
            members = await self._ops.joined_members(room_id)
            if members < self._min_members:
                return
            started = time.monotonic()
            if await self._ops.warm(room_id):
                self.warmed.append(room_id)
                logger.info(
                    "Worked out the servers in %s (%d members) ahead of its "
                    "joiners in %.2f s",
                    room_id,
                    members,
                    time.monotonic() - started,
                )
            # Also when the hosts could not be worked out (several forward
            # extremities: the state before each is what a joiner's resync asks).
            if self._then is not None:
                await self._prepare_state(room_id, at_start)
        except Exception:
            # Only a head start lost: the first asker computes it as without us.
            logger.exception("Could not work out the servers in %s ahead", room_id)

    async def _prepare_state(self, room_id: str, at_start: bool) -> None:
        assert self._then is not None
        try:
            await self._then(room_id, at_start)
        except Exception:
            logger.exception("Could not prepare the state answers of %s ahead", room_id)
