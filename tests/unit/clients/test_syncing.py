"""The syncing signal's policy: which rooms a sync reports as complete, and the
field's value on each joined room (no Synapse process)."""

from __future__ import annotations

import unittest

from synapse_partial_state.clients.syncing import (
    mark_room,
    resynced_rooms,
    syncing_flag,
)
from synapse_partial_state.wire import SYNCING_FIELD


class ResyncedRoomsTests(unittest.TestCase):
    def test_rooms_complete_now(self) -> None:
        got = resynced_rooms(["!a:x", "!b:x"], {"!a:x": False, "!b:x": False})
        self.assertEqual(got, {"!a:x", "!b:x"})

    def test_a_room_partial_again_is_not_reported(self) -> None:
        """Left and joined again since: it is partial, so it carries true."""
        got = resynced_rooms(["!a:x", "!b:x"], {"!a:x": True, "!b:x": False})
        self.assertEqual(got, {"!b:x"})

    def test_a_room_of_unknown_state_counts_as_partial(self) -> None:
        self.assertEqual(resynced_rooms(["!a:x"], {}), frozenset())

    def test_only_rooms_the_client_filter_wants(self) -> None:
        partial = {"!a:x": False, "!b:x": False}
        got = resynced_rooms(["!a:x", "!b:x"], partial, wanted={"!b:x", "!c:x"})
        self.assertEqual(got, {"!b:x"})
        self.assertEqual(resynced_rooms(["!a:x"], partial, wanted=[]), frozenset())

    def test_nothing_completed(self) -> None:
        self.assertEqual(resynced_rooms([], {}), frozenset())


class SyncingFlagTests(unittest.TestCase):
    def test_true_while_partial(self) -> None:
        self.assertIs(syncing_flag("!a:x", True, frozenset()), True)
        # partial wins over a stale report of completion
        self.assertIs(syncing_flag("!a:x", True, frozenset({"!a:x"})), True)

    def test_false_once_right_after_completion(self) -> None:
        self.assertIs(syncing_flag("!a:x", False, frozenset({"!a:x"})), False)

    def test_no_field_otherwise(self) -> None:
        self.assertIsNone(syncing_flag("!a:x", False, frozenset({"!b:x"})))


class MarkRoomTests(unittest.TestCase):
    def test_adds_the_field(self) -> None:
        for flag in (True, False):
            room: dict = {"timeline": {}}
            mark_room(room, flag)
            self.assertEqual(room, {"timeline": {}, SYNCING_FIELD: flag})

    def test_none_leaves_the_room_as_it_is(self) -> None:
        room: dict = {"timeline": {}}
        mark_room(room, None)
        self.assertEqual(room, {"timeline": {}})

    def test_field_name(self) -> None:
        self.assertEqual(SYNCING_FIELD, "org.matrix.msc2775.syncing")
