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
* a ``/messages`` (backwards from the end, 20 events) by hs2's user sent right
  after ``/join``: how long it takes to answer (stock holds it until the room is
  complete; the module answers during the resync) and whether it answered before
  the full member list;

plus hs2's peak RSS and CPU seconds over that window, hs1's CPU, federation bytes
per endpoint (hs2's outgoing-request log lines) and the resident's serving time per
endpoint (hs1's access log or the fake peer's request log), and the stages found in
hs2's log (:data:`bench.measure.STAGES`).

Afterwards (``resident=True``) the fake peer measures the resident side
(:mod:`bench.resident`).

Each measurement returns two run records (see :mod:`bench.report`): scenario
``join`` and scenario ``resident``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench import measure
from bench.machine import OtherLoad
from bench.resident import measure_resident
from bench.traffic import Traffic, fake_members
from bench.waits import (
    in_thread,
    lazy_filter,
    timed_messages,
    wait_for_body,
    wait_for_transaction,
    wait_full_members,
)
from tests.fedkit.certs import KitCA
from tests.fedkit.fakepeer.control_client import FakePeer
from tests.fedkit.homeserver import Homeserver, start_all
from tests.fedkit.hsconfig import trusted_key_servers
from tests.fedkit.matrix_client import Client

MIB = measure.MIB

#: Room sizes of the issue: members -> fake servers.
DEFAULT_SERVERS = {1000: 50, 10000: 200, 100000: 2000}

Phase = Callable[[str], None]


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
    #: Seconds the joiner is watched after its full member list (0: not).
    after_s: float = 0.0
    #: How the homeservers get signing keys: "direct" (from each server: no
    #: trusted key servers, the kit's default) or "notary" (the fake peer's
    #: notary as their one trusted key server).
    keys: str = "direct"
    #: Seconds the resident-side probes wait at most for the resident to be idle.
    resident_idle_max_s: float = 600.0

    @property
    def scenario_suffix(self) -> str:
        """Appended to the records' scenario: notary measurements apart."""
        return "" if self.keys == "direct" else f"/{self.keys}"

    @property
    def resync_timeout(self) -> float:
        return self.timeout or 300 + self.members / 100

    @property
    def path(self) -> str:
        return "via hs1" if self.via_hs1 else "direct to fake peer"


def _base_record(s: Settings, scenario: str, run: int, order: int) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "variant": s.variant,
        "module_config": s.module_config,
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
    join_rec = _base_record(s, "join" + s.scenario_suffix, run, order)
    res_rec = (
        _base_record(s, "resident" + s.scenario_suffix, run, order)
        if s.resident
        else None
    )
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


@dataclass
class _Cast:
    """The room and who is in the join: the homeservers and their users."""

    room: dict[str, Any]
    hs1: Homeserver | None
    hs2: Homeserver
    alice: Client | None  # on hs1, in the room before hs2 joins
    bob: Client  # on hs2, the joiner
    #: /joined_members on hs2 once its resync is complete.
    expected: int

    @property
    def room_id(self) -> str:
        return str(self.room["room_id"])

    @property
    def resident(self) -> str:
        """The fake peer's server that holds the room."""
        return str(self.room["resident"])


@dataclass
class _Instruments:
    """What watches hs2's join: traffic, resource windows, log offsets."""

    traffic: Traffic
    hs2_window: measure.ResourceWindow
    hs2_cpu: measure.CpuTimeline
    hs1_window: measure.ResourceWindow | None
    other: OtherLoad
    hs2_off: int
    hs1_off: int

    def start(self) -> None:
        self.other.start()
        self.traffic.start()
        self.hs2_window.start()
        self.hs2_cpu.start()
        if self.hs1_window:
            self.hs1_window.start()


@dataclass
class _JoinTimes:
    """Wall-clock times of hs2's join (``t0``: the /join request)."""

    t0: float
    t_join: float
    t_sent: float
    t_seen: float
    t_full: float
    count: int
    #: /messages right after /join: seconds it took, wall time it answered
    messages_s: float
    t_messages: float


@dataclass
class _Usage:
    """What the instruments measured over the join."""

    resources: dict[str, Any]
    cpu_samples: list[measure.CpuSample]
    hs1_res: dict[str, Any] | None
    #: seconds the joiner was watched after its full member list
    after_s: float = 0.0


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
    """The measurement's steps, in order (see the module docstring)."""
    room = _build_room(s, peer, rec, phase)
    setup: dict[str, Any] = {}
    rec["setup"] = setup
    extra = _start_homeservers(s, workdir, ca, peer, servers, stack, setup, phase)
    cast = _hs1_joins_first(s, room, servers, stack, setup, phase)
    since = None
    if cast.alice is not None:
        alice_filter = lazy_filter(cast.alice, cast.room_id)
        since = cast.alice.sync(filter=alice_filter)["next_batch"]
    inst = _make_instruments(s, peer, cast, rec["run"])
    times, usage = _timed_join(s, peer, cast, since, inst, servers, rec, phase)
    _record_join(rec, times, usage)
    time.sleep(0.5)  # the log handler flushes every 0.2 s
    _record_joiner_log(rec, cast, inst.hs2_off, times, usage.cpu_samples)
    _record_resident_serving(rec, cast, peer, inst.hs1_off, times.t0)
    if res_rec is None:
        return
    res_hs = cast.hs1 or cast.hs2

    def start_joiner() -> Client:
        """hs3, of the same variant and set-up, and a user there."""
        hs3 = _homeserver(s, workdir, ca, "hs3", extra)
        stack.callback(hs3.cleanup)
        servers["hs3"] = hs3
        hs3.start()
        _wait_background_updates(hs3)
        carol = hs3.register_user("carol")
        stack.callback(carol.close)
        return carol

    measure_resident(
        peer,
        cast.room_id,
        res_hs,
        rec,
        res_rec,
        phase,
        start_joiner=start_joiner,
        idle_max_s=s.resident_idle_max_s,
    )


def _build_room(
    s: Settings, peer: FakePeer, rec: dict[str, Any], phase: Phase
) -> dict[str, Any]:
    """Start the fake peer and build the fake room; records ``room``."""
    phase("starting fake peer and building the room")
    peer.start()
    t = time.monotonic()
    room = peer.create_room(**room_spec(s.members, s.servers, s.room_version))
    rec["room"] = {
        "room_id": room["room_id"],
        "room_version": room["room_version"],
        "member_count": room["member_count"],
        "state_event_count": room["state_event_count"],
        "event_count": room["event_count"],
        "fake_servers": len(room["servers"]),
        "build_s": round(time.monotonic() - t, 2),
    }
    return room


def _start_homeservers(
    s: Settings,
    workdir: str,
    ca: KitCA,
    peer: FakePeer,
    servers: dict[str, Homeserver],
    stack: contextlib.ExitStack,
    setup: dict[str, Any],
    phase: Phase,
) -> dict[str, Any]:
    """Start hs2 (and hs1 when joining via it) into ``servers``; ``start_s``.
    With ``keys="notary"`` they trust the fake peer's notary for keys. Returns
    the configuration they have on top of the kit's (for hs3 later)."""
    phase("starting homeservers")
    names = ["hs1", "hs2"] if s.via_hs1 else ["hs2"]
    extra: dict[str, Any] = {}
    if s.keys == "notary":
        notary = peer.notary()
        extra = trusted_key_servers(notary)
        setup["notary"] = notary["server_name"]
    for name in names:
        hs = _homeserver(s, workdir, ca, name, extra)
        stack.callback(hs.cleanup)
        servers[name] = hs
    t = time.monotonic()
    start_all(servers.values())
    setup["start_s"] = round(time.monotonic() - t, 2)
    phase("homeservers run their background updates")
    t = time.monotonic()
    for hs in servers.values():
        _wait_background_updates(hs)
    setup["background_updates_s"] = round(time.monotonic() - t, 2)
    return extra


#: Longest wait for a fresh homeserver's background updates (seconds).
BACKGROUND_UPDATES_MAX_S = 300


def _wait_background_updates(hs: Homeserver) -> None:
    """Wait until ``hs`` has run its background updates (a fresh database has
    some sixty: index builds, table populations), run back to back
    (:data:`BACKGROUND_UPDATE_CONFIG`). A homeserver that joins a big room has
    long finished them; left running, they would compete with the join for the
    database for the first minutes, in one variant as in the other."""
    deadline = time.monotonic() + BACKGROUND_UPDATES_MAX_S
    while hs.sql("SELECT update_name FROM background_updates"):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{hs.name}: background updates still pending after "
                f"{BACKGROUND_UPDATES_MAX_S} s"
            )
        time.sleep(0.5)


