"""Fault campaign: resyncs of big rooms under injected faults, checked.

Each run joins a fresh fake room from a fresh homeserver with the module,
injects one fault at a random moment of the resync, heals it, waits (bounded)
for the outcome, and checks the invariants: no room left partial, the final
state equal to the resident's event by event, every message visible, no
duplicate rows, the job table and Synapse's partial-state tables agreeing.
Prints a table of runs by fault kind and outcome; exits 1 if any run failed.

    scripts-dev/faults/run --runs 22 --db both --seed 1
    scripts-dev/faults/run --runs 300 --db both --members-min 1000 --members-max 10000
    scripts-dev/faults/run --kinds resident_hang,admin_abort --db sqlite --runs 4
    scripts-dev/faults/run --seed 7 --runs 40 --only 13      # replay run 13 alone
    scripts-dev/faults/run --seed 7 --runs 40 --from 21      # the rest of a cut-short campaign
    scripts-dev/faults/run --list-kinds
    scripts-dev/faults/run --report faults-results/latest/results.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Any

from bench.machine import REPO_ROOT, describe_machine, machine_info

from faults import report
from faults.campaign import run_campaign
from faults.kinds import KINDS, kinds_for
from faults.plan import DEFAULT_ROOM_VERSIONS, make_plan
from faults.runner import Settings
from tests.fedkit.cleanup import unwind_on_sigterm

RESULTS_DIR = os.path.join(REPO_ROOT, "faults-results")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts-dev/faults/run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--runs", type=int, default=22, help="runs in all (default 22)")
    p.add_argument("--db", default="both", help="sqlite|postgres|both (default both)")
    p.add_argument("--members-min", type=int, default=1000, help="default 1000")
    p.add_argument("--members-max", type=int, default=10000, help="default 10000")
    p.add_argument("--seed", type=int, help="the campaign's seed (default: the time)")
    p.add_argument("--kinds", help="comma-separated fault kinds (default: all)")
    p.add_argument(
        "--room-versions",
        default=",".join(DEFAULT_ROOM_VERSIONS),
        help="room versions drawn from (default %(default)s)",
    )
    p.add_argument(
        "--only", type=int, metavar="N", help="run only run N of the plan (replay)"
    )
    p.add_argument(
        "--from",
        dest="first",
        type=int,
        metavar="N",
        help="start at run N of the plan (the rest of a campaign cut short)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300,
        help="seconds allowed, once a fault is healed, for the room to complete"
        " (default 300)",
    )
    p.add_argument(
        "--traffic-interval",
        type=float,
        default=1.0,
        help="seconds between remote messages during a run (default 1)",
    )
    p.add_argument(
        "--out",
        help="results directory (default faults-results/<timestamp>, also linked"
        " as faults-results/latest)",
    )
    p.add_argument("--workdir", help="where run directories go (default: temp)")
    p.add_argument("--keep", action="store_true", help="keep every run's directory")
    p.add_argument("--list-kinds", action="store_true", help="list the fault kinds")
    p.add_argument(
        "--report",
        metavar="JSON[,JSON...]",
        help="print the table of results files (several: one campaign run in parts)",
    )
    return p


def parse_kinds(text: str | None) -> list[str]:
    if not text:
        return list(KINDS)
    wanted = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in KINDS]
    if unknown or not wanted:
        raise ValueError(f"unknown fault kind(s) {unknown}; see --list-kinds")
    return list(dict.fromkeys(wanted))


def parse_dbs(text: str) -> list[str]:
    if text == "both":
        return ["sqlite", "postgres"]
    if text not in ("sqlite", "postgres"):
        raise ValueError("--db: sqlite, postgres or both")
    return [text]


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Validate and complete the options (ValueError on bad input)."""
    args.kind_list = parse_kinds(args.kinds)
    args.dbs = parse_dbs(args.db)
    if args.runs < 1:
        raise ValueError("--runs must be at least 1")
    if not 10 <= args.members_min <= args.members_max:
        raise ValueError("need 10 <= --members-min <= --members-max")
    if args.seed is None:
        args.seed = int(time.time()) % 100_000
    args.room_version_list = tuple(
        v.strip() for v in args.room_versions.split(",") if v.strip()
    )
    return args


def _list_kinds() -> int:
    for kind in KINDS.values():
        only = "" if len(kind.databases) == 2 else f" [{', '.join(kind.databases)}]"
        print(f"{kind.name}{only}: {kind.doc}")
    return 0


def _reprint(paths: str) -> int:
    """``--report``: the table, headline and failures of one or more results
    files (a campaign run in parts, e.g. with ``--from``)."""
    records = [r for path in paths.split(",") for r in report.read_json(path)["runs"]]
    print(report.table(records))
    print(report.headline(records))
    print(report.failures(records))
    return 0


def _out_dir(args: argparse.Namespace) -> str:
    """``--out``, or a new timestamped directory linked as ``latest``."""
    if args.out:
        return os.path.abspath(args.out)
    out = os.path.join(RESULTS_DIR, time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    latest = os.path.join(RESULTS_DIR, "latest")
    if os.path.islink(latest) or not os.path.exists(latest):
        if os.path.islink(latest):
            os.unlink(latest)
        os.symlink(os.path.basename(out), latest)
    return out


def _conclude(
    out: str, params: dict[str, Any], records: list[dict[str, Any]], seconds: float
) -> int:
    """Print and save the table, the headline and the failed runs; the exit
    status (1 if any run failed)."""
    text = "\n".join(
        [
            report.table(records),
            "",
            report.headline(records) + f" in {seconds / 60:.0f} min",
            params["machine_text"],
            report.failures(records),
        ]
    )
    print("\n" + text)
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(text + "\n")
    print(f"Results: {out}")
    return 0 if all(r["outcome"] == "ok" for r in records) else 1


def main(argv: list[str] | None = None) -> int:
    """The campaign: plan, runs, report (interrupted: what ran, status 130)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_kinds:
        return _list_kinds()
    if args.report:
        return _reprint(args.report)
    try:
        resolve(args)
    except ValueError as e:
        parser.error(str(e))
    plan = make_plan(
        args.runs,
        args.dbs,
        kinds_for(args.dbs, args.kind_list),
        args.seed,
        args.members_min,
        args.members_max,
        args.room_version_list,
    )
    if args.only is not None:
        plan = [s for s in plan if s.index == args.only]
    if args.first is not None:
        plan = [s for s in plan if s.index >= args.first]
    unwind_on_sigterm()
    out = _out_dir(args)
    machine = machine_info(with_postgres="postgres" in args.dbs)
    params = {
        **{k: v for k, v in vars(args).items() if k not in ("report", "list_kinds")},
        "machine": machine,
        "machine_text": describe_machine(machine),
    }
    print(f"Machine: {params['machine_text']}", file=sys.stderr)
    print(f"Seed {args.seed}; {len(plan)} run(s); results in {out}", file=sys.stderr)
    settings = Settings(args.timeout, args.traffic_interval, args.keep)
    started = time.monotonic()
    records: list[dict[str, Any]] = []
    try:
        records = run_campaign(
            plan, settings, out, params, args.workdir, say=_say, into=records
        )
    except (KeyboardInterrupt, SystemExit) as e:
        _say(f"interrupted ({type(e).__name__}{': ' + str(e) if str(e) else ''})")
        traceback.print_exc()
        if not records:
            return 130
    finally:
        from tests.fedkit.cleanup import cleanup_all

        cleanup_all()
    status = _conclude(out, params, records, time.monotonic() - started)
    return 130 if len(records) < len(plan) else status


def _say(text: str) -> None:
    print(text, flush=True)
