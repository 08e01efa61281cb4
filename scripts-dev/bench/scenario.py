"""One measurement: a fresh fake room, real homeservers of one variant, a timed join.

:func:`run_measurement` builds a room on a fake peer (fresh peer process, so every
measurement starts from the same state), starts ``hs2`` (the joiner) and, when
joining via a real resident, ``hs1``, which first joins the fake room itself and
finishes its resync. Then ``hs2`` joins while the fake peer sends a message every
``traffic_interval`` seconds from random fake members, and we time:

* ``/join`` returning;
* a message sent by hs2's user right after ``/join`` being seen by hs1's user
  (or, joining the fake peer directly, reaching the fake resident in a ``/send``);
* ``/joined_members`` on hs2 returning the full count (Synapse holds it until a
  partial-state room is complete);

plus hs2's peak RSS and CPU seconds over that window, hs1's CPU, federation bytes
per endpoint (hs2's outgoing-request log lines) and the resident's serving time per
endpoint (hs1's access log or the fake peer's request log), and the stages found in
hs2's log (:data:`bench.measure.STAGES`).

Afterwards (``resident=True``) the fake peer measures the resident side: a partial
``send_join`` (``omit_members=true``) against the real server that holds the room
(hs1, or hs2 when there is no hs1); ``/state_ids`` then ``/state`` at that join
event (as a resyncing joiner asks them), ``/state`` there again, and ``/state`` at
a second probe join's event (a state group no one asked about: cold).

Each measurement returns two run records (see :mod:`bench.report`): scenario
``join`` and scenario ``resident``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import requests

from bench import measure
from bench.machine import OtherLoad
from tests.fedkit.certs import KitCA
from tests.fedkit.client import Client
from tests.fedkit.fakepeer.client import FakePeer
from tests.fedkit.homeserver import Homeserver, start_all

MIB = measure.MIB

#: Room sizes of the issue: members -> fake servers.
DEFAULT_SERVERS = {1000: 50, 10000: 200, 100000: 2000}

Phase = Callable[[str], None]
T = TypeVar("T")


def servers_for(members: int) -> int:
    """Fake servers for a room of ``members`` (1k/50, 10k/200, 100k/2,000; else ~1:50)."""
    if members in DEFAULT_SERVERS:
        return DEFAULT_SERVERS[members]
    return max(2, min(5000, round(members / 50)))


def room_spec(members: int, servers: int, room_version: str = "10") -> dict[str, Any]:
    """``FakePeer.create_room`` arguments for a realistic public room of this size.

    Besides the members: power levels with some moderators, public join rule,
    shared history, name, topic, alias, server ACL, and ~0.5% bans, ~0.2% kicks
    and ~0.1% pending invites (at least a few of each)."""
    return {
        "room_version": room_version,
        "members": members - 1,  # plus the creator
        "servers": servers,
        "name": f"Benchmark room ({members:,} members)",
        "topic": "A synthetic public room for synapse_partial_state's benchmark",
        "alias": True,
        "acl": True,
        "bans": max(5, members // 200),
        "kicks": max(3, members // 500),
        "invites": max(2, members // 1000),
        "power_users": max(3, min(50, members // 1000)),
        "history_visibility": "shared",
        "join_rule": "public",
    }


@dataclass
class Settings:
    """What one measurement does."""

    variant: str  # "stock" or "module"
    db: str  # "sqlite" or "postgres"
    members: int
    servers: int
    via_hs1: bool = True
    resident: bool = True
    room_version: str = "10"
    traffic_interval: float = 0.5
    module_config: dict[str, Any] | None = None
    #: Seconds allowed for each resync (hs1's, then hs2's); None: by room size.
    timeout: float | None = None

    @property
    def resync_timeout(self) -> float:
        return self.timeout or 300 + self.members / 100

    @property
    def path(self) -> str:
        return "via hs1" if self.via_hs1 else "direct to fake peer"


@dataclass
class TrafficStats:
    sent: int = 0
    failed: int = 0
    undelivered: int = 0  # a real server answered non-200 or not at all
    max_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


class Traffic:
    """Messages from random fake members every ``interval`` seconds, in the background.

    Each send goes through the fake peer's control API, which pushes the event to
    every real server in the room; sends run on a few threads so a slow receiver
    does not slow the cadence."""

    def __init__(
        self,
        control_url: str,
        room_id: str,
        senders: list[str],
        interval: float,
        seed: int = 0,
    ) -> None:
        self.url = f"{control_url}/control/rooms/{quote(room_id, safe='')}/send"
        self.senders = senders
        self.interval = interval
        self.stats = TrafficStats()
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="traffic")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def start(self) -> Traffic:
        if self.interval > 0 and self.senders:
            self._thread.start()
        return self

    def stop(self) -> TrafficStats:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        return self.stats

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.trust_env = False
        return s

    def _run(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            n += 1
            sender = self._rng.choice(self.senders)
            self._pool.submit(self._send, sender, f"traffic message {n}")
            next_at += self.interval
            if next_at < time.monotonic():  # fell behind: skip missed ticks
                next_at = time.monotonic() + self.interval

    def _send(self, sender: str, body: str) -> None:
        started = time.monotonic()
        payload: dict[str, Any] = {
            "type": "m.room.message",
            "sender": sender,
            "content": {"msgtype": "m.text", "body": body},
        }
        try:
            r = self._session().post(self.url, json=payload, timeout=600)
            ok = r.status_code == 200
            delivered = r.json().get("delivered", {}) if ok else {}
            error = None if ok else f"{r.status_code} {r.text[:200]}"
        except Exception as e:  # noqa: BLE001 - counted, not fatal
            ok, delivered, error = False, {}, repr(e)
        with self._lock:
            self.stats.sent += 1
            self.stats.max_seconds = max(
                self.stats.max_seconds, round(time.monotonic() - started, 3)
            )
            if not ok:
                self.stats.failed += 1
                if error and len(self.stats.errors) < 5:
                    self.stats.errors.append(error)
            self.stats.undelivered += sum(1 for s in delivered.values() if s != 200)


def fake_members(room: dict[str, Any], members: int) -> list[str]:
    """User IDs of the fake room's members (as the fake peer's synthesiser names them)."""
    names = room["servers"]
    return [f"@u{i}:{names[i % len(names)]}" for i in range(members)]


def _lazy_filter(client: Client, room_id: str) -> str:
    return json.dumps(client.lazy_loading_filter(room_id))


def wait_for_body(
    client: Client, room_id: str, body: str, since: str, deadline: float
) -> float:
    """Incremental syncs from ``since`` until a message with ``body`` shows up.

    Returns the wall-clock time it was seen."""
    filt = _lazy_filter(client, room_id)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{client.user_id} never saw {body!r} in {room_id}")
        resp = client.sync(
            since=since, filter=filt, timeout_ms=int(min(remaining, 10) * 1000)
        )
        since = resp["next_batch"]
        room = resp.get("rooms", {}).get("join", {}).get(room_id, {})
        for ev in room.get("timeline", {}).get("events", []):
            if (
                ev.get("type") == "m.room.message"
                and ev.get("content", {}).get("body") == body
            ):
                return time.time()


def wait_for_transaction(
    peer: FakePeer, origin: str, destination: str, body: str, deadline: float
) -> float:
    """Poll the fake peer until ``destination`` received a PDU with ``body`` from ``origin``.

    Returns the (wall-clock) time the fake peer recorded the transaction."""
    while True:
        for txn in peer.transactions(origin=origin, destination=destination):
            for pdu in txn.get("body", {}).get("pdus", []):
                if (pdu.get("content") or {}).get("body") == body:
                    return float(txn["time"])
        if time.monotonic() > deadline:
            raise TimeoutError(f"{destination} never received {body!r} from {origin}")
        time.sleep(0.05)


def wait_full_members(
    client: Client, room_id: str, expected: int, deadline: float
) -> tuple[float, int]:
    """``/joined_members`` until it lists ``expected`` users; (wall time, count)."""
    count = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"{client.user_id}: {count} of {expected} members in {room_id}"
            )
        count = len(client.joined_members(room_id, timeout=remaining))
        if count >= expected:
            return time.time(), count
        time.sleep(0.2)


def in_thread(fn: Callable[..., T], *args: Any) -> Future[T]:
    """Run ``fn(*args)`` on a daemon thread (abandoned, not joined, on errors)."""
    fut: Future[T] = Future()

    def run() -> None:
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            fut.set_exception(e)

    threading.Thread(target=run, name=f"bench-{fn.__name__}", daemon=True).start()
    return fut


def _base_record(s: Settings, scenario: str, run: int, order: int) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "variant": s.variant,
        "db": s.db,
        "members": s.members,
        "servers": s.servers,
        "run": run,
        "order": order,
        "path": s.path,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": asdict(s),
        "metrics": {},
        "error": None,
    }


def _copy_logs(dest: str, files: dict[str, str]) -> None:
    os.makedirs(dest, exist_ok=True)
    for name, path in files.items():
        if os.path.exists(path):
            shutil.copyfile(path, os.path.join(dest, name))


def run_measurement(
    s: Settings,
    workdir: str,
    ca: KitCA,
    run: int = 0,
    order: int = 0,
    phase: Phase = lambda text: None,
    logs_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Run one measurement; returns the ``join`` and (if asked) ``resident`` records.

    Errors (other than Ctrl-C) are recorded in the records' ``error`` and the
    logs copied to ``logs_dir``; everything started is stopped before returning."""
    join_rec = _base_record(s, "join", run, order)
    res_rec = _base_record(s, "resident", run, order) if s.resident else None
    servers: dict[str, Homeserver] = {}
    peer = FakePeer(os.path.join(workdir, "fakepeer"), ca.directory)
    with contextlib.ExitStack() as stack:
        stack.callback(peer.stop)
        try:
            _measure(s, workdir, ca, peer, servers, stack, join_rec, res_rec, phase)
        except Exception as e:  # noqa: BLE001 - recorded; the benchmark goes on
            error = f"{type(e).__name__}: {e}"[:2000]
            if "endpoints_resident" in join_rec and res_rec is not None:
                res_rec["error"] = error  # the join part was complete
            else:
                join_rec["error"] = error
                if res_rec is not None:
                    res_rec["error"] = "not measured: the join failed"
            if logs_dir:
                files = {f"{n}.log": hs.log_path for n, hs in servers.items()}
                files["fakepeer.log"] = peer.log_path
                _copy_logs(logs_dir, files)
        finally:
            phase("stopping")
    return [join_rec] + ([res_rec] if res_rec else [])


