"""The ``/state`` server with Synapse faked (``resident/state.py``): the cache,
auth chains by difference, paced loading."""

from __future__ import annotations

import unittest
from typing import Any
from unittest import mock

from twisted.internet import defer

from synapse_partial_state.config import StateCacheConfig
from synapse_partial_state.resident.state import StateServer
from tests.unit.sync_run import run

MEMBER = "m.room.member"


class _FakeApi:
    server_name = "unit.test"


class _FakeAccess:
    """Synchronous stand-in for the Synapse calls of the state server."""

    def __init__(self, events: dict[str, bytes], state: dict[Any, str]) -> None:
        self.events = events
        self.state = state
        self.loads: list[list[str]] = []
        self.groups = 0
        self.extremities = ["$x"]
        self.partial = False

    async def state_group_before(self, room_id: str, event_id: str) -> Any:
        return 7, None

    async def state_ids_of_group(self, state_group: int) -> Any:
        self.groups += 1
        return self.state

    async def state_group_delta(self, state_group: int) -> Any:
        return None, None  # stored in full

    async def forward_extremities(self, room_id: str) -> list[str]:
        return list(self.extremities)

    async def is_partial_state_room(self, room_id: str) -> bool:
        return self.partial

    async def state_ids_at_keys(self, state_group: int, keys: Any) -> Any:
        raise AssertionError("no deltas here")

    async def auth_chain_ids(self, room_id: str, event_ids: Any) -> set[str]:
        return {"$create"} if "$create" not in event_ids else set()

    async def encoded_pdus(
        self, room_id: str, event_ids: list[str]
    ) -> dict[str, bytes]:
        self.loads.append(list(event_ids))
        return {e: self.events[e] for e in event_ids if e in self.events}


class _StateServerUnit(unittest.TestCase):
    def make(self, budget: int) -> tuple[StateServer, _FakeAccess]:
        events = {f"$m{i}": b'{"m":%d}' % i for i in range(10)}
        events["$create"] = b'{"c":0}'
        state: dict[Any, str] = {(MEMBER, f"@u{i}:x"): f"$m{i}" for i in range(10)}
        access = _FakeAccess(events, state)
        server = StateServer(_FakeApi(), StateCacheConfig(), access)  # type: ignore[arg-type]
        server._cache.max_bytes = budget
        return server, access

    def answer(self, server: StateServer) -> Any:
        async def run() -> Any:
            key, entry, hit = await server._entry("!r:x", "$x")
            return hit, await server._full_events(entry)

        return self.successResultOf(defer.ensureDeferred(run()))

    def successResultOf(self, d: defer.Deferred[Any]) -> Any:
        results: list[Any] = []
        d.addBoth(results.append)
        self.assertEqual(len(results), 1, "did not complete synchronously")
        if isinstance(results[0], Exception):
            raise results[0]
        return results[0]


class StateServerCacheTests(_StateServerUnit):
    def test_second_answer_comes_from_the_cache(self) -> None:
        server, access = self.make(10_000_000)
        hit, first = self.answer(server)
        self.assertFalse(hit)
        self.assertEqual(first.loaded, 11)
        hit, second = self.answer(server)
        self.assertTrue(hit)
        self.assertEqual(second.loaded, 0)
        self.assertEqual(first.pdus, second.pdus)
        self.assertEqual(access.groups, 1)
        self.assertEqual(server.stats()["entry_hits"], 1)

    def test_small_budget_evicts_and_reloads(self) -> None:
        # Room for the state entry and a few events only.
        server, access = self.make(3000)
        _, first = self.answer(server)
        self.assertLessEqual(server.stats()["cache_bytes"], 3000)
        self.assertGreater(server.stats()["cache_evictions"], 0)
        _, second = self.answer(server)
        self.assertGreater(second.loaded, 0)  # evicted events were loaded again
        self.assertEqual(first.pdus, second.pdus)

    def test_forgotten_events_are_loaded_again(self) -> None:
        server, access = self.make(10_000_000)
        self.answer(server)
        server.forget_event("$m3")
        _, answer = self.answer(server)
        self.assertEqual(answer.loaded, 1)
        self.assertEqual(access.loads[-1], ["$m3"])
        server.forget_room("!r:x")
        self.assertEqual(server.stats()["cache_entries"], 0)


