"""The outgoing queue's decisions, with Synapse and the tables faked."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, cast

from twisted.internet import defer
from twisted.trial import unittest

from synapse_partial_state.device_lists.metrics import DeviceListMetrics
from synapse_partial_state.device_lists.outgoing import OutgoingQueue
from synapse_partial_state.device_lists.store import QueuedChange


class FakeOps:
    server_name = "me"

    def __init__(self) -> None:
        self.partial = {"!p"}
        self.room_hosts: set[str] = set()
        self.other_hosts: set[str] = set()
        #: (destination, user, device, poke stream id)
        self.pokes: list[tuple[str, str, str, int]] = []
        self.stream = 100

    def is_mine(self, user_id: str) -> bool:
        return user_id.endswith(":me")

    def now_ms(self) -> int:
        return 1

    async def is_partial_state_room(self, room_id: str) -> bool:
        return room_id in self.partial

    async def hosts_of_room_during_resync(self, room_id: str) -> set[str]:
        return set(self.room_hosts)

    async def hosts_sharing_other_rooms(self, user_id: str, room_id: str) -> set[str]:
        return set(self.other_hosts)

    async def hosts_with_later_poke(
        self, user_id: str, device_id: str, stream_id: int, hosts: Collection[str]
    ) -> set[str]:
        return {
            d
            for d, u, dev, s in self.pokes
            if u == user_id and dev == device_id and s > stream_id and d in hosts
        }

    async def add_pokes(
        self, user_id: str, device_id: str, room_id: str, hosts: Collection[str]
    ) -> None:
        self.stream += 1
        self.pokes += [(h, user_id, device_id, self.stream) for h in hosts]


class FakeStore:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str, int], QueuedChange] = {}
        #: delete raises once this many deletes were done (a crash mid-replay)
        self.crash_after: int | None = None
        self.deletes = 0

    async def queue_outbound(
        self,
        room_id: str,
        user_id: str,
        device_id: str,
        stream_id: int,
        hosts: Collection[str],
        now_ms: int,
    ) -> None:
        key = (room_id, user_id, device_id, stream_id)
        old = self.rows.get(key)
        reached = frozenset(hosts) | (old.reached if old else frozenset())
        self.rows[key] = QueuedChange(
            room_id, user_id, device_id, stream_id, reached, now_ms
        )

    async def outbound_for_room(self, room_id: str) -> list[QueuedChange]:
        return sorted(
            (c for c in self.rows.values() if c.room_id == room_id),
            key=lambda c: c.stream_id,
        )

    async def delete_outbound(self, change: QueuedChange) -> None:
        if self.crash_after is not None and self.deletes >= self.crash_after:
            raise RuntimeError("crash")
        self.deletes += 1
        key = (change.room_id, change.user_id, change.device_id, change.stream_id)
        del self.rows[key]


class OutgoingQueueTests(unittest.TestCase):
    def setUp(self) -> None:
        self.ops = FakeOps()
        self.store = FakeStore()
        self.queue = OutgoingQueue(
            cast(Any, self.ops), cast(Any, self.store), DeviceListMetrics("test")
        )

    def run_(self, d: Any) -> Any:
        return self.successResultOf(defer.ensureDeferred(d))

    def sent(self, destination: str) -> list[int]:
        return [s for d, _, _, s in self.ops.pokes if d == destination]

    def test_only_local_changes_of_partial_rooms_are_queued(self) -> None:
        self.run_(self.queue.on_pokes("@bob:me", "D", "!p", 5, ["a"]))
        self.run_(self.queue.on_pokes("@eve:x", "D", "!p", 6, ["a"]))
        self.run_(self.queue.on_pokes("@bob:me", "D", "!full", 7, ["a"]))
        self.assertEqual([c.stream_id for c in self.store.rows.values()], [5])

    def test_replay_to_missed_servers_once(self) -> None:
        self.run_(self.queue.on_pokes("@bob:me", "D", "!p", 5, ["a"]))
        self.run_(self.queue.on_pokes("@bob:me", "D", "!p", 6, ["a", "b"]))
        self.ops.room_hosts = {"me", "a", "b", "c"}
        self.run_(self.queue.replay("!p"))
        # b missed change 5 only, c both: each gets one update of the device.
        self.assertEqual(len(self.sent("b")), 1)
        self.assertEqual(len(self.sent("c")), 1)
        self.assertEqual(self.sent("a"), [])
        self.assertEqual(self.store.rows, {})

    def test_crash_mid_replay_then_replay_again_sends_nothing_twice(self) -> None:
        self.run_(self.queue.on_pokes("@bob:me", "D", "!p", 5, []))
        self.run_(self.queue.on_pokes("@bob:me", "E", "!p", 6, []))
        self.ops.room_hosts = {"a"}
        self.store.crash_after = 0  # the first change's pokes written, then a crash
        self.assertIsNotNone(
            self.failureResultOf(defer.ensureDeferred(self.queue.replay("!p")))
        )
        self.store.crash_after = None
        self.run_(self.queue.replay("!p"))
        self.assertEqual(
            sorted((d, dev) for d, _, dev, _ in self.ops.pokes),
            [("a", "D"), ("a", "E")],
        )

    def test_given_up_room_goes_to_other_rooms_servers(self) -> None:
        self.run_(self.queue.on_pokes("@bob:me", "D", "!p", 5, ["a"]))
        self.ops.other_hosts = {"a", "c"}
        self.ops.partial = set()
        self.run_(self.queue.on_room_abandoned("!p"))
        self.assertEqual(len(self.sent("c")), 1)
        self.assertEqual(self.sent("a"), [])
        self.assertEqual(self.store.rows, {})
