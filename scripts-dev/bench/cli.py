"""Stock Synapse vs Synapse with synapse_partial_state: joining big rooms.

Runs every (room size, database) measurement for both variants, interleaved: in
each run both variants join a freshly generated fake room of the same shape, the
variant going first alternating from one run to the next. Prints a table of medians
with module/stock ratios, and writes every run as JSON, the table and a PNG plot to
the results folder.

    scripts-dev/bench/run --quick                 # 1,000 members, 1 run, SQLite
    scripts-dev/bench/run --sizes 1000,10000 --runs 3 --db sqlite,postgres
    scripts-dev/bench/run --sizes 5000:100        # members:servers
    scripts-dev/bench/run --quick --key-notary    # keys direct, and via a notary
    scripts-dev/bench/run --report bench-results/latest.json   # re-print a table
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench import report
from bench.machine import REPO_ROOT, describe_machine, machine_info
from bench.progress import Progress
from bench.scenario import Settings, run_measurement, servers_for
from tests.fedkit.cleanup import unwind_on_sigterm

if TYPE_CHECKING:
    from tests.fedkit.certs import KitCA

DEFAULT_SIZES = "1000,10000,100000"
RESULTS_DIR = os.path.join(REPO_ROOT, "bench-results")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"1000,10000:300"`` -> [(1000, 50), (10000, 300)] (members, servers)."""
    sizes = []
    for part in text.split(","):
        part = part.strip().replace("_", "")
        if not part:
            continue
        members_s, _, servers_s = part.partition(":")
        members = int(members_s)
        servers = int(servers_s) if servers_s else servers_for(members)
        if members < 10 or servers < 1 or servers > members:
            raise ValueError(f"bad room size {part!r}")
        sizes.append((members, servers))
    if not sizes:
        raise ValueError("no room sizes")
    return sizes


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise ValueError(
            f"{what}: {', '.join(bad) or '(none)'}; use {'|'.join(allowed)}"
        )
    return list(dict.fromkeys(items))


Step = tuple[int, str, int, int, list[str], str]


def plan(
    runs: int,
    dbs: list[str],
    sizes: list[tuple[int, int]],
    variants: list[str],
    keys: tuple[str, ...] | list[str] = ("direct",),
) -> list[Step]:
    """(run, db, members, servers, variants in order, key set-up) for every
    measurement pair.

    The variant that goes first alternates between runs (and between the rooms
    and key set-ups of one run), so warm-up effects do not favour either."""
    steps = []
    for run in range(runs):
        for i_db, db in enumerate(dbs):
            for i_size, (members, servers) in enumerate(sizes):
                for i_keys, key_setup in enumerate(keys):
                    order = list(variants)
                    if (run + i_db + i_size + i_keys) % 2:
                        order.reverse()
                    steps.append((run, db, members, servers, order, key_setup))
    return steps


