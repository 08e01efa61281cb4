"""One run, from nothing to a verdict.

A fresh fake peer builds the room; a fresh joiner (``hs2``, with the module and
fast back-offs) starts with an admin and ``bob``. The fault's thread starts
(:mod:`faults.kinds`); bob joins; traffic flows (:mod:`faults.traffic`) until the
fault is healed and the room is complete (or :attr:`Settings.timeout` has
passed: ``stuck``). Then the messages the joiner missed are pushed again, a
closing message goes each way, and the invariants are checked
(:mod:`faults.invariants`). Everything started is stopped before returning; the
logs are kept when the run failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, cast

from faults import invariants
from faults.context import Run, RunStopped
from faults.kinds import KINDS
from faults.plan import RunSpec
from faults.traffic import Traffic, redeliver
from tests.blackbox.resync_case import FAST
from tests.fedkit.certs import KitCA
from tests.fedkit.fakepeer.control_client import FakePeer
from tests.fedkit.homeserver import Homeserver
from tests.fedkit.hsconfig import DatabaseKind

#: The joiner's config: the module with fast back-offs, as the resync tests.
JOINER_CONFIG: dict[str, Any] = dict(FAST)

#: The outcomes of a run, in the order a run's first violation is named by.
OUTCOMES = (
    "ok",
    "error",
    "stuck",
    "job disagrees",
    "state differs",
    "message lost",
    "duplicates",
)


@dataclass(frozen=True)
class Settings:
    """How every run of a campaign is run."""

    #: Seconds allowed, once the fault is healed, for the room to complete.
    timeout: float = 300
    #: Seconds between two remote messages (local ones: twice that).
    traffic_interval: float = 1.0
    #: Keep every run's work directory (else removed, the logs of failed runs
    #: copied to the results first).
    keep: bool = False


def expected_seconds(spec: RunSpec) -> float:
    """Roughly how long the resync takes without faults (measured on a 2-core
    machine: 10,000 members in 5 s on SQLite, 11 s on PostgreSQL)."""
    per_member = 0.0005 if spec.db == "sqlite" else 0.0011
    return 0.3 + spec.members * per_member


def outcome_of(violations: list[tuple[str, str]]) -> str:
    """The run's outcome: its gravest violation's, or ``ok``."""
    found = {o for o, _ in violations}
    return next((o for o in OUTCOMES[1:] if o in found), "ok")


def run_one(
    spec: RunSpec, settings: Settings, ca: KitCA, workdir: str, logs_dir: str
) -> dict[str, Any]:
    """Run ``spec``; returns its record (``outcome``, ``violations``, ...). The
    logs go to ``logs_dir`` (returned as ``logs``) when the run failed."""
    started = time.monotonic()
    record: dict[str, Any] = {"spec": spec.to_json(), "started_at": time.time()}
    peer = FakePeer(os.path.join(workdir, "fakepeer"), ca.directory)
    hs: Homeserver | None = None
    run: Run | None = None
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(peer.stop)
            peer.start()
            room = _build_room(spec, peer)
            record["room"] = {k: room[k] for k in ("room_id", "member_count")}
            db = cast(DatabaseKind, spec.db)
            hs = Homeserver(
                os.path.join(workdir, "hs2"), "hs2", ca, db=db, **JOINER_CONFIG
            )
            stack.callback(hs.cleanup)
            hs.start()
            admin = hs.register_user("admin", admin=True)
            bob = hs.register_user("bob")
            stack.callback(admin.close)
            stack.callback(bob.close)
            run = Run(
                spec.name, spec.seed, peer, room, hs, admin, bob, expected_seconds(spec)
            )
            run.notes["setup_s"] = round(time.monotonic() - started, 1)
            _drive(run, spec, settings)
            _copy_logs_if_failed(run, hs, peer, logs_dir, record)
    except Exception as e:  # noqa: BLE001 - recorded; the campaign goes on
        detail = f"{type(e).__name__}: {e}"[:2000]
        record["traceback"] = traceback.format_exc()[-4000:]
        if run is None:
            record["violations"] = [{"outcome": "error", "detail": detail}]
        else:
            run.violation("error", detail)
        if hs is not None:
            _copy_logs(hs, peer, logs_dir, record)
    if run is not None:
        record.update(run.record())
    violations = [(v["outcome"], v["detail"]) for v in record.get("violations", [])]
    record["outcome"] = outcome_of(violations)
    record["seconds"] = round(time.monotonic() - started, 1)
    if not settings.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return record


def _build_room(spec: RunSpec, peer: FakePeer) -> dict[str, Any]:
    """The fake room: ``spec.members`` members besides its creator, a topic and
    shared history (every message stays visible to a member who rejoins)."""
    room = peer.create_room(
        room_version=spec.room_version,
        members=spec.members,
        servers=spec.servers,
        name=f"Fault campaign {spec.name}",
        topic="faults",
        history_visibility="shared",
        join_rule="public",
    )
    return room


def _drive(run: Run, spec: RunSpec, settings: Settings) -> None:
    """The fault, the join and the traffic; the outcome; the invariants."""
    try:
        _drive_until_checked(run, spec, settings)
    finally:
        run.stopped.set()  # a fault still waiting gives up


def _drive_until_checked(run: Run, spec: RunSpec, settings: Settings) -> None:
    """The steps of the module docstring, from the fault's thread to the
    invariants; a room still partial gets only the checks that make sense."""
    fault = threading.Thread(
        target=_fault_thread, args=(run, spec.kind), name="fault", daemon=True
    )
    fault.start()
    if not run.ready_for_join.wait(60):
        raise RuntimeError("the fault never got ready for the join")
    run.bob.join(run.room_id, via=[run.resident], timeout=120)
    run.window_start = time.time()
    run.log("bob joined")
    run.joined.set()
    traffic = Traffic(run, settings.traffic_interval, spec.seed + 1).start()
    try:
        fault.join(timeout=settings.timeout)
        if fault.is_alive():
            run.stopped.set()
            raise RuntimeError(f"the fault did not end within {settings.timeout} s")
        complete = _wait_complete(run, settings.timeout)
    finally:
        traffic.stop()
    run.notes["traffic_errors"] = traffic.errors[:10]
    sent = traffic.sent + run.extra_messages
    run.notes["undelivered"] = sum(1 for m in sent if m.undelivered)
    run.notes["pdu_errors"] = [m.pdu_error for m in sent if m.pdu_error][:5]
    if complete:
        redeliver(run, sent)
        sent += _closing_messages(run, traffic)
    invariants.check_complete(run)
    if complete:
        settle_s = KINDS[spec.kind].settle_s
        invariants.check_state(run, settle_s)
        invariants.check_messages(run, sent, settle_s)
    invariants.check_duplicates(run)
    invariants.check_job(run)
    _note_job(run)


def _note_job(run: Run) -> None:
    """The job as the run ends: phase, failed rounds, servers failed, length."""
    job = run.job() or {}
    run.notes["job"] = {k: job.get(k) for k in ("phase", "attempts", "tried")}
    if job.get("completed_ts"):
        run.notes["job"]["seconds"] = (job["completed_ts"] - job["created_ts"]) / 1000


def _fault_thread(run: Run, kind: str) -> None:
    """The fault kind's function; what it raises is the run's error."""
    try:
        KINDS[kind].inject(run)
    except RunStopped:
        run.log("fault stopped: the run gave up")
    except Exception as e:  # noqa: BLE001 - the run records it
        run.violation("error", f"fault {kind} failed: {type(e).__name__}: {e}")
    finally:
        run.ready_for_join.set()


def _wait_complete(run: Run, timeout: float) -> bool:
    """Until the room is no longer partial; False after ``timeout`` seconds."""
    t = time.monotonic()
    deadline = t + timeout
    while time.monotonic() < deadline:
        if not run.is_partial():
            run.notes["complete_after_heal_s"] = round(time.monotonic() - t, 1)
            run.log("room complete")
            return True
        time.sleep(0.5)
    run.log(f"still partial {timeout:.0f} s after the fault ended")
    return False


def _closing_messages(run: Run, traffic: Traffic) -> list[Any]:
    """A last message each way once the room is complete: the remote one pulls in
    whatever the joiner missed (its prev events), the local one shows the
    resident has every earlier event of bob's."""
    remote = traffic.remote_message(f"{run.name} closing remote")
    local = traffic.local_message(run.bob, f"{run.name} closing local")
    deadline = time.monotonic() + 60
    if local is not None:
        while time.monotonic() < deadline and not _resident_has(run, local.body):
            time.sleep(0.5)
    run.log("closing messages sent")
    return [m for m in (remote, local) if m is not None and m.event_id]


def _resident_has(run: Run, body: str) -> bool:
    events = run.peer.room_events(run.room_id, limit=1_000_000)["events"]
    return any((e.get("content") or {}).get("body") == body for e in events[-200:])


def _copy_logs_if_failed(
    run: Run, hs: Homeserver, peer: FakePeer, logs_dir: str, record: dict[str, Any]
) -> None:
    if run.violations:
        _copy_logs(hs, peer, logs_dir, record)


def _copy_logs(
    hs: Homeserver, peer: FakePeer, logs_dir: str, record: dict[str, Any]
) -> None:
    """The joiner's and the fake peer's logs and config, into ``logs_dir``."""
    os.makedirs(logs_dir, exist_ok=True)
    files = {
        "hs2.log": hs.log_path,
        "hs2.stderr": hs.stderr_path,
        "hs2.yaml": hs.config_path,
        "fakepeer.log": peer.log_path,
    }
    for name, path in files.items():
        if os.path.exists(path):
            shutil.copyfile(path, os.path.join(logs_dir, name))
    record["logs"] = logs_dir
