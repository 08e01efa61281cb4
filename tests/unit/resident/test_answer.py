"""How ``/state`` answers are assembled (``resident/answer.py``)."""

from __future__ import annotations

import json
import unittest
from typing import Any

from synapse_partial_state.resident.answer import (
    blocks,
    group_state_of,
    split_state,
    state_before,
    state_body_parts,
    state_by_delta,
)
from synapse_partial_state.wire import MEMBERS_ONLY_PARAM

MEMBER = "m.room.member"


class AnswerAssemblyTests(unittest.TestCase):
    def test_state_body_is_the_json_of_its_parts(self) -> None:
        pdus = [b'{"a":1}', b"", b'{"b":2}']  # b"": loaded, never sent
        auth = [b'{"c":3}']
        length, parts = state_body_parts(pdus, auth, members_only=False)
        body = b"".join(parts)
        self.assertEqual(len(body), length)
        self.assertEqual(
            json.loads(body), {"pdus": [{"a": 1}, {"b": 2}], "auth_chain": [{"c": 3}]}
        )
        length, parts = state_body_parts([], [], members_only=True)
        self.assertEqual(
            json.loads(b"".join(parts)),
            {"pdus": [], "auth_chain": [], MEMBERS_ONLY_PARAM: True},
        )

    def test_blocks_join_small_pieces(self) -> None:
        pieces = [b"x" * 10] * 25
        out = list(blocks(pieces, size=100))
        self.assertEqual([len(b) for b in out], [100, 100, 50])
        self.assertEqual(b"".join(out), b"".join(pieces))
        self.assertEqual(list(blocks([], size=100)), [])

    def test_state_before_an_event(self) -> None:
        group = {("m.room.create", ""): "$c", (MEMBER, "@a:x"): "$a2"}
        # A non-state event: its group is the state before it.
        self.assertEqual(state_before(group, None, "$msg"), group)
        # A state event that replaced another: that one instead.
        self.assertEqual(
            state_before(group, ((MEMBER, "@a:x"), "$a1"), "$a2"),
            {("m.room.create", ""): "$c", (MEMBER, "@a:x"): "$a1"},
        )
        # A state event at a new key: not there.
        self.assertEqual(
            state_before(group, ((MEMBER, "@a:x"), None), "$a2"),
            {("m.room.create", ""): "$c"},
        )
        with self.assertRaises(AssertionError):
            state_before(group, ((MEMBER, "@b:x"), None), "$b")
        self.assertEqual(split_state(group), (("$c", "$a2"), ("$a2",)))


class StateByDeltaTests(unittest.TestCase):
    """``state_by_delta`` against ``state_before`` of the whole group."""

    BASE = {
        ("m.room.create", ""): "$c",
        ("m.room.power_levels", ""): "$pl",
        (MEMBER, "@a:x"): "$a1",
        (MEMBER, "@b:x"): "$b1",
    }

    def by_delta(
        self, replaced: dict, delta: dict, adjustment: Any, event_id: str
    ) -> Any:
        """``state_by_delta`` from :attr:`BASE`."""
        base_all, base_members = split_state(self.BASE)
        return state_by_delta(
            base_all, base_members, replaced, delta, adjustment, event_id
        )

    def check(self, delta: dict, adjustment: Any, event_id: str) -> None:
        group = {**self.BASE, **delta}
        want_all, want_members = split_state(state_before(group, adjustment, event_id))
        replaced = {k: self.BASE[k] for k in delta if k in self.BASE}
        got = self.by_delta(replaced, delta, adjustment, event_id)
        assert got is not None
        self.assertEqual(sorted(got[0]), sorted(want_all))
        self.assertEqual(sorted(got[1]), sorted(want_members))
        self.assertEqual(len(got[0]), len(set(got[0])))

    def test_matches_the_whole_group(self) -> None:
        a2 = {(MEMBER, "@a:x"): "$a2"}
        new = {(MEMBER, "@n:x"): "$n"}
        # Before a message, after a membership changed / a member came.
        self.check(a2, None, "$msg")
        self.check(new, None, "$msg")
        # Before the membership event itself: the one it replaced is back.
        self.check(a2, ((MEMBER, "@a:x"), "$a1"), "$a2")
        # Before a new member's first event: no one there.
        self.check(new, ((MEMBER, "@n:x"), None), "$n")
        # Power levels replaced (not a member), and before that event.
        pl = {("m.room.power_levels", ""): "$pl2"}
        self.check(pl, None, "$msg")
        self.check(pl, (("m.room.power_levels", ""), "$pl"), "$pl2")
        # Several keys, one a no-op (same event in the delta).
        self.check({**a2, **new, ("m.room.create", ""): "$c"}, None, "$msg")

    def test_declines_when_the_delta_does_not_hold_the_event(self) -> None:
        delta = {(MEMBER, "@n:x"): "$n"}
        # The adjusted key is not in the delta, or the delta did not change it.
        for adjustment, event_id, replaced in (
            (((MEMBER, "@a:x"), None), "$a1", {}),
            (((MEMBER, "@n:x"), None), "$n", {(MEMBER, "@n:x"): "$n"}),
        ):
            self.assertIsNone(self.by_delta(replaced, delta, adjustment, event_id))


class GroupStateOfTests(unittest.TestCase):
    def test_undoes_state_before(self) -> None:
        group = {
            ("m.room.create", ""): "$c",
            ("m.room.power_levels", ""): "$pl2",
            (MEMBER, "@a:x"): "$a2",
            (MEMBER, "@n:x"): "$n",
        }
        for key, replaced, event_id in (
            ((MEMBER, "@a:x"), "$a1", "$a2"),  # a membership that replaced one
            ((MEMBER, "@n:x"), None, "$n"),  # a first membership
            (("m.room.power_levels", ""), "$pl1", "$pl2"),  # not a member
        ):
            adjustment = (key, replaced)
            ids, members = split_state(state_before(group, adjustment, event_id))
            got = group_state_of(ids, members, adjustment, {key: event_id})
            assert got is not None
            want = split_state(group)
            self.assertEqual(sorted(got[0]), sorted(want[0]), key)
            self.assertEqual(sorted(got[1]), sorted(want[1]), key)
        # Unadjusted: as it is; the group's event unknown: None.
        self.assertEqual(group_state_of(("$c",), (), None, {}), (("$c",), ()))
        self.assertIsNone(group_state_of(("$c",), (), ((MEMBER, "@a:x"), "$a1"), {}))