def weight(members: int, via_hs1: bool) -> float:
    """Rough relative cost of one measurement (for the progress estimate)."""
    return 15 + members / 300 * (2 if via_hs1 else 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts-dev/bench/run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="development mode: 1,000 members, one run, SQLite (a few minutes)",
    )
    p.add_argument(
        "--sizes",
        help=f"room sizes, members[:servers] comma-separated (default {DEFAULT_SIZES};"
        " servers default 1k:50, 10k:200, 100k:2000, else members/50)",
    )
    p.add_argument("--runs", type=int, help="runs per measurement (default 3)")
    p.add_argument("--db", help="sqlite,postgres (default both)")
    p.add_argument(
        "--variants", default="stock,module", help="default stock,module (both)"
    )
    p.add_argument(
        "--via-hs1-max",
        type=int,
        default=50000,
        metavar="N",
        help="rooms up to N members are joined via a real hs1 that joined first;"
        " bigger ones directly via the fake peer (default 50000)",
    )
    p.add_argument(
        "--no-resident",
        action="store_true",
        help="skip the resident-side measurements (send_join, /state, /state_ids)",
    )
    p.add_argument(
        "--traffic-interval",
        type=float,
        default=0.5,
        metavar="S",
        help="seconds between fake messages during the join; 0 for none (default 0.5)",
    )
    p.add_argument(
        "--after",
        type=float,
        default=0.0,
        metavar="S",
        help="also watch the joiner for S seconds after its full member list (its"
        " CPU, its PostgreSQL's, and how long it stays busy), traffic going on;"
        " the issue's 'minute after' is --after 120 (default 0: not watched)",
    )
    p.add_argument(
        "--resident-idle-max",
        type=float,
        default=600.0,
        metavar="S",
        help="before the resident-side probes, wait until the resident is idle"
        " (under 0.15 cores for 2 s), at most S seconds: after a big resync"
        " Synapse works through the room's new members for minutes (user"
        " directory, statistics, presence), and the probes should measure a"
        " server holding the room, not one still busy joining it (default 600)",
    )
    p.add_argument(
        "--keys",
        default="direct",
        help="how the homeservers get other servers' signing keys: direct (from"
        " each server, the kit's default: no trusted_key_servers), notary (the fake"
        " peer as their one trusted key server), or direct,notary for both"
        " (default direct); notary measurements are reported as scenario"
        " join/notary (resident/notary)",
    )
    p.add_argument(
        "--key-notary",
        action="store_true",
        help="shorthand for --keys direct,notary",
    )
    p.add_argument("--room-version", default="10", help="default 10")
    p.add_argument(
        "--timeout",
        type=float,
        help="seconds allowed per resync (default 300 + members/100)",
    )
    p.add_argument(
        "--module-config",
        type=json.loads,
        default=None,
        metavar="JSON",
        help='the module variant\'s config, e.g. \'{"resync": {"bulk_writer": false}}\' '
        "(default: the module's defaults)",
    )
    p.add_argument(
        "--out",
        help="results JSON path, or a directory to write results.json into (default"
        " bench-results/<timestamp>/results.json,"
        " also copied to bench-results/latest.json); the table and plot go next to it",
    )
    p.add_argument(
        "--workdir", help="where temporary work directories go (default: system temp)"
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the work directories (configs, logs, SQLite files)",
    )
    p.add_argument(
        "--report",
        metavar="JSON",
        help="print the tables of an existing results file again (and rewrite its"
        " .txt and .png)",
    )
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Apply --quick and the defaults; validate lists (ValueError on bad input)."""
    args.sizes_list = parse_sizes(
        args.sizes or ("1000" if args.quick else DEFAULT_SIZES)
    )
    args.runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    if args.runs < 1:
        raise ValueError("--runs must be at least 1")
    args.dbs = parse_list(
        args.db or ("sqlite" if args.quick else "sqlite,postgres"),
        ("sqlite", "postgres"),
        "--db",
    )
    args.variant_list = parse_list(args.variants, ("stock", "module"), "--variants")
    args.key_setups = parse_list(
        "direct,notary" if args.key_notary else args.keys,
        ("direct", "notary"),
        "--keys",
    )
    return args


def _outputs(json_path: str) -> tuple[str, str]:
    stem = os.path.splitext(json_path)[0]
    return stem + ".txt", stem + ".png"


def finish(
    json_path: str,
    machine: dict[str, Any],
    runs: list[dict[str, Any]],
    notes: list[str],
    latest: bool,
) -> str:
    """Write table and plot next to the JSON (and the latest copies); return the text."""
    text = report.format_report(describe_machine(machine), runs, notes)
    table_path, png_path = _outputs(json_path)
    with open(table_path, "w") as f:
        f.write(text)
    title = (
        f"synapse_partial_state benchmark, {time.strftime('%Y-%m-%d')}:"
        f" Synapse {machine.get('synapse')}, {machine.get('cores_logical')} cores"
    )
    headline_path = png_path[: -len(".png")] + "-headline.png"
    try:
        plotted = report.plot(png_path, runs, title)
        report.plot_headline(headline_path, runs, title)
    except Exception as e:  # noqa: BLE001 - the table matters more
        print(f"plot failed: {e}", file=sys.stderr)
        plotted = []
    if latest:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        for src, name in (
            (json_path, "latest.json"),
            (table_path, "latest.txt"),
            (png_path, "latest.png"),
            (headline_path, "latest-headline.png"),
        ):
            if os.path.exists(src) and (src != png_path or plotted):
                shutil.copyfile(src, os.path.join(RESULTS_DIR, name))
    return text


def notes_for(args: argparse.Namespace, runs: list[dict[str, Any]]) -> list[str]:
    notes = [
        "every measurement uses a freshly generated fake room of the same shape"
        " (fresh fake peer and homeservers); the fake peer sends a message every"
        f" {args.traffic_interval} s from a random member while hs2 joins",
        "the homeservers finish their background updates (a fresh database's"
        " index builds and table populations) before the join, as a homeserver"
        " that has been running has",
    ]
    for members, _servers in args.sizes_list:
        if members <= args.via_hs1_max:
            notes.append(
                f"{members:,} members: hs2 joins via hs1, a real Synapse of the same"
                " variant that joined the fake room first and finished its resync"
            )
        else:
            notes.append(
                f"{members:,} members: hs2 joins the fake peer directly (a real hs1"
                " cannot hold a room this big in reasonable time; --via-hs1-max);"
                " resident figures are then measured on hs2 after its resync"
            )
    busy = [
        r for r in runs if (r.get("other_load") or {}).get("share_of_machine", 0) > 0.05
    ]
    if busy:
        worst = max(busy, key=lambda r: r["other_load"]["share_of_machine"])
        load = worst["other_load"]
        notes.append(
            f"other processes used >5% of the machine during {len(busy)} of"
            f" {sum(1 for r in runs if r['scenario'].startswith('join'))} joins (worst"
            f" {load['share_of_machine'] * 100:.0f}%: {load['top']})"
        )
    return notes


def _reprint(json_path: str) -> int:
    """``--report``: print the tables of an existing results file again."""
    data = report.read_json(json_path)
    print(
        finish(
            json_path,
            data["machine"],
            data["runs"],
            data.get("notes") or [],
            latest=False,
        )
    )
    return 0


def _postgres_reachable() -> bool:
    from bench.machine import postgres_version

    if postgres_version() is None:
        print(
            "PostgreSQL is not reachable at 127.0.0.1:5432 as user postgres"
            " (SPS_PG_* variables); start it or use --db sqlite",
            file=sys.stderr,
        )
        return False
    return True


def _results_path(args: argparse.Namespace) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = os.path.abspath(
        args.out or os.path.join(RESULTS_DIR, stamp, "results.json")
    )
    if os.path.isdir(json_path):
        # --out names a directory: the results go into it, as results.json.
        json_path = os.path.join(json_path, "results.json")
    return json_path


def _settings(
    args: argparse.Namespace,
    variant: str,
    db: str,
    members: int,
    servers: int,
    keys: str = "direct",
) -> Settings:
    return Settings(
        variant=variant,
        db=db,
        members=members,
        servers=servers,
        via_hs1=members <= args.via_hs1_max,
        resident=not args.no_resident,
        room_version=args.room_version,
        traffic_interval=args.traffic_interval,
        timeout=args.timeout,
        module_config=args.module_config if variant == "module" else None,
        after_s=args.after,
        keys=keys,
        resident_idle_max_s=args.resident_idle_max,
    )


def _print_records(
    progress: Progress, label: str, records: list[dict[str, Any]]
) -> None:
    for r in records:
        if r.get("error"):
            progress.line(f"{label} {r['scenario']}: FAILED: {r['error']}")
        elif r["scenario"].startswith("join"):
            m = r["metrics"]
            progress.line(
                f"{label}: /join {m['join_s']:.2f} s, message"
                f" {m['message_remote_s']:.2f} s, members"
                f" {m['full_members_s']:.1f} s, /messages"
                f" {m.get('messages_s', float('nan')):.2f} s,"
                f" RSS {m['peak_rss_mib']:.0f} MiB"
            )


@dataclass
class _Run:
    """One benchmark invocation: where results go and what was measured so far."""

    args: argparse.Namespace
    json_path: str
    machine: dict[str, Any]
    params: dict[str, Any]
    progress: Progress
    base: str
    ca: KitCA
    runs: list[dict[str, Any]] = field(default_factory=list)

    def measure(
        self,
        run: int,
        db: str,
        members: int,
        servers: int,
        position: int,
        variant: str,
        keys: str = "direct",
    ) -> None:
        """One measurement: run it, print it, save all runs so far."""
        args = self.args
        via = members <= args.via_hs1_max
        setup = "" if keys == "direct" else f" ({keys} keys)"
        label = f"run {run + 1}/{args.runs} {db} {members:,} members {variant}{setup}"
        self.progress.step_started(label)
        name = f"r{run}-{db}-{members}-{variant}-{keys}"
        records = run_measurement(
            _settings(args, variant, db, members, servers, keys),
            os.path.join(self.base, name),
            self.ca,
            run=run,
            order=position,
            phase=self.progress.phase,
            logs_dir=os.path.join(os.path.dirname(self.json_path), "logs", name),
        )
        self.runs.extend(records)
        _print_records(self.progress, label, records)
        report.write_json(
            self.json_path, self.machine, self.runs, parameters=self.params
        )
        if not args.keep:
            shutil.rmtree(os.path.join(self.base, name), ignore_errors=True)
        self.progress.step_done(weight(members, via))


def _run_steps(bench: _Run, steps: list[Step]) -> bool:
    """Every measurement of the plan; True if interrupted. Stops everything."""
    from tests.fedkit.cleanup import cleanup_all

    try:
        for run, db, members, servers, order, keys in steps:
            for position, variant in enumerate(order):
                bench.measure(run, db, members, servers, position, variant, keys)
        bench.progress.finish()
    except (KeyboardInterrupt, SystemExit):
        bench.progress.line("interrupted: stopping everything")
        return True
    finally:
        cleanup_all()
        if bench.args.keep:
            print(f"work directories kept in {bench.base}", file=sys.stderr)
        else:
            shutil.rmtree(bench.base, ignore_errors=True)
    return False


def _conclude(bench: _Run, interrupted: bool) -> int:
    """Notes, the final JSON, the table and the plot; the exit status."""
    runs, json_path = bench.runs, bench.json_path
    if not runs:
        return 130 if interrupted else 1
    notes = notes_for(bench.args, runs)
    report.write_json(
        json_path, bench.machine, runs, parameters=bench.params, notes=notes
    )
    text = finish(json_path, bench.machine, runs, notes, latest=bench.args.out is None)
    print(text)
    table_path, png_path = _outputs(json_path)
    print(f"Results: {json_path}\n        {table_path}\n        {png_path}")
    if interrupted:
        return 130
    return 1 if any(r.get("error") for r in runs) else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.report:
        return _reprint(args.report)
    try:
        resolve(args)
    except ValueError as e:
        parser.error(str(e))

    if "postgres" in args.dbs and not _postgres_reachable():
        return 2
    unwind_on_sigterm()

    json_path = _results_path(args)
    machine = machine_info(with_postgres="postgres" in args.dbs)
    print(f"Machine: {describe_machine(machine)}", file=sys.stderr)
    steps = plan(
        args.runs, args.dbs, args.sizes_list, args.variant_list, args.key_setups
    )
    total = sum(
        weight(m, m <= args.via_hs1_max) * len(order) for _, _, m, _, order, _ in steps
    )
    progress = Progress(total)
    base = tempfile.mkdtemp(prefix="sps-bench-", dir=args.workdir)
    from tests.fedkit.certs import KitCA

    params = {
        k: v for k, v in vars(args).items() if k not in ("report",) and v is not None
    }
    bench = _Run(
        args,
        json_path,
        machine,
        params,
        progress,
        base,
        KitCA(os.path.join(base, "ca")),
    )
    interrupted = _run_steps(bench, steps)
    return _conclude(bench, interrupted)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
