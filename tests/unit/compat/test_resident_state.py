"""How the resident's ``/state`` reads stored events (Synapse faked where it
would be called)."""

from __future__ import annotations

import json
import sqlite3
import unittest
from typing import Any
from unittest import mock

from twisted.internet import defer
from twisted.trial import unittest as trial_unittest

from synapse_partial_state.compat import resident_state


class StoredPduBytesTests(unittest.TestCase):
    V1, V3, V4 = 1, 2, 3  # EventFormatVersions

    def pdu(self, **fields: object) -> str:
        base: dict[str, object] = {
            "type": "m.room.member",
            "state_key": "@a:x",
            "content": {"membership": "join", "depth": "not the event's"},
            "depth": 12,
        }
        base.update(fields)
        return json.dumps(base, separators=(",", ":"))

    def test_plain_event_is_sent_as_stored(self) -> None:
        text = self.pdu()
        self.assertEqual(
            resident_state.stored_pdu_bytes("$e", text, self.V4), text.encode("utf-8")
        )

    def test_depth_outside_canonical_json_is_dropped_as_stock_drops_it(self) -> None:
        for depth in (2**53, -(2**53)):
            self.assertEqual(
                resident_state.stored_pdu_bytes("$e", self.pdu(depth=depth), self.V4),
                b"",
            )
        self.assertNotEqual(
            resident_state.stored_pdu_bytes("$e", self.pdu(depth=2**53 - 1), self.V4),
            b"",
        )

    def test_what_needs_stocks_loader(self) -> None:
        cases = {
            "not JSON": "{",
            "not an object": "[1]",
            "no depth": json.dumps({"type": "m.room.member"}),
            "depth not an integer": self.pdu(depth="12"),
            "boolean depth": self.pdu(depth=True),
            "redaction": self.pdu(type="m.room.redaction"),
        }
        for what, text in cases.items():
            self.assertIsNone(
                resident_state.stored_pdu_bytes("$e", text, self.V4), what
            )

    def test_the_text_settles_the_depth_without_parsing(self) -> None:
        parsed: list[str] = []
        real = resident_state._parsed_pdu_bytes

        def spy(event_id: str, text: str, fmt: int) -> bytes | None:
            parsed.append(text)
            return real(event_id, text, fmt)

        plain = self.pdu(content={"membership": "join"})
        nested_ok = self.pdu(content={"depth": 3})
        nested_far = self.pdu(content={"depth": 2**60})
        spaced = json.dumps({"type": "m.room.member", "depth": 4})
        valued = self.pdu(content={"x": "depth"})
        as_float = self.pdu(depth=1.5)
        with mock.patch.object(resident_state, "_parsed_pdu_bytes", spy):
            for text in (plain, nested_ok):
                self.assertEqual(
                    resident_state.stored_pdu_bytes("$e", text, self.V4),
                    text.encode("utf-8"),
                )
            self.assertEqual(parsed, [])
            # Where the text does not tell: parsed, and stock's verdict.
            self.assertEqual(
                resident_state.stored_pdu_bytes("$e", nested_far, self.V4),
                nested_far.encode("utf-8"),
            )
            self.assertEqual(
                resident_state.stored_pdu_bytes("$e", spaced, self.V4),
                spaced.encode("utf-8"),
            )
            self.assertEqual(
                resident_state.stored_pdu_bytes("$e", valued, self.V4),
                valued.encode("utf-8"),
            )
            self.assertIsNone(resident_state.stored_pdu_bytes("$e", as_float, self.V4))
            self.assertEqual(parsed, [nested_far, spaced, valued, as_float])

    def test_room_v1_v2_event_id_must_match_the_row(self) -> None:
        text = self.pdu(event_id="$e:x")
        self.assertIsNotNone(resident_state.stored_pdu_bytes("$e:x", text, self.V1))
        self.assertIsNone(resident_state.stored_pdu_bytes("$other:x", text, self.V1))
        # Later formats carry no event_id: nothing to compare.
        self.assertIsNotNone(
            resident_state.stored_pdu_bytes("$other", self.pdu(), self.V3)
        )


class _FakeEventCache:
    def get_local(self, key: tuple[str], update_metrics: bool = True) -> None:
        return None


class _FakeStore:
    """Rows for ``_state_event_rows_txn`` made up from the event IDs; each query
    stays pending until the test fires it."""

    def __init__(self, bad: set[str]) -> None:
        self._get_event_cache = _FakeEventCache()
        self.db_pool = self
        self.bad = bad
        self.pending: list[tuple[defer.Deferred[Any], list[str]]] = []
        self.most_at_once = 0
        self.slow: list[str] = []

    def runInteraction(self, name: str, func: Any, room_id: str, ids: list[str]) -> Any:
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append((d, ids))
        self.most_at_once = max(self.most_at_once, len(self.pending))
        return d

    def fire_all(self) -> None:
        while self.pending:
            d, ids = self.pending.pop(0)
            rows = [
                (
                    e,
                    json.dumps({"type": "m.room.member", "depth": 5, "event_id": e})
                    if e not in self.bad
                    else "{",
                    3,
                    None,
                    False,
                )
                for e in ids
            ]
            d.callback(("10", rows))

    async def get_events_as_list(self, ids: list[str]) -> list[Any]:
        self.slow.extend(ids)
        return []


