"""Identical state sets resolve to themselves, identical sets of stored events
have no auth chain difference (the shortcuts' tests)."""

from __future__ import annotations

import unittest
from types import SimpleNamespace
from typing import Any

from synapse.storage.databases.main.event_federation import StateDifference

from synapse_partial_state.compat import state_resolution
from synapse_partial_state.compat.state_resolution import (
    identical_state_sets,
    install_auth_difference_shortcut,
)
from tests.unit.sync_run import run


class IdenticalStateSetsTests(unittest.TestCase):
    A = {("m.room.create", ""): "$c", ("m.room.member", "@a:x"): "$a"}

    def test_equal_maps(self) -> None:
        self.assertTrue(identical_state_sets([self.A, dict(self.A)]))
        self.assertTrue(identical_state_sets([self.A, self.A, self.A]))

    def test_one_map_is_no_resolution(self) -> None:
        self.assertFalse(identical_state_sets([self.A]))
        self.assertFalse(identical_state_sets([]))

    def test_a_different_value_or_key_is_not_identical(self) -> None:
        other = dict(self.A)
        other[("m.room.member", "@a:x")] = "$b"
        self.assertFalse(identical_state_sets([self.A, other]))
        fewer = {("m.room.create", ""): "$c"}
        self.assertFalse(identical_state_sets([self.A, fewer]))
        self.assertFalse(identical_state_sets([fewer, self.A]))
        self.assertFalse(identical_state_sets([self.A, self.A, other]))


class _FakeStore:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def get_auth_chain_difference_extended(
        self,
        room_id: str,
        state_sets: list[set[str]],
        conflicted_set: set[str] | None,
        additional: set[str] | None,
    ) -> Any:
        self.calls.append((room_id, state_sets, conflicted_set, additional))
        return "native"


class AuthDifferenceShortcutTests(unittest.TestCase):
    """Identical sets of stored events: no auth chain difference, the store's
    computation skipped (state resolution v2 only)."""

    def setUp(self) -> None:
        self.store = _FakeStore()
        hs = SimpleNamespace(get_datastores=lambda: SimpleNamespace(main=self.store))
        install_auth_difference_shortcut(SimpleNamespace(_hs=hs))  # type: ignore[arg-type]

    def ask(self, sets: list[set[str]], conflicted: set[str] | None = None) -> Any:
        return run(
            self.store.get_auth_chain_difference_extended(
                "!r:x", sets, conflicted, None
            )
        )

    def test_identical_sets_have_no_difference(self) -> None:
        sets = [{"$c", "$pl", "$a"}, {"$a", "$pl", "$c"}, {"$c", "$a", "$pl"}]
        with self.assertLogs(state_resolution.__name__, "INFO") as logs:
            got = self.ask(sets)
        self.assertEqual(
            got, StateDifference(auth_difference=set(), conflicted_subgraph=None)
        )
        got.auth_difference.add("$x")  # Synapse adds the not-stored part to it
        self.assertEqual(self.store.calls, [])
        self.assertIn("3 identical sets of 3 stored events", logs.output[0])

    def test_anything_else_goes_to_synapse(self) -> None:
        cases: list[tuple[list[set[str]], set[str] | None]] = [
            ([{"$c", "$a"}, {"$c", "$b"}], None),  # different
            ([{"$c", "$a"}, {"$c", "$a", "$b"}], None),  # one holds more
            ([{"$c", "$a"}], None),  # nothing to compare
            ([{"$c", "$a"}, {"$c", "$a"}], set()),  # v2.1: its subgraph too
        ]
        for sets, conflicted in cases:
            self.assertEqual(self.ask(sets, conflicted), "native")
        self.assertEqual(len(self.store.calls), len(cases))
        self.assertEqual(self.store.calls[-1][2], set())

    def test_installed_once(self) -> None:
        wrapped = self.store.get_auth_chain_difference_extended
        hs = SimpleNamespace(get_datastores=lambda: SimpleNamespace(main=self.store))
        install_auth_difference_shortcut(SimpleNamespace(_hs=hs))  # type: ignore[arg-type]
        self.assertIs(self.store.get_auth_chain_difference_extended, wrapped)


ROOM = "!wave:x"


class _Clock:
    async def sleep(self, duration: Any) -> None:
        return None


class _ChainStore:
    """The stored events, and their auth chain difference as Synapse's store
    defines it: the events in some but not all of the sets' full auth chains."""

    def __init__(self, events: dict[str, Any]) -> None:
        self.events = events
        self.calls = 0

    def chain(self, event_ids: set[str]) -> set[str]:
        seen: set[str] = set()
        todo = list(event_ids)
        while todo:
            event_id = todo.pop()
            if event_id not in seen:
                seen.add(event_id)
                todo.extend(self.events[event_id].auth_event_ids())
        return seen

    async def get_auth_chain_difference_extended(
        self,
        room_id: str,
        state_sets: list[set[str]],
        conflicted_set: set[str] | None,
        additional: set[str] | None,
    ) -> Any:
        self.calls += 1
        chains = [self.chain(s) for s in state_sets]
        union = set().union(*chains)
        return StateDifference(
            auth_difference=union - chains[0].intersection(*chains[1:]),
            conflicted_subgraph=None,
        )