#: Background updates back to back (Synapse's default sleeps between batches).
BACKGROUND_UPDATE_CONFIG = {"background_updates": {"sleep_enabled": False}}


def _homeserver(
    s: Settings, workdir: str, ca: KitCA, name: str, extra: dict[str, Any]
) -> Homeserver:
    """A homeserver of the measurement's variant, not started."""
    return Homeserver(
        os.path.join(workdir, name),
        name,
        ca,
        db=s.db,  # type: ignore[arg-type]
        with_module=s.variant == "module",
        module_config=s.module_config,
        extra_config={**BACKGROUND_UPDATE_CONFIG, **extra},
    )


def _hs1_joins_first(
    s: Settings,
    room: dict[str, Any],
    servers: dict[str, Homeserver],
    stack: contextlib.ExitStack,
    setup: dict[str, Any],
    phase: Phase,
) -> _Cast:
    """hs1's alice joins the fake room and waits for its resync; bob registers on hs2."""
    hs2 = servers["hs2"]
    hs1 = servers.get("hs1")
    expected = room["member_count"] + 1  # + bob on hs2
    alice: Client | None = None
    if hs1 is not None:
        phase("hs1 joins the fake room and resyncs")
        alice = hs1.register_user("alice")
        stack.callback(alice.close)
        t = time.monotonic()
        alice.join(room["room_id"], via=[room["resident"]], timeout=s.resync_timeout)
        setup["hs1_join_s"] = round(time.monotonic() - t, 2)
        got = len(alice.joined_members(room["room_id"], timeout=s.resync_timeout))
        setup["hs1_full_members_s"] = round(time.monotonic() - t, 2)
        if got < room["member_count"] + 1:
            raise RuntimeError(f"hs1 sees {got} members, expected {expected}")
        expected += 1  # + alice

    bob = hs2.register_user("bob")
    stack.callback(bob.close)
    return _Cast(room, hs1, hs2, alice, bob, expected)


