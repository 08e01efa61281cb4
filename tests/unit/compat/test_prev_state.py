"""The state after a missing prev event, read back in one transaction (pure
logic: a fake handler and store).

The same on a real joiner, against the resident's state:
tests/blackbox/test_prev_state.py."""

from __future__ import annotations

from typing import Any

import attr
from twisted.trial import unittest

from synapse_partial_state.compat.prev_state import (
    StoredEvent,
    fetch_whole_state,
    state_after_missing_prev,
    state_map_from,
)
from tests.unit.sync_run import run

ROOM = "!room:x"


@attr.s(auto_attribs=True)
class Event:
    event_id: str
    type: str
    state_key: str | None
    rejected_reason: str | None = None

    def is_state(self) -> bool:
        return self.state_key is not None


class FakeDbPool:
    def __init__(self, store: FakeStore) -> None:
        self._store = store

    async def runInteraction(self, name: str, func: Any, ids: list[str]) -> Any:
        self._store.lookups.append(sorted(ids))
        return {i: self._store.rows[i] for i in ids if i in self._store.rows}


class FakeStore:
    def __init__(self) -> None:
        self.rows: dict[str, StoredEvent] = {}
        self.events: dict[str, Event] = {}
        self.lookups: list[list[str]] = []
        self.db_pool = FakeDbPool(self)

    def add(self, event: Event, room: str = ROOM) -> None:
        self.events[event.event_id] = event
        self.rows[event.event_id] = StoredEvent(
            room, event.type, event.state_key, event.rejected_reason
        )

    async def get_event(self, event_id: str, **kw: Any) -> Event | None:
        return self.events.get(event_id)


class FakeFederationClient:
    def __init__(self, answer: tuple[list[str], list[str]]) -> None:
        self.answer = answer

    async def get_room_state_ids(
        self, destination: str, room_id: str, event_id: str
    ) -> tuple[list[str], list[str]]:
        return self.answer


class FakeHandler:
    """Synapse's handler: its fetches store what the remote has."""

    def __init__(self, store: FakeStore, remote: dict[str, Event], answer: Any):
        self._store = store
        self._remote = remote
        self._federation_client = FakeFederationClient(answer)
        self.calls: list[tuple[str, Any]] = []

    async def _get_state_and_persist(self, dest: str, room: str, event_id: str) -> None:
        self.calls.append(("whole", event_id))
        for event in self._remote.values():
            if event.event_id not in self._store.rows:
                self._store.add(event)

    async def _get_events_and_persist(
        self, destination: str, room_id: str, event_ids: Any
    ) -> None:
        self.calls.append(("events", set(event_ids)))
        for event_id in event_ids:
            if event_id in self._remote:
                self._store.add(self._remote[event_id])


def member(i: int) -> Event:
    return Event(f"$m{i}", "m.room.member", f"@u{i}:x")


class StateAfterMissingPrevTests(unittest.TestCase):
    def setUp(self) -> None:
        self.store = FakeStore()
        self.state = [Event("$create", "m.room.create", "")] + [
            member(i) for i in range(30)
        ]
        self.prev = Event("$prev", "m.room.message", None)
        self.remote = {e.event_id: e for e in [*self.state, self.prev]}

    def resolve(
        self, state_ids: list[str], auth_ids: tuple[str, ...] = ()
    ) -> tuple[Any, Any]:
        handler = FakeHandler(self.store, self.remote, (state_ids, list(auth_ids)))
        got = run(state_after_missing_prev(handler, self.store, "d", ROOM, "$prev"))
        return got, handler

    def expected(self) -> dict[tuple[str, str], str]:
        return {(e.type, e.state_key or ""): e.event_id for e in self.state}

    def test_everything_stored_is_one_look_up_and_no_fetch(self) -> None:
        for event in self.remote.values():
            self.store.add(event)
        ids = [e.event_id for e in self.state]
        got, handler = self.resolve(ids, ("$create", "$m1"))
        self.assertEqual(got, self.expected())
        self.assertEqual(handler.calls, [])
        self.assertEqual(len(self.store.lookups), 1)
        self.assertEqual(self.store.lookups[0], sorted({*ids, "$prev"}))

    def test_a_few_missing_are_fetched_and_read_again(self) -> None:
        for event in self.remote.values():
            if event.event_id not in ("$m3", "$prev"):
                self.store.add(event)
        got, handler = self.resolve([e.event_id for e in self.state])
        self.assertEqual(got, self.expected())
        self.assertEqual(handler.calls, [("events", {"$m3", "$prev"})])
        # the second look-up reads only what was missing
        self.assertEqual(self.store.lookups[1], ["$m3", "$prev"])

    def test_a_missing_auth_event_counts_too(self) -> None:
        self.remote["$auth"] = Event("$auth", "m.room.power_levels", "")
        for event in self.remote.values():
            if event.event_id != "$auth":
                self.store.add(event)
        got, handler = self.resolve([e.event_id for e in self.state], ("$auth",))
        self.assertEqual(handler.calls, [("events", {"$auth"})])
        self.assertEqual(got, self.expected())

    def test_ten_percent_missing_fetches_the_whole_state(self) -> None:
        for event in self.state[4:]:
            self.store.add(event)
        self.store.add(self.prev)
        got, handler = self.resolve([e.event_id for e in self.state])
        self.assertEqual(handler.calls, [("whole", "$prev")])
        self.assertEqual(got, self.expected())

    def test_the_prev_event_itself_when_an_unrejected_state_event(self) -> None:
        self.prev = Event("$prev", "m.room.topic", "")
        self.remote["$prev"] = self.prev
        for event in self.remote.values():
            self.store.add(event)
        got, _ = self.resolve([e.event_id for e in self.state])
        self.assertEqual(got, {**self.expected(), ("m.room.topic", ""): "$prev"})
        self.store.events["$prev"] = Event("$prev", "m.room.topic", "", "auth_error")
        got, _ = self.resolve([e.event_id for e in self.state])
        self.assertEqual(got, self.expected())

    def test_prev_event_not_stored_raises(self) -> None:
        del self.remote["$prev"]
        for event in self.state:
            self.store.add(event)
        with self.assertRaisesRegex(Exception, "Unable to get missing prev_event"):
            self.resolve([e.event_id for e in self.state])

    def test_other_rooms_and_non_state_events_are_left_out(self) -> None:
        for event in self.remote.values():
            self.store.add(event)
        self.store.add(Event("$elsewhere", "m.room.member", "@z:x"), room="!other:x")
        self.store.add(Event("$msg", "m.room.message", None))
        got, _ = self.resolve([e.event_id for e in self.state] + ["$elsewhere", "$msg"])
        self.assertEqual(got, self.expected())