class _DagAccess:
    """Auth chains computed from a small auth DAG, counting the events asked about."""

    def __init__(self, parents: dict[str, tuple[str, ...]]) -> None:
        self.parents = parents
        self.asked: list[int] = []

    def chain(self, event_ids: Any) -> set[str]:
        seen: set[str] = set()
        todo = [p for e in event_ids for p in self.parents[e]]
        while todo:
            event_id = todo.pop()
            if event_id not in seen:
                seen.add(event_id)
                todo.extend(self.parents[event_id])
        return seen

    async def auth_chain_ids(self, room_id: str, event_ids: Any) -> set[str]:
        self.asked.append(len(event_ids))
        return self.chain(event_ids)


class AuthChainByDifferenceTests(unittest.TestCase):
    PARENTS: dict[str, tuple[str, ...]] = {
        "$create": (),
        "$pl": ("$create",),
        "$pl2": ("$create", "$pl"),
        "$jr": ("$create", "$pl"),
        "$a": ("$create", "$pl", "$jr"),
        "$b": ("$create", "$pl", "$jr"),
        "$b_leave": ("$create", "$pl", "$b"),  # cites the membership it replaces
        "$c_stray": ("$create", "$pl"),  # replaces $a without citing it
    }
    BASE = ("$create", "$pl", "$jr", "$a")

    def by_difference(self, state: tuple[str, ...], base: Any = BASE) -> Any:
        from synapse_partial_state.resident.state import auth_chain_by_difference

        access = _DagAccess(self.PARENTS)
        result = run(
            auth_chain_by_difference(
                access,  # type: ignore[arg-type]
                "!r:x",
                base,
                access.chain(base),
                state,
            )
        )
        return result, access

    def test_equals_the_full_chain_when_applicable(self) -> None:
        for state in (
            self.BASE,  # same state: no query at all
            self.BASE + ("$b",),  # a new member
            ("$create", "$pl2", "$jr", "$a"),  # power levels replaced, citing the old
            self.BASE + ("$b_leave",),  # $b came, then left
        ):
            base = self.BASE + ("$b",) if "$b_leave" in state else self.BASE
            got, access = self.by_difference(state, base)
            self.assertEqual(got, access.chain(state), state)
            self.assertLessEqual(sum(access.asked), 1, "only the added events")

    def test_declines_when_a_removed_event_is_not_cited(self) -> None:
        got, _ = self.by_difference(("$create", "$pl", "$jr", "$c_stray"))
        self.assertIsNone(got)

    def test_declines_when_too_much_changed(self) -> None:
        from synapse_partial_state.resident import state as state_module

        with mock.patch.object(state_module, "INCREMENTAL_AUTH_MAX_CHANGES", 1):
            got, _ = self.by_difference(self.BASE + ("$b", "$b_leave"))
        self.assertIsNone(got)


class PacedLoadingTests(_StateServerUnit):
    def test_pause_between_steps_only(self) -> None:
        from synapse_partial_state.resident import state as state_module

        server, access = self.make(10_000_000)
        pauses: list[float] = []

        async def pause(took: float) -> None:
            pauses.append(took)

        async def run() -> Any:
            _, entry, _ = await server._entry("!r:x", "$x")
            return await server._full_events(entry, pause)

        with mock.patch.object(state_module, "LOAD_STEP", 3):
            answer = self.successResultOf(defer.ensureDeferred(run()))
        # 10 state events in steps of 3 (3 pauses), then 1 auth event (none).
        self.assertEqual(len(pauses), 3)
        self.assertEqual([len(batch) for batch in access.loads], [3, 3, 3, 1, 1])
        self.assertEqual(answer.loaded, 11)

    def _sleeps_of(self, start: Any) -> list[float]:
        """The sleeps of a prewarm started by ``start(server)``, run at once,
        in steps of 3 events."""
        from synapse_partial_state.resident import state as state_module

        server, _ = self.make(10_000_000)
        api: Any = server._api
        sleeps: list[float] = []

        def sleep(seconds: float) -> Any:
            sleeps.append(seconds)
            return defer.succeed(None)

        api.sleep = sleep
        api.run_as_background_process = lambda desc, f, *args: defer.ensureDeferred(
            f(*args)
        )
        with (
            mock.patch.object(state_module, "LOAD_STEP", 3),
            mock.patch.object(state_module, "PREWARM_MIN_STATE", 1),
        ):
            start(server)
        self.assertEqual(server.stats()["events_loaded"], 11)
        return sleeps

    def test_the_prewarm_after_state_ids_goes_at_full_speed(self) -> None:
        async def state_ids(server: StateServer) -> None:
            key, entry, _ = await server._entry("!r:x", "$x")
            server._maybe_prewarm(key, entry)

        sleeps = self._sleeps_of(
            lambda s: self.successResultOf(defer.ensureDeferred(state_ids(s)))
        )
        self.assertEqual(sleeps, [])

    def test_the_prewarm_after_a_partial_join_is_paced(self) -> None:
        sleeps = self._sleeps_of(lambda s: s.after_partial_join("!r:x", ["$x"]))
        self.assertEqual(len(sleeps), 3)

    def test_preparing_a_room_ahead_is_paced(self) -> None:
        sleeps = self._sleeps_of(
            lambda s: self.successResultOf(defer.ensureDeferred(s.prepare_room("!r:x")))
        )
        self.assertEqual(len(sleeps), 3)


