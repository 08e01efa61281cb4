"""A resident in a worker deployment under a wave of joining servers.

Issue #17's benchmark: a Synapse worker deployment (the kit's
:class:`~tests.fedkit.workers.WorkerHomeserver`: main process, two federation
workers, sync, client reader, federation sender and background workers, on
PostgreSQL with Redis, behind nginx) joins a fake room of ``--members`` members
and resyncs it; then a wave of ``--joiners`` fake servers joins through it at
once, each as a resyncing joiner does: ``make_join``, a partial ``send_join``
(``omit_members=true``), ``/state_ids`` then ``/state`` at its join event.

The wave runs twice on the same homeserver: with the federation paths routed by
nginx to the main process alone (``main``: what a single-process homeserver
does), then to the two federation workers (``workers``). Both variants, stock
Synapse and Synapse with the module, go through the same steps with a room of
the same shape, one after the other. Reported per (variant, routing): the
wave's wall time and throughput, each request's median and slowest time as the
joiners saw them, and the peak RSS and CPU of every process that served it.

    scripts-dev/bench/wave --quick           # 2,000 members, 5 joiners
    scripts-dev/bench/wave                   # 100,000 members, 20 joiners
    scripts-dev/bench/wave --report bench-results/wave-latest.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

from bench import measure
from bench.machine import REPO_ROOT, describe_machine, machine_info
from bench.scenario import room_spec, servers_for
from tests.fedkit.certs import KitCA
from tests.fedkit.cleanup import unwind_on_sigterm
from tests.fedkit.fakepeer.control_client import FakePeer
from tests.fedkit.sampling import ResourceSampler
from tests.fedkit.workers import WorkerHomeserver, unavailable_reason

MIB = measure.MIB
RESULTS_DIR = os.path.join(REPO_ROOT, "bench-results")
#: The processes that can serve the wave (federation routed to main or workers).
SERVING = ("main", *WorkerHomeserver.FEDERATION_WORKERS)
#: Requests of one joiner, in order.
STEPS = ("send_join", "state_ids", "state")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts-dev/bench/wave",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="2,000 members, 5 joiners")
    p.add_argument("--members", type=int, default=100_000)
    p.add_argument("--servers", type=int, default=None, help="default by size")
    p.add_argument("--joiners", type=int, default=20)
    p.add_argument("--variants", default="stock,module")
    p.add_argument("--routings", default="main,workers")
    p.add_argument("--room-version", default="10")
    p.add_argument("--timeout", type=float, default=None, help="resync, seconds")
    p.add_argument("--out", default=None, help="results JSON path")
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--report", default=None, help="re-print a results JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.report:
        with open(args.report) as f:
            print(table(json.load(f)["records"]))
        return 0
    if args.quick:
        args.members, args.joiners = 2000, 5
    servers = args.servers or servers_for(args.members)
    reason = unavailable_reason()
    if reason is not None:
        print(f"wave: {reason}", file=sys.stderr)
        return 2
    unwind_on_sigterm()
    machine = machine_info(with_postgres=True)
    print(f"Machine: {describe_machine(machine)}", file=sys.stderr)
    out = args.out or os.path.join(
        RESULTS_DIR, f"wave-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    base = tempfile.mkdtemp(prefix="sps-wave-", dir=args.workdir)
    ca = KitCA(os.path.join(base, "ca"))
    results: dict[str, Any] = {
        "machine": machine,
        "params": {
            "members": args.members,
            "servers": servers,
            "joiners": args.joiners,
            "room_version": args.room_version,
        },
        "records": [],
    }
    try:
        for variant in args.variants.split(","):
            results["records"] += run_variant(
                variant,
                args.members,
                servers,
                args.joiners,
                args.routings.split(","),
                args.room_version,
                args.timeout or 300 + args.members / 50,
                os.path.join(base, variant),
                ca,
            )
            _write(out, results)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    _write(out, results)
    print(table(results["records"]))
    print(f"results: {out}", file=sys.stderr)
    return 0 if all("error" not in r for r in results["records"]) else 1


def _write(path: str, results: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def _phase(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_variant(
    variant: str,
    members: int,
    servers: int,
    joiners: int,
    routings: list[str],
    room_version: str,
    timeout: float,
    workdir: str,
    ca: KitCA,
) -> list[dict[str, Any]]:
    """One variant: a worker deployment joins and resyncs a fake room, then a
    wave per routing; one record per routing."""
    records: list[dict[str, Any]] = []
    peer = FakePeer(os.path.join(workdir, "fakepeer"), ca.directory)
    with contextlib.ExitStack() as stack:
        stack.callback(peer.stop)
        _phase(f"{variant}: building a room of {members:,} members")
        peer.start()
        room = peer.create_room(**room_spec(members, servers, room_version))
        room_id = room["room_id"]
        hs = WorkerHomeserver(
            os.path.join(workdir, "hs1"), "hs1", ca, with_module=variant == "module"
        )
        stack.callback(hs.cleanup)
        hs.start()
        _phase(f"{variant}: hs1 (workers) joins and resyncs")
        alice = hs.register_user("alice")
        stack.callback(alice.close)
        t = time.monotonic()
        alice.join(room_id, via=[room["resident"]], timeout=timeout)
        _wait_complete(hs, room_id, t + timeout)
        resync_s = round(time.monotonic() - t, 1)
        _wait_members(alice, room_id, room["member_count"] + 1, timeout)
        wave_servers = peer.create_servers(joiners * len(routings))
        for i, routing in enumerate(routings):
            rec: dict[str, Any] = {
                "variant": variant,
                "routing": routing,
                "members": members,
                "servers": servers,
                "joiners": joiners,
                "resync_s": resync_s,
            }
            try:
                names = wave_servers[i * joiners : (i + 1) * joiners]
                rec.update(wave(peer, hs, room_id, routing, names, i))
            except Exception as e:  # noqa: BLE001 - recorded, the next one runs
                rec["error"] = f"{type(e).__name__}: {e}"[:2000]
            records.append(rec)
    return records


#: Longest wait, once the resync is over, for the client API to list every
#: member: with workers, the client reader's caches follow the finish's
#: current-state write over replication (stock once listed 96,275 of 100,001
#: members right after its flag was cleared).
MEMBERS_WAIT_S = 300.0


def _wait_members(alice: Any, room_id: str, want: int, timeout: float) -> None:
    """Until ``alice`` sees ``want`` joined members (see :data:`MEMBERS_WAIT_S`)."""
    deadline = time.monotonic() + MEMBERS_WAIT_S
    while True:
        got = len(alice.joined_members(room_id, timeout=timeout))
        if got >= want:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"hs1 sees {got} members, not {want}, {MEMBERS_WAIT_S:.0f} s after "
                "its resync"
            )
        time.sleep(2)


def _wait_complete(hs: WorkerHomeserver, room_id: str, deadline: float) -> None:
    """Until Synapse's partial-state flag of the room is cleared (the resync's end)."""
    while hs.sql("SELECT 1 FROM partial_state_rooms WHERE room_id = ?", (room_id,)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{room_id} still partial on {hs.name}")
        time.sleep(1)


def wave(
    peer: FakePeer,
    hs: WorkerHomeserver,
    room_id: str,
    routing: str,
    names: list[str],
    index: int,
) -> dict[str, Any]:
    """The wave: every joiner at once; the serving processes watched."""
    _phase(f"federation routed to {routing}; waiting for hs1 to be idle")
    hs.route_federation(routing)
    everyone = {name: _sampler(hs, name) for name in ("main", *hs.workers)}
    samplers = {name: everyone[name] for name in SERVING}
    # (After a big resync Synapse stays busy for minutes: user directory, room
    # statistics; the wave waits for that, stock and module alike.)
    idle_s = measure.wait_until_idle(
        lambda: sum(s.cpu_seconds() for s in everyone.values()), max_wait=600
    )
    cpu0 = {}
    for name, sampler in samplers.items():
        sampler.reset_rss_peak()
        cpu0[name] = sampler.cpu_seconds()
    log_offset = hs.access_log_offset()
    _phase(f"a wave of {len(names)} joiners, federation on {routing}")
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        joins = list(
            pool.map(
                lambda n: _one_joiner(peer, hs, room_id, n[1], f"wave{index}x{n[0]}"),
                enumerate(names),
            )
        )
    wall = time.monotonic() - t0
    usage = {
        name: {
            "peak_rss_mib": round(s.rss_peak_bytes() / MIB, 1),
            "cpu_s": round(s.cpu_seconds() - cpu0[name], 2),
        }
        for name, s in samplers.items()
    }
    # Which processes nginx sent the wave's federation requests to.
    served = hs.upstreams(r"/_matrix/federation/(?!v1/version)", since=log_offset)
    expected = {"main"} if routing == "main" else set(hs.FEDERATION_WORKERS)
    if not served or not served <= expected:
        raise RuntimeError(f"the wave was served by {served}, not {expected}")
    return {
        "idle_wait_s": round(idle_s, 1),
        "wave_s": round(wall, 2),
        "joiners_per_minute": round(60 * len(names) / wall, 1),
        "requests": {
            step: {
                "median_s": round(statistics.median(j[step] for j in joins), 3),
                "max_s": round(max(j[step] for j in joins), 3),
            }
            for step in STEPS
        },
        # The slowest joiner's wait for its send_join and its /state (issue #14).
        "slowest_send_join_and_state_s": round(
            max(j["send_join"] + j["state"] for j in joins), 3
        ),
        "serving_cpu_s": round(sum(u["cpu_s"] for u in usage.values()), 2),
        "joiners_seen": [{k: round(v, 3) for k, v in j.items()} for j in joins],
        "answer_mib": {
            step: round(statistics.median(j[f"{step}_bytes"] for j in joins) / MIB, 2)
            for step in STEPS
        },
        "processes": usage,
        "served_by": sorted(served),
    }


def _sampler(hs: WorkerHomeserver, name: str) -> ResourceSampler:
    if name == "main":
        return ResourceSampler(name, lambda: hs.pid)
    worker = hs.workers[name]
    return ResourceSampler(name, lambda: worker.pid)


def _one_joiner(
    peer: FakePeer, hs: WorkerHomeserver, room_id: str, server: str, localpart: str
) -> dict[str, float]:
    """One joining server: make_join + partial send_join, /state_ids, /state."""
    client = peer.another_client()
    try:
        j = client.join(
            room_id,
            hs.server_name,
            server=server,
            user_localpart=localpart,
            omit_members=True,
            include_body=False,
        )
        sj = j.get("send_join") or {}
        if sj.get("status") != 200:
            raise RuntimeError(f"send_join from {server}: {j.get('make_join')} {sj}")
        got = {"send_join": sj["seconds"], "send_join_bytes": sj["bytes"]}
        q_room = quote(room_id, safe="")
        q_event = quote(j["event_id"], safe="")
        for endpoint in ("state_ids", "state"):
            r = client.federation_request(
                server,
                hs.server_name,
                "GET",
                f"/_matrix/federation/v1/{endpoint}/{q_room}?event_id={q_event}",
                timeout=1200,
                include_body=False,
            )
            if r["status"] != 200:
                raise RuntimeError(f"/{endpoint} for {server}: {r['status']}")
            got[endpoint] = r["seconds"]
            got[f"{endpoint}_bytes"] = r["bytes"]
        return got
    finally:
        client.stop()


def table(records: list[dict[str, Any]]) -> str:
    """One line per (variant, routing); then module/stock per routing."""
    head = (
        f"{'variant':<7} {'routing':<8} {'wave s':>7} {'joins/min':>9} "
        f"{'send_join':>15} {'state_ids':>15} {'state':>15} {'slowest sj+st':>13} "
        f"{'CPU s':>6} {'peak RSS MiB (CPU s) main / federation1 / federation2'}"
    )
    lines = [
        "median / slowest seconds per request, as the joiners saw them",
        head,
        "-" * len(head),
    ]
    by_key = {}
    for r in records:
        by_key[(r["variant"], r["routing"])] = r
        if "error" in r:
            lines.append(f"{r['variant']:<7} {r['routing']:<8} error: {r['error']}")
            continue
        reqs = " ".join(
            f"{r['requests'][s]['median_s']:>7.2f}/{r['requests'][s]['max_s']:<7.2f}"
            for s in STEPS
        )
        procs = " / ".join(
            f"{p['peak_rss_mib']:.0f} ({p['cpu_s']:.1f})"
            for p in r["processes"].values()
        )
        slowest = r.get("slowest_send_join_and_state_s")
        cpu = r.get("serving_cpu_s")
        lines.append(
            f"{r['variant']:<7} {r['routing']:<8} {r['wave_s']:>7.1f} "
            f"{r['joiners_per_minute']:>9.1f} {reqs} "
            f"{'-' if slowest is None else f'{slowest:.2f}':>13} "
            f"{'-' if cpu is None else f'{cpu:.1f}':>6} {procs}"
        )
    for routing in ("main", "workers"):
        s, m = by_key.get(("stock", routing)), by_key.get(("module", routing))
        if not s or not m or "error" in s or "error" in m:
            continue
        peak = max(p["peak_rss_mib"] for p in m["processes"].values()) / max(
            p["peak_rss_mib"] for p in s["processes"].values()
        )
        line = (
            f"module/stock, federation on {routing}: wave time "
            f"{m['wave_s'] / s['wave_s']:.2f}x, highest peak RSS {peak:.2f}x"
        )
        key = "slowest_send_join_and_state_s"
        if key in m and key in s:
            line += f", slowest joiner {m[key] / s[key]:.2f}x"
        if "serving_cpu_s" in m and "serving_cpu_s" in s:
            line += f", CPU {m['serving_cpu_s'] / s['serving_cpu_s']:.2f}x"
        lines.append(line)
    return "\n".join(lines)
