"""Config validation of the ``clients`` section."""

from __future__ import annotations

from typing import Any

from synapse_partial_state import PartialStateModule
from synapse_partial_state.config import MEMBERS_BLOCK, MEMBERS_PARTIAL, ClientsConfig
from tests.config_asserts import ConfigAssertions


class ClientsConfigTests(ConfigAssertions):
    def test_default_blocks(self) -> None:
        """Without the section (or empty), members requests block as stock."""
        raws: list[dict[str, Any]] = [{}, {"clients": None}, {"clients": {}}]
        for raw in raws:
            config = PartialStateModule.parse_config(raw)
            self.assertEqual(config.clients, ClientsConfig())
            self.assertEqual(config.clients.members_during_resync, MEMBERS_BLOCK)

    def test_each_value(self) -> None:
        for value in (MEMBERS_BLOCK, MEMBERS_PARTIAL):
            config = PartialStateModule.parse_config(
                {"clients": {"members_during_resync": value}}
            )
            self.assertEqual(config.clients.members_during_resync, value)

    def test_unknown_value(self) -> None:
        self.assert_rejected(
            {"clients": {"members_during_resync": "wait"}},
            "'clients.members_during_resync'",
            "'wait' (str)",
            "one of 'block', 'partial'",
        )

    def test_not_a_string(self) -> None:
        self.assert_rejected(
            {"clients": {"members_during_resync": True}},
            "'clients.members_during_resync'",
            "True (bool)",
        )

    def test_unknown_key(self) -> None:
        self.assert_rejected(
            {"clients": {"members": "partial"}},
            "config.clients",
            "'members'",
            "'members_during_resync'",
        )

    def test_section_not_a_mapping(self) -> None:
        self.assert_rejected({"clients": "partial"}, "config.clients", "'partial'")

    def test_history_wait(self) -> None:
        self.assertEqual(ClientsConfig().history_wait_seconds, 0.5)
        config = PartialStateModule.parse_config(
            {"clients": {"history_wait_seconds": 2}}
        )
        self.assertEqual(config.clients.history_wait_seconds, 2)
        self.assert_rejected(
            {"clients": {"history_wait_seconds": -1}},
            "'clients.history_wait_seconds'",
        )
