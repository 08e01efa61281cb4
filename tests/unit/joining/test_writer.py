"""The state fetch's writer (``joining/writer.py``, ``OutlierWriter``): events stored as
outliers as they arrive, each only once its auth events are stored, in batches,
with progress (pure logic: real Synapse events, a fake store)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from synapse.api.room_versions import KNOWN_ROOM_VERSIONS, EventFormatVersions
from synapse.events import EventBase, make_event_from_dict
from twisted.internet import defer
from twisted.trial import unittest

from synapse_partial_state.joining import writer as writer_module
from synapse_partial_state.joining.writer import FetchReport, OutlierWriter

ROOM = "!room:a.test"


class FakeOps:
    """Records ``persist_outliers`` calls."""

    def __init__(self) -> None:
        #: events the writer holds before storing (the bulk writer's chunk)
        self.store_at_least = 0
        self.calls: list[list[str]] = []
        #: events stored when the planner's statistics were refreshed
        self.analyzed_at: list[int] = []

    async def persist_outliers(self, room_id: str, events: list[EventBase]) -> None:
        assert room_id == ROOM
        self.calls.append([e.event_id for e in events])

    async def refresh_planner_stats(self) -> bool:
        self.analyzed_at.append(len(self.stored))
        return True

    @property
    def stored(self) -> list[str]:
        return list(itertools.chain.from_iterable(self.calls))


class _WriterCase(unittest.SynchronousTestCase):
    #: room version of the events; subclasses cover v1 IDs and hash IDs
    VERSION = "10"

    def setUp(self) -> None:
        self.ops = FakeOps()
        self.report = FetchReport(fetched=100, verified=90)
        self.progress: list[tuple[int, int, int]] = []
        self._depth = itertools.count(1)
        #: event ID -> auth event IDs, for assert_auth_first
        self._auth_of: dict[str, list[str]] = {}

    def event(self, name: str, auth: Sequence[EventBase | str] = ()) -> EventBase:
        """A member event named ``name`` (its ID: explicit in v1 rooms, computed
        in v10) with ``auth`` as auth events (events, or made-up IDs)."""
        room_version = KNOWN_ROOM_VERSIONS[self.VERSION]
        v1 = room_version.event_format == EventFormatVersions.ROOM_V1_V2
        auth_ids = [a if isinstance(a, str) else a.event_id for a in auth]
        pdu: dict[str, Any] = {
            "room_id": ROOM,
            "type": "m.room.member",
            "state_key": f"@{name}:a.test",
            "sender": f"@{name}:a.test",
            "content": {"membership": "join"},
            "auth_events": [[a, {}] for a in auth_ids] if v1 else auth_ids,
            "prev_events": [],
            "depth": next(self._depth),
            "origin_server_ts": 1,
            "hashes": {"sha256": "x"},
            "signatures": {},
        }
        if v1:
            pdu["event_id"] = f"${name}:a.test"
        event = make_event_from_dict(pdu, room_version)
        self.assertEqual(event.auth_event_ids(), auth_ids)
        return event

    def writer(self, missing: Sequence[EventBase | str]) -> OutlierWriter:
        async def progress(report: FetchReport) -> None:
            self.progress.append((report.fetched, report.verified, report.persisted))

        ids = {m if isinstance(m, str) else m.event_id for m in missing}
        return OutlierWriter(self.ops, ROOM, ids, self.report, progress)  # type: ignore[arg-type]

    def add(self, writer: OutlierWriter, *events: EventBase) -> None:
        self.successResultOf(defer.ensureDeferred(writer.add(list(events))))

    def flush(self, writer: OutlierWriter) -> None:
        self.successResultOf(defer.ensureDeferred(writer.flush()))

    def ids(self, *events: EventBase) -> list[str]:
        return [e.event_id for e in events]

    def assert_auth_first(self) -> None:
        """Every stored event's wanted auth events were stored before it (or in
        the same call, earlier)."""
        position = {event_id: i for i, event_id in enumerate(self.ops.stored)}
        for event_id, i in position.items():
            for auth_id in self._auth_of.get(event_id, []):
                if auth_id in position:
                    self.assertLess(position[auth_id], i, (auth_id, event_id))

    def room(self) -> dict[str, EventBase]:
        """create <- power levels <- join rules <- members a, b (each member also
        authed by create and power levels), and c, authorised by a's join."""
        create = self.event("creator")
        pl = self.event("pl", [create])
        jr = self.event("jr", [create, pl])
        a = self.event("a", [create, pl, jr])
        b = self.event("b", [create, pl, jr])
        c = self.event("c", [create, pl, jr, a])
        events = {"create": create, "pl": pl, "jr": jr, "a": a, "b": b, "c": c}
        self._auth_of = {e.event_id: list(e.auth_event_ids()) for e in events.values()}
        return events


