"""The fault campaign at CI size: the same code as ``scripts-dev/faults/run``
(real joiners with the module, a fake resident, one fault per run at a random
moment, the invariants checked after each run), on small rooms.

SQLite: every fault kind once. PostgreSQL: the kinds that touch the database
(its connections terminated, the joiner killed) and an admin abort. Every run
must end ``ok``. A failure prints the campaign's table and the failed runs;
the test's work directory, kept, holds the results and the failed runs' logs.
The same plan runs from the command line (``--only N`` for run N alone)::

    scripts-dev/faults/run --db sqlite --runs 10 --seed 12 \
        --members-min 300 --members-max 1000
    scripts-dev/faults/run --db postgres --runs 3 --seed 12 \
        --members-min 300 --members-max 1000 \
        --kinds postgres_connections_dropped,joiner_kill_restart,admin_abort
"""

from __future__ import annotations

import os
import sys
from typing import ClassVar

from tests.fedkit.testcase import FederationTestCase, on_both_databases

_SCRIPTS_DEV = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "scripts-dev",
)
if _SCRIPTS_DEV not in sys.path:
    sys.path.insert(0, _SCRIPTS_DEV)

from faults import report  # noqa: E402
from faults.campaign import run_campaign  # noqa: E402
from faults.kinds import KINDS, kinds_for  # noqa: E402
from faults.plan import make_plan  # noqa: E402
from faults.runner import Settings  # noqa: E402

#: The campaign's seed: every run's room, moment and fault are drawn from it.
SEED = 12
#: Room sizes (members besides the creator): small, for a run of seconds.
MEMBERS = (300, 1000)
#: Fault kinds per database.
CI_KINDS = {
    "sqlite": [k for k, kind in KINDS.items() if "sqlite" in kind.databases],
    "postgres": ["postgres_connections_dropped", "joiner_kill_restart", "admin_abort"],
}


@on_both_databases
class FaultCampaign(FederationTestCase):
    KINDS: ClassVar[dict[str, list[str]]] = CI_KINDS

    def test_every_run_ends_ok(self) -> None:
        db = self.DATABASE
        wanted = self.KINDS[db]
        plan = make_plan(len(wanted), [db], kinds_for([db], wanted), SEED, *MEMBERS)
        self.assertEqual(sorted(s.kind for s in plan), sorted(wanted))
        out = os.path.join(self.workdir, "results")
        records = run_campaign(
            plan,
            Settings(timeout=240),
            out,
            {"seed": SEED, "db": db, "kinds": wanted},
            workdir=self.workdir,
            say=lambda text: None,
        )
        self.assertEqual(len(records), len(plan))
        failed = [r["spec"]["kind"] for r in records if r["outcome"] != "ok"]
        self.assertEqual(
            failed,
            [],
            f"\n{report.table(records)}\n{report.failures(records)}\nresults: {out}",
        )
        # Every run checked what it promised: messages, the job, the state.
        for record in records:
            self.assertIn("messages_required", record["notes"], record["spec"])
            self.assertEqual(record["notes"]["job"]["phase"], "done", record["spec"])
