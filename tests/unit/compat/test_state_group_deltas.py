"""Big states given whole stored as deltas (pure logic: a fake state store).

What Synapse then reads from such a group is checked on a real joiner by
tests/blackbox/test_prev_state.py."""

from __future__ import annotations

from typing import Any

from twisted.trial import unittest

from synapse_partial_state.compat import state_group_deltas
from synapse_partial_state.compat.state_group_deltas import (
    MIN_ENTRIES,
    StateGroupDeltas,
    delta_from,
)
from tests.unit.sync_run import run


def members(n: int, tag: str = "") -> dict[tuple[str, str], str]:
    state = {("m.room.create", ""): "$create"}
    for i in range(n):
        state[("m.room.member", f"@u{i}:x")] = f"$m{i}{tag}"
    return state


class DeltaFromTests(unittest.TestCase):
    def test_changed_and_added_entries(self) -> None:
        base = members(100)
        new = dict(base)
        new[("m.room.member", "@u3:x")] = "$leave3"
        new[("m.room.topic", "")] = "$topic"
        self.assertEqual(
            delta_from(base, new),
            {("m.room.member", "@u3:x"): "$leave3", ("m.room.topic", ""): "$topic"},
        )

    def test_identical_is_an_empty_delta(self) -> None:
        self.assertEqual(delta_from(members(10), members(10)), {})

    def test_a_removed_key_cannot_be_a_delta(self) -> None:
        base = members(100)
        new = dict(base)
        del new[("m.room.member", "@u3:x")]
        new[("m.room.topic", "")] = "$topic"  # same size, one key swapped
        self.assertIsNone(delta_from(base, new))
        self.assertIsNone(delta_from(members(101), members(100)))

    def test_too_many_changes_are_not_a_delta(self) -> None:
        base = members(100)
        fraction = state_group_deltas.MAX_DELTA_FRACTION
        new = dict(base)
        changed = int(fraction * len(new))
        for i in range(changed):
            new[("m.room.member", f"@u{i}:x")] = f"$other{i}"
        self.assertEqual(len(delta_from(base, new) or {}), changed)
        new[("m.room.member", f"@u{changed + 1}:x")] = "$one_more"
        self.assertIsNone(delta_from(base, new))

    def test_no_base_state(self) -> None:
        self.assertIsNone(delta_from({}, members(10)))


class FakeStateStore:
    """``store_state_group`` records its calls and numbers groups; their
    states are kept for ``_get_state_for_groups``."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.states: dict[int, dict[tuple[str, str], str]] = {}
        self.next_group = 1
        self.fail_delta = False
        self.reads: list[int] = []

    async def store_state_group(
        self,
        event_id: str,
        room_id: str,
        prev_group: int | None,
        delta_ids: Any,
        current_state_ids: Any,
    ) -> int:
        self.calls.append((event_id, room_id, prev_group, delta_ids))
        if prev_group is not None and self.fail_delta:
            raise Exception("Trying to persist state with unpersisted prev_group")
        group = self.next_group
        self.next_group += 1
        if current_state_ids is not None:
            self.states[group] = dict(current_state_ids)
        else:
            assert prev_group is not None
            self.states[group] = {**self.states[prev_group], **delta_ids}
        return group

    async def _get_state_for_groups(self, groups: list[int]) -> dict[int, Any]:
        self.reads.extend(groups)
        return {g: dict(self.states.get(g, {})) for g in groups}


class StateGroupDeltasTests(unittest.TestCase):
    def setUp(self) -> None:
        self.store = FakeStateStore()
        self.deltas = StateGroupDeltas(self.store)
        self.native = self.store.store_state_group
        self.store_group = self.deltas._wrap(self.native)

    def put(
        self, state: Any, room: str = "!r", prev: Any = None, delta: Any = None
    ) -> int:
        return run(self.store_group("$ev", room, prev, delta, state))

    def test_first_big_state_is_stored_whole_then_deltas_follow(self) -> None:
        base = members(MIN_ENTRIES)
        first = self.put(base)
        self.assertEqual(self.store.calls[-1][2:], (None, None))
        new = dict(base)
        new[("m.room.member", "@u1:x")] = "$leave1"
        second = self.put(new)
        self.assertEqual(
            self.store.calls[-1][2:], (first, {("m.room.member", "@u1:x"): "$leave1"})
        )
        self.assertEqual(self.store.states[second], new)
        # and the next one builds on the newest
        newer = dict(new)
        newer[("m.room.name", "")] = "$name"
        self.put(newer)
        self.assertEqual(
            self.store.calls[-1][2:], (second, {("m.room.name", ""): "$name"})
        )

    def test_small_states_are_left_to_synapse(self) -> None:
        small = members(MIN_ENTRIES - 10)
        self.put(small)
        self.put(dict(small))
        self.assertEqual([c[2] for c in self.store.calls], [None, None])
        self.assertEqual(self.store.reads, [])

    def test_other_rooms_do_not_share_a_base(self) -> None:
        self.put(members(MIN_ENTRIES), room="!a")
        self.put(members(MIN_ENTRIES), room="!b")
        self.assertEqual(self.store.calls[-1][2], None)

    def test_removal_or_many_changes_store_whole(self) -> None:
        base = members(MIN_ENTRIES + 10)
        self.put(base)
        fewer = dict(base)
        del fewer[("m.room.member", "@u1:x")]
        self.put(fewer)
        self.assertEqual(self.store.calls[-1][2], None)
        self.put(members(MIN_ENTRIES + 10, tag="x"))  # every member changed
        self.assertEqual(self.store.calls[-1][2], None)

    def test_a_failed_delta_is_stored_whole(self) -> None:
        base = members(MIN_ENTRIES)
        self.put(base)
        self.store.fail_delta = True
        new = dict(base)
        new[("m.room.topic", "")] = "$t"
        group = self.put(new)
        self.assertEqual([c[2] is None for c in self.store.calls], [True, False, True])
        self.assertEqual(self.store.states[group], new)

    def test_synapse_deltas_on_the_base_move_it(self) -> None:
        base = members(MIN_ENTRIES)
        first = self.put(base)
        small = self.put(members(3))
        # Synapse's own delta on top of the remembered group (no whole state)
        on_top = self.put(None, prev=first, delta={("m.room.topic", ""): "$t"})
        # ... and one on top of another group, which does not move it
        self.put(None, prev=small, delta={("m.room.name", ""): "$n"})
        new = {**base, ("m.room.topic", ""): "$t", ("m.room.member", "@u2:x"): "$l"}
        self.put(new)
        self.assertEqual(
            self.store.calls[-1][2:], (on_top, {("m.room.member", "@u2:x"): "$l"})
        )

    def test_rooms_remembered_are_bounded(self) -> None:
        self.patch(state_group_deltas, "MAX_ROOMS", 2)
        for room in ("!a", "!b", "!c"):
            self.put(members(MIN_ENTRIES), room=room)
        self.assertEqual(list(self.deltas._last_big), ["!b", "!c"])