class _WriterTests(_WriterCase):
    def test_an_event_waits_for_auth_events_arriving_later(self) -> None:
        r = self.room()
        writer = self.writer(list(r.values()))
        self.add(writer, r["a"], r["b"])
        self.assertEqual(self.ops.calls, [])  # their auth events are still to come
        self.assertFalse(writer.wants(r["a"].event_id))  # held, not wanted again
        self.assertEqual(
            writer.outstanding(), set(self.ids(r["create"], r["pl"], r["jr"], r["c"]))
        )
        self.add(writer, r["create"])
        self.assertEqual(self.ops.calls, [[r["create"].event_id]])
        self.add(writer, r["jr"])  # still waits for the power levels
        self.assertEqual(len(self.ops.calls), 1)
        self.add(writer, r["pl"])
        # power levels, then what waited on it: join rules, then the members
        self.assertEqual(self.ops.calls[1][0], r["pl"].event_id)
        self.assertEqual(self.ops.calls[1][1], r["jr"].event_id)
        self.assertEqual(set(self.ops.calls[1][2:]), set(self.ids(r["a"], r["b"])))
        self.assertEqual(writer.outstanding(), {r["c"].event_id})
        self.add(writer, r["c"])
        self.assertEqual(self.ops.calls[2], [r["c"].event_id])
        self.assertEqual(writer.outstanding(), set())
        self.assert_auth_first()
        self.assertEqual(self.report.persisted, 6)

    def test_one_add_in_any_order_stores_auth_events_first(self) -> None:
        r = self.room()
        writer = self.writer(list(r.values()))
        self.add(writer, r["c"], r["b"], r["a"], r["jr"], r["pl"], r["create"])
        self.assertEqual(len(self.ops.calls), 1)
        self.assertEqual(set(self.ops.stored), set(self.ids(*r.values())))
        self.assert_auth_first()

    def test_auth_events_not_wanted_do_not_hold_events(self) -> None:
        """Auth events already stored (not in the wanted set), or not part of the
        state at all, are not waited for."""
        r = self.room()
        writer = self.writer([r["a"], r["b"], r["c"]])
        self.add(writer, r["b"])
        self.assertEqual(self.ops.calls, [[r["b"].event_id]])
        # c waits for a, which is wanted
        self.add(writer, r["c"])
        self.assertEqual(len(self.ops.calls), 1)
        self.add(writer, r["a"])
        self.assertEqual(self.ops.calls[1:], [self.ids(r["a"], r["c"])])
        # a made-up auth event that nobody wants does not hold anything
        stray = self.event("stray", ["$nobody-wants-this"])
        writer = self.writer([stray])
        self.add(writer, stray)
        self.assertEqual(self.ops.calls[-1], [stray.event_id])

    def test_wants_and_outstanding(self) -> None:
        r = self.room()
        unwanted = self.event("unwanted", [r["create"]])
        writer = self.writer([r["create"], r["pl"]])
        self.assertEqual(writer.outstanding(), set(self.ids(r["create"], r["pl"])))
        self.assertTrue(writer.wants(r["create"].event_id))
        self.assertFalse(writer.wants(unwanted.event_id))
        # events nobody asked for are ignored
        self.add(writer, unwanted)
        self.assertEqual(self.ops.calls, [])
        # held (waiting for create): not wanted again, not outstanding
        self.add(writer, r["pl"])
        self.assertFalse(writer.wants(r["pl"].event_id))
        self.assertEqual(writer.outstanding(), {r["create"].event_id})
        # stored: neither
        self.add(writer, r["create"])
        self.assertFalse(writer.wants(r["create"].event_id))
        self.assertFalse(writer.wants(r["pl"].event_id))
        self.assertEqual(writer.outstanding(), set())
        # a second copy of a stored event is not stored again
        self.add(writer, r["create"], r["pl"])
        self.assertEqual(self.ops.stored, self.ids(r["create"], r["pl"]))

    def test_duplicates_in_one_add_are_stored_once(self) -> None:
        r = self.room()
        writer = self.writer([r["create"], r["pl"]])
        self.add(writer, r["pl"], r["create"], r["pl"], r["create"])
        self.assertEqual(self.ops.calls, [self.ids(r["create"], r["pl"])])

    def test_flush_stores_everything_left(self) -> None:
        """Events whose auth events never came are stored at the end anyway
        (Synapse then decides; the completeness check judges the result), still
        auth events first among them."""
        r = self.room()
        writer = self.writer(list(r.values()))
        self.add(writer, r["c"], r["a"], r["jr"])  # create and pl never come
        self.assertEqual(self.ops.calls, [])
        self.flush(writer)
        self.assertEqual(self.ops.calls, [self.ids(r["jr"], r["a"], r["c"])])
        self.assertEqual(
            writer.outstanding(), set(self.ids(r["create"], r["pl"], r["b"]))
        )
        # nothing held: flushing again stores nothing (no empty calls)
        self.flush(writer)
        self.assertEqual(len(self.ops.calls), 1)
        # events arriving after the flush are handled as before: b waits for
        # create and power levels, which are still wanted
        self.add(writer, r["b"])
        self.assertEqual(len(self.ops.calls), 1)
        self.add(writer, r["pl"], r["create"])
        self.assertEqual(self.ops.calls[1], self.ids(r["create"], r["pl"], r["b"]))
        self.assertEqual(writer.outstanding(), set())

    def test_flush_with_nothing_held_stores_nothing(self) -> None:
        writer = self.writer(["$a", "$b"])
        self.flush(writer)
        self.add(writer)
        self.assertEqual(self.ops.calls, [])
        self.assertEqual(self.progress, [])

    def test_batches_and_progress(self) -> None:
        self.patch(writer_module, "PERSIST_BATCH", 3)
        create = self.event("creator")
        members = [self.event(f"m{i}", [create]) for i in range(7)]
        writer = self.writer([create, *members])
        # given last-first: the batches still follow auth order
        self.add(writer, *reversed(members), create)
        self.assertEqual([len(c) for c in self.ops.calls], [3, 3, 2])
        self.assertEqual(self.ops.calls[0][0], create.event_id)
        self.assertEqual(set(self.ops.stored), set(self.ids(create, *members)))
        self.assertEqual(self.progress, [(100, 90, 3), (100, 90, 6), (100, 90, 8)])
        self.assertEqual(self.report.persisted, 8)

    def test_planner_stats_refreshed_each_time_the_stored_count_doubles(
        self,
    ) -> None:
        self.patch(writer_module, "PERSIST_BATCH", 2)
        self.patch(writer_module, "ANALYZE_FIRST_AT", 3)
        create = self.event("creator")
        members = [self.event(f"m{i}", [create]) for i in range(14)]
        writer = self.writer([create, *members])
        self.add(writer, create, *members)
        # batches end at 2, 4, ..., 14, 15: first at >= 3, then at twice that
        self.assertEqual(self.ops.analyzed_at, [4, 8])
        self.successResultOf(defer.ensureDeferred(writer.refresh_stats_if_big()))
        self.assertEqual(self.ops.analyzed_at, [4, 8, 15])

    def test_no_planner_stats_refresh_for_a_small_state(self) -> None:
        create = self.event("creator")
        members = [self.event(f"m{i}", [create]) for i in range(5)]
        writer = self.writer([create, *members])
        self.add(writer, create, *members)
        self.successResultOf(defer.ensureDeferred(writer.refresh_stats_if_big()))
        self.assertEqual(self.ops.analyzed_at, [])

    def test_progress_counts_increase_across_adds(self) -> None:
        self.patch(writer_module, "PERSIST_BATCH", 2)
        create = self.event("creator")
        members = [self.event(f"m{i}", [create]) for i in range(5)]
        writer = self.writer([create, *members])
        self.add(writer, create, members[0])
        self.report.fetched, self.report.verified = 200, 150
        self.add(writer, *members[1:4])
        self.add(writer, members[4])
        self.assertEqual(
            self.progress,
            [(100, 90, 2), (200, 150, 4), (200, 150, 5), (200, 150, 6)],
        )
        persisted = [p for _, _, p in self.progress]
        self.assertEqual(persisted, sorted(set(persisted)))

    def test_bulk_writer_batches_are_filled_before_storing(self) -> None:
        """With the bulk writer (``store_at_least``), adds are held until that
        many events are, then stored in one call; flush stores the rest."""
        self.ops.store_at_least = 4
        r = self.room()
        w = self.writer(list(r.values()))
        self.add(w, r["create"], r["pl"])
        self.add(w, r["jr"])
        self.assertEqual(self.ops.calls, [])
        self.add(w, r["a"])
        self.assertEqual(
            self.ops.calls, [self.ids(r["create"], r["pl"], r["jr"], r["a"])]
        )
        self.add(w, r["b"])
        self.assertEqual(len(self.ops.calls), 1)
        self.flush(w)
        self.assertEqual(self.ops.calls[1], self.ids(r["b"]))
        self.assertEqual(w.outstanding(), {r["c"].event_id})

    def test_long_chain_across_batches(self) -> None:
        self.patch(writer_module, "PERSIST_BATCH", 3)
        chain = [self.event("e0")]
        for i in range(1, 8):
            chain.append(self.event(f"e{i}", [chain[-1]]))
        self._auth_of = {e.event_id: list(e.auth_event_ids()) for e in chain}
        writer = self.writer(chain)
        self.add(writer, *chain[1:])  # the root last
        self.assertEqual(self.ops.calls, [])
        self.add(writer, chain[0])
        self.assertEqual(self.ops.stored, self.ids(*chain))
        self.assertEqual([len(c) for c in self.ops.calls], [3, 3, 2])
        self.assert_auth_first()


