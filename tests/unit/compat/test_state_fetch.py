"""The state-fetch seam's own SQL (``compat/state_fetch.py``), on SQLite with the
columns of Synapse's tables it reads."""

from __future__ import annotations

import sqlite3

from synapse.storage.engines import Sqlite3Engine
from twisted.trial import unittest

from synapse_partial_state.compat import state_fetch


class _Txn(sqlite3.Cursor):
    """A cursor as Synapse's transactions are: with their database engine."""

    database_engine = Sqlite3Engine({"args": {"database": ":memory:"}})


class StoredNotRejectedTests(unittest.TestCase):
    def setUp(self) -> None:
        self.db = sqlite3.connect(":memory:")
        self.txn = self.db.cursor(_Txn)
        self.txn.execute("CREATE TABLE events (event_id TEXT NOT NULL UNIQUE)")
        self.txn.execute(
            "CREATE TABLE rejections (event_id TEXT NOT NULL UNIQUE, reason TEXT"
            " NOT NULL, last_check TEXT NOT NULL)"
        )
        stored = [f"$e{i}" for i in range(20)]
        self.txn.executemany("INSERT INTO events VALUES (?)", [(e,) for e in stored])
        self.rejected = {"$e3", "$e11", "$e19", "$not-stored-but-rejected"}
        self.txn.executemany(
            "INSERT INTO rejections VALUES (?, 'auth_error', '0')",
            [(e,) for e in self.rejected],
        )
        self.stored = set(stored)

    def query(self, event_ids: list[str]) -> set[str]:
        return state_fetch._stored_txn(self.txn, event_ids, True)

    def test_stored_and_not_rejected(self) -> None:
        asked = [f"$e{i}" for i in range(25)] + ["$not-stored-but-rejected"]
        self.assertEqual(self.query(asked), self.stored - self.rejected)
        self.assertEqual(self.query(["$e3"]), set())
        self.assertEqual(self.query(["$e4", "$nope"]), {"$e4"})
        self.assertEqual(self.query([]), set())

    def test_in_batches(self) -> None:
        self.patch(state_fetch, "STORED_CHECK_BATCH_SQLITE", 3)
        asked = [f"$e{i}" for i in range(25)]
        self.assertEqual(self.query(asked), self.stored - self.rejected)

    def test_have_seen_counts_rejected_events(self) -> None:
        """``have_seen``'s form: stored events, rejected or not, in batches."""
        self.patch(state_fetch, "STORED_CHECK_BATCH_SQLITE", 4)
        asked = [f"$e{i}" for i in range(25)] + ["$not-stored-but-rejected"]
        self.assertEqual(state_fetch._stored_txn(self.txn, asked, False), self.stored)
        self.assertEqual(state_fetch._stored_txn(self.txn, ["$nope"], False), set())


class HaveSeenTests(unittest.TestCase):
    """``have_seen``: Synapse's ``have_seen_events`` for a few IDs, one
    transaction of its own for many."""

    def test_few_through_synapse_many_in_one_transaction(self) -> None:
        from twisted.internet import defer

        asked: list[tuple[str, int]] = []

        class Pool:
            async def runInteraction(
                self, desc: str, f: object, ids: list[str], nr: bool
            ) -> set[str]:
                asked.append((desc, len(ids)))
                self.not_rejected = nr
                return {i for i in ids if i.endswith("0")}

        class Store:
            db_pool = Pool()

            async def have_seen_events(self, room_id: str, ids: list[str]) -> set[str]:
                asked.append(("synapse", len(ids)))
                return {i for i in ids if i.endswith("0")}

        few = [f"$e{i}" for i in range(state_fetch.HAVE_SEEN_VIA_SYNAPSE_MAX)]
        many = few + ["$extra0"]
        store = Store()
        got = self.successResultOf(
            defer.ensureDeferred(state_fetch.have_seen(store, "!r", few))
        )
        self.assertEqual(got, {i for i in few if i.endswith("0")})
        got = self.successResultOf(
            defer.ensureDeferred(state_fetch.have_seen(store, "!r", many))
        )
        self.assertIn("$extra0", got)
        self.assertFalse(store.db_pool.not_rejected)  # rejected ones count
        self.successResultOf(
            defer.ensureDeferred(state_fetch.have_seen(store, "!r", []))
        )
        self.assertEqual(asked, [("synapse", len(few)), ("sps_have_seen", len(many))])