class EncodedPdusTests(trial_unittest.TestCase):
    def test_batches_two_at_a_time_and_every_event_served(self) -> None:
        batch = resident_state.STATE_LOAD_BATCH
        ids = [f"$e{i}" for i in range(batch * 5 + batch // 2)]
        store = _FakeStore(bad={"$e1234"})
        access = resident_state.ResidentStateOps.__new__(
            resident_state.ResidentStateOps
        )
        access._store = store
        d = defer.ensureDeferred(access.encoded_pdus("!r:x", ids))
        self.assertEqual(len(store.pending), resident_state.STATE_LOAD_CONCURRENCY)
        while store.pending:
            store.fire_all()
        result = self.successResultOf(d)
        self.assertEqual(store.most_at_once, resident_state.STATE_LOAD_CONCURRENCY)
        self.assertEqual(set(result), set(ids) - {"$e1234"})
        self.assertEqual(store.slow, ["$e1234"])  # not JSON: stock's loader
        self.assertEqual(json.loads(result["$e7"])["event_id"], "$e7")


class _SqliteTxn:
    """What ``_state_event_rows_txn`` uses of Synapse's transaction, on a real
    SQLite database (``?`` placeholders, an engine that is not PostgreSQL)."""

    class database_engine:
        supports_using_any_list = False

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._cur = conn.cursor()

    def execute(self, sql: str, args: Any = ()) -> None:
        self._cur.execute(sql, list(args))

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def __iter__(self) -> Any:
        return iter(self._cur.fetchall())


class StateEventRowsTests(unittest.TestCase):
    """The rows read for ``/state``, against Synapse's tables (the columns used)."""

    ROOM = "!r:x"

    def setUp(self) -> None:
        self.conn = sqlite3.connect(":memory:")
        self.conn.executescript(
            """
            CREATE TABLE rooms (room_id TEXT, room_version TEXT);
            CREATE TABLE events (event_id TEXT, room_id TEXT, sender TEXT);
            CREATE TABLE event_json (event_id TEXT, room_id TEXT, json TEXT,
                format_version INTEGER);
            CREATE TABLE rejections (event_id TEXT, reason TEXT);
            CREATE TABLE redactions (event_id TEXT, redacts TEXT);
            CREATE TABLE room_ban_redactions (room_id TEXT, user_id TEXT);
            """
        )
        self.conn.execute("INSERT INTO rooms VALUES (?, '10')", (self.ROOM,))
        for event_id, room, sender in [
            ("$plain", self.ROOM, "@a:x"),
            ("$rejected", self.ROOM, "@a:x"),
            ("$redacted", self.ROOM, "@a:x"),
            ("$elsewhere", "!other:x", "@a:x"),
            ("$by_banned", self.ROOM, "@banned:x"),
        ]:
            self.conn.execute(
                "INSERT INTO events VALUES (?, ?, ?)", (event_id, room, sender)
            )
            self.conn.execute(
                "INSERT INTO event_json VALUES (?, ?, ?, 3)",
                (event_id, room, json.dumps({"sender": sender})),
            )
        self.conn.execute("INSERT INTO rejections VALUES ('$rejected', 'auth')")
        self.conn.execute("INSERT INTO redactions VALUES ('$r', '$redacted')")
        self.ids = ["$plain", "$rejected", "$redacted", "$elsewhere", "$by_banned"]

    def rows(self) -> tuple[Any, dict[str, tuple[Any, ...]]]:
        version, rows = resident_state._state_event_rows_txn(
            _SqliteTxn(self.conn), self.ROOM, self.ids + ["$unknown"]
        )
        return version, {row[0]: row[1:] for row in rows}

    def test_room_version_rejections_and_what_needs_stocks_loader(self) -> None:
        version, rows = self.rows()
        self.assertEqual(version, "10")
        self.assertEqual(set(rows), set(self.ids))  # $unknown is not stored
        # (JSON, format, rejection, special)
        self.assertEqual(rows["$plain"][1:], (3, None, False))
        self.assertEqual(rows["$rejected"][2:], ("auth", False))
        self.assertTrue(rows["$redacted"][3])
        self.assertTrue(rows["$elsewhere"][3])
        self.assertFalse(rows["$by_banned"][3])

    def test_a_redact_on_ban_sender_needs_stocks_loader(self) -> None:
        self.conn.execute(
            "INSERT INTO room_ban_redactions VALUES (?, '@banned:x')", (self.ROOM,)
        )
        _, rows = self.rows()
        self.assertTrue(rows["$by_banned"][3])
        self.assertFalse(rows["$plain"][3])

    def test_many_events_in_batches(self) -> None:
        ids = [f"$m{i}" for i in range(resident_state.STATE_QUERY_BATCH_SQLITE * 2 + 5)]
        self.conn.executemany(
            "INSERT INTO event_json VALUES (?, ?, '{}', 3)",
            [(event_id, self.ROOM) for event_id in ids],
        )
        _, rows = resident_state._state_event_rows_txn(
            _SqliteTxn(self.conn), self.ROOM, ids
        )
        self.assertEqual([row[0] for row in rows], ids)
