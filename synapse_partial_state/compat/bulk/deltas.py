"""The minute after: Synapse's current-state delta handlers, batched.

When a big room's state becomes full, Synapse's current state gains one delta
per member (100,000 at 100,000 members), and three handlers then work through
them, one delta at a time: the user directory, the room statistics and
presence. Each reads the delta's event (and the event it replaced) with its own
``get_event`` call, one database round trip per delta once the events have left
Synapse's event cache; the user directory then writes every remote member of a
public room with two transactions of its own (its profile, its
``users_in_public_rooms`` row), and the statistics read the room's
``completed_delta_stream_id`` once per delta. At 100,000 members that kept a
joining homeserver busy for minutes after its resync, stock and module alike,
with its reactor mostly waiting for the database.

Here, while a handler works through a list of deltas, the events of the next
:data:`WINDOW` deltas are read with one ``get_events`` (:class:`DeltaReadingStore`,
which the handlers see as their ``store``: everything else passes through), the
statistics' per-room token is read once per list, and the user directory writes
runs of remote members joining the same room with Synapse's own statements over
many rows (:class:`UserDirectoryBatcher`; in a private room, where Synapse walks
the whole member list once per new member, the walk is done once per run).
Every other delta goes through Synapse's own handler, in order.

Installed on the handler classes (``UserDirectoryHandler._handle_deltas``,
``StatsHandler._handle_deltas``, ``PresenceHandler._handle_state_delta``),
checked against Synapse 1.163.2 by the differential test in
``tests/blackbox/test_bulk_finish.py`` (the same user-directory and statistics
rows as Synapse's own handlers); elsewhere :mod:`.gate` keeps it off.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, ClassVar, TypeVar

from synapse.api.constants import EventTypes, Membership

from synapse_partial_state.compat.bulk.gate import BulkGate
from synapse_partial_state.compat.patching import wrap_instance_method

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Deltas whose events one ``get_events`` call reads ahead.
WINDOW = 500
#: Members per user-directory transaction.
WRITE_BATCH = 1000
#: ... on SQLite, where Synapse has one connection: each query of every other
#: request waits for the transaction in progress (1,000 members took ~1.2 s
#: there, the full-text index being the slow part; a resident that had just
#: finished its own resync answered a `send_join` in 6 s instead of 0.5).
SQLITE_WRITE_BATCH = 5
#: ... and after each such transaction the writer waits this many times as long
#: as it took, leaving the connection to the requests being served (a resident
#: that has just resynced a 10,000-member room writes its user directory for
#: ~12 s, ~1.2 ms per member for the full-text index; every query of a joiner's
#: `send_join` or of an incoming `/send` waits for the transaction in progress).
SQLITE_PACE = 1.0
#: Runs at least this long are logged at INFO.
LOG_MIN_RUN = 100
#: Longest a finishing room's user-directory run waits for the finish (s).
FINISH_HOLD_MAX_S = 60.0
#: How often a held run looks whether the finish is over (s).
FINISH_HOLD_POLL_S = 0.25


class FinishHold:
    """On SQLite, the user directory's bulk write of a room waits while that
    room's resync is finishing.

    A resync's finish writes the room's full current state, which gives the
    user directory one delta per member (10,000 at 10,000 members); then
    Synapse clears the room's partial-state flag, which fails (and is retried)
    while an event received meanwhile is still partial. Synapse on SQLite has
    one database connection, so each retry of the finish waited behind a whole
    transaction of the directory's bulk write (1,000 members, 12.6 s for 10,000
    in a benchmark), and the longer it waited the likelier another event came
    in partial: at 10,000 members the finish took ~11 s more than stock's in
    two of three runs. Here the directory's runs for a finishing room
    (:meth:`hold` at the finish's start, :meth:`release` once the flag is
    cleared or the resync given up) wait until the finish is over, at most
    :data:`FINISH_HOLD_MAX_S` from the hold; deltas of other rooms wait too
    (the directory handles its deltas in order). On PostgreSQL, with a pool of
    connections, nothing is held (:func:`finish_hold` is None)."""

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        #: room ID -> when its finish began (s, the clock's)
        self._since: dict[str, float] = {}

    def hold(self, room_id: str) -> None:
        self._since.setdefault(room_id, self._clock.time())

    def release(self, room_id: str) -> None:
        self._since.pop(room_id, None)

    def held(self, room_id: str) -> bool:
        return room_id in self._since

    async def wait(self, room_id: str) -> float:
        """Until ``room_id`` is released or has been held for
        :data:`FINISH_HOLD_MAX_S`; the seconds waited."""
        from synapse.util.duration import Duration

        started = self._clock.time()
        while room_id in self._since:
            if self._clock.time() - self._since[room_id] >= FINISH_HOLD_MAX_S:
                logger.warning(
                    "User directory: the finish of %s has held its write for "
                    "%.0f s; writing now",
                    room_id,
                    FINISH_HOLD_MAX_S,
                )
                self._since.pop(room_id, None)
                break
            await self._clock.sleep(Duration(seconds=FINISH_HOLD_POLL_S))
        return self._clock.time() - started


def _on_sqlite(store: Any) -> bool:
    from synapse.storage.engines import Sqlite3Engine

    return isinstance(store.database_engine, Sqlite3Engine)


def write_batch(store: Any) -> int:
    """Members per user-directory transaction on ``store``'s database."""
    return SQLITE_WRITE_BATCH if _on_sqlite(store) else WRITE_BATCH