def _make_instruments(
    s: Settings, peer: FakePeer, cast: _Cast, run: int
) -> _Instruments:
    """Traffic, hs2's (and hs1's) resource windows and log offsets, not started."""
    traffic = Traffic(
        peer.control_url,
        cast.room_id,
        fake_members(cast.room, s.members - 1),
        s.traffic_interval,
        seed=hash((s.members, run)),
    )
    hs1 = cast.hs1
    return _Instruments(
        traffic=traffic,
        hs2_window=measure.ResourceWindow(cast.hs2),
        hs2_cpu=measure.CpuTimeline(cast.hs2),
        hs1_window=measure.ResourceWindow(hs1, reset_rss=False) if hs1 else None,
        other=OtherLoad(),
        hs2_off=cast.hs2.log_offset(),
        hs1_off=hs1.log_offset() if hs1 else 0,
    )


def _timed_join(
    s: Settings,
    peer: FakePeer,
    cast: _Cast,
    since: str | None,
    inst: _Instruments,
    servers: dict[str, Homeserver],
    rec: dict[str, Any],
    phase: Phase,
) -> tuple[_JoinTimes, _Usage]:
    """hs2 joins under traffic, instrumented; records ``traffic`` and ``other_load``."""
    deadline = time.monotonic() + s.resync_timeout
    via = cast.hs1.server_name if cast.hs1 else cast.resident

    phase(f"hs2 joins {s.path}")
    inst.start()
    t0 = time.time()
    resources = None
    try:
        times = _join_and_talk(s, peer, cast, since, via, deadline, t0, phase)
        # The join's window ends with the full member list; the CPU timeline
        # goes on through the time after it, if watched.
        resources = inst.hs2_window.stop()
        if s.after_s > 0:
            phase(f"the {s.after_s:g} s after the full member list")
            time.sleep(max(0.0, times.t_full + s.after_s - time.time()))
    finally:
        usage = _Usage(
            resources=resources if resources is not None else inst.hs2_window.stop(),
            cpu_samples=inst.hs2_cpu.stop(),
            hs1_res=inst.hs1_window.stop() if inst.hs1_window else None,
            after_s=s.after_s if resources is not None else 0.0,
        )
        rec["traffic"] = asdict(inst.traffic.stop())
        rec["other_load"] = inst.other.stop([hs.pid for hs in servers.values()])
    return times, usage


