"""The version gate: how Synapse's version is read, and what an untested one does."""

from __future__ import annotations

import os
import unittest
from unittest import mock

from synapse.module_api.errors import ConfigError

from synapse_partial_state.compat import patching

UNTESTED = ("1.162.9", "1.164.0", "1.170.0")


class VersionGateTests(unittest.TestCase):
    def setUp(self) -> None:
        # The operator's override must not leak in from the environment.
        env = mock.patch.dict(os.environ)
        env.start()
        self.addCleanup(env.stop)
        os.environ.pop(patching.TESTED_RANGE_ENV, None)

    def _with_version(self, version: str) -> mock._patch:
        return mock.patch.object(patching.synapse, "__version__", version)

    def test_parses_release_and_rc_versions(self) -> None:
        for raw, want in (
            ("1.163.2", (1, 163, 2)),
            ("1.164.0rc1", (1, 164, 0)),
            ("2.0", (2, 0, 0)),
        ):
            with self._with_version(raw):
                self.assertEqual(patching.synapse_version(), want)

    def test_tested_version_installs_the_patches(self) -> None:
        for refuse in (False, True):
            with self._with_version("1.163.2"):
                gate = patching.check_synapse_version(False, refuse)
            self.assertEqual(
                gate,
                patching.VersionGate(
                    "1.163.2",
                    "1.163.0 <= version < 1.164.0",
                    tested=True,
                    patches_active=True,
                    reason=None,
                ),
            )

    def test_untested_version_starts_with_patches_off_and_says_so(self) -> None:
        for version in UNTESTED:
            with (
                self._with_version(version),
                self.assertLogs(patching.logger, "ERROR") as logs,
            ):
                gate = patching.check_synapse_version(allow_untested=False)
            self.assertFalse(gate.tested)
            self.assertFalse(gate.patches_active)
            self.assertEqual(gate.reason, patching.PATCHES_OFF)
            self.assertNotIn(version, gate.reason or "")
            (line,) = logs.output
            self.assertTrue(line.startswith("ERROR:"), line)
            for fragment in (
                f"Synapse {version} is outside the range",
                "1.163.0 <= version < 1.164.0",
                "NONE is installed",
                "runs as stock",
                "allow_untested_synapse: true",
                "refuse_untested_synapse: true",
            ):
                self.assertIn(fragment, line)

    def test_allow_untested_installs_the_patches_with_a_warning(self) -> None:
        with (
            self._with_version("1.170.0"),
            self.assertLogs(patching.logger, "WARNING") as logs,
        ):
            gate = patching.check_synapse_version(allow_untested=True)
        self.assertIn("outside the tested range", logs.output[0])
        self.assertTrue(logs.output[0].startswith("WARNING:"))
        self.assertTrue(gate.patches_active)
        self.assertFalse(gate.tested)
        self.assertEqual(gate.reason, patching.PATCHES_ON_ANYWAY)

    def test_refuse_untested_stops_synapse_with_clear_message(self) -> None:
        for version in UNTESTED:
            with self._with_version(version), self.assertRaises(ConfigError) as cm:
                patching.check_synapse_version(False, refuse_untested=True)
            message = str(cm.exception)
            self.assertIn(f"Synapse {version}", message)
            self.assertIn("1.163.0 <= version < 1.164.0", message)
            self.assertIn("'refuse_untested_synapse' is set", message)
            self.assertIn("allow_untested_synapse", message)

    def test_environment_overrides_the_tested_range(self) -> None:
        os.environ[patching.TESTED_RANGE_ENV] = "1.0.0, 1.1.0"
        with self._with_version("1.163.2"), self.assertLogs(patching.logger, "ERROR"):
            gate = patching.check_synapse_version(False)
        self.assertEqual(gate.tested_range, "1.0.0 <= version < 1.1.0")
        self.assertFalse(gate.patches_active)
        os.environ[patching.TESTED_RANGE_ENV] = "1.170.0,1.171.0"
        with self._with_version("1.170.3"):
            self.assertTrue(patching.check_synapse_version(False).patches_active)

    def test_malformed_override_is_refused(self) -> None:
        for raw in ("1.163", "1.163.0", "1.163.0,1.164", "a,b", "1.0.0,1.1.0,2.0.0"):
            os.environ[patching.TESTED_RANGE_ENV] = raw
            with self.assertRaises(ConfigError) as cm:
                patching.check_synapse_version(False)
            self.assertIn(patching.TESTED_RANGE_ENV, str(cm.exception))
            self.assertIn("'1.163.0,1.164.0'", str(cm.exception))