def _measure(
    s: Settings,
    workdir: str,
    ca: KitCA,
    peer: FakePeer,
    servers: dict[str, Homeserver],
    stack: contextlib.ExitStack,
    rec: dict[str, Any],
    res_rec: dict[str, Any] | None,
    phase: Phase,
) -> None:
    phase("starting fake peer and building the room")
    peer.start()
    t = time.monotonic()
    room = peer.create_room(**room_spec(s.members, s.servers, s.room_version))
    room_id, resident = room["room_id"], room["resident"]
    rec["room"] = {
        "room_id": room_id,
        "room_version": room["room_version"],
        "member_count": room["member_count"],
        "state_event_count": room["state_event_count"],
        "event_count": room["event_count"],
        "fake_servers": len(room["servers"]),
        "build_s": round(time.monotonic() - t, 2),
    }
    setup: dict[str, Any] = {}
    rec["setup"] = setup

    phase("starting homeservers")
    names = ["hs1", "hs2"] if s.via_hs1 else ["hs2"]
    for name in names:
        hs = Homeserver(
            os.path.join(workdir, name),
            name,
            ca,
            db=s.db,  # type: ignore[arg-type]
            with_module=s.variant == "module",
            module_config=s.module_config,
        )
        stack.callback(hs.cleanup)
        servers[name] = hs
    t = time.monotonic()
    start_all(servers.values())
    setup["start_s"] = round(time.monotonic() - t, 2)
    hs2 = servers["hs2"]
    hs1 = servers.get("hs1")

    expected = room["member_count"] + 1  # + bob on hs2
    alice: Client | None = None
    if hs1 is not None:
        phase("hs1 joins the fake room and resyncs")
        alice = hs1.register_user("alice")
        stack.callback(alice.close)
        t = time.monotonic()
        alice.join(room_id, via=[resident], timeout=s.resync_timeout)
        setup["hs1_join_s"] = round(time.monotonic() - t, 2)
        got = len(alice.joined_members(room_id, timeout=s.resync_timeout))
        setup["hs1_full_members_s"] = round(time.monotonic() - t, 2)
        if got < room["member_count"] + 1:
            raise RuntimeError(f"hs1 sees {got} members, expected {expected}")
        expected += 1  # + alice

    bob = hs2.register_user("bob")
    stack.callback(bob.close)
    since = None
    if alice is not None:
        since = alice.sync(filter=_lazy_filter(alice, room_id))["next_batch"]

    traffic = Traffic(
        peer.control_url,
        room_id,
        fake_members(room, s.members - 1),
        s.traffic_interval,
        seed=hash((s.members, rec["run"])),
    )
    hs2_window = measure.ResourceWindow(hs2)
    hs2_cpu = measure.CpuTimeline(hs2)
    hs1_window = measure.ResourceWindow(hs1, reset_rss=False) if hs1 else None
    other = OtherLoad()
    hs2_off = hs2.log_offset()
    hs1_off = hs1.log_offset() if hs1 else 0
    deadline = time.monotonic() + s.resync_timeout
    via = hs1.server_name if hs1 else resident

    phase(f"hs2 joins {s.path}")
    other.start()
    traffic.start()
    hs2_window.start()
    hs2_cpu.start()
    if hs1_window:
        hs1_window.start()
    t0 = time.time()
    try:
        bob.join(room_id, via=[via], timeout=s.resync_timeout)
        t_join = time.time()
        full = in_thread(wait_full_members, bob, room_id, expected, deadline)
        marker = f"bench message {uuid.uuid4().hex[:8]}"
        phase("hs2 sends a message")
        bob.send_message(room_id, marker)
        t_sent = time.time()
        if alice is not None:
            assert since is not None
            t_seen = wait_for_body(alice, room_id, marker, since, deadline)
        else:
            t_seen = wait_for_transaction(
                peer, hs2.server_name, resident, marker, deadline
            )
        phase("hs2 resyncs (waiting for the full member list)")
        t_full, count = full.result()
    finally:
        resources = hs2_window.stop()
        cpu_samples = hs2_cpu.stop()
        hs1_res = hs1_window.stop() if hs1_window else None
        rec["traffic"] = asdict(traffic.stop())
        rec["other_load"] = other.stop([hs.pid for hs in servers.values()])

    m = rec["metrics"]
    m["join_s"] = round(t_join - t0, 3)
    m["message_remote_s"] = round(t_seen - t0, 3)
    m["full_members_s"] = round(t_full - t0, 3)
    m["peak_rss_mib"] = resources["peak_rss_mib"]
    m["cpu_s"] = resources["cpu_s"]
    if hs1_res:
        m["resident_cpu_s"] = hs1_res["cpu_s"]
    rec["message_after_send_s"] = round(t_seen - t_sent, 3)
    rec["joined_members_count"] = count

    time.sleep(0.5)  # the log handler flushes every 0.2 s
    lines = measure.read_log_lines(hs2.log_path, hs2_off)
    out = measure.aggregate(measure.outgoing_requests(lines, since=t0, until=t_full))
    rec["endpoints_joiner"] = out
    m["fed_bytes_mib"] = round(sum(e["bytes"] for e in out.values()) / MIB, 3)
    for endpoint, agg in out.items():
        if agg["bytes"] >= 1024:
            m[f"bytes:{endpoint}"] = round(agg["bytes"] / MIB, 3)
    rec["stages"] = measure.stage_times(lines, t0, room_id, until=t_full + 0.2)
    for stage, secs in rec["stages"].items():
        m[f"stage:{stage}"] = secs
    # Each stage's duration, and how busy the joiner and its database were.
    m.update(measure.stage_spans(rec["stages"], t0, cpu_samples))
    if hs1 is not None:
        served = measure.access_requests(
            measure.read_log_lines(hs1.log_path, hs1_off), origin=hs2.server_name
        )
    else:
        served = []
    rec["endpoints_resident"] = (
        measure.aggregate(served)
        if hs1 is not None
        else measure.aggregate_peer_requests(
            peer.requests(since=t0), origin=hs2.server_name
        )
    )
    # Where the resident's time went (summed per endpoint; the fake peer's is
    # the same for both variants, but shows what the joiner asked for).
    for endpoint, agg in rec["endpoints_resident"].items():
        if agg["seconds"] >= 0.005:
            m[f"serve:{endpoint}"] = round(agg["seconds"], 3)

    if res_rec is None:
        return
    res_rec["room"] = rec["room"]
    res_hs = hs1 or hs2
    res_rec["resident_server"] = res_hs.name
    phase(f"resident side: waiting for {res_hs.name} to be idle")
    res_rec["idle_wait_s"] = round(measure.wait_until_idle(res_hs.cpu_seconds), 1)
    phase(f"resident side: partial send_join to {res_hs.name}")
    off = res_hs.log_offset()
    # Memory and CPU the resident spends serving the probe joins and the state
    # requests below (its peak counter reset now; growth over its RSS now).
    res_window = measure.ResourceWindow(res_hs)
    res_window.start()
    rss_before = res_hs.rss_bytes()
    j = peer.join(
        room_id,
        res_hs.server_name,
        user_localpart="benchprobe",
        omit_members=True,
        include_body=False,
    )
    sj = j.get("send_join") or {}
    if sj.get("status") != 200:
        raise RuntimeError(f"send_join to {res_hs.name} failed: {j.get('make_join')}")
    rm = res_rec["metrics"]
    rm["send_join_s"] = round(sj["seconds"], 3)
    rm["send_join_mib"] = round(sj["bytes"] / MIB, 3)
    res_rec["send_join_summary"] = sj.get("summary")
    q_room = quote(room_id, safe="")

    def state_request(name: str, endpoint: str, event_id: str) -> None:
        phase(f"resident side: /{endpoint} from {res_hs.name}")
        r = peer.federation_request(
            j["server"],
            res_hs.server_name,
            "GET",
            f"/_matrix/federation/v1/{endpoint}/{q_room}"
            f"?event_id={quote(event_id, safe='')}",
        )
        if r["status"] != 200:
            raise RuntimeError(f"/{endpoint} from {res_hs.name}: {r['status']}")
        rm[f"{name}_s"] = round(r["seconds"], 3)
        if name in ("state_ids", "state"):
            rm[f"{name}_mib"] = round(r["bytes"] / MIB, 3)

    # As a resyncing joiner asks: /state_ids, then /state at the same event.
    state_request("state_ids", "state_ids", j["event_id"])
    state_request("state", "state", j["event_id"])
    state_request("state_repeat", "state", j["event_id"])
    # And /state at an event no one asked about yet: a second probe join makes a
    # new state group.
    phase(f"resident side: a second partial send_join to {res_hs.name}")
    j2 = peer.join(
        room_id,
        res_hs.server_name,
        server=j["server"],
        user_localpart="benchprobe2",
        omit_members=True,
        include_body=False,
    )
    if (j2.get("send_join") or {}).get("status") != 200:
        raise RuntimeError(f"second send_join to {res_hs.name} failed")
    state_request("state_cold", "state", j2["event_id"])
    served_res = res_window.stop()
    rm["resident_peak_rss_mib"] = served_res["peak_rss_mib"]
    rm["resident_rss_growth_mib"] = round(
        max(0.0, served_res["peak_rss_mib"] - rss_before / MIB), 1
    )
    rm["resident_serve_cpu_s"] = served_res["cpu_s"]

    time.sleep(0.5)  # log flush
    served = measure.access_requests(
        measure.read_log_lines(res_hs.log_path, off), origin=j["server"]
    )
    res_rec["endpoints_resident"] = measure.aggregate(served)
    # The resident's own time for each of the requests above, in order.
    labels = {
        "make_join": ["make_join", "make_join_2"],
        "send_join": ["send_join", "send_join_2"],
        "state_ids": ["state_ids"],
        "state": ["state", "state_repeat", "state_cold"],
    }
    for req in served:
        queue = labels.get(req.endpoint)
        if queue:
            rm[f"serve:{queue.pop(0)}"] = round(req.seconds, 3)