def finish_hold(store: Any) -> FinishHold | None:
    """The main store's :class:`FinishHold` (one per homeserver), or None
    where the database is not SQLite."""
    if not _on_sqlite(store):
        return None
    hold = store.__dict__.get("_sps_finish_hold")
    if hold is None:
        hold = store._sps_finish_hold = FinishHold(store._clock)
    return hold


class _DeltaIndex:
    """The event IDs of a list of deltas in order (each event, then the event
    it replaced), and each ID's position: where a read-ahead window starts.

    Synapse's delta handlers get the same delta objects from one shared read
    (:mod:`.delta_reads`) and handle them at the same time: at a finish, three
    of them over one 100,000-member list, whose index (two entries per delta)
    held ~8 MiB each at the joiner's peak. A handler whose deltas are the same
    objects (first, last and length) as one being handled uses that index; it
    is dropped when the last of them is done. An index shared by mistake could
    only cost reads, never change an answer: a window is always read for the
    ID asked, and an ID the index does not hold goes to the store."""

    #: indexes in use (a handful: one per list being handled)
    _in_use: ClassVar[list[_DeltaIndex]] = []

    def __init__(self, deltas: Sequence[Any]) -> None:
        self.first = deltas[0] if deltas else None
        self.last = deltas[-1] if deltas else None
        self.size = len(deltas)
        self.users = 0
        self.order: list[str] = []
        self.positions: dict[str, int] = {}
        for delta in deltas:
            for event_id in (delta.event_id, delta.prev_event_id):
                if event_id is not None and event_id not in self.positions:
                    self.positions[event_id] = len(self.order)
                    self.order.append(event_id)

    @classmethod
    def enter(cls, deltas: Sequence[Any]) -> _DeltaIndex:
        """The index of ``deltas``: one in use for the same deltas, or new."""
        for index in cls._in_use:
            if (
                index.size == len(deltas)
                and deltas
                and index.first is deltas[0]
                and index.last is deltas[-1]
            ):
                break
        else:
            index = cls(deltas)
            cls._in_use.append(index)
        index.users += 1
        return index

    def leave(self) -> None:
        self.users -= 1
        if self.users <= 0 and self in self._in_use:
            self._in_use.remove(self)