class PureTests(unittest.TestCase):
    def test_synapse_ten_percent_rule(self) -> None:
        self.assertTrue(fetch_whole_state(10, 60, 40))
        self.assertFalse(fetch_whole_state(9, 60, 40))
        self.assertTrue(fetch_whole_state(0, 0, 0))  # an empty answer, as Synapse

    def test_state_map_rejected_state_events_stay(self) -> None:
        stored = {
            "$a": StoredEvent(ROOM, "m.room.member", "@a:x", "auth_error"),
            "$b": StoredEvent(ROOM, "m.room.member", "@b:x", None),
        }
        self.assertEqual(
            state_map_from(ROOM, ["$a", "$b", "$unknown"], stored, "d"),
            {("m.room.member", "@a:x"): "$a", ("m.room.member", "@b:x"): "$b"},
        )


class StoredEventsTxnTests(unittest.TestCase):
    """``_stored_events_txn`` against Synapse's tables (the columns it reads),
    on a real SQLite database."""

    def test_rows_read_with_one_string_per_room_and_type(self) -> None:
        import sqlite3

        from synapse_partial_state.compat import prev_state
        from tests.unit.compat.test_resident_state import _SqliteTxn

        conn = sqlite3.connect(":memory:")
        conn.executescript(
            """
            CREATE TABLE events (event_id TEXT, room_id TEXT, type TEXT);
            CREATE TABLE state_events (event_id TEXT, room_id TEXT, type TEXT,
                state_key TEXT);
            CREATE TABLE rejections (event_id TEXT, reason TEXT);
            """
        )
        for i in range(6):
            conn.execute(
                "INSERT INTO events VALUES (?, ?, ?)", (f"$m{i}", ROOM, "m.room.member")
            )
            conn.execute(
                "INSERT INTO state_events VALUES (?, ?, ?, ?)",
                (f"$m{i}", ROOM, "m.room.member", f"@u{i}:x"),
            )
        conn.execute("INSERT INTO events VALUES ('$msg', ?, 'm.room.message')", (ROOM,))
        conn.execute("INSERT INTO rejections VALUES ('$m5', 'auth_error')")
        self.patch(prev_state, "IDS_PER_STATEMENT_SQLITE", 4)  # two statements
        found = prev_state._stored_events_txn(
            _SqliteTxn(conn), [f"$m{i}" for i in range(6)] + ["$msg", "$unknown"]
        )
        self.assertEqual(
            found["$m5"], StoredEvent(ROOM, "m.room.member", "@u5:x", "auth_error")
        )
        self.assertEqual(found["$msg"], StoredEvent(ROOM, "m.room.message", None, None))
        self.assertNotIn("$unknown", found)
        self.assertEqual(len(found), 7)
        # Equal strings of every row are one object, across statements too.
        members = [found[f"$m{i}"] for i in range(6)]
        self.assertEqual(len({id(m.room_id) for m in found.values()}), 1)
        self.assertEqual(len({id(m.event_type) for m in members}), 1)
