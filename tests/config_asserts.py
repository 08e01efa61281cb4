"""Shared assertion for config-validation tests."""

from __future__ import annotations

import unittest
from typing import Any

from synapse.module_api.errors import ConfigError

from synapse_partial_state import PartialStateModule


class ConfigAssertions(unittest.TestCase):
    def assert_rejected(self, raw: Any, *fragments: str) -> None:
        """``raw`` fails parsing with a message containing every fragment."""
        with self.assertRaises(ConfigError) as cm:
            PartialStateModule.parse_config(raw)
        message = str(cm.exception)
        for fragment in fragments:
            self.assertIn(fragment, message)
