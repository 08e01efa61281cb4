"""The bulk writers' version gate: exact tested Synapse releases and schema."""

from __future__ import annotations

from unittest import mock

from twisted.trial import unittest

from synapse_partial_state.compat.bulk import gate


class BulkGateTests(unittest.TestCase):
    def test_tested_release_runs_the_bulk_writers(self) -> None:
        with mock.patch.object(gate, "synapse_version", return_value=(1, 163, 2)):
            self.assertEqual(gate.release_verdict(), gate.BulkGate(True))

    def test_other_release_falls_back_and_says_why(self) -> None:
        for version in ((1, 163, 3), (1, 164, 0), (1, 162, 0)):
            with mock.patch.object(gate, "synapse_version", return_value=version):
                with self.assertLogs(gate.logger, "WARNING") as logs:
                    verdict = gate.release_verdict()
            self.assertFalse(verdict.allowed)
            self.assertEqual(verdict.reason, gate.BULK_OFF_UNTESTED)
            self.assertIn("Synapse's own persistence", logs.output[0])

    def test_other_schema_falls_back(self) -> None:
        with (
            mock.patch.object(gate, "synapse_version", return_value=(1, 163, 2)),
            mock.patch("synapse.storage.schema.SCHEMA_VERSION", 95),
            self.assertLogs(gate.logger, "WARNING"),
        ):
            self.assertFalse(gate.release_verdict().allowed)

    def test_off_by_configuration(self) -> None:
        verdict = gate.configured(gate.release_verdict(), False)
        self.assertEqual(verdict, gate.BulkGate(False, gate.BULK_OFF_CONFIG))

    def test_one_warning_for_both_writers(self) -> None:
        """The release is checked once; each writer's setting then applies to
        that verdict without a second warning."""
        with mock.patch.object(gate, "synapse_version", return_value=(1, 164, 0)):
            with self.assertLogs(gate.logger, "INFO") as logs:
                release = gate.release_verdict()
                finish = gate.configured(release, True)
                outliers = gate.configured(release, False)
        self.assertEqual(finish, gate.BulkGate(False, gate.BULK_OFF_UNTESTED))
        self.assertEqual(outliers, gate.BulkGate(False, gate.BULK_OFF_CONFIG))
        warnings = [line for line in logs.output if line.startswith("WARNING")]
        self.assertEqual(len(warnings), 1)
