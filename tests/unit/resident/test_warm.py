"""The joined-hosts warmer (pure logic: fake ops, a hand-driven clock)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from synapse_partial_state.resident.warm import JoinedHostsWarmer


class _Ops:
    """Rooms with member counts; ``warm`` waits on a Deferred per call."""

    def __init__(self, members: dict[str, int], big: list[str]) -> None:
        self.members = members
        self.big = big
        self.later: list[tuple[float, Callable[[], None]]] = []
        self.warming: list[tuple[str, defer.Deferred[bool]]] = []
        self.listed_with: list[int] = []

    async def rooms_to_warm(self, min_members: int) -> list[str]:
        self.listed_with.append(min_members)
        return list(self.big)

    async def joined_members(self, room_id: str) -> int:
        if room_id not in self.members:
            raise RuntimeError("no such room")
        return self.members[room_id]

    async def warm(self, room_id: str) -> bool:
        d: defer.Deferred[bool] = defer.Deferred()
        self.warming.append((room_id, d))
        return await d

    def run_in_background(self, f: Callable[[], Awaitable[None]]) -> None:
        defer.ensureDeferred(f())  # type: ignore[arg-type]

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Any:
        self.later.append((delay_s, callback))

    def finish(self, result: bool = True) -> str:
        room_id, d = self.warming[-1]
        d.callback(result)
        return room_id

    def fail(self) -> str:
        room_id, d = self.warming[-1]
        d.errback(RuntimeError("database gone"))
        return room_id


class WarmerTests(unittest.TestCase):
    def make(
        self, min_members: int = 1000, **ops: Any
    ) -> tuple[_Ops, JoinedHostsWarmer]:
        fake = _Ops(
            ops.get("members", {"!big:a": 5000, "!huge:a": 90000, "!small:a": 10}),
            ops.get("big", ["!huge:a", "!big:a"]),
        )
        return fake, JoinedHostsWarmer(fake, min_members, start_delay_s=7)

    def test_start_waits_then_warms_the_big_rooms_one_at_a_time(self) -> None:
        ops, warmer = self.make()
        warmer.start()
        self.assertEqual(ops.warming, [])
        [(delay, callback)] = ops.later
        self.assertEqual(delay, 7)
        callback()
        self.assertEqual(ops.listed_with, [1000])
        # One room at a time, largest first (the order rooms_to_warm gives).
        self.assertEqual([r for r, _ in ops.warming], ["!huge:a"])
        self.assertEqual(ops.finish(), "!huge:a")
        self.assertEqual([r for r, _ in ops.warming], ["!huge:a", "!big:a"])
        ops.finish()
        self.assertEqual(warmer.warmed, ["!huge:a", "!big:a"])

    def test_resynced_rooms_below_the_threshold_are_left_alone(self) -> None:
        ops, warmer = self.make()
        warmer.on_room_resynced("!small:a")
        self.assertEqual(ops.warming, [])
        warmer.on_room_resynced("!big:a")
        self.assertEqual([r for r, _ in ops.warming], ["!big:a"])
        ops.finish()
        self.assertEqual(warmer.warmed, ["!big:a"])

    def test_a_room_queued_twice_while_another_warms_is_warmed_once(self) -> None:
        ops, warmer = self.make()
        warmer.on_room_resynced("!huge:a")
        warmer.on_room_resynced("!big:a")
        warmer.on_room_resynced("!big:a")
        ops.finish()
        ops.finish()
        self.assertEqual([r for r, _ in ops.warming], ["!huge:a", "!big:a"])
        self.assertEqual(warmer.warmed, ["!huge:a", "!big:a"])
        # Idle again: a later resync starts a new pass.
        warmer.on_room_resynced("!huge:a")
        self.assertEqual(len(ops.warming), 3)

    def test_a_room_that_cannot_be_warmed_or_fails_does_not_stop_the_rest(
        self,
    ) -> None:
        ops, warmer = self.make(members={"!a:x": 2000, "!b:x": 2000, "!c:x": 2000})
        with self.assertLogs("synapse_partial_state.resident.warm") as logs:
            for room_id in ("!a:x", "!gone:x", "!b:x", "!c:x"):
                warmer.on_room_resynced(room_id)
            ops.finish(False)  # !a:x: several forward extremities, say
            # !gone:x: joined_members raised; logged, skipped.
            ops.fail()  # !b:x
            ops.finish()  # !c:x
        self.assertEqual([r for r, _ in ops.warming], ["!a:x", "!b:x", "!c:x"])
        self.assertEqual(warmer.warmed, ["!c:x"])
        errors = [r.getMessage() for r in logs.records if r.levelname == "ERROR"]
        self.assertEqual(
            errors,
            [
                "Could not work out the servers in !gone:x ahead",
                "Could not work out the servers in !b:x ahead",
            ],
        )

    def test_zero_disables_it(self) -> None:
        ops, warmer = self.make(min_members=0)
        warmer.start()
        warmer.on_room_resynced("!huge:a")
        self.assertEqual((ops.later, ops.warming), ([], []))

    def test_then_prepares_each_warmed_room_before_the_next(self) -> None:
        ops = _Ops({"!a:x": 2000, "!b:x": 2000, "!c:x": 2000}, [])
        prepared: list[tuple[str, bool, defer.Deferred[None]]] = []

        async def then(room_id: str, at_start: bool) -> None:
            d: defer.Deferred[None] = defer.Deferred()
            prepared.append((room_id, at_start, d))
            await d

        warmer = JoinedHostsWarmer(ops, 1000, then=then)
        with self.assertLogs("synapse_partial_state.resident.warm") as logs:
            for room_id in ("!a:x", "!b:x", "!c:x"):
                warmer.on_room_resynced(room_id)
            ops.finish()  # !a:x warmed: its state is prepared...
            self.assertEqual([r for r, _, _ in prepared], ["!a:x"])
            self.assertEqual(len(ops.warming), 1, "...before the next room")
            prepared[0][2].callback(None)
            # !b:x: its hosts cannot be worked out (several extremities, say):
            # its state is prepared all the same.
            ops.finish(False)
            prepared[1][2].callback(None)
            ops.finish()  # !c:x: its preparation fails, logged
            prepared[-1][2].errback(RuntimeError("gone"))
        # After a resync: not the start pass.
        self.assertEqual(
            [(r, at_start) for r, at_start, _ in prepared],
            [("!a:x", False), ("!b:x", False), ("!c:x", False)],
        )
        self.assertEqual(warmer.warmed, ["!a:x", "!c:x"])
        errors = [r.getMessage() for r in logs.records if r.levelname == "ERROR"]
        self.assertEqual(errors, ["Could not prepare the state answers of !c:x ahead"])

    def test_then_is_told_which_rooms_the_start_pass_found(self) -> None:
        ops = _Ops({"!a:x": 2000, "!b:x": 2000}, ["!a:x"])
        told: list[tuple[str, bool]] = []

        async def then(room_id: str, at_start: bool) -> None:
            told.append((room_id, at_start))

        warmer = JoinedHostsWarmer(ops, 1000, start_delay_s=1, then=then)
        warmer.start()
        warmer.on_room_resynced("!b:x")
        ops.later[0][1]()  # the start pass lists !a:x behind !b:x
        warmer.on_room_resynced("!a:x")  # queued by both: the start pass wins
        ops.finish()
        ops.finish()
        self.assertEqual(told, [("!b:x", False), ("!a:x", True)])