class _GatedAccess(_FakeAccess):
    """Group 7 is stored in full, group 8 as a delta of it (a new member); whole
    group loads and event loads wait on gates the test opens."""

    DELTA = {(MEMBER, "@new:x"): "$new"}

    def __init__(self, events: dict[str, bytes], state: dict[Any, str]) -> None:
        super().__init__(events, state)
        self.events["$new"] = b'{"n":1}'
        self.group_gates: list[defer.Deferred[None]] = []
        self.load_gates: list[defer.Deferred[None]] = []
        self.groups_for: dict[str, int] = {"$x": 7, "$y": 8}
        self.adjustments: dict[str, Any] = {}

    async def state_group_before(self, room_id: str, event_id: str) -> Any:
        return self.groups_for[event_id], self.adjustments.get(event_id)

    async def state_ids_of_group(self, state_group: int) -> Any:
        self.groups += 1
        gate: defer.Deferred[None] = defer.Deferred()
        self.group_gates.append(gate)
        await gate
        return self.state if state_group == 7 else {**self.state, **self.DELTA}

    async def state_group_delta(self, state_group: int) -> Any:
        return (7, dict(self.DELTA)) if state_group == 8 else (None, None)

    async def state_ids_at_keys(self, state_group: int, keys: Any) -> Any:
        return {k: self.state[k] for k in keys if k in self.state}

    async def encoded_pdus(
        self, room_id: str, event_ids: list[str]
    ) -> dict[str, bytes]:
        self.loads.append(list(event_ids))
        gate: defer.Deferred[None] = defer.Deferred()
        self.load_gates.append(gate)
        await gate
        return {e: self.events[e] for e in event_ids if e in self.events}


