"""The default suite's and the full suite's database variants (pure logic: the
decorators of :mod:`tests.fedkit.testcase`, no homeserver started)."""

from __future__ import annotations

import os
import unittest
from typing import Any
from unittest import mock

from tests.fedkit.testcase import (
    FederationTestCase,
    on_both_databases,
    on_room_versions,
)


def _skipped(cls: type) -> str | None:
    """The skip reason of a variant class, or None when it runs."""
    if getattr(cls, "__unittest_skip__", False):
        return str(getattr(cls, "__unittest_skip_why__", ""))
    return None


def _env(**values: str) -> Any:
    """The environment without any ``SPS_TEST_*`` setting, plus ``values``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPS_TEST_")}
    clean.update(values)
    return mock.patch.dict(os.environ, clean, clear=True)


def _decorated(decorator: str, name: str, **env: str) -> Any:
    """``decorator`` applied to a new test class in a scratch module namespace
    (the decorators define their variants in the caller's globals), with the
    environment ``env``."""
    namespace: dict[str, Any] = {
        "FederationTestCase": FederationTestCase,
        "on_both_databases": on_both_databases,
        "on_room_versions": on_room_versions,
    }
    with _env(**env):
        exec(
            f"@{decorator}\nclass {name}(FederationTestCase):\n"
            "    def test_nothing(self) -> None:\n        pass\n",
            namespace,
        )
    return namespace[name]


class SuiteVariantTests(unittest.TestCase):
    def test_plain_decorator_runs_both_in_every_suite(self) -> None:
        for env in ({}, {"SPS_TEST_FULL": "1"}):
            variants = _decorated("on_both_databases", "Plain", **env)
            self.assertIsNone(_skipped(variants.sqlite))
            self.assertIsNone(_skipped(variants.postgres))
            self.assertEqual(variants.postgres.DATABASE, "postgres")

    def test_ci_database_skips_the_other_outside_the_full_suite(self) -> None:
        decorator = 'on_both_databases(ci_database="postgres")'
        variants = _decorated(decorator, "Default")
        self.assertIsNone(_skipped(variants.postgres))
        self.assertIn("full suite only", _skipped(variants.sqlite) or "")
        variants = _decorated(decorator, "Full", SPS_TEST_FULL="1")
        self.assertIsNone(_skipped(variants.postgres))
        self.assertIsNone(_skipped(variants.sqlite))

    def test_selected_databases_still_win(self) -> None:
        variants = _decorated(
            'on_both_databases(ci_database="postgres")',
            "OnlySqlite",
            SPS_TEST_DATABASES="sqlite",
            SPS_TEST_FULL="1",
        )
        self.assertIn("SPS_TEST_DATABASES", _skipped(variants.postgres) or "")
        self.assertIsNone(_skipped(variants.sqlite))

    def test_unknown_ci_database_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            on_both_databases(ci_database="mysql")  # type: ignore[arg-type]

    def test_rotation_covers_every_version_and_both_databases(self) -> None:
        by_version = _decorated(
            'on_room_versions("10", "11", "12", ci_rotate=True)', "Rotated"
        )
        running = {
            (version, db)
            for version, variants in by_version.items()
            for db, cls in variants.variants.items()
            if _skipped(cls) is None
        }
        self.assertEqual(
            running, {("10", "sqlite"), ("11", "postgres"), ("12", "sqlite")}
        )
        by_version = _decorated(
            'on_room_versions("10", "12", ci_rotate=True)',
            "RotatedFull",
            SPS_TEST_FULL="1",
        )
        self.assertTrue(
            all(
                _skipped(cls) is None
                for variants in by_version.values()
                for cls in variants.variants.values()
            )
        )
        self.assertEqual(by_version["12"].postgres.ROOM_VERSION, "12")
