"""Which path stores the resync's outliers: the bulk outlier writer only where the
bulk gate allows it (its inputs: ``resync.bulk_writer``, the Synapse release,
the schema version) and this process persists the room's events; else
Synapse's ``_auth_and_persist_outliers`` (Synapse faked: routing only; the rows
are the differential black-box test's, ``tests/blackbox/test_bulk_outliers.py``)."""

from __future__ import annotations

from typing import Any
from unittest import mock

from twisted.trial import unittest

from synapse_partial_state.compat.bulk import gate, outliers
from synapse_partial_state.compat.state_fetch import StateFetchOps
from tests.unit.sync_run import run

ROOM = "!room:a.test"


class _Handler:
    """Synapse's federation event handler: records outlier persistence."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    async def _auth_and_persist_outliers(self, room_id: str, events: Any) -> None:
        self.calls.append((room_id, list(events)))


class _Hs:
    def __init__(self) -> None:
        self.handler = _Handler()

    def get_federation_event_handler(self) -> _Handler:
        return self.handler


class _Bulk:
    chunk = 2000

    def __init__(self, here: bool) -> None:
        self.here = here
        self.calls: list[tuple[str, list[str]]] = []

    def persists_here(self, room_id: str) -> bool:
        return self.here

    async def persist_outliers(self, room_id: str, events: Any) -> None:
        self.calls.append((room_id, list(events)))


def _ops(bulk: Any) -> tuple[StateFetchOps, _Hs]:
    hs = _Hs()
    ops = StateFetchOps.__new__(StateFetchOps)
    ops._hs = hs  # type: ignore[assignment]
    ops._bulk = bulk
    ops.store_at_least = 0 if bulk is None else bulk.chunk
    return ops, hs


class GateDecidesTheWriter(unittest.TestCase):
    """``bulk_outlier_writer``: the gate's verdict and the writer it allows."""

    def writer_for(self, version: tuple[int, int, int], enabled: bool = True) -> Any:
        built = []
        with (
            mock.patch.object(gate, "synapse_version", return_value=version),
            mock.patch.object(
                outliers, "BulkOutlierWriter", side_effect=lambda hs: built.append(hs)
            ),
        ):
            verdict = gate.configured(gate.release_verdict(), enabled)
            outliers.bulk_outlier_writer("hs", verdict)  # type: ignore[arg-type]
        return verdict, built

    def test_tested_release_gets_the_bulk_writer(self) -> None:
        verdict, built = self.writer_for((1, 163, 2))
        self.assertTrue(verdict.allowed)
        self.assertEqual(built, ["hs"])

    def test_untested_release_gets_none(self) -> None:
        with self.assertLogs(gate.logger, "WARNING"):
            verdict, built = self.writer_for((1, 164, 0))
        self.assertEqual(verdict.reason, gate.BULK_OFF_UNTESTED)
        self.assertEqual(built, [])

    def test_untested_schema_gets_none(self) -> None:
        with (
            mock.patch("synapse.storage.schema.SCHEMA_VERSION", 95),
            self.assertLogs(gate.logger, "WARNING"),
        ):
            verdict, built = self.writer_for((1, 163, 2))
        self.assertFalse(verdict.allowed)
        self.assertEqual(built, [])

    def test_off_by_configuration_gets_none(self) -> None:
        verdict, built = self.writer_for((1, 163, 2), enabled=False)
        self.assertEqual(verdict.reason, gate.BULK_OFF_CONFIG)
        self.assertEqual(built, [])


class PersistOutliersRouting(unittest.TestCase):
    def test_without_the_bulk_writer_synapse_stores(self) -> None:
        ops, hs = _ops(None)
        run(ops.persist_outliers(ROOM, ["$a", "$b"]))  # type: ignore[list-item]
        self.assertEqual(hs.handler.calls, [(ROOM, ["$a", "$b"])])
        self.assertEqual(ops.store_at_least, 0)

    def test_with_the_bulk_writer_it_stores(self) -> None:
        bulk = _Bulk(here=True)
        ops, hs = _ops(bulk)
        run(ops.persist_outliers(ROOM, ["$a", "$b"]))  # type: ignore[list-item]
        self.assertEqual(bulk.calls, [(ROOM, ["$a", "$b"])])
        self.assertEqual(hs.handler.calls, [])
        self.assertEqual(ops.store_at_least, 2000)

    def test_room_persisted_by_another_worker_goes_to_synapse(self) -> None:
        bulk = _Bulk(here=False)
        ops, hs = _ops(bulk)
        run(ops.persist_outliers(ROOM, ["$a"]))  # type: ignore[list-item]
        self.assertEqual(bulk.calls, [])
        self.assertEqual(hs.handler.calls, [(ROOM, ["$a"])])


class BulkTaskIsNeverMergedInto(unittest.TestCase):
    def test_try_merge(self) -> None:
        from synapse.storage.controllers.persist_events import _PersistEventsTask

        task = outliers.BulkOutliersTask(events_and_contexts=[], backfilled=True)
        other = _PersistEventsTask(events_and_contexts=[], backfilled=True)
        self.assertFalse(task.try_merge(other))
        self.assertEqual(task.events_and_contexts, [])

    def test_not_merged_into_a_backfilled_task_before_it(self) -> None:
        from synapse.storage.controllers.persist_events import _PersistEventsTask

        pulled = _PersistEventsTask(events_and_contexts=[], backfilled=True)
        bulk = outliers.BulkOutliersTask(
            events_and_contexts=[("$a", None)],  # type: ignore[list-item]
            backfilled=outliers.BULK_BACKFILLED,
        )
        self.assertFalse(pulled.try_merge(bulk))
        self.assertEqual(pulled.events_and_contexts, [])
        self.assertTrue(bulk.backfilled)
