"""Identical state sets resolve to themselves (the shortcut's test)."""

from __future__ import annotations

import unittest

from synapse_partial_state.compat.state_resolution import identical_state_sets


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