class ConcurrentBuildTests(_StateServerUnit):
    """Two answers for one room at once share the room-sized work."""

    def make_gated(self) -> tuple[StateServer, _GatedAccess]:
        server, plain = self.make(10_000_000)
        access = _GatedAccess(plain.events, plain.state)
        server._access = access  # type: ignore[assignment]
        return server, access

    def test_a_build_beside_another_of_its_room_waits_and_uses_its_delta(
        self,
    ) -> None:
        server, access = self.make_gated()
        first = defer.ensureDeferred(server._entry("!r:x", "$x"))
        second = defer.ensureDeferred(server._entry("!r:x", "$y"))
        # Only the first loads the whole group; the second waits its turn.
        self.assertEqual(access.groups, 1)
        access.group_gates[0].callback(None)
        _, entry7, _ = self.successResultOf(first)
        _, entry8, hit = self.successResultOf(second)
        self.assertEqual(access.groups, 1, "group 8 came from 7's entry + delta")
        self.assertFalse(hit)
        self.assertEqual(sorted(entry8.state_ids), sorted(entry7.state_ids + ("$new",)))
        self.assertEqual(sorted(entry8.member_ids), sorted(entry8.state_ids))
        self.assertEqual(server.stats()["states_by_delta"], 1)
        self.assertEqual(server.stats()["auth_chains_by_difference"], 1)

    def test_a_group_after_an_adjusted_state_comes_by_delta(self) -> None:
        """/state_ids at a join (the state before it: its group minus the join),
        then at an event of the next group (a delta of the join's group)."""
        server, access = self.make_gated()
        join_key = (MEMBER, "@u3:x")
        access.groups_for["$u3join"] = 7
        access.state[join_key] = "$u3join"
        access.adjustments = {"$u3join": (join_key, "$m3")}
        first = defer.ensureDeferred(server._entry("!r:x", "$u3join"))
        access.group_gates[0].callback(None)
        _, before_join, _ = self.successResultOf(first)
        self.assertNotIn("$u3join", before_join.state_ids)
        self.assertIn("$m3", before_join.state_ids)
        _, entry8, _ = self.successResultOf(
            defer.ensureDeferred(server._entry("!r:x", "$y"))
        )
        self.assertEqual(access.groups, 1, "group 8 came from the adjusted entry")
        self.assertEqual(server.stats()["states_by_delta"], 1)
        want = sorted(set(access.state.values()) | {"$new"})
        self.assertEqual(sorted(entry8.state_ids), want)
        self.assertEqual(sorted(entry8.member_ids), want)

    def test_without_the_base_entry_it_is_built_once_for_its_deltas(self) -> None:
        """Group 8 and group 9 are each stored as a delta of group 7 (two
        joins of a wave, a fork each): asked for 8 first, the state server
        builds 7's entry whole, keeps it, and makes 8 and then 9 of it and
        their deltas; each as Synapse's whole group would give it."""
        server, access = self.make_gated()
        other = {(MEMBER, "@other:x"): "$other"}
        access.events["$other"] = b'{"o":1}'
        access.groups_for["$z"] = 9
        deltas = {8: dict(access.DELTA), 9: other}

        async def state_group_delta(state_group: int) -> Any:
            return (7, deltas[state_group]) if state_group in deltas else (None, None)

        access.state_group_delta = state_group_delta  # type: ignore[method-assign]
        d = defer.ensureDeferred(server._entry("!r:x", "$y"))
        access.group_gates[0].callback(None)
        _, entry8, _ = self.successResultOf(d)
        _, entry9, hit = self.successResultOf(
            defer.ensureDeferred(server._entry("!r:x", "$z"))
        )
        self.assertFalse(hit)
        self.assertEqual(access.groups, 1, "only group 7 was loaded whole")
        stats = server.stats()
        self.assertEqual((stats["base_entries"], stats["states_by_delta"]), (1, 2))
        base = set(access.state.values())
        self.assertEqual(sorted(entry8.state_ids), sorted(base | {"$new"}))
        self.assertEqual(sorted(entry9.state_ids), sorted(base | {"$other"}))
        self.assertEqual(sorted(entry9.member_ids), sorted(entry9.state_ids))
        # the base itself is cached: the state at an event before the joins
        access.groups_for["$before"] = 7
        _, entry7, hit7 = self.successResultOf(
            defer.ensureDeferred(server._entry("!r:x", "$before"))
        )
        self.assertTrue(hit7)
        self.assertEqual(sorted(entry7.state_ids), sorted(base))

    def test_the_base_itself_comes_by_delta_from_a_cached_entry(self) -> None:
        """Group 7 cached; group 8 (not cached) a delta of 7; group 9 a delta
        of 8: 8 is built as the base of 9 from 7's entry and its delta, no
        group loaded whole again."""
        server, access = self.make_gated()
        other = {(MEMBER, "@other:x"): "$other"}
        access.events["$other"] = b'{"o":1}'
        access.groups_for["$z"] = 9

        async def state_group_delta(state_group: int) -> Any:
            if state_group == 8:
                return 7, dict(access.DELTA)
            return (8, other) if state_group == 9 else (None, None)

        async def state_ids_at_keys(state_group: int, keys: Any) -> Any:
            group = dict(access.state)
            if state_group == 8:
                group.update(access.DELTA)
            return {k: group[k] for k in keys if k in group}

        access.state_group_delta = state_group_delta  # type: ignore[method-assign]
        access.state_ids_at_keys = state_ids_at_keys  # type: ignore[method-assign]
        d = defer.ensureDeferred(server._entry("!r:x", "$x"))
        access.group_gates[0].callback(None)
        self.successResultOf(d)
        server._latest.clear()  # not the latest: only the cache holds 7
        _, entry9, _ = self.successResultOf(
            defer.ensureDeferred(server._entry("!r:x", "$z"))
        )
        self.assertEqual(access.groups, 1, "only group 7 was ever loaded whole")
        stats = server.stats()
        self.assertEqual((stats["base_entries"], stats["states_by_delta"]), (1, 2))
        want = set(access.state.values()) | {"$new", "$other"}
        self.assertEqual(sorted(entry9.state_ids), sorted(want))

    def test_no_base_is_built_when_the_delta_cannot_give_the_state(self) -> None:
        """The state before an event of group 8 whose key is not in 8's delta
        (``state_by_delta`` cannot make it): group 8 is loaded whole, and
        group 7's entry is not built for nothing."""
        server, access = self.make_gated()
        access.groups_for["$w"] = 8
        access.adjustments = {"$w": ((MEMBER, "@u3:x"), "$m3")}
        d = defer.ensureDeferred(server._entry("!r:x", "$w"))
        access.group_gates[0].callback(None)
        self.successResultOf(d)
        self.assertEqual(access.groups, 1)
        self.assertEqual(server.stats()["base_entries"], 0)

    def test_a_build_that_waited_for_the_same_state_reuses_it(self) -> None:
        """A build queued behind its room's build of the same entry (asked
        by another key's flight) takes that entry instead of building it."""
        server, access = self.make_gated()
        first = defer.ensureDeferred(server._entry("!r:x", "$x"))
        key = ("s", "!r:x", 7, None)
        second = defer.ensureDeferred(server._build_entry(key, "!r:x", 7, None, "$x"))
        access.group_gates[0].callback(None)
        _, entry, _ = self.successResultOf(first)
        self.assertIs(self.successResultOf(second), entry)
        self.assertEqual(access.groups, 1)

    def test_answers_at_once_load_each_event_once(self) -> None:
        from synapse_partial_state.resident import state as state_module

        server, access = self.make_gated()
        d = defer.ensureDeferred(server._entry("!r:x", "$x"))
        access.group_gates[0].callback(None)
        _, entry, _ = self.successResultOf(d)

        async def body() -> Any:
            return await server._full_events(entry)

        with mock.patch.object(state_module, "LOAD_STEP", 4):
            first = defer.ensureDeferred(body())  # loads $m0-$m3, waits
            second = defer.ensureDeferred(body())  # waits for those, loads $m4-$m7
            while any(not g.called for g in access.load_gates):
                next(g for g in access.load_gates if not g.called).callback(None)
            a, b = self.successResultOf(first), self.successResultOf(second)
        loaded = [e for batch in access.loads for e in batch]
        self.assertEqual(sorted(loaded), sorted(set(loaded)), "each event loaded once")
        self.assertEqual(a.pdus, b.pdus)
        self.assertEqual(len(a.pdus), 10)
        self.assertEqual(a.loaded + b.loaded, 11)  # 10 state events, 1 auth event


