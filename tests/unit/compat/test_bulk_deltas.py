"""The batched delta handlers (pure logic: a fake store and handler).

What Synapse's own handlers then write is checked against Synapse's per-delta
path by the differential test in tests/blackbox/test_bulk_finish.py."""

from __future__ import annotations

from typing import Any

import attr
from synapse.api.errors import NotFoundError
from twisted.trial import unittest

from synapse_partial_state.compat.bulk import deltas as bulk_deltas
from synapse_partial_state.compat.bulk.deltas import (
    FINISH_HOLD_MAX_S,
    DeltaReadingStore,
    UserDirectoryBatcher,
    finish_hold,
    profile_of,
)
from tests.unit.sync_run import run


@attr.s(frozen=True, auto_attribs=True)
class Delta:
    room_id: str
    event_type: str
    state_key: str
    event_id: str | None
    prev_event_id: str | None = None


@attr.s(frozen=True, auto_attribs=True)
class Event:
    event_id: str
    content: dict[str, Any]


class FakeStore:
    """Events by ID (rejected ones are simply absent); records every read."""

    def __init__(self, events: dict[str, dict[str, Any]], public: set[str]) -> None:
        self.events = {k: Event(k, v) for k, v in events.items()}
        self.public = public
        self.single_reads: list[str] = []
        self.batch_reads: list[list[str]] = []
        self.token_reads: list[tuple[str, str]] = []
        self.public_rooms: list[tuple[str, list[str]]] = []
        self.other = "passed through"
        self.members: dict[str, list[str]] = {}
        self.room_reads = 0
        self.private_pairs: list[tuple[str, list[tuple[str, str]]]] = []
        self.database_engine: Any = None
        self._clock: Any = None

    async def get_event(
        self, event_id: str, allow_none: bool = False, check_room_id: Any = None
    ) -> Any:
        self.single_reads.append(event_id)
        event = self.events.get(event_id)
        if event is None and not allow_none:
            raise NotFoundError(event_id)
        return event

    async def get_events(self, event_ids: list[str]) -> dict[str, Any]:
        self.batch_reads.append(list(event_ids))
        return {e: self.events[e] for e in event_ids if e in self.events}

    async def get_earliest_token_for_stats(self, kind: str, id: str) -> int:
        self.token_reads.append((kind, id))
        return 7

    async def is_room_world_readable_or_publicly_joinable(self, room_id: str) -> bool:
        return room_id in self.public

    async def add_users_in_public_rooms(self, room_id: str, users: list[str]) -> None:
        self.public_rooms.append((room_id, list(users)))

    async def get_users_in_room(self, room_id: str) -> list[str]:
        self.room_reads += 1
        return self.members.get(room_id, [])

    async def should_include_local_user_in_dir(self, user_id: str) -> bool:
        return user_id != "@bot:here"

    async def add_users_who_share_private_room(
        self, room_id: str, pairs: list[tuple[str, str]]
    ) -> None:
        self.private_pairs.append((room_id, list(pairs)))


class FakeClock:
    def __init__(self) -> None:
        self.later: list[tuple[float, Any, tuple[Any, ...]]] = []
        self.slept: list[float] = []

    async def sleep(self, duration: Any) -> None:
        self.slept.append(duration.as_secs())

    def time_msec(self) -> int:
        return 1_000_000

    def call_later(self, delay: Any, callback: Any, *args: Any) -> None:
        self.later.append((delay.as_secs(), callback, args))