class DeltaReadingStore:
    """A delta handler's view of the main store.

    Outside :meth:`reading` it is the store. Inside, ``get_event(event_id)``
    (with at most ``allow_none``) of an event named by the deltas being handled
    is served from a window of events read ahead with one ``get_events`` call
    (the same events ``get_event`` returns: redacted as stored, rejected ones
    left out; for an event the window does not hold, the store's own
    ``get_event`` answers, with its errors), and
    ``get_earliest_token_for_stats`` is read once per room."""

    def __init__(self, store: Any, window: int = WINDOW) -> None:
        self._store = store
        self._window_size = window
        self._positions: dict[str, int] = {}
        self._order: list[str] = []
        self._window: dict[str, Any] = {}
        self._window_ids: frozenset[str] = frozenset()
        self._tokens: dict[tuple[str, str], int | None] | None = None
        #: ``get_events`` calls made for windows (for tests and the log).
        self.window_reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    @contextlib.contextmanager
    def reading(self, deltas: Sequence[Any]) -> Iterator[None]:
        """While handling ``deltas`` (objects with ``event_id`` and
        ``prev_event_id``), in order."""
        saved = (
            self._positions,
            self._order,
            self._window,
            self._window_ids,
            self._tokens,
        )
        index = _DeltaIndex.enter(deltas)
        self._positions, self._order = index.positions, index.order
        self._window, self._window_ids, self._tokens = {}, frozenset(), {}
        try:
            yield
        finally:
            index.leave()
            (
                self._positions,
                self._order,
                self._window,
                self._window_ids,
                self._tokens,
            ) = saved

    async def get_event(self, event_id: str, *args: Any, **kwargs: Any) -> Any:
        position = self._positions.get(event_id)
        if position is None or args or set(kwargs) - {"allow_none"}:
            return await self._store.get_event(event_id, *args, **kwargs)
        if event_id not in self._window_ids:
            ids = self._order[position : position + self._window_size]
            self._window = {}  # let the previous window go first
            self._window = await self._store.get_events(ids)
            self._window_ids = frozenset(ids)
            self.window_reads += 1
        event = self._window.get(event_id)
        if event is None:
            return await self._store.get_event(event_id, **kwargs)
        return event

    async def get_earliest_token_for_stats(self, stats_type: str, id: str) -> Any:
        if self._tokens is None:
            return await self._store.get_earliest_token_for_stats(stats_type, id)
        key = (stats_type, id)
        if key not in self._tokens:
            self._tokens[key] = await self._store.get_earliest_token_for_stats(
                stats_type, id
            )
        return self._tokens[key]


def reading_store(handler: Any) -> DeltaReadingStore:
    """``handler.store``, made a :class:`DeltaReadingStore` (once)."""
    store = handler.store
    if not isinstance(store, DeltaReadingStore):
        store = handler.store = DeltaReadingStore(store)
    return store


def membership(event: Any) -> Any:
    """The ``membership`` of an event's content (None without an event)."""
    return None if event is None else event.content.get("membership")


#: (display name, avatar URL) as the user directory keeps them.
Profile = tuple[str | None, str | None]


def profile_of(event: Any) -> Profile:
    """(display name, avatar URL) as the user directory keeps them: a value
    that is not a string is None."""
    name = event.content.get("displayname")
    avatar = event.content.get("avatar_url")
    return (
        name if isinstance(name, str) else None,
        avatar if isinstance(avatar, str) else None,
    )


class UserDirectoryWrites:
    """Synapse's own user-directory statements, over many users at once."""

    def __init__(self, store: Any) -> None:
        self._store = store

    async def profiles(
        self, profiles: list[tuple[str, str | None, str | None]]
    ) -> None:
        """``update_profile_in_user_dir`` of each (user, name, avatar): its
        transaction function takes many."""
        from synapse.storage.databases.main.user_directory import _UserDirProfile

        await self._store.db_pool.runInteraction(
            "sps_update_profiles_in_user_dir",
            self._store._update_profiles_in_user_dir_txn,
            [_UserDirProfile(user, name, avatar) for user, name, avatar in profiles],
        )

    async def stale(self, user_ids: list[str], next_try_at_ms: int) -> None:
        """``set_remote_user_profile_in_user_dir_stale(user, next_try_at_ms, 0)``
        of each remote user: the same upsert, of many rows."""
        from synapse.types import get_domain_from_id

        await self._store.db_pool.simple_upsert_many(
            table="user_directory_stale_remote_users",
            key_names=("user_id",),
            key_values=[(user_id,) for user_id in user_ids],
            value_names=("next_try_at_ts", "retry_counter", "user_server_name"),
            value_values=[
                (next_try_at_ms, 0, get_domain_from_id(user_id)) for user_id in user_ids
            ],
            desc="sps_set_remote_user_profiles_in_user_dir_stale",
        )


