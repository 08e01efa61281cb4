"""The resident's summary from ``/send_join``: parsing (it is a remote's word)
and the view of one user."""

from __future__ import annotations

from typing import Any

from twisted.trial import unittest

from synapse_partial_state.clients.summary import (
    MAX_HEROES,
    ResidentSummary,
    for_user,
    parse_summary,
)


class ParseTests(unittest.TestCase):
    def test_a_summary(self) -> None:
        got = parse_summary(
            {
                "m.heroes": ["@a:x", "@b:y", "@a:x"],
                "m.joined_member_count": 10000,
                "m.invited_member_count": 3,
            }
        )
        self.assertEqual(got, ResidentSummary(("@a:x", "@b:y"), 10000, 3))

    def test_invited_and_heroes_may_be_left_out(self) -> None:
        self.assertEqual(
            parse_summary({"m.joined_member_count": 2}), ResidentSummary((), 2, 0)
        )

    def test_malformed_is_none(self) -> None:
        malformed: list[Any] = [
            None,
            [],
            {},
            {"m.joined_member_count": -1},
            {"m.joined_member_count": True},
            {"m.joined_member_count": 1.5},
            {"m.joined_member_count": 1, "m.invited_member_count": "2"},
            {"m.joined_member_count": 1, "m.heroes": "@a:x"},
            {"m.joined_member_count": 1, "m.heroes": ["a:x"]},
            {"m.joined_member_count": 1, "m.heroes": ["@" + "a" * 300]},
            {"m.joined_member_count": 1, "m.heroes": [None]},
        ]
        for raw in malformed:
            self.assertIsNone(parse_summary(raw), raw)

    def test_heroes_capped(self) -> None:
        heroes = [f"@u{i}:x" for i in range(50)]
        got = parse_summary({"m.joined_member_count": 50, "m.heroes": heroes})
        assert got is not None
        self.assertEqual(len(for_user(got, "@me:x").heroes), MAX_HEROES)


class ForUserTests(unittest.TestCase):
    def test_never_ones_own_hero(self) -> None:
        summary = ResidentSummary(tuple(f"@u{i}:x" for i in range(6)), 6, 0)
        mine = for_user(summary, "@u0:x")
        self.assertNotIn("@u0:x", mine.heroes)
        self.assertEqual(mine.heroes, tuple(f"@u{i}:x" for i in range(1, 6)))
        self.assertEqual(mine.joined_member_count, 6)