class HoldClock:
    """The store's clock for :class:`FinishHold`: ``sleep`` moves time on at
    once and calls ``on_sleep`` (which may release the room)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps = 0
        self.on_sleep: Any = None

    def time(self) -> float:
        return self.now

    async def sleep(self, duration: Any) -> None:
        self.now += duration.as_secs()
        self.sleeps += 1
        if self.on_sleep is not None:
            self.on_sleep()


class FakeHandler:
    def __init__(self, store: Any) -> None:
        self.store = store
        self.clock = FakeClock()

    def is_mine_id(self, user_id: str) -> bool:
        return user_id.endswith(":here")

    def kick_off_remote_profile_refresh_process_for_remote_server(
        self, server: str
    ) -> None:
        pass

    def kick_off_remote_profile_refresh_process(self) -> None:
        pass


class FakeWrites:
    def __init__(self) -> None:
        self.profiles_written: list[list[tuple[str, str | None, str | None]]] = []
        self.stale_written: list[tuple[list[str], int]] = []

    async def profiles(
        self, profiles: list[tuple[str, str | None, str | None]]
    ) -> None:
        self.profiles_written.append(profiles)

    async def stale(self, user_ids: list[str], next_try_at_ms: int) -> None:
        self.stale_written.append((list(user_ids), next_try_at_ms))


def join(n: int, **content: Any) -> dict[str, Any]:
    return {"membership": "join", "displayname": f"user {n}", **content}


class ReadingStoreTests(unittest.TestCase):
    def setUp(self) -> None:
        self.store = FakeStore(
            {f"$e{i}": join(i) for i in range(10)} | {"$p3": {"membership": "leave"}},
            set(),
        )
        self.view = DeltaReadingStore(self.store, window=4)
        self.deltas = [
            Delta("!r", "m.room.member", f"@u{i}:there", f"$e{i}") for i in range(10)
        ]
        self.deltas[3] = attr.evolve(self.deltas[3], prev_event_id="$p3")

    def test_events_read_a_window_ahead(self) -> None:
        with self.view.reading(self.deltas):
            got = [run(self.view.get_event(f"$e{i}")) for i in range(10)]
            self.assertEqual(
                run(self.view.get_event("$p3")).content["membership"], "leave"
            )
        self.assertEqual([e.event_id for e in got], [f"$e{i}" for i in range(10)])
        # Windows of 4 IDs in delta order (event, then the event it replaced).
        self.assertEqual(
            self.store.batch_reads,
            [
                ["$e0", "$e1", "$e2", "$e3"],
                ["$e4", "$e5", "$e6", "$e7"],
                ["$e8", "$e9"],
                ["$p3", "$e4", "$e5", "$e6"],  # $p3 asked for last
            ],
        )
        self.assertEqual(self.store.single_reads, [])

    def test_handlers_of_the_same_deltas_share_one_index(self) -> None:
        """Each handler has its own list of the same delta objects (one shared
        read): one index for all of them while any is reading, each still
        reading its own windows."""
        from synapse_partial_state.compat.bulk.deltas import _DeltaIndex

        other = DeltaReadingStore(self.store, window=4)
        third = DeltaReadingStore(self.store, window=4)
        with self.view.reading(list(self.deltas)):
            with other.reading(list(self.deltas)):
                self.assertIs(other._positions, self.view._positions)
                self.assertEqual(len(_DeltaIndex._in_use), 1)
                with third.reading(self.deltas[:5]):  # other deltas: its own
                    self.assertIsNot(third._positions, self.view._positions)
                    self.assertEqual(len(_DeltaIndex._in_use), 2)
                run(other.get_event("$e5"))
            self.assertEqual(len(_DeltaIndex._in_use), 1)
            run(self.view.get_event("$e0"))
        self.assertEqual(_DeltaIndex._in_use, [])
        self.assertEqual(
            self.store.batch_reads,
            [["$e5", "$e6", "$e7", "$e8"], ["$e0", "$e1", "$e2", "$e3"]],
        )
        self.assertEqual(self.store.single_reads, [])

    def test_outside_reading_and_other_ids_go_to_the_store(self) -> None:
        run(self.view.get_event("$e1"))
        with self.view.reading(self.deltas[:2]):
            run(self.view.get_event("$e5", allow_none=True))  # not in these deltas
            run(self.view.get_event("$e0", check_room_id="!r"))  # other arguments
        self.assertEqual(self.store.single_reads, ["$e1", "$e5", "$e0"])
        self.assertEqual(self.store.batch_reads, [])
        self.assertEqual(self.view.other, "passed through")

    def test_missing_event_answered_by_the_store(self) -> None:
        """A rejected or unknown event: None with allow_none, else the store's
        own error."""
        deltas = [Delta("!r", "m.room.member", "@x:there", "$gone")]
        with self.view.reading(deltas):
            self.assertIsNone(run(self.view.get_event("$gone", allow_none=True)))
            with self.assertRaises(NotFoundError):
                run(self.view.get_event("$gone"))
        self.assertEqual(self.store.single_reads, ["$gone", "$gone"])

    def test_stats_token_read_once_per_room_and_batch(self) -> None:
        with self.view.reading(self.deltas):
            for _ in range(3):
                self.assertEqual(
                    run(self.view.get_earliest_token_for_stats("room", "!r")), 7
                )
        with self.view.reading(self.deltas):
            run(self.view.get_earliest_token_for_stats("room", "!r"))
        run(self.view.get_earliest_token_for_stats("room", "!r"))
        self.assertEqual(self.store.token_reads, [("room", "!r")] * 3)

    def test_nested_reading_restores_the_outer_one(self) -> None:
        with self.view.reading(self.deltas[:2]):
            with self.view.reading(self.deltas[5:6]):
                run(self.view.get_event("$e5"))
            run(self.view.get_event("$e1"))
            run(self.view.get_event("$e5"))  # not in the outer deltas
        self.assertEqual(self.store.batch_reads, [["$e5"], ["$e1"]])
        self.assertEqual(self.store.single_reads, ["$e5"])


class BatcherTests(unittest.TestCase):
    def setUp(self) -> None:
        events: dict[str, dict[str, Any]] = {f"$j{i}": join(i) for i in range(20)}
        events |= {
            "$leave": {"membership": "leave"},
            "$oldjoin": join(99),
            "$local": join(50),
            "$jr": {"join_rule": "public"},
            "$odd": {
                "membership": "join",
                "displayname": 42,
                "avatar_url": "mxc://x/y",
            },
        }
        self.store = FakeStore(events, {"!pub", "!pub2"})
        self.handler = FakeHandler(DeltaReadingStore(self.store))
        self.native: list[list[str]] = []
        self.writes = FakeWrites()
        self.profiles = self.writes.profiles_written

        async def native(part: list[Delta]) -> None:
            self.native.append([d.event_id or "-" for d in part])

        self.batcher = UserDirectoryBatcher(self.handler, native, self.writes)

    def handle(self, deltas: list[Delta]) -> None:
        with self.handler.store.reading(deltas):
            run(self.batcher.handle(deltas))

    @staticmethod
    def j(i: int, room: str = "!pub", user: str | None = None, **kw: Any) -> Delta:
        return Delta(room, "m.room.member", user or f"@u{i}:there", f"$j{i}", **kw)

    def test_public_joins_written_in_bulk(self) -> None:
        self.handle([self.j(i) for i in range(5)])
        self.assertEqual(self.native, [])
        self.assertEqual(
            self.profiles, [[(f"@u{i}:there", f"user {i}", None) for i in range(5)]]
        )
        self.assertEqual(
            self.store.public_rooms, [("!pub", [f"@u{i}:there" for i in range(5)])]
        )
        self.assertEqual((self.batcher.bulk_members, self.batcher.bulk_runs), (5, 1))

    def test_written_in_transactions_of_write_batch(self) -> None:
        self.patch(bulk_deltas, "WRITE_BATCH", 2)
        self.handle([self.j(i) for i in range(5)])
        self.assertEqual([len(p) for p in self.profiles], [2, 2, 1])
        self.assertEqual([len(u) for _, u in self.store.public_rooms], [2, 2, 1])

    def test_a_run_keeps_profiles_not_events(self) -> None:
        # A finish's run is every member of the room: its events must go once
        # their window is read past, not stay alive until the run is written.
        import gc
        import weakref

        store = self.store
        alive: list[weakref.ref[Event]] = []

        async def fresh_events(event_ids: list[str]) -> dict[str, Any]:
            # as Synapse: events built for the read (its cache is bounded)
            out = {e: Event(e, dict(store.events[e].content)) for e in event_ids}
            alive.extend(weakref.ref(event) for event in out.values())
            return out

        store.get_events = fresh_events  # type: ignore[method-assign]
        self.handler.store = DeltaReadingStore(store, window=2)
        live_at_write: list[int] = []

        async def profiles(rows: list[tuple[str, str | None, str | None]]) -> None:
            gc.collect()
            live_at_write.append(sum(ref() is not None for ref in alive))
            self.profiles.append(rows)

        self.writes.profiles = profiles  # type: ignore[method-assign,assignment]
        self.handle([self.j(i) for i in range(5)])
        self.assertEqual(len(alive), 5)
        # The last window's events at most (the reading store's own window).
        self.assertEqual(live_at_write, [1])
        self.assertEqual(
            self.profiles, [[(f"@u{i}:there", f"user {i}", None) for i in range(5)]]
        )

    def test_smaller_transactions_on_sqlite(self) -> None:
        from synapse.storage.engines import PostgresEngine, Sqlite3Engine

        self.patch(bulk_deltas, "WRITE_BATCH", 4)
        self.patch(bulk_deltas, "SQLITE_WRITE_BATCH", 3)
        self.store.database_engine = PostgresEngine({"args": {}})
        self.handle([self.j(i) for i in range(5)])
        self.store.database_engine = Sqlite3Engine({"args": {"database": ":memory:"}})
        self.handle([self.j(i) for i in range(5, 12)])
        self.assertEqual([len(p) for p in self.profiles], [4, 1, 3, 3, 1])
        # Paced on SQLite only: a wait between its three transactions.
        self.assertEqual(len(self.handler.clock.slept), 2)

    def test_sqlite_waits_as_long_as_each_transaction_took(self) -> None:
        from synapse.storage.engines import Sqlite3Engine

        self.patch(bulk_deltas, "SQLITE_WRITE_BATCH", 2)
        self.store.database_engine = Sqlite3Engine({"args": {"database": ":memory:"}})
        ticks = iter(range(0, 100, 1))
        self.patch(bulk_deltas.time, "monotonic", lambda: next(ticks) * 0.5)
        self.handle([self.j(i) for i in range(5)])
        self.assertEqual([len(p) for p in self.profiles], [2, 2, 1])
        # Each transaction "took" 0.5 s between two readings of the clock.
        self.assertEqual(self.handler.clock.slept, [0.5, 0.5])
        self.patch(bulk_deltas, "SQLITE_PACE", 0)
        self.handle([self.j(i) for i in range(5, 10)])
        self.assertEqual(len(self.handler.clock.slept), 2, "0 turns it off")

    def test_everything_else_goes_to_synapse_in_order(self) -> None:
        """Non-joins, local users, re-joins over a join and single joins go to
        Synapse's handler; runs are cut around them, and Synapse's calls come
        in the deltas' order."""
        deltas = [
            self.j(0),
            self.j(1),
            Delta("!pub", "m.room.join_rules", "", "$jr"),
            self.j(2),
            Delta("!pub", "m.room.member", "@gone:there", "$leave"),
            Delta("!pub", "m.room.member", "@me:here", "$local"),
            self.j(3, prev_event_id="$oldjoin"),  # a profile change, not a join
            self.j(4, prev_event_id="$leave"),  # a re-join: a join
            self.j(5),
            Delta("!pub", "m.room.member", "@del:there", None, "$j6"),  # deleted
        ]
        self.handle(deltas)
        self.assertEqual(
            self.native,
            [["$jr"], ["$j2"], ["$leave", "$local", "$j3"], ["-"]],
        )
        self.assertEqual(
            [[p[0] for p in batch] for batch in self.profiles],
            [["@u0:there", "@u1:there"], ["@u4:there", "@u5:there"]],
        )

    def test_runs_cut_by_room_and_repeated_user(self) -> None:
        self.handle(
            [
                self.j(0),
                self.j(1),
                self.j(2, room="!pub2"),
                self.j(3, room="!pub2"),
                self.j(4, room="!pub2", user="@u3:there"),  # u3 again
                self.j(5, room="!pub2"),
            ]
        )
        self.assertEqual(
            self.store.public_rooms,
            [
                ("!pub", ["@u0:there", "@u1:there"]),
                ("!pub2", ["@u2:there", "@u3:there"]),
                ("!pub2", ["@u3:there", "@u5:there"]),
            ],
        )
        self.assertEqual(self.native, [])

    def test_private_room_run(self) -> None:
        """A private room: every profile marked stale in one statement, one
        refresh per server (and one general), the room's member list read
        once, and a pair for every (included local user, new member)."""
        self.store.members["!private"] = [
            "@u0:there",
            "@u1:there",
            "@u2:else",
            "@me:here",
            "@bot:here",
            "@you:here",
        ]
        deltas = [
            self.j(0, room="!private"),
            self.j(1, room="!private"),
            self.j(2, room="!private", user="@u2:else"),
            self.j(3),  # a single public join afterwards: Synapse's
        ]
        self.handle(deltas)
        self.assertEqual(self.native, [["$j3"]])
        self.assertEqual(self.profiles, [])
        self.assertEqual(
            self.writes.stale_written,
            [(["@u0:there", "@u1:there", "@u2:else"], 1_000_000 + 60_000)],
        )
        handler = self.handler
        self.assertEqual(
            handler.clock.later,
            [
                (
                    61,
                    handler.kick_off_remote_profile_refresh_process_for_remote_server,
                    ("else",),
                ),
                (
                    61,
                    handler.kick_off_remote_profile_refresh_process_for_remote_server,
                    ("there",),
                ),
                (121, handler.kick_off_remote_profile_refresh_process, ()),
            ],
        )
        self.assertEqual(self.store.room_reads, 1)
        self.assertEqual(
            self.store.private_pairs,
            [
                (
                    "!private",
                    [
                        (local, user)
                        for user in ("@u0:there", "@u1:there", "@u2:else")
                        for local in ("@me:here", "@you:here")
                    ],
                )
            ],
        )

    def test_private_pairs_in_batches(self) -> None:
        self.patch(bulk_deltas, "WRITE_BATCH", 4)
        self.store.members["!private"] = ["@me:here", "@you:here"]
        self.handle([self.j(i, room="!private") for i in range(5)])
        self.assertEqual([len(p) for _, p in self.store.private_pairs], [4, 4, 2])
        self.assertEqual([len(u) for u, _ in self.writes.stale_written], [4, 1])

    def test_unknown_or_rejected_event_goes_to_synapse(self) -> None:
        deltas = [
            self.j(0),
            Delta("!pub", "m.room.member", "@x:there", "$nope"),
            self.j(1),
        ]
        self.handle(deltas)
        self.assertEqual(self.native, [["$j0"], ["$nope"], ["$j1"]])

    def test_profile_values_that_are_not_strings_are_none(self) -> None:
        self.assertEqual(
            profile_of(Event("$odd", {"displayname": 42, "avatar_url": "mxc://x/y"})),
            (None, "mxc://x/y"),
        )
        self.assertEqual(profile_of(Event("$e", {})), (None, None))
        self.handle([self.j(0), Delta("!pub", "m.room.member", "@odd:there", "$odd")])
        self.assertEqual(
            self.profiles,
            [[("@u0:there", "user 0", None), ("@odd:there", None, "mxc://x/y")]],
        )

    def test_events_read_in_windows(self) -> None:
        self.handle([self.j(i) for i in range(20)])
        self.assertEqual(len(self.store.batch_reads), 1)
        self.assertEqual(self.store.single_reads, [])