class UserDirectoryBatcher:
    """``UserDirectoryHandler._handle_deltas`` with runs of joins in bulk.

    A *join* here is a membership delta of a remote user whose event says
    ``join`` while the event it replaced (if any, and stored) does not: what
    Synapse's handler calls ``MatchChange.now_true``. Consecutive joins of one
    room by distinct users (a *run*) touch distinct rows and read nothing the
    others write, so they are written together with the same statements over
    many rows. For each, Synapse's handler (1.163.2):

    * in a room that is world-readable or publicly joinable: writes the user's
      profile from the event (``update_profile_in_user_dir``) and a
      ``users_in_public_rooms`` row, two transactions per member;
    * in any other room: marks the user's profile stale (to be fetched from its
      server in a minute), schedules that refresh for the user's server and a
      general one, and records that every local user of the room (those the
      directory includes) now shares a private room with the user; for that it
      walks the room's whole member list, per member (quadratic). A run walks
      it once, marks every profile stale in one statement and schedules one
      refresh per server.

    A single join and every other delta go through Synapse's handler, in the
    order they came.
    """

    def __init__(
        self,
        handler: Any,
        native: Callable[[list[Any]], Awaitable[None]],
        writes: Any,
    ) -> None:
        self._handler = handler
        self._native = native
        self._writes = writes
        #: Members written in bulk, and runs (for tests and the log).
        self.bulk_members = 0
        self.bulk_runs = 0

    async def _join(self, delta: Any) -> Any:
        """The delta's event if the delta is a remote user's join, else None."""
        if (
            delta.event_type != EventTypes.Member
            or delta.event_id is None
            or self._handler.is_mine_id(delta.state_key)
        ):
            return None
        store = self._handler.store
        event = await store.get_event(delta.event_id, allow_none=True)
        if membership(event) != Membership.JOIN:
            return None
        if delta.prev_event_id is not None:
            prev = await store.get_event(delta.prev_event_id, allow_none=True)
            if membership(prev) == Membership.JOIN:
                return None
        return event

    async def handle(self, deltas: Sequence[Any]) -> None:
        # (delta, profile), one room, distinct users. The profile, not the
        # event: a resync's finish makes a run of every member (100,000 at
        # 100,000 members), and holding their events until the run is written
        # kept ~220 MiB of them alive after the window that read them.
        run: list[tuple[Any, Profile]] = []
        users: set[str] = set()
        others: list[Any] = []  # deltas for Synapse's handler, in order
        for delta in deltas:
            event = await self._join(delta)
            if run and (
                event is None
                or delta.room_id != run[0][0].room_id
                or delta.state_key in users
            ):
                await self._flush(run)
                run, users = [], set()
            if event is None:
                others.append(delta)
                continue
            if others:
                await self._native(others)
                others = []
            run.append((delta, profile_of(event)))
            users.add(delta.state_key)
        if run:
            await self._flush(run)
        if others:
            await self._native(others)

    async def _flush(self, run: list[tuple[Any, Profile]]) -> None:
        if len(run) < 2:
            await self._native([delta for delta, _ in run])
            return
        room_id = run[0][0].room_id
        store = self._handler.store
        hold = finish_hold(getattr(store, "_store", store))
        if hold is not None and hold.held(room_id):
            waited = await hold.wait(room_id)
            logger.info(
                "User directory: %d members joining %s waited %.2f s for the "
                "room's resync to finish",
                len(run),
                room_id,
                waited,
            )
        started = time.monotonic()
        if await store.is_room_world_readable_or_publicly_joinable(room_id):
            kind = "public"
            await self._public(room_id, run)
        else:
            kind = "private"
            await self._private(room_id, [delta.state_key for delta, _ in run])
        self.bulk_members += len(run)
        self.bulk_runs += 1
        logger.log(
            logging.INFO if len(run) >= LOG_MIN_RUN else logging.DEBUG,
            "User directory: %d members joining %s (%s) written in bulk in %.2f s",
            len(run),
            room_id,
            kind,
            time.monotonic() - started,
        )

    async def _batches(self, items: list[T], size: int) -> AsyncIterator[list[T]]:
        """``items`` in parts of ``size``, one transaction each. On SQLite,
        between parts, wait :data:`SQLITE_PACE` times as long as the caller's
        work on the previous part took."""
        from synapse.util.duration import Duration

        pace = SQLITE_PACE > 0 and _on_sqlite(self._handler.store)
        for start in range(0, len(items), size):
            began = time.monotonic()
            yield items[start : start + size]
            if pace and start + size < len(items):
                took = time.monotonic() - began
                await self._handler.clock.sleep(Duration(seconds=took * SQLITE_PACE))

    async def _public(self, room_id: str, run: list[tuple[Any, Profile]]) -> None:
        store = self._handler.store
        batch = write_batch(store)
        async for part in self._batches(run, batch):
            await self._writes.profiles(
                [(delta.state_key, *profile) for delta, profile in part]
            )
            await store.add_users_in_public_rooms(
                room_id, [delta.state_key for delta, _ in part]
            )

    async def _private(self, room_id: str, joined: list[str]) -> None:
        from synapse.handlers.user_directory import USER_DIRECTORY_STALE_REFRESH_TIME
        from synapse.types import get_domain_from_id
        from synapse.util.duration import Duration

        handler = self._handler
        store = handler.store
        refresh = USER_DIRECTORY_STALE_REFRESH_TIME
        next_try_at_ms = handler.clock.time_msec() + refresh.as_millis()
        batch = write_batch(store)
        async for part in self._batches(joined, batch):
            await self._writes.stale(part, next_try_at_ms)
        for server in sorted({get_domain_from_id(user_id) for user_id in joined}):
            handler.clock.call_later(
                refresh + Duration(seconds=1),
                handler.kick_off_remote_profile_refresh_process_for_remote_server,
                server,
            )
        handler.clock.call_later(
            refresh * 2 + Duration(seconds=1),
            handler.kick_off_remote_profile_refresh_process,
        )
        local_users = [
            user_id
            for user_id in await store.get_users_in_room(room_id)
            if handler.is_mine_id(user_id)
            and await store.should_include_local_user_in_dir(user_id)
        ]
        pairs = [(local, user_id) for user_id in joined for local in local_users]
        async for shared in self._batches(pairs, batch):
            await store.add_users_who_share_private_room(room_id, shared)


