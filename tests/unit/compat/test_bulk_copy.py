"""COPY for the bulk outlier writer (``compat/bulk/copy.py``): the text format
of values, and which inserts are copied (pure logic: a recording cursor)."""

from __future__ import annotations

import io
from typing import Any

from synapse.storage.engines import PostgresEngine, Sqlite3Engine
from twisted.trial import unittest

from synapse_partial_state.compat.bulk import copy


class EncodeTests(unittest.TestCase):
    def test_values(self) -> None:
        self.assertEqual(copy.encode_value(None), "\\N")
        self.assertEqual(copy.encode_value(True), "t")
        self.assertEqual(copy.encode_value(False), "f")
        self.assertEqual(copy.encode_value(-42), "-42")
        self.assertEqual(copy.encode_value(""), "")
        self.assertEqual(copy.encode_value("\\N"), "\\\\N")  # a string, not NULL
        self.assertEqual(
            copy.encode_value('{"a":"b\\\\c\\n"}\tx\ny\rz'),
            '{"a":"b\\\\\\\\c\\\\n"}\\tx\\ny\\rz',
        )
        self.assertEqual(copy.encode_value("é\u2028😀"), "é\u2028😀")

        class Name(str):
            pass

        self.assertEqual(copy.encode_value(Name("a\tb")), "a\\tb")
        self.assertEqual(copy.encode_rows([(Name("x\n"), 1)]), "x\\n\t1\n")

    def test_other_types_are_not_encoded(self) -> None:
        for value in (1.5, b"bytes", ["list"], {"a": 1}):
            with self.assertRaises(copy.Unencodable):
                copy.encode_value(value)

    def test_rows(self) -> None:
        self.assertEqual(
            copy.encode_rows([("$a", 1, None), ("$b\t", -2, True)]),
            "$a\t1\t\\N\n$b\\t\t-2\tt\n",
        )


class _Cursor:
    def __init__(self) -> None:
        self.copies: list[tuple[str, str]] = []

    def copy_expert(self, sql: str, body: io.StringIO) -> None:
        self.copies.append((sql, body.read()))


class _Txn:
    def __init__(self, engine: Any) -> None:
        self.database_engine = engine
        self.txn = _Cursor()


class WrapperTests(unittest.TestCase):
    def setUp(self) -> None:
        self.native: list[tuple[str, list[Any]]] = []

        def native(txn: Any, table: str, keys: Any, values: Any) -> None:
            self.native.append((table, list(values)))

        self.insert = copy.wrap_insert_many(native)
        self.pg = _Txn(PostgresEngine.__new__(PostgresEngine))
        self.rows = [(f"$e{i}", i) for i in range(copy.COPY_MIN_ROWS)]

    def test_copied_only_within_the_bulk_writers_transactions(self) -> None:
        self.insert(self.pg, "events", ("event_id", "depth"), self.rows)
        self.assertEqual(len(self.native), 1)
        with copy.copying():
            self.insert(self.pg, "events", ("event_id", "depth"), self.rows)
        self.assertFalse(copy.active())
        self.assertEqual(len(self.native), 1)
        [(sql, body)] = self.pg.txn.copies
        self.assertEqual(sql, "COPY events (event_id, depth) FROM STDIN")
        self.assertEqual(body, "".join(f"$e{i}\t{i}\n" for i in range(len(self.rows))))

    def test_other_tables_small_batches_sqlite_and_odd_values_are_inserted(
        self,
    ) -> None:
        sqlite = _Txn(Sqlite3Engine({"args": {"database": ":memory:"}}))
        odd = [*self.rows[1:], ("$odd", 1.5)]
        with copy.copying():
            self.insert(self.pg, "event_forward_extremities", ("a", "b"), self.rows)
            self.insert(self.pg, "events", ("event_id", "depth"), self.rows[:3])
            self.insert(sqlite, "events", ("event_id", "depth"), self.rows)
            self.insert(self.pg, "events", ("event_id", "depth"), odd)
        self.assertEqual(self.pg.txn.copies, [])
        self.assertEqual(
            [table for table, _ in self.native],
            ["event_forward_extremities", "events", "events", "events"],
        )
        self.assertEqual(self.native[-1][1], odd)

    def test_a_big_whole_state_group_is_copied_in_any_transaction(self) -> None:
        keys = ("state_group", "room_id", "type", "state_key", "event_id")
        big = [
            (7, "!r:a", "m.room.member", f"@u{i}:a", f"$m{i}")
            for i in range(copy.ALWAYS_COPY_MIN_ROWS)
        ]
        sqlite = _Txn(Sqlite3Engine({"args": {"database": ":memory:"}}))
        with self.assertLogs(copy.__name__, "INFO") as logs:
            self.insert(self.pg, "state_groups_state", keys, big)
        self.assertEqual(
            logs.output[0].split(":", 2)[2],
            f"{len(big)} rows of state_groups_state written with COPY",
        )
        self.insert(self.pg, "state_groups_state", keys, big[:-1])  # small
        self.insert(sqlite, "state_groups_state", keys, big)
        [(sql, body)] = self.pg.txn.copies
        self.assertEqual(sql, f"COPY state_groups_state ({', '.join(keys)}) FROM STDIN")
        self.assertEqual(body.count("\n"), len(big))
        self.assertTrue(body.startswith("7\t!r:a\tm.room.member\t@u0:a\t$m0\n"))
        self.assertEqual(
            [len(rows) for _, rows in self.native], [len(big) - 1, len(big)]
        )
