"""How the resident's ``/state`` reads stored events (Synapse faked where it
would be called)."""

from __future__ import annotations

import json
import unittest
from typing import Any

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

    def runInteraction(self, name: str, func: Any, ids: list[str]) -> Any:
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
                    "10",
                    None,
                    False,
                )
                for e in ids
            ]
            d.callback(rows)

    async def get_events_as_list(self, ids: list[str]) -> list[Any]:
        self.slow.extend(ids)
        return []


class EncodedPdusTests(trial_unittest.TestCase):
    def test_batches_two_at_a_time_and_every_event_served(self) -> None:
        ids = [f"$e{i}" for i in range(2500)]
        store = _FakeStore(bad={"$e1234"})
        access = resident_state.ResidentStateOps.__new__(
            resident_state.ResidentStateOps
        )
        access._store = store
        d = defer.ensureDeferred(access.encoded_pdus(ids))
        self.assertEqual(len(store.pending), resident_state.STATE_LOAD_CONCURRENCY)
        while store.pending:
            store.fire_all()
        result = self.successResultOf(d)
        self.assertEqual(store.most_at_once, 2)
        self.assertEqual(set(result), set(ids) - {"$e1234"})
        self.assertEqual(store.slow, ["$e1234"])  # not JSON: stock's loader
        self.assertEqual(json.loads(result["$e7"])["event_id"], "$e7")