def install_delta_batching(verdict: BulkGate) -> bool:
    """Batch the delta handlers' reads and the user directory's writes where the
    bulk gate's ``verdict`` allows (False where it does not)."""
    if not verdict.allowed:
        return False
    from synapse.handlers.presence import PresenceHandler
    from synapse.handlers.stats import StatsHandler
    from synapse.handlers.user_directory import UserDirectoryHandler

    def user_directory(native: Callable[..., Awaitable[None]]) -> Callable[..., Any]:
        async def _handle_deltas(self: Any, deltas: list[Any]) -> None:
            store = reading_store(self)
            batcher = self.__dict__.get("_sps_batcher")
            if batcher is None:
                batcher = self._sps_batcher = UserDirectoryBatcher(
                    self,
                    lambda part: native(self, part),
                    UserDirectoryWrites(store._store),
                )
            with store.reading(deltas):
                await batcher.handle(deltas)

        return _handle_deltas

    def stats(native: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def _handle_deltas(self: Any, deltas: Any) -> Any:
            deltas = list(deltas)
            store = reading_store(self)
            with store.reading(deltas):
                return await native(self, deltas)

        return _handle_deltas

    def presence(native: Callable[..., Awaitable[None]]) -> Callable[..., Any]:
        async def _handle_state_delta(self: Any, room_id: str, deltas: Any) -> None:
            store = reading_store(self)
            with store.reading(deltas):
                await native(self, room_id, deltas)

        return _handle_state_delta

    module = "synapse.handlers."
    wrap_instance_method(
        UserDirectoryHandler,
        "_handle_deltas",
        user_directory,
        module + "user_directory.UserDirectoryHandler._handle_deltas",
        "events read a window ahead; a room's new remote members written in "
        "bulk (Synapse's own statements over many rows)",
        kind="wrap",
    )
    wrap_instance_method(
        StatsHandler,
        "_handle_deltas",
        stats,
        module + "stats.StatsHandler._handle_deltas",
        "events read a window ahead; a room's stats token read once per batch",
        kind="wrap",
    )
    wrap_instance_method(
        PresenceHandler,
        "_handle_state_delta",
        presence,
        module + "presence.PresenceHandler._handle_state_delta",
        "events read a window ahead",
        kind="wrap",
    )
    return True
