"""Where a queued device-list change goes at replay."""

from __future__ import annotations

from twisted.trial import unittest

from synapse_partial_state.device_lists.plan import replay_targets


class ReplayTargetsTests(unittest.TestCase):
    def test_missed_servers_only(self) -> None:
        self.assertEqual(
            replay_targets(
                {"a", "b", "c"}, reached={"a"}, later_pokes=(), server_name="me"
            ),
            {"b", "c"},
        )

    def test_never_ourselves(self) -> None:
        self.assertEqual(replay_targets({"me", "b"}, (), (), "me"), {"b"})

    def test_later_pokes_are_not_repeated(self) -> None:
        """A server with a later poke of the device (another room, or a replay
        cut short by a restart) gets the device as it is now anyway."""
        self.assertEqual(replay_targets({"b", "c"}, (), {"c"}, "me"), {"b"})

    def test_reached_servers_not_in_the_room_get_nothing(self) -> None:
        self.assertEqual(replay_targets({"b"}, {"x"}, (), "me"), {"b"})
