"""Pure-logic tests of the partial /send_join state choice (no Synapse process)."""

from __future__ import annotations

import unittest
from unittest.mock import Mock

from synapse.events import EventBase

from synapse_partial_state.resident.send_join import (
    _power_users,
    order_candidates,
    pick_per_server,
    select_partial_state,
    signing_servers_of,
)

M = "m.room.member"


def _join(user: str) -> EventBase:
    event = Mock(spec_set=EventBase)
    event.state_key = user
    return event


STATE = {
    ("m.room.create", ""): "$create",
    ("m.room.power_levels", ""): "$pl",
    ("m.room.join_rules", ""): "$jr",
    (M, "@alice:a"): "$alice",
    (M, "@bob:b"): "$bob",
    (M, "@carol:c"): "$carol",
    (M, "@joiner:j"): "$old_joiner",
}


class SelectTests(unittest.TestCase):
    def test_no_extras_is_non_member_state_and_own_membership(self) -> None:
        got = select_partial_state(_join("@joiner:j"), STATE, {}, (), cap=10)
        self.assertEqual(got, {"$create", "$pl", "$jr", "$old_joiner"})

    def test_extras_only_from_state_before_join(self) -> None:
        got = select_partial_state(
            _join("@new:n"), STATE, {}, ("@bob:b", "@ghost:g"), cap=10
        )
        self.assertEqual(got, {"$create", "$pl", "$jr", "$bob"})

    def test_cap_keeps_priority_order(self) -> None:
        got = select_partial_state(
            _join("@new:n"), STATE, {}, ("@carol:c", "@alice:a", "@bob:b"), cap=2
        )
        self.assertEqual(got, {"$create", "$pl", "$jr", "$carol", "$alice"})

    def test_cap_zero_adds_nothing_but_keeps_own_membership(self) -> None:
        got = select_partial_state(_join("@joiner:j"), STATE, {}, ("@bob:b",), cap=0)
        self.assertEqual(got, {"$create", "$pl", "$jr", "$old_joiner"})

    def test_own_membership_does_not_count_against_cap(self) -> None:
        got = select_partial_state(
            _join("@joiner:j"), STATE, {}, ("@joiner:j", "@bob:b"), cap=1
        )
        self.assertEqual(got, {"$create", "$pl", "$jr", "$old_joiner", "$bob"})


class CandidateTests(unittest.TestCase):
    def test_order_and_dedup(self) -> None:
        self.assertEqual(
            order_candidates(["@h:1"], ["@p:1", "@h:1"], ["@b:1"], ["@i:1"], ["@p:1"]),
            ("@h:1", "@p:1", "@b:1", "@i:1"),
        )

    def test_pick_per_server(self) -> None:
        users = ["@a:x", "@b:x", "@c:y", "@d:x", "@e:z", "@f:y"]
        self.assertEqual(pick_per_server(users, 1), ["@a:x", "@c:y", "@e:z"])
        self.assertEqual(
            pick_per_server(users, 2), ["@a:x", "@b:x", "@c:y", "@e:z", "@f:y"]
        )
        self.assertEqual(pick_per_server(users, 0), [])

    def test_pick_per_server_skips_malformed_ids(self) -> None:
        self.assertEqual(pick_per_server(["nocolon", "@a:x"], 1), ["@a:x"])

    def test_power_users(self) -> None:
        self.assertEqual(
            _power_users({"users": {"@a:x": 100, "not-a-user": 50, "@b:y": 0}}),
            ["@a:x", "@b:y"],
        )
        self.assertEqual(_power_users(None), [])
        self.assertEqual(_power_users({"users": ["@a:x"]}), [])


class SigningServersTests(unittest.TestCase):
    def test_servers_of_senders_once_in_order_and_junk_skipped(self) -> None:
        self.assertEqual(
            signing_servers_of(
                [
                    "@a:two.org",
                    "@b:one.org",
                    "@c:two.org",
                    "not-a-user-id",
                    "@d:three.org",
                ]
            ),
            ["two.org", "one.org", "three.org"],
        )
