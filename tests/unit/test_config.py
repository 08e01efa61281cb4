"""Config validation: every bad shape fails with a message naming key, value and rule."""

from __future__ import annotations

import os
import re

import attr
import yaml

from synapse_partial_state import PartialStateModule
from synapse_partial_state.config import PartialStateConfig, ResidentConfig
from tests.config_asserts import ConfigAssertions


class ParseConfigTests(ConfigAssertions):
    def test_empty_gives_defaults(self) -> None:
        self.assertEqual(PartialStateModule.parse_config({}), PartialStateConfig())
        self.assertEqual(PartialStateModule.parse_config(None), PartialStateConfig())

    def test_readme_config_is_valid_and_gives_the_defaults(self) -> None:
        """The module config the README documents parses, and is the defaults (it
        says "default: ..." for each option)."""
        readme = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
        with open(readme, encoding="utf-8") as f:
            blocks = re.findall(r"```yaml\n(.*?)```", f.read(), re.S)
        configs = [
            module.get("config")
            for block in blocks
            if "PartialStateModule" in block
            for module in (yaml.safe_load(block) or {}).get("modules", [])
            if module["module"] == "synapse_partial_state.PartialStateModule"
        ]
        self.assertTrue(configs, "no module config in the README")
        for documented in configs:
            self.assertEqual(
                PartialStateModule.parse_config(documented), PartialStateConfig()
            )

    def test_warm_hosts_min_members(self) -> None:
        self.assertEqual(PartialStateConfig().resident.warm_hosts_min_members, 10000)
        config = PartialStateModule.parse_config(
            {"resident": {"warm_hosts_min_members": 0}}
        )
        self.assertEqual(config.resident.warm_hosts_min_members, 0)
        self.assert_rejected(
            {"resident": {"warm_hosts_min_members": -5}},
            "'resident.warm_hosts_min_members'",
            "-5 (int)",
        )

    def test_config_is_frozen(self) -> None:
        config = PartialStateModule.parse_config({})
        with self.assertRaises(attr.exceptions.FrozenInstanceError):
            config.allow_untested_synapse = True  # type: ignore[misc]

    def test_full_valid_config(self) -> None:
        config = PartialStateModule.parse_config(
            {
                "resident": {
                    "enabled": True,
                    "heroes": False,
                    "bans_and_kicks": False,
                    "invites_and_knocks": True,
                    "members_per_server": 3,
                    "power_level_users": False,
                    "summary": False,
                    "max_extra_members": 50,
                },
                "allow_untested_synapse": True,
            }
        )
        self.assertEqual(
            config.resident,
            ResidentConfig(
                heroes=False,
                bans_and_kicks=False,
                members_per_server=3,
                power_level_users=False,
                summary=False,
                max_extra_members=50,
            ),
        )
        self.assertTrue(config.allow_untested_synapse)

    def test_untested_synapse_switches(self) -> None:
        default = PartialStateModule.parse_config({})
        self.assertFalse(default.allow_untested_synapse)
        self.assertFalse(default.refuse_untested_synapse)
        refuse = PartialStateModule.parse_config({"refuse_untested_synapse": True})
        self.assertTrue(refuse.refuse_untested_synapse)
        self.assertFalse(refuse.allow_untested_synapse)

    def test_allow_and_refuse_untested_synapse_together(self) -> None:
        self.assert_rejected(
            {"allow_untested_synapse": True, "refuse_untested_synapse": True},
            "'allow_untested_synapse' and 'refuse_untested_synapse' are both true",
            "expected at most one of them",
        )

    def test_refuse_untested_synapse_given_string(self) -> None:
        self.assert_rejected(
            {"refuse_untested_synapse": "yes"},
            "'refuse_untested_synapse'",
            "'yes' (str)",
            "true or false",
        )

    def test_top_level_not_a_mapping(self) -> None:
        self.assert_rejected(["a"], "expected a mapping", "['a'] (list)")

    def test_section_not_a_mapping(self) -> None:
        self.assert_rejected({"resident": "yes"}, "config.resident", "'yes' (str)")

    def test_unknown_top_level_key(self) -> None:
        self.assert_rejected({"resync_speed": 3}, "unknown option", "'resync_speed'")

    def test_unknown_nested_key(self) -> None:
        self.assert_rejected(
            {"resident": {"hero": True}}, "config.resident", "'hero'", "'heroes'"
        )

    def test_boolean_given_string(self) -> None:
        self.assert_rejected(
            {"resident": {"heroes": "yes"}},
            "'resident.heroes'",
            "'yes' (str)",
            "true or false",
        )

    def test_boolean_given_number(self) -> None:
        self.assert_rejected(
            {"allow_untested_synapse": 1}, "'allow_untested_synapse'", "1 (int)"
        )

    def test_integer_out_of_range(self) -> None:
        self.assert_rejected(
            {"resident": {"members_per_server": 11}},
            "'resident.members_per_server'",
            "11 (int)",
            "from 0 to 10",
        )

    def test_integer_negative(self) -> None:
        self.assert_rejected(
            {"resident": {"max_extra_members": -1}},
            "'resident.max_extra_members'",
            "-1 (int)",
        )

    def test_integer_given_bool(self) -> None:
        self.assert_rejected(
            {"resident": {"max_extra_members": True}},
            "'resident.max_extra_members'",
            "True (bool)",
        )

    def test_integer_given_float(self) -> None:
        self.assert_rejected(
            {"resident": {"members_per_server": 1.5}},
            "'resident.members_per_server'",
            "1.5 (float)",
        )

    def test_resync_section(self) -> None:
        config = PartialStateModule.parse_config(
            {"resync": {"initial_backoff_seconds": 1, "max_backoff_seconds": 30}}
        )
        self.assertEqual(config.resync.initial_backoff_seconds, 1.0)
        self.assertEqual(config.resync.max_backoff_seconds, 30.0)
        self.assertTrue(config.resync.enabled)

    def test_start_delay(self) -> None:
        self.assertEqual(
            PartialStateModule.parse_config({}).resync.start_delay_seconds, 0.4
        )
        config = PartialStateModule.parse_config({"resync": {"start_delay_seconds": 0}})
        self.assertEqual(config.resync.start_delay_seconds, 0)
        self.assert_rejected(
            {"resync": {"start_delay_seconds": 61}},
            "'resync.start_delay_seconds'",
            "from 0 to 60",
        )

    def test_essentials_key_wait(self) -> None:
        self.assertEqual(
            PartialStateModule.parse_config({}).resync.essentials_key_wait_seconds,
            0.25,
        )
        config = PartialStateModule.parse_config(
            {"resync": {"essentials_key_wait_seconds": 2}}
        )
        self.assertEqual(config.resync.essentials_key_wait_seconds, 2)
        self.assert_rejected(
            {"resync": {"essentials_key_wait_seconds": 6}},
            "'resync.essentials_key_wait_seconds'",
            "from 0 to 5",
        )

    def test_state_fetch_options(self) -> None:
        config = PartialStateModule.parse_config({})
        self.assertTrue(config.resync.fast_state_fetch)
        self.assertEqual(config.resync.verify_workers, -1)
        self.assertTrue(config.resync.bulk_writer)
        config = PartialStateModule.parse_config(
            {
                "resync": {
                    "fast_state_fetch": False,
                    "verify_workers": 0,
                    "bulk_writer": False,
                }
            }
        )
        self.assertFalse(config.resync.fast_state_fetch)
        self.assertEqual(config.resync.verify_workers, 0)
        self.assertFalse(config.resync.bulk_writer)

    def test_bulk_finish(self) -> None:
        self.assertTrue(PartialStateModule.parse_config({}).resync.bulk_finish)
        config = PartialStateModule.parse_config({"resync": {"bulk_finish": False}})
        self.assertFalse(config.resync.bulk_finish)
        self.assert_rejected(
            {"resync": {"bulk_finish": 1}}, "'resync.bulk_finish'", "1 (int)"
        )

    def test_bulk_state_deltas(self) -> None:
        self.assertTrue(PartialStateModule.parse_config({}).resync.bulk_state_deltas)
        config = PartialStateModule.parse_config(
            {"resync": {"bulk_state_deltas": False}}
        )
        self.assertFalse(config.resync.bulk_state_deltas)
        self.assert_rejected(
            {"resync": {"bulk_state_deltas": "no"}},
            "'resync.bulk_state_deltas'",
            "'no' (str)",
        )

    def test_fast_state_fetch_given_string(self) -> None:
        self.assert_rejected(
            {"resync": {"fast_state_fetch": "yes"}},
            "'resync.fast_state_fetch'",
            "'yes' (str)",
        )

    def test_verify_workers_out_of_range(self) -> None:
        self.assert_rejected(
            {"resync": {"verify_workers": -2}},
            "'resync.verify_workers'",
            "-2 (int)",
            "from -1 to 64",
        )

    def test_seconds_given_string(self) -> None:
        self.assert_rejected(
            {"resync": {"initial_backoff_seconds": "5s"}},
            "'resync.initial_backoff_seconds'",
            "'5s' (str)",
            "a number of seconds from 0.1 to 3600",
        )

    def test_seconds_out_of_range(self) -> None:
        self.assert_rejected(
            {"resync": {"max_backoff_seconds": 0}},
            "'resync.max_backoff_seconds'",
            "0 (int)",
            "from 1 to 86400",
        )

    def test_backoff_ceiling_below_start(self) -> None:
        self.assert_rejected(
            {"resync": {"initial_backoff_seconds": 60, "max_backoff_seconds": 10}},
            "'resync.max_backoff_seconds' (10)",
            "'resync.initial_backoff_seconds' (60)",
        )