class WriterV10Tests(_WriterTests):
    """Room version 10: event IDs are reference hashes."""

    VERSION = "10"


class WriterV1Tests(_WriterTests):
    """Room version 1: event IDs are explicit (``$name:server``)."""

    VERSION = "1"

    def test_an_auth_cycle_does_not_hang_the_flush(self) -> None:
        """v1 event IDs are chosen by their servers, so a malicious one can make
        two events each other's auth event. Neither is ever ready; the flush
        still ends, storing what it can."""
        room_version = KNOWN_ROOM_VERSIONS["1"]

        def cyclic(name: str, other: str) -> EventBase:
            return make_event_from_dict(
                {
                    "event_id": f"${name}:a.test",
                    "room_id": ROOM,
                    "type": "m.room.member",
                    "state_key": f"@{name}:a.test",
                    "sender": f"@{name}:a.test",
                    "content": {"membership": "join"},
                    "auth_events": [[f"${other}:a.test", {}]],
                    "prev_events": [],
                    "depth": 1,
                    "origin_server_ts": 1,
                    "hashes": {"sha256": "x"},
                    "signatures": {},
                },
                room_version,
            )

        x, y = cyclic("x", "y"), cyclic("y", "x")
        fine = self.event("fine")
        writer = self.writer([x, y, fine])
        self.add(writer, x, y, fine)
        self.assertEqual(self.ops.calls, [[fine.event_id]])
        self.flush(writer)
        self.assertNotIn(x.event_id, self.ops.stored[1:])
        self.assertEqual(writer.outstanding(), set())


del _WriterTests