def _join_and_talk(
    s: Settings,
    peer: FakePeer,
    cast: _Cast,
    since: str | None,
    via: str,
    deadline: float,
    t0: float,
    phase: Phase,
) -> _JoinTimes:
    """bob joins, sends a message that the other side must see, and waits for
    the full member list."""
    room_id = cast.room_id
    cast.bob.join(room_id, via=[via], timeout=s.resync_timeout)
    t_join = time.time()
    messages = in_thread(timed_messages, cast.bob, room_id, deadline)
    full = in_thread(wait_full_members, cast.bob, room_id, cast.expected, deadline)
    marker = f"bench message {uuid.uuid4().hex[:8]}"
    phase("hs2 sends a message")
    cast.bob.send_message(room_id, marker)
    t_sent = time.time()
    if cast.alice is not None:
        assert since is not None
        t_seen = wait_for_body(cast.alice, room_id, marker, since, deadline)
    else:
        t_seen = wait_for_transaction(
            peer, cast.hs2.server_name, cast.resident, marker, deadline
        )
    phase("hs2 resyncs (waiting for the full member list)")
    t_full, count = full.result()
    messages_s, t_messages = messages.result()
    return _JoinTimes(t0, t_join, t_sent, t_seen, t_full, count, messages_s, t_messages)


def _record_join(rec: dict[str, Any], times: _JoinTimes, usage: _Usage) -> None:
    """The join's headline metrics: times from /join, hs2's peak RSS and CPU."""
    m = rec["metrics"]
    t0 = times.t0
    m["join_s"] = round(times.t_join - t0, 3)
    m["message_remote_s"] = round(times.t_seen - t0, 3)
    m["full_members_s"] = round(times.t_full - t0, 3)
    m["messages_s"] = round(times.messages_s, 3)
    m["peak_rss_mib"] = usage.resources["peak_rss_mib"]
    m["cpu_s"] = usage.resources["cpu_s"]
    if usage.after_s > 0:
        after = measure.after_metrics(usage.cpu_samples, times.t_full, usage.after_s)
        if rec["db"] != "postgres":
            after.pop("db_cpu_after_s", None)  # no PostgreSQL to watch
        m.update(after)
    if usage.hs1_res:
        m["resident_cpu_s"] = usage.hs1_res["cpu_s"]
    rec["message_after_send_s"] = round(times.t_seen - times.t_sent, 3)
    rec["joined_members_count"] = times.count
    rec["messages_before_full_members"] = times.t_messages < times.t_full


def _record_joiner_log(
    rec: dict[str, Any],
    cast: _Cast,
    hs2_off: int,
    times: _JoinTimes,
    cpu_samples: list[measure.CpuSample],
) -> None:
    """From hs2's log: federation bytes per endpoint, and the stages' times."""
    m = rec["metrics"]
    t0, t_full = times.t0, times.t_full
    lines = measure.read_log_lines(cast.hs2.log_path, hs2_off)
    out = measure.aggregate(measure.outgoing_requests(lines, since=t0, until=t_full))
    rec["endpoints_joiner"] = out
    m["fed_bytes_mib"] = round(sum(e["bytes"] for e in out.values()) / MIB, 3)
    for endpoint, agg in out.items():
        if agg["bytes"] >= 1024:
            m[f"bytes:{endpoint}"] = round(agg["bytes"] / MIB, 3)
    rec["stages"] = measure.stage_times(lines, t0, cast.room_id, until=t_full + 0.2)
    for stage, secs in rec["stages"].items():
        m[f"stage:{stage}"] = secs
    # Each stage's duration, and how busy the joiner and its database were.
    m.update(measure.stage_spans(rec["stages"], t0, cpu_samples))


def _record_resident_serving(
    rec: dict[str, Any], cast: _Cast, peer: FakePeer, hs1_off: int, t0: float
) -> None:
    """What the resident served hs2 (hs1's access log, or the fake peer's log)."""
    hs2 = cast.hs2
    if cast.hs1 is not None:
        served = measure.access_requests(
            measure.read_log_lines(cast.hs1.log_path, hs1_off), origin=hs2.server_name
        )
        rec["endpoints_resident"] = measure.aggregate(served)
    else:
        rec["endpoints_resident"] = measure.aggregate_peer_requests(
            peer.requests(since=t0), origin=hs2.server_name
        )
    # Where the resident's time went (summed per endpoint; the fake peer's is
    # the same for both variants, but shows what the joiner asked for).
    m = rec["metrics"]
    for endpoint, agg in rec["endpoints_resident"].items():
        if agg["seconds"] >= 0.005:
            m[f"serve:{endpoint}"] = round(agg["seconds"], 3)
