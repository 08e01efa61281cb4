"""The demo behind ``scripts-dev/demo``: one timed join of a big room, module only.

Reuses the benchmark's scenario (:func:`bench.scenario.run_measurement`) with the
module variant, one run, joining via hs1, without the resident-side figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

SCRIPTS_DEV = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(SCRIPTS_DEV)
for _p in (SCRIPTS_DEV, REPO_ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench.machine import describe_machine, machine_info  # noqa: E402
from bench.report import _render  # noqa: E402
from bench.scenario import Settings, run_measurement, servers_for  # noqa: E402


def timing_table(rec: dict[str, Any]) -> str:
    """The demo's table of one ``join`` record."""
    m = rec["metrics"]
    room = rec["room"]
    members = rec.get("joined_members_count", room["member_count"])
    rows: list[tuple[str, str]] = [
        ("step (timed from hs2's /join request)", "time"),
        ("/join returned on hs2", f"{m['join_s']:.2f} s"),
        ("hs2's first message seen by a user on hs1", f"{m['message_remote_s']:.2f} s"),
        (
            f"full member list on hs2 ({members:,} joined)",
            f"{m['full_members_s']:.1f} s",
        ),
        ("hs2 peak memory (RSS)", f"{m['peak_rss_mib']:.0f} MiB"),
        ("hs2 CPU time", f"{m['cpu_s']:.1f} s"),
        ("federation bytes hs2 received", f"{m['fed_bytes_mib']:.1f} MiB"),
    ]
    stages = rec.get("stages") or {}
    for name, secs in stages.items():
        rows.append((f"  stage in hs2's log: {name}", f"{secs:.2f} s"))
    return _render(rows)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts-dev/demo", description=__doc__)
    p.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--members", type=int, default=10000)
    p.add_argument("--servers", type=int, help="fake servers (default: by size)")
    p.add_argument(
        "--traffic-interval",
        type=float,
        default=0.5,
        help="seconds between fake messages during the join (default 0.5)",
    )
    p.add_argument("--keep", action="store_true", help="keep configs and logs")
    return p.parse_args(argv)


def _print_intro(
    args: argparse.Namespace, servers: int, machine: dict[str, Any]
) -> None:
    print(f"Machine: {describe_machine(machine)}")
    print(
        f"Fake peer: a {args.members:,}-member room over {servers:,} fake servers"
        f" (power levels, bans, invites, ACL...), a message every"
        f" {args.traffic_interval} s while hs2 joins."
    )
    print(
        f"hs1 and hs2: Synapse {machine['synapse']} with synapse_partial_state,"
        f" {args.db}. hs1 joins the fake room first and completes its resync;"
        " then hs2 joins via hs1.\n"
    )


def _print_outcome(
    rec: dict[str, Any], args: argparse.Namespace, base: str, started: float
) -> int:
    """The join record's table (or its error); the exit status."""
    if rec.get("error"):
        print(f"\nThe demo failed: {rec['error']}", file=sys.stderr)
        if args.keep:
            print(f"logs: {base}", file=sys.stderr)
        else:
            print("re-run with --keep to look at the logs", file=sys.stderr)
        return 1
    setup = rec["setup"]
    print(
        f"\nhs1 joined the fake room and completed its resync in"
        f" {setup['hs1_full_members_s']:.1f} s (/join: {setup['hs1_join_s']:.2f} s);"
        f" then hs2 joined via hs1:\n"
    )
    print(timing_table(rec))
    load = rec.get("other_load") or {}
    if load.get("share_of_machine", 0) > 0.05:
        print(
            f"\nNote: other processes used {load['share_of_machine'] * 100:.0f}% of"
            f" this machine's CPU meanwhile (top: {load.get('top')}): timings suffer."
        )
    print(f"\nAll processes stopped. Total {time.monotonic() - started:.0f} s.")
    if args.keep:
        print(f"Configs and logs kept in {base}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    servers = args.servers or servers_for(args.members)

    from tests.fedkit.certs import KitCA
    from tests.fedkit.cleanup import cleanup_all

    machine = machine_info(with_postgres=args.db == "postgres")
    _print_intro(args, servers, machine)
    started = time.monotonic()

    def phase(text: str) -> None:
        print(f"  [{time.monotonic() - started:6.1f} s] {text}", flush=True)

    base = tempfile.mkdtemp(prefix="sps-demo-")
    try:
        records = run_measurement(
            Settings(
                variant="module",
                db=args.db,
                members=args.members,
                servers=servers,
                via_hs1=True,
                resident=False,
                traffic_interval=args.traffic_interval,
            ),
            os.path.join(base, "demo"),
            KitCA(os.path.join(base, "ca")),
            phase=phase,
            logs_dir=os.path.join(base, "failed-logs"),
        )
    except KeyboardInterrupt:
        print("\ninterrupted; everything stopped", file=sys.stderr)
        return 130
    finally:
        cleanup_all()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return _print_outcome(records[0], args, base, started)


if __name__ == "__main__":
    sys.exit(main())
