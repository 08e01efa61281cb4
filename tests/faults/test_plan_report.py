"""Pure unit tests of the fault campaign's plan, verdicts and report
(``scripts-dev/faults``). No homeserver is started."""

from __future__ import annotations

import os
import sys
import unittest
from typing import Any

_SCRIPTS_DEV = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "scripts-dev",
)
if _SCRIPTS_DEV not in sys.path:
    sys.path.insert(0, _SCRIPTS_DEV)

from faults import cli, report  # noqa: E402
from faults.invariants import required_messages  # noqa: E402
from faults.kinds import KINDS, kinds_for  # noqa: E402
from faults.plan import interleave, make_plan  # noqa: E402
from faults.runner import OUTCOMES, outcome_of  # noqa: E402
from faults.traffic import Sent  # noqa: E402

BOTH = ["sqlite", "postgres"]


class Plan(unittest.TestCase):
    def test_every_kind_on_every_database_in_the_first_cycle(self) -> None:
        kinds = kinds_for(BOTH, list(KINDS))
        self.assertNotIn("postgres_connections_dropped", kinds["sqlite"])
        self.assertIn("postgres_connections_dropped", kinds["postgres"])
        cycle = interleave(BOTH, kinds)
        self.assertEqual(len(cycle), 2 * len(KINDS) - 1)
        plan = make_plan(len(cycle), BOTH, kinds, 5, 1000, 10000)
        self.assertEqual({(s.db, s.kind) for s in plan}, set(cycle))
        # the databases alternate while both have kinds left
        self.assertEqual([s.db for s in plan[:4]], BOTH * 2)

    def test_the_suite_runs_every_kind_once_on_a_database_it_supports(self) -> None:
        from tests.blackbox.test_faults import CI_KINDS

        ran = [kind for kinds in CI_KINDS.values() for kind in kinds]
        self.assertEqual(sorted(ran), sorted(KINDS))
        for db, kinds in CI_KINDS.items():
            self.assertEqual(kinds, kinds_for([db], kinds)[db])

    def test_the_plan_is_a_function_of_the_seed(self) -> None:
        kinds = kinds_for(BOTH, list(KINDS))
        a = make_plan(40, BOTH, kinds, 7, 1000, 10000)
        self.assertEqual(a, make_plan(40, BOTH, kinds, 7, 1000, 10000))
        self.assertNotEqual(a, make_plan(40, BOTH, kinds, 8, 1000, 10000))
        self.assertTrue(all(1000 <= s.members <= 10000 for s in a))
        self.assertTrue(all(3 <= s.servers <= 8 for s in a))
        self.assertEqual([s.index for s in a], list(range(1, 41)))
        self.assertEqual(len({s.seed for s in a}), 40)

    def test_a_kind_for_another_database_only(self) -> None:
        kinds = kinds_for(["sqlite"], ["postgres_connections_dropped"])
        with self.assertRaises(ValueError):
            make_plan(3, ["sqlite"], kinds, 1, 10, 20)

    def test_command_line_checks(self) -> None:
        with self.assertRaises(ValueError):
            cli.parse_kinds("resident_hang,nonsense")
        self.assertEqual(cli.parse_kinds(None), list(KINDS))
        self.assertEqual(cli.parse_dbs("both"), BOTH)
        with self.assertRaises(ValueError):
            cli.parse_dbs("mysql")


class Verdicts(unittest.TestCase):
    def test_the_gravest_violation_names_the_outcome(self) -> None:
        self.assertEqual(outcome_of([]), "ok")
        self.assertEqual(
            outcome_of([("message lost", "x"), ("stuck", "y"), ("duplicates", "z")]),
            "stuck",
        )
        self.assertEqual(outcome_of([("duplicates", "z")]), "duplicates")

    def test_messages_before_the_last_join_are_not_required(self) -> None:
        class FakeRun:
            window_start = 100.0

        sent = [
            Sent("before", "remote", "@a:x", 99.0, "$1"),
            Sent("after", "local", "@b:y", 101.0, "$2"),
            Sent("refused", "local", "@b:y", 102.0, None),
        ]
        got = required_messages(FakeRun(), sent)  # type: ignore[arg-type]
        self.assertEqual([m.body for m in got], ["after"])


def _record(kind: str, db: str, outcome: str, hit: bool = True) -> dict[str, Any]:
    violations = [] if outcome == "ok" else [{"outcome": outcome, "detail": "why"}]
    return {
        "spec": {
            "index": 1,
            "kind": kind,
            "db": db,
            "seed": 3,
            "members": 999,
            "room_version": "10",
        },
        "outcome": outcome,
        "notes": {"hit": hit, "injected": "it", "moment": "now"},
        "violations": violations,
        "logs": "/tmp/logs" if violations else None,
    }


class Report(unittest.TestCase):
    def test_table_headline_and_failures(self) -> None:
        records = [
            _record("resident_hang", "sqlite", "ok"),
            _record("resident_hang", "sqlite", "stuck"),
            _record("admin_abort", "postgres", "ok", hit=False),
        ]
        text = report.table(records)
        lines = text.splitlines()
        self.assertEqual([c.strip() for c in lines[0].split("|")[4:]], list(OUTCOMES))
        rows = {tuple(c.strip() for c in line.split("|")[:2]): line for line in lines}
        hang = [c.strip() for c in rows[("resident_hang", "sqlite")].split("|")]
        self.assertEqual(hang[2:6], ["2", "2", "1", "0"])  # runs, hit, ok, error
        self.assertEqual(hang[6], "1")  # stuck
        both = [c.strip() for c in rows[("all", "both")].split("|")]
        self.assertEqual(both[2:5], ["3", "2", "2"])
        self.assertEqual(
            report.headline(records),
            "3 runs (postgres, sqlite), 2 fault kinds, 1 stuck, 0 lost,"
            " 0 state differences, 0 other failures",
        )
        failed = report.failures(records)
        self.assertIn("resident_hang on sqlite: stuck (seed 3", failed)
        self.assertIn("logs: /tmp/logs", failed)
        self.assertNotIn("admin_abort", failed)


if __name__ == "__main__":
    unittest.main()
