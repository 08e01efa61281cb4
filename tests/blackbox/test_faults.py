"""The fault campaign at CI size: the same code as ``scripts-dev/faults/run``
(real joiners with the module, a fake resident, one fault per run at a random
moment, the invariants checked after each run), on small rooms.

Every fault kind once, split between the databases: PostgreSQL takes the kinds
that touch the database (its connections terminated, the joiner killed, an
admin abort's purge) and a hanging resident, SQLite the rest (the full campaign,
``scripts-dev/faults/run``, runs every kind on both). Every run must end
``ok``. A failure prints the campaign's table and the failed runs; the test's
work directory, kept, holds the results and the failed runs' logs. The same
plan runs from the command line (``--only N`` for run N alone)::

    scripts-dev/faults/run --db sqlite --runs 6 --seed 12 \
        --members-min 300 --members-max 1000 \
        --kinds resident_kill,resident_trickle,truncated_answer,malformed_answer,errors_500,second_user_joins
    scripts-dev/faults/run --db postgres --runs 5 --seed 12 \
        --members-min 300 --members-max 1000 \
        --kinds postgres_connections_dropped,joiner_kill_restart,admin_abort,resident_hang,leave_rejoin
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, ClassVar

from tests.blackbox.resync_case import FAST, wait_until
from tests.fedkit.testcase import FederationTestCase, on_both_databases

_SCRIPTS_DEV = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "scripts-dev",
)
if _SCRIPTS_DEV not in sys.path:
    sys.path.insert(0, _SCRIPTS_DEV)

from faults import invariants, report  # noqa: E402
from faults.campaign import run_campaign  # noqa: E402
from faults.context import Run  # noqa: E402
from faults.kinds import KINDS, kinds_for  # noqa: E402
from faults.plan import make_plan  # noqa: E402
from faults.runner import Settings  # noqa: E402
from faults.traffic import Sent  # noqa: E402

#: The campaign's seed: every run's room, moment and fault are drawn from it.
SEED = 12
#: Room sizes (members besides the creator): small, for a run of seconds.
MEMBERS = (300, 1000)
#: Fault kinds per database: every kind once.
CI_POSTGRES_KINDS = [
    "postgres_connections_dropped",
    "joiner_kill_restart",
    "admin_abort",
    "resident_hang",
    "leave_rejoin",
]
CI_KINDS = {
    "sqlite": [k for k in KINDS if k not in CI_POSTGRES_KINDS],
    "postgres": CI_POSTGRES_KINDS,
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


class InvariantsCatchBreakage(FederationTestCase):
    """The campaign's checks pass on a good resync and catch each breakage
    they exist for (so that "0 failures" means something)."""

    def test_each_check_catches_its_breakage(self) -> None:
        run = self.resynced_run()
        sent = [
            Sent("said remotely", "remote", "@u1:x", run.window_start, "$r"),
            Sent("said locally", "local", run.bob.user_id, run.window_start, "$l"),
        ]
        run.peer.send_event(
            run.room_id, "m.room.message", {"msgtype": "m.text", "body": sent[0].body}
        )
        run.bob.send_message(run.room_id, sent[1].body)
        self.assertEqual(self.violations(run, sent), [])

        lost = Sent("never sent", "remote", "@u1:x", run.window_start, "$n")
        self.assertEqual(self.violations(run, [*sent, lost]), ["message lost"])

        room = (run.room_id,)
        run.hs.sql(
            "UPDATE sps_resync_jobs SET phase = 'applying' WHERE room_id = ?", room
        )
        self.assertEqual(self.violations(run, sent), ["job disagrees"])
        run.hs.sql("UPDATE sps_resync_jobs SET phase = 'done' WHERE room_id = ?", room)

        run.hs.sql(
            "INSERT INTO event_auth (event_id, auth_id, room_id)"
            " SELECT event_id, auth_id, room_id FROM event_auth LIMIT 1"
        )
        self.assertEqual(self.violations(run, sent), ["duplicates"])

        run.hs.sql(
            "DELETE FROM current_state_events WHERE room_id = ? AND type = ?",
            (run.room_id, "m.room.topic"),
        )
        self.assertEqual(self.violations(run, sent), ["duplicates", "state differs"])

        run.hs.sql("INSERT INTO partial_state_rooms (room_id) VALUES (?)", room)
        self.assertEqual(
            self.violations(run, sent),
            ["duplicates", "job disagrees", "state differs", "stuck"],
        )

    def resynced_run(self) -> Run:
        """A run whose room (60 members) has finished resyncing, no fault."""
        peer = self.make_fake_peer()
        room = peer.create_room(members=60, servers=3, topic="t")
        fast: dict[str, Any] = dict(FAST)
        hs = self.make_homeserver("hs2", **fast)
        admin = self.register(hs, "admin", admin=True)
        bob = self.register(hs, "bob")
        run = Run("selftest", 1, peer, room, hs, admin, bob, expected_s=1)
        bob.join(run.room_id, via=[run.resident])
        run.window_start = time.time() - 1
        wait_until(lambda: not run.is_partial(), 60, "the resync")
        return run

    def violations(self, run: Run, sent: list[Sent]) -> list[str]:
        """The outcomes every check finds broken now (no waiting)."""
        run.violations = []
        invariants.check_complete(run)
        invariants.check_state(run, timeout=0)
        invariants.check_messages(run, sent, timeout=5)
        invariants.check_duplicates(run)
        invariants.check_job(run, timeout=0)
        return sorted({outcome for outcome, _ in run.violations})
