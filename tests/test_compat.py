"""The compat layer's pure parts: the version gate, identical state sets, how stored
events are served (Synapse faked where it would be called)."""

from __future__ import annotations

import json
import unittest
from typing import Any
from unittest import mock

from synapse.module_api.errors import ConfigError
from twisted.internet import defer
from twisted.trial import unittest as trial_unittest

from synapse_partial_state import _synapse


class VersionGateTests(unittest.TestCase):
    def _with_version(self, version: str) -> mock._patch:
        return mock.patch.object(_synapse.synapse, "__version__", version)

    def test_parses_release_and_rc_versions(self) -> None:
        for raw, want in (
            ("1.163.2", (1, 163, 2)),
            ("1.164.0rc1", (1, 164, 0)),
            ("2.0", (2, 0, 0)),
        ):
            with self._with_version(raw):
                self.assertEqual(_synapse.synapse_version(), want)

    def test_tested_version_starts(self) -> None:
        with self._with_version("1.163.2"):
            _synapse.check_synapse_version(allow_untested=False)

    def test_untested_version_refused_with_clear_message(self) -> None:
        for version in ("1.162.9", "1.164.0"):
            with self._with_version(version), self.assertRaises(ConfigError) as cm:
                _synapse.check_synapse_version(allow_untested=False)
            message = str(cm.exception)
            self.assertIn(f"Synapse {version}", message)
            self.assertIn("allow_untested_synapse", message)
            self.assertIn("1.163.0 <= version < 1.164.0", message)

    def test_override_starts_with_a_warning(self) -> None:
        with (
            self._with_version("1.170.0"),
            self.assertLogs(_synapse.logger, "WARNING") as logs,
        ):
            _synapse.check_synapse_version(allow_untested=True)
        self.assertIn("outside the tested range", logs.output[0])


class IdenticalStateSetsTests(unittest.TestCase):
    A = {("m.room.create", ""): "$c", ("m.room.member", "@a:x"): "$a"}

    def test_equal_maps(self) -> None:
        self.assertTrue(_synapse.identical_state_sets([self.A, dict(self.A)]))
        self.assertTrue(_synapse.identical_state_sets([self.A, self.A, self.A]))

    def test_one_map_is_no_resolution(self) -> None:
        self.assertFalse(_synapse.identical_state_sets([self.A]))
        self.assertFalse(_synapse.identical_state_sets([]))

    def test_a_different_value_or_key_is_not_identical(self) -> None:
        other = dict(self.A)
        other[("m.room.member", "@a:x")] = "$b"
        self.assertFalse(_synapse.identical_state_sets([self.A, other]))
        fewer = {("m.room.create", ""): "$c"}
        self.assertFalse(_synapse.identical_state_sets([self.A, fewer]))
        self.assertFalse(_synapse.identical_state_sets([fewer, self.A]))
        self.assertFalse(_synapse.identical_state_sets([self.A, self.A, other]))


class CurrentStateGuardTests(trial_unittest.TestCase):
    """The persistence controller's current-state recalculation is skipped
    while the room has partial-state events."""

    def guarded(self, partial: set[str]) -> tuple[Any, list[str]]:
        ran: list[str] = []

        async def native(room_id: str, task: object) -> None:
            ran.append(room_id)

        async def has_partial_state_events(room_id: str) -> bool:
            return room_id in partial

        return _synapse.current_state_guard(native, has_partial_state_events), ran

    def test_recalculated_without_partial_state_events(self) -> None:
        guarded, ran = self.guarded(partial={"!other:x"})
        self.successResultOf(defer.ensureDeferred(guarded("!r:x", object())))
        self.assertEqual(ran, ["!r:x"])

    def test_kept_while_partial_state_events_exist(self) -> None:
        guarded, ran = self.guarded(partial={"!r:x"})
        with self.assertLogs("synapse_partial_state._synapse", "INFO") as logs:
            self.successResultOf(defer.ensureDeferred(guarded("!r:x", object())))
        self.assertEqual(ran, [])
        self.assertIn("not recalculated", logs.output[0])

    def test_partial_state_events_query(self) -> None:
        import sqlite3

        db = sqlite3.connect(":memory:")
        txn = db.cursor()
        txn.execute("CREATE TABLE partial_state_events (room_id TEXT, event_id TEXT)")
        txn.execute("INSERT INTO partial_state_events VALUES ('!r:x', '$e')")
        self.assertTrue(_synapse._has_partial_state_events_txn(txn, "!r:x"))
        self.assertFalse(_synapse._has_partial_state_events_txn(txn, "!s:x"))


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
            _synapse.stored_pdu_bytes("$e", text, self.V4), text.encode("utf-8")
        )

    def test_depth_outside_canonical_json_is_dropped_as_stock_drops_it(self) -> None:
        for depth in (2**53, -(2**53)):
            self.assertEqual(
                _synapse.stored_pdu_bytes("$e", self.pdu(depth=depth), self.V4), b""
            )
        self.assertNotEqual(
            _synapse.stored_pdu_bytes("$e", self.pdu(depth=2**53 - 1), self.V4), b""
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
            self.assertIsNone(_synapse.stored_pdu_bytes("$e", text, self.V4), what)

    def test_room_v1_v2_event_id_must_match_the_row(self) -> None:
        text = self.pdu(event_id="$e:x")
        self.assertIsNotNone(_synapse.stored_pdu_bytes("$e:x", text, self.V1))
        self.assertIsNone(_synapse.stored_pdu_bytes("$other:x", text, self.V1))
        # Later formats carry no event_id: nothing to compare.
        self.assertIsNotNone(_synapse.stored_pdu_bytes("$other", self.pdu(), self.V3))


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
        access = _synapse.ResidentStateAccess.__new__(_synapse.ResidentStateAccess)
        access._store = store
        d = defer.ensureDeferred(access.encoded_pdus(ids))
        self.assertEqual(len(store.pending), _synapse.STATE_LOAD_CONCURRENCY)
        while store.pending:
            store.fire_all()
        result = self.successResultOf(d)
        self.assertEqual(store.most_at_once, 2)
        self.assertEqual(set(result), set(ids) - {"$e1234"})
        self.assertEqual(store.slow, ["$e1234"])  # not JSON: stock's loader
        self.assertEqual(json.loads(result["$e7"])["event_id"], "$e7")