class _ResolutionStore:
    """Synapse's ``StateResolutionStore`` over the chain store."""

    def __init__(self, store: _ChainStore) -> None:
        self.store = store

    async def get_events(
        self, event_ids: Any, allow_rejected: bool = False
    ) -> dict[str, Any]:
        return {e: self.store.events[e] for e in event_ids if e in self.store.events}

    async def get_auth_chain_difference(
        self,
        room_id: str,
        state_sets: list[set[str]],
        conflicted_state: set[str] | None,
        additional: set[str] | None,
    ) -> Any:
        return await self.store.get_auth_chain_difference_extended(
            room_id, state_sets, conflicted_state, additional
        )


class AuthDifferenceShortcutInResolutionTests(unittest.TestCase):
    """Synapse's own state resolution v2 over a wave of joins: forks of one
    stored state, each with one join not stored yet, resolve as without the
    shortcut, and the store's computation is skipped; with stored events that
    differ between the forks, it is not."""

    def setUp(self) -> None:
        from synapse.api.room_versions import KNOWN_ROOM_VERSIONS

        self.room_version = KNOWN_ROOM_VERSIONS["10"]
        self.stored: dict[str, Any] = {}
        self.state: dict[tuple[str, str], str] = {}
        self.depth = 0
        create = self.add("m.room.create", "", "@c:x", {"creator": "@c:x"}, [])
        creator = self.add(
            "m.room.member", "@c:x", "@c:x", {"membership": "join"}, [create]
        )
        pl = self.add(
            "m.room.power_levels",
            "",
            "@c:x",
            {"users": {"@c:x": 100}},
            [create, creator],
        )
        rules = self.add(
            "m.room.join_rules",
            "",
            "@c:x",
            {"join_rule": "public"},
            [create, creator, pl],
        )
        self.join_auth = [create, pl, rules]
        for i in range(5):
            self.add(
                "m.room.member",
                f"@u{i}:x",
                f"@u{i}:x",
                {"membership": "join"},
                self.join_auth,
            )

    def event(
        self,
        etype: str,
        key: str,
        sender: str,
        content: dict[str, Any],
        auth: list[str],
    ) -> Any:
        from synapse.events import make_event_from_dict

        self.depth += 1
        return make_event_from_dict(
            {
                "type": etype,
                "state_key": key,
                "sender": sender,
                "content": content,
                "room_id": ROOM,
                "auth_events": auth,
                "prev_events": [],
                "depth": self.depth,
                "origin_server_ts": 1000 + self.depth,
                "hashes": {"sha256": "aaaa"},
                "signatures": {},
            },
            self.room_version,
        )

    def add(
        self,
        etype: str,
        key: str,
        sender: str,
        content: dict[str, Any],
        auth: list[str],
    ) -> str:
        ev = self.event(etype, key, sender, content, auth)
        self.stored[ev.event_id] = ev
        self.state[(etype, key)] = ev.event_id
        return ev.event_id

    def resolve(
        self, sets: list[dict[Any, str]], event_map: dict[str, Any], shortcut: bool
    ) -> tuple[dict[Any, str], _ChainStore]:
        from synapse.state import v2

        store = _ChainStore(dict(self.stored))
        if shortcut:
            hs = SimpleNamespace(get_datastores=lambda: SimpleNamespace(main=store))
            install_auth_difference_shortcut(SimpleNamespace(_hs=hs))  # type: ignore[arg-type]
        resolved = run(
            v2.resolve_events_with_store(
                _Clock(),  # type: ignore[arg-type]
                ROOM,
                self.room_version,
                sets,
                dict(event_map),
                _ResolutionStore(store),  # type: ignore[arg-type]
            )
        )
        return dict(resolved), store

    def test_a_wave_of_joins_resolves_the_same_without_reading_chains(self) -> None:
        joins = [
            self.event(
                "m.room.member",
                f"@n{i}:y",
                f"@n{i}:y",
                {"membership": "join"},
                self.join_auth,
            )
            for i in range(4)
        ]
        sets = [{**self.state, (j.type, j.state_key): j.event_id} for j in joins]
        event_map = {j.event_id: j for j in joins}
        with self.assertLogs(state_resolution.__name__, "INFO"):
            fast, store = self.resolve(sets, event_map, shortcut=True)
        self.assertEqual(store.calls, 0, "the store's difference was skipped")
        reference, ref_store = self.resolve(sets, event_map, shortcut=False)
        self.assertEqual(ref_store.calls, 1)
        self.assertEqual(fast, reference)
        for j in joins:  # every join is in the resolved state
            self.assertEqual(fast[(j.type, j.state_key)], j.event_id)

    def test_forks_that_differ_in_stored_events_go_to_the_store(self) -> None:
        other = self.add(
            "m.room.member",
            "@late:x",
            "@late:x",
            {"membership": "join"},
            self.join_auth,
        )
        without = {k: v for k, v in self.state.items() if v != other}
        join = self.event(
            "m.room.member", "@n:y", "@n:y", {"membership": "join"}, self.join_auth
        )
        sets = [
            dict(self.state),
            {**without, (join.type, join.state_key): join.event_id},
        ]
        fast, store = self.resolve(sets, {join.event_id: join}, shortcut=True)
        self.assertEqual(store.calls, 1)
        reference, _ = self.resolve(sets, {join.event_id: join}, shortcut=False)
        self.assertEqual(fast, reference)
        self.assertEqual(fast[("m.room.member", "@late:x")], other)
