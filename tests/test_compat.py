"""The compat layer's version gate (pure logic: the version string is patched)."""

from __future__ import annotations

import unittest
from unittest import mock

from synapse.module_api.errors import ConfigError

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
