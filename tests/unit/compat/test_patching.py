"""The version gate and how Synapse's version is read."""

from __future__ import annotations

import unittest
from unittest import mock

from synapse.module_api.errors import ConfigError

from synapse_partial_state.compat import patching


class VersionGateTests(unittest.TestCase):
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

    def test_tested_version_starts(self) -> None:
        with self._with_version("1.163.2"):
            patching.check_synapse_version(allow_untested=False)

    def test_untested_version_refused_with_clear_message(self) -> None:
        for version in ("1.162.9", "1.164.0"):
            with self._with_version(version), self.assertRaises(ConfigError) as cm:
                patching.check_synapse_version(allow_untested=False)
            message = str(cm.exception)
            self.assertIn(f"Synapse {version}", message)
            self.assertIn("allow_untested_synapse", message)
            self.assertIn("1.163.0 <= version < 1.164.0", message)

    def test_override_starts_with_a_warning(self) -> None:
        with (
            self._with_version("1.170.0"),
            self.assertLogs(patching.logger, "WARNING") as logs,
        ):
            patching.check_synapse_version(allow_untested=True)
        self.assertIn("outside the tested range", logs.output[0])