class FinishHoldTests(unittest.TestCase):
    """On SQLite a finishing room's user-directory run waits for the finish."""

    def setUp(self) -> None:
        from synapse.storage.engines import Sqlite3Engine

        self.store = FakeStore({f"$j{i}": join(i) for i in range(5)}, {"!pub"})
        self.store.database_engine = Sqlite3Engine({"args": {"database": ":memory:"}})
        self.clock = self.store._clock = HoldClock()
        handler = FakeHandler(DeltaReadingStore(self.store))
        self.written_at: list[float] = []

        class Writes(FakeWrites):
            async def profiles(inner: Any, profiles: Any) -> None:  # noqa: N805
                self.written_at.append(self.clock.now)

        async def native(part: list[Delta]) -> None:
            pass

        self.batcher = UserDirectoryBatcher(handler, native, Writes())
        self.handler = handler
        hold = finish_hold(self.store)
        assert hold is not None
        self.hold = hold
        self.deltas = [
            Delta("!pub", "m.room.member", f"@u{i}:there", f"$j{i}") for i in range(5)
        ]

    def handle(self) -> None:
        with self.handler.store.reading(self.deltas):
            run(self.batcher.handle(self.deltas))

    def test_one_hold_per_store_and_none_on_postgres(self) -> None:
        from synapse.storage.engines import PostgresEngine

        self.assertIs(finish_hold(self.store), self.hold)
        other = FakeStore({}, set())
        other.database_engine = PostgresEngine({"args": {}})
        self.assertIsNone(finish_hold(other))

    def test_run_of_a_finishing_room_waits_for_the_release(self) -> None:
        self.hold.hold("!pub")
        started = self.clock.now

        def release_after_two_seconds() -> None:
            if self.clock.now - started >= 2:
                self.hold.release("!pub")

        self.clock.on_sleep = release_after_two_seconds
        self.handle()
        self.assertEqual(len(self.written_at), 1)
        self.assertGreaterEqual(self.written_at[0] - started, 2)
        self.assertLess(self.written_at[0] - started, 3)
        self.assertFalse(self.hold.held("!pub"))

    def test_other_rooms_and_released_rooms_do_not_wait(self) -> None:
        self.hold.hold("!other")
        self.handle()
        self.hold.hold("!pub")
        self.hold.release("!pub")
        self.handle()
        self.assertEqual(self.clock.sleeps, 0)
        self.assertEqual(len(self.written_at), 2)

    def test_a_hold_never_released_ends_after_the_maximum(self) -> None:
        self.hold.hold("!pub")
        started = self.clock.now
        with self.assertLogs(bulk_deltas.logger, "WARNING") as logs:
            self.handle()
        self.assertIn("held its write", logs.output[0])
        self.assertGreaterEqual(self.written_at[0] - started, FINISH_HOLD_MAX_S)
        self.assertLess(self.written_at[0] - started, FINISH_HOLD_MAX_S + 1)
        self.assertFalse(self.hold.held("!pub"))
        # held from the first hold: holding again does not restart the time
        self.hold.hold("!pub")
        self.clock.now += FINISH_HOLD_MAX_S / 2
        self.hold.hold("!pub")
        self.clock.now += FINISH_HOLD_MAX_S / 2
        with self.assertLogs(bulk_deltas.logger, "WARNING"):
            self.handle()
        self.assertEqual(self.written_at[1], self.clock.now)
