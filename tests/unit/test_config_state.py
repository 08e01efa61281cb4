"""Config validation of ``resident.state_cache``: each bad shape names key, value, rule."""

from __future__ import annotations

from typing import Any

from synapse_partial_state import PartialStateModule
from synapse_partial_state.config import PartialStateConfig, StateCacheConfig
from tests.config_asserts import ConfigAssertions


def _with(state_cache: Any) -> dict[str, Any]:
    return {"resident": {"state_cache": state_cache}}


class StateCacheConfigTests(ConfigAssertions):
    def test_defaults(self) -> None:
        config = PartialStateModule.parse_config({})
        self.assertEqual(config.resident.state_cache, StateCacheConfig())
        self.assertEqual(PartialStateConfig().resident.state_cache, StateCacheConfig())
        self.assertEqual(StateCacheConfig(), StateCacheConfig(True, 256, True))
        # An empty or null section is the defaults too.
        empty: tuple[Any, ...] = ({}, None)
        for raw in empty:
            self.assertEqual(
                PartialStateModule.parse_config(_with(raw)).resident.state_cache,
                StateCacheConfig(),
            )

    def test_full_valid_section(self) -> None:
        config = PartialStateModule.parse_config(
            _with({"enabled": False, "max_size_mib": 0, "members_only": False})
        )
        self.assertEqual(
            config.resident.state_cache,
            StateCacheConfig(enabled=False, max_size_mib=0, members_only=False),
        )
        config = PartialStateModule.parse_config(_with({"max_size_mib": 1048576}))
        self.assertEqual(config.resident.state_cache.max_size_mib, 1048576)

    def test_section_must_be_a_mapping(self) -> None:
        for bad in ("yes", ["enabled"], 256, True):
            self.assert_rejected(
                _with(bad),
                "partial-state module config.resident.state_cache",
                "expected a mapping of options",
                repr(bad),
            )

    def test_enabled_must_be_a_boolean(self) -> None:
        for bad in ("true", 1, None):
            self.assert_rejected(
                _with({"enabled": bad}),
                "'resident.state_cache.enabled'",
                repr(bad),
                "true or false",
            )

    def test_members_only_must_be_a_boolean(self) -> None:
        for bad in ("false", 0, [True]):
            self.assert_rejected(
                _with({"members_only": bad}),
                "'resident.state_cache.members_only'",
                repr(bad),
                "true or false",
            )

    def test_max_size_must_be_a_whole_number_in_range(self) -> None:
        for bad in (-1, 1048577, "256", "256M", 1.5, True, None):
            self.assert_rejected(
                _with({"max_size_mib": bad}),
                "'resident.state_cache.max_size_mib'",
                repr(bad),
                "a whole number from 0 to 1048576",
            )

    def test_unknown_option_is_named(self) -> None:
        self.assert_rejected(
            _with({"max_bytes": 1000}),
            "partial-state module config.resident.state_cache",
            "unknown option(s) 'max_bytes'",
            "'enabled', 'max_size_mib', 'members_only'",
        )
