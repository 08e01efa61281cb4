"""The benchmark end to end at its smallest (``scripts-dev/bench/run --quick``: real
stock and module homeservers, 1,000 members, SQLite): it must keep producing every
figure the README and the issues rely on, not only parse them."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: The README's command, run as a newcomer types it: from the repository's
#: root, through the script's own shebang (it re-runs itself under .venv).
RUN = "scripts-dev/bench/run"


class BenchSmoke(unittest.TestCase):
    def test_quick_run_reports_every_figure_for_both_variants(self) -> None:
        with tempfile.TemporaryDirectory(prefix="sps-bench-smoke-") as tmp:
            out = os.path.join(tmp, "out")
            work = os.path.join(tmp, "work")
            os.makedirs(out)
            os.makedirs(work)
            proc = subprocess.run(
                # Room version 12: Synapse 1.163's default for new rooms.
                [
                    RUN,
                    "--quick",
                    "--room-version",
                    "12",
                    "--out",
                    out,
                    "--workdir",
                    work,
                ],
                capture_output=True,
                text=True,
                timeout=600,
                cwd=ROOT,
            )
            self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
            with open(os.path.join(out, "results.json")) as f:
                results = json.load(f)
            with open(os.path.join(out, "results.txt")) as f:
                table = f.read()
            self.assertTrue(os.path.getsize(os.path.join(out, "results.png")) > 0)

        runs = {(r["variant"], r["scenario"]): r for r in results["runs"]}
        self.assertEqual({r["room"]["room_version"] for r in results["runs"]}, {"12"})
        self.assertEqual(
            set(runs),
            {(v, s) for v in ("stock", "module") for s in ("join", "resident")},
        )
        for (variant, scenario), run in runs.items():
            what = f"{variant} {scenario}"
            self.assertIsNone(run.get("error"), what)
            m = run["metrics"]
            if scenario == "join":
                for key in (
                    "join_s",
                    "message_remote_s",
                    "full_members_s",
                    "messages_s",
                ):
                    self.assertGreater(m[key], 0, f"{what}: {key}")
                self.assertGreater(m["peak_rss_mib"], 0, what)
                self.assertIn("stage:resync started", m, what)
                # Each stage's duration and the joiner's CPU meanwhile.
                self.assertTrue(any(k.startswith("took:") for k in m), what)
                self.assertTrue(any(k.startswith("cores:") for k in m), what)
                self.assertGreater(m["full_members_s"], m["stage:resync started"])
            else:
                for key in (
                    "send_join_s",
                    "send_join_2_s",
                    "state_ids_s",
                    "state_s",
                    "state_cold_s",
                    "real_join_s",
                ):
                    self.assertGreater(m[key], 0, f"{what}: {key}")
                self.assertGreater(m["resident_peak_rss_mib"], 0, what)
                self.assertGreaterEqual(m["resident_rss_growth_mib"], 0, what)
                self.assertIn("idle_wait_s", run, what)
        # The module's own stages show up in its breakdown.
        self.assertIn("stage:module:state_fetched", runs["module", "join"]["metrics"])
        self.assertIn("module/stock", table)
        self.assertIn("stage took:", table)
        self.assertIn("resident peak RSS serving", table)