class PrepareRoomTests(_StateServerUnit):
    """``prepare_room``: the state before the room's one forward extremity."""

    def prepare(self, server: StateServer) -> None:
        api: Any = server._api
        api.sleep = lambda s: defer.succeed(None)
        api.run_as_background_process = lambda desc, f, *args: defer.ensureDeferred(
            f(*args)
        )
        from synapse_partial_state.resident import state as state_module

        with mock.patch.object(state_module, "PREWARM_MIN_STATE", 1):
            self.successResultOf(defer.ensureDeferred(server.prepare_room("!r:x")))

    def test_builds_the_entry_and_encodes_its_events(self) -> None:
        server, access = self.make(10_000_000)
        self.prepare(server)
        self.assertEqual(access.groups, 1)
        self.assertEqual(
            sorted(e for batch in access.loads for e in batch), sorted(access.events)
        )
        # A joiner's /state at the extremity is then served from the cache.
        hit, answer = self.answer(server)
        self.assertTrue(hit)
        self.assertEqual(answer.loaded, 0)

    def test_ids_only_when_the_cache_is_half_full(self) -> None:
        server, access = self.make(10_000_000)
        server._cache.put(("other",), object(), 6_000_000)
        self.prepare(server)
        self.assertEqual((access.groups, access.loads), (1, []))

    def test_ids_only_when_asked(self) -> None:
        server, access = self.make(10_000_000)
        api: Any = server._api
        api.sleep = lambda s: defer.succeed(None)
        self.successResultOf(
            defer.ensureDeferred(server.prepare_room("!r:x", events=False))
        )
        self.assertEqual((access.groups, access.loads), (1, []))

    def test_the_state_before_each_of_several_extremities(self) -> None:
        server, access = self.make(10_000_000)
        access.extremities = ["$x", "$z"]
        groups = {"$x": 7, "$z": 9}

        async def state_group_before(room_id: str, event_id: str) -> Any:
            return groups[event_id], None

        access.state_group_before = state_group_before  # type: ignore[method-assign]
        self.prepare(server)
        self.assertEqual(access.groups, 2)
        self.assertEqual(server.stats()["cache_entries"] - len(access.events), 2)

    def test_nothing_with_too_many_extremities_or_partial_state(self) -> None:
        from synapse_partial_state.resident import state as state_module

        server, access = self.make(10_000_000)
        access.extremities = [
            f"$e{i}" for i in range(state_module.PREPARE_MAX_EXTREMITIES + 1)
        ]
        self.prepare(server)
        access.extremities = ["$x"]
        access.partial = True
        self.prepare(server)
        self.assertEqual((access.groups, access.loads), (0, []))
