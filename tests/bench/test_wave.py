"""The worker benchmark (``scripts-dev/bench/wave``): its table on sample
records, and the command itself at its smallest (``--quick``: real worker
deployments, stock and module, 2,000 members, 5 joiners), which must keep
producing every figure the README relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import unittest
from typing import Any

from twisted.trial import unittest as trial_unittest

_SCRIPTS_DEV = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "scripts-dev",
)
if _SCRIPTS_DEV not in sys.path:
    sys.path.insert(0, _SCRIPTS_DEV)

from bench import wave  # noqa: E402

from tests.fedkit.workers import unavailable_reason  # noqa: E402

_ROOT = os.path.dirname(_SCRIPTS_DEV)
#: The README's command, run as a newcomer types it: from the repository's
#: root, through the script's own shebang (it re-runs itself under .venv).
WAVE = "scripts-dev/bench/wave"


def _record(
    variant: str, routing: str, wave_s: float, rss: float, cpu: float = 10.0
) -> dict[str, Any]:
    return {
        "variant": variant,
        "routing": routing,
        "wave_s": wave_s,
        "joiners_per_minute": round(60 * 20 / wave_s, 1),
        "requests": {step: {"median_s": 1.0, "max_s": 2.0} for step in wave.STEPS},
        "slowest_send_join_and_state_s": wave_s / 10,
        "serving_cpu_s": cpu,
        "processes": {
            "main": {"peak_rss_mib": rss, "cpu_s": 4.0},
            "federation1": {"peak_rss_mib": rss / 2, "cpu_s": 3.0},
            "federation2": {"peak_rss_mib": rss / 2, "cpu_s": 3.0},
        },
    }


class WaveTableTests(unittest.TestCase):
    def test_a_line_per_wave_and_the_ratios_per_routing(self) -> None:
        text = wave.table(
            [
                _record("stock", "main", 100.0, 1000.0),
                _record("stock", "workers", 80.0, 800.0),
                _record("module", "main", 20.0, 400.0, cpu=2.0),
                _record("module", "workers", 20.0, 600.0, cpu=5.0),
            ]
        )
        lines = text.splitlines()
        self.assertEqual(
            [ln.split()[:2] for ln in lines[3:7]],
            [
                ["stock", "main"],
                ["stock", "workers"],
                ["module", "main"],
                ["module", "workers"],
            ],
        )
        self.assertIn("10.00   10.0 1000 (4.0) / 500 (3.0) / 500 (3.0)", lines[3])
        self.assertIn(
            "federation on main: wave time 0.20x, highest peak RSS 0.40x,"
            " slowest joiner 0.20x, CPU 0.20x",
            text,
        )
        self.assertIn(
            "federation on workers: wave time 0.25x, highest peak RSS 0.75x,"
            " slowest joiner 0.25x, CPU 0.50x",
            text,
        )

    def test_a_failed_wave_is_shown_and_has_no_ratio(self) -> None:
        failed = {"variant": "stock", "routing": "main", "error": "Boom: no"}
        text = wave.table([failed, _record("module", "main", 20.0, 400.0)])
        self.assertIn("stock   main     error: Boom: no", text)
        self.assertNotIn("module/stock", text)


class WaveSmoke(trial_unittest.TestCase):
    def setUp(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            self.skipTest(reason)

    def test_quick_run_reports_every_figure_for_both_variants(self) -> None:
        with tempfile.TemporaryDirectory(prefix="sps-wave-smoke-") as tmp:
            out = os.path.join(tmp, "wave.json")
            proc = subprocess.run(
                [WAVE, "--quick", "--out", out, "--workdir", tmp],
                capture_output=True,
                text=True,
                timeout=900,
                cwd=_ROOT,
            )
            self.assertEqual(proc.returncode, 0, proc.stderr[-4000:])
            with open(out) as f:
                results = json.load(f)
        records = {(r["variant"], r["routing"]): r for r in results["records"]}
        self.assertEqual(
            set(records),
            {(v, r) for v in ("stock", "module") for r in ("main", "workers")},
        )
        for (variant, routing), rec in records.items():
            what = f"{variant} on {routing}"
            self.assertNotIn("error", rec, what)
            self.assertEqual(rec["joiners"], 5, what)
            self.assertEqual(len(rec["joiners_seen"]), 5, what)
            self.assertGreater(rec["wave_s"], 0, what)
            for step in wave.STEPS:
                self.assertGreater(rec["requests"][step]["median_s"], 0, what)
                self.assertGreaterEqual(
                    rec["requests"][step]["max_s"],
                    rec["requests"][step]["median_s"],
                    what,
                )
                self.assertGreater(rec["answer_mib"][step], 0, what)
            self.assertEqual(set(rec["processes"]), set(wave.SERVING), what)
            for usage in rec["processes"].values():
                self.assertGreater(usage["peak_rss_mib"], 0, what)
            # nginx sent the wave where the routing says, and nowhere else.
            expected = ["main"] if routing == "main" else ["federation1", "federation2"]
            self.assertEqual(rec["served_by"], expected, what)
        self.assertIn("module/stock, federation on main", proc.stdout)
        self.assertIn("module/stock, federation on workers", proc.stdout)


if __name__ == "__main__":
    unittest.main()
