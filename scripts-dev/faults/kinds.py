"""The fault kinds: one function each, run on the fault's thread of a run.

Each waits for a random moment of the resync, injects its fault, keeps it a
random while, and heals it; the run then waits for the outcome and checks the
invariants (:mod:`faults.invariants`). Every draw comes from the run's seed.

Faults at the resident answer the joiner's state requests badly (``/state``
and ``/state_ids``, sometimes every room read): on the server the resync is
asking, or on every server of the room (then the engine must back off and retry
rather than fail over). Faults at the joiner hit its process, its database or
its users.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from faults.context import (
    AFTER_JOIN,
    APPLYING,
    BEFORE_JOIN,
    DELAY,
    PROGRESS,
    Run,
    pick_moment,
)
from faults.traffic import Sent
from tests.blackbox.endpoints import ADMIN
from tests.blackbox.resync_case import STATE_PATH, STATE_PATHS
from tests.fedkit.postgres import pg_connect

#: Where a resident's bad answers may be: (name, path regex, how many of the
#: first matching requests a fault from the start may let through: a resync
#: that goes well asks once for /state_ids, then once for /state, then for a
#: few single events).
REQUEST_PATHS = (
    ("state and state_ids", STATE_PATHS, 1),
    ("state", STATE_PATH, 0),
    ("state_ids", r"^/_matrix/federation/v1/state_ids/", 0),
    (
        "every room read",
        r"^/_matrix/federation/v1/(state|state_ids|event|event_auth"
        r"|get_missing_events|backfill)/",
        2,
    ),
)
#: Moments for faults at the resident, weighted: mostly from the start (letting
#: the first zero to two matching requests through), else soon after the join.
#: A bad answer hits only requests that arrive once it is in place, and the
#: resync asks for the state within a second of the join.
RESIDENT_MOMENTS = (BEFORE_JOIN, BEFORE_JOIN, BEFORE_JOIN, AFTER_JOIN, DELAY)
#: Moments for faults at the joiner: any time during the resync.
JOINER_MOMENTS = (AFTER_JOIN, DELAY, PROGRESS, APPLYING)


@dataclass(frozen=True)
class Kind:
    """A fault kind: its function and the databases it runs on."""

    name: str
    inject: Callable[[Run], None]
    databases: tuple[str, ...] = ("sqlite", "postgres")
    #: How long the final state and message checks wait for the joiner to
    #: converge with the resident (see :data:`DB_FAULT_SETTLE_S`).
    settle_s: float = 30

    @property
    def doc(self) -> str:
        """The first sentence of the function's docstring."""
        text = " ".join((self.inject.__doc__ or "").split())
        return text.split(". ")[0].rstrip(".") + "."


#: The final checks' wait after a database fault. Synapse handles a room's
#: incoming events under a database lock (``worker_locks``); when the connection
#: drops under its handler, neither the handling nor the lock's release is
#: written, and the room's incoming events wait, staged, until the orphaned lock
#: times out (2 minutes, Synapse's ``_LOCK_TIMEOUT``). Stock Synapse does the
#: same in any room; the checks wait it out (and the run records how long).
DB_FAULT_SETTLE_S = 150

#: The final checks' wait after a resident that held requests open. Synapse
#: handles a room's incoming events one at a time; one whose missing prev events
#: or state it asked of the resident waits for that request until Synapse's
#: federation request timeout (60 s), and the room's later incoming events wait
#: behind it, staged (stock Synapse does the same in any room). Healing the
#: fault does not release a request already held.
HELD_REQUEST_SETTLE_S = 90


# -- faults at the resident ------------------------------------------------------


def _scope(run: Run) -> str:
    """The server the resync is asking (two runs in three), or every server."""
    return run.target_server() if run.rng.random() < 2 / 3 else "*"


def _misbehave(run: Run, action: str, seconds: tuple[float, float], **kw: Any) -> None:
    """A behaviour of the fake peer on state requests at a random moment, kept a
    random while (or until its ``count`` is spent), then removed."""
    moment = pick_moment(run.rng, RESIDENT_MOMENTS, run.expected_s / 4)
    path_name, path, max_skip = run.rng.choice(REQUEST_PATHS)
    lasts = run.rng.uniform(*seconds)
    if moment.kind == BEFORE_JOIN and max_skip:
        kw["skip"] = run.rng.randint(0, max_skip)
    run.wait_for(moment)
    server = _scope(run)
    rule = run.peer.add_behaviour(path, action, server=server, **kw)
    extra = ", ".join(f"{k}={v}" for k, v in kw.items())
    run.injected(
        f"{action}{' (' + extra + ')' if extra else ''} on {path_name} at {server}"
    )
    run.sleep(lasts)
    hits = next((b["hits"] for b in run.peer.behaviours() if b["id"] == rule), 0)
    run.peer.remove_behaviour(rule)
    run.notes["hit"] = hits > 0
    run.notes["requests_hit"] = hits
    run.healed(f"{action} removed after {lasts:.1f} s ({hits} request(s) hit)")


def resident_hang(run: Run) -> None:
    """The resident holds state requests open without answering, then answers
    new ones again (requests already held stay held until the joiner gives
    up on them)."""
    _misbehave(run, "hang", (5, 25))


def resident_trickle(run: Run) -> None:
    """The resident answers state requests one byte a second for a while."""
    _misbehave(run, "trickle", (5, 25))


def truncated_answer(run: Run) -> None:
    """One to three state answers cut short in transit."""
    _misbehave(run, "truncate", (3, 15), count=run.rng.randint(1, 3))


def malformed_answer(run: Run) -> None:
    """One to three state answers that are invalid JSON or JSON of the wrong
    shape."""
    mode = run.rng.choice(["invalid_json", "wrong_shape"])
    _misbehave(run, "malformed", (3, 15), count=run.rng.randint(1, 3), mode=mode)


def errors_500(run: Run) -> None:
    """State requests answered 500 for a while."""
    _misbehave(run, "error", (3, 20), status=500)


def resident_kill(run: Run) -> None:
    """The server being asked goes away (listener closed, connections cut); it
    comes back after a while in half the runs, never in the others: the
    resync must fail over."""
    moment = pick_moment(run.rng, (AFTER_JOIN, DELAY, PROGRESS), run.expected_s)
    back_after = run.rng.uniform(5, 30) if run.rng.random() < 0.5 else None
    run.wait_for(moment)
    server = run.target_server()
    run.peer.stop_server(server)
    run.injected(f"fake server {server} stopped")
    if back_after is None:
        run.healed("never restarted")
        return
    run.sleep(back_after)
    run.peer.start_server(server)
    run.healed(f"{server} started again after {back_after:.1f} s")


# -- faults at the joiner --------------------------------------------------------


def joiner_kill_restart(run: Run) -> None:
    """SIGKILL of the joining homeserver, restarted a moment later: the job
    resumes from its row."""
    moment = pick_moment(run.rng, JOINER_MOMENTS, run.expected_s)
    down_for = run.rng.uniform(0, 3)
    run.wait_for(moment)
    hit = run.is_partial()
    run.hs.kill()
    run.injected("joiner SIGKILLed", hit=hit)
    run.sleep(down_for)
    run.hs.start()
    run.healed(f"joiner restarted after {down_for:.1f} s down")


def postgres_connections_dropped(run: Run) -> None:
    """Every connection of the joiner to its PostgreSQL database terminated,
    again and again for a few seconds: what a PostgreSQL restart looks like to
    Synapse, without restarting a server other people's tests use."""
    moment = pick_moment(run.rng, JOINER_MOMENTS, run.expected_s)
    lasts = run.rng.uniform(2, 6)
    run.wait_for(moment)
    database = run.hs.database_name
    assert database is not None
    run.injected(f"terminating {database}'s connections for {lasts:.1f} s")
    terminated = terminate_connections(database, lasts)
    run.notes["connections_terminated"] = terminated
    run.healed(f"{terminated} connection(s) terminated")


def terminate_connections(database: str, seconds: float) -> int:
    """``pg_terminate_backend`` on every connection to ``database`` (but ours)
    every 0.2 s for ``seconds``; returns how many were terminated."""
    conn = pg_connect()
    terminated = 0
    try:
        with conn.cursor() as cur:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (database,),
                )
                terminated += sum(1 for (done,) in cur.fetchall() if done)
                time.sleep(0.2)
    finally:
        conn.close()
    return terminated


def leave_rejoin(run: Run) -> None:
    """The last local user leaves (the resync is aborted and the room purged,
    if it was still partial), then joins again a moment later."""
    moment = pick_moment(run.rng, JOINER_MOMENTS, run.expected_s)
    away = run.rng.uniform(0.5, 5)
    run.wait_for(moment)
    hit = run.is_partial()
    run.bob.leave(run.room_id)
    run.injected("bob (the last local user) left", hit=hit)
    run.sleep(away)
    run.rejoined(run.bob)
    run.healed(f"bob joined again after {away:.1f} s")


def second_user_joins(run: Run) -> None:
    """Another local user joins mid-resync, and says something."""
    moment = pick_moment(run.rng, JOINER_MOMENTS, run.expected_s)
    carol = run.hs.register_user("carol")
    try:
        run.wait_for(moment)
        hit = run.is_partial()
        carol.join(run.room_id, via=[run.resident], timeout=120)
        run.injected("carol joined", hit=hit)
        body = f"{run.name} from carol"
        sent = Sent(body, "local", carol.user_id, time.time())
        sent.event_id = carol.send_message(run.room_id, body)
        run.extra_messages.append(sent)
        run.healed("carol said something")
    finally:
        carol.close()


def admin_abort(run: Run) -> None:
    """The last local user leaves and an admin aborts the resync: it ends
    ``aborted`` with the room purged (if it was still partial); a rejoin then
    completes."""
    moment = pick_moment(run.rng, (AFTER_JOIN, DELAY), run.expected_s / 2)
    run.wait_for(moment)
    hit = run.is_partial()
    run.bob.leave(run.room_id)
    status, body = run.admin.post(f"{ADMIN}/{quote(run.room_id)}/abort")
    run.injected(f"bob left; admin abort answered {status}", hit=hit)
    run.notes["abort_status"] = status
    if status not in (200, 404):
        run.violation("error", f"admin abort answered {status}: {body}")
    elif hit:
        check_aborted(run)
    run.sleep(run.rng.uniform(0.5, 3))
    run.rejoined(run.bob)
    run.healed("bob joined again")


def check_aborted(run: Run, timeout: float = 60) -> None:
    """The job says aborted, the room is no longer partial, and its events are
    purged, within ``timeout`` seconds; else a violation saying which."""
    deadline = time.monotonic() + timeout
    while True:
        phase = run.sql(
            "SELECT phase FROM sps_resync_jobs WHERE room_id = ?", (run.room_id,)
        )
        partial = run.is_partial()
        events = run.sql(
            "SELECT COUNT(*) FROM events WHERE room_id = ?", (run.room_id,)
        )
        aborted = bool(phase) and phase[0][0] == "aborted"
        if aborted and not partial and events[0][0] == 0:
            run.log("aborted, room purged")
            return
        if time.monotonic() > deadline:
            break
        run.sleep(0.5)
    if partial:
        run.violation("stuck", f"still partial {timeout:.0f} s after the abort")
    elif not aborted:
        run.violation("job disagrees", f"job phase {phase} after the abort")
    else:
        run.violation("state differs", f"{events[0][0]} event(s) left after the purge")


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("joiner_kill_restart", joiner_kill_restart),
        Kind("resident_kill", resident_kill),
        Kind("resident_hang", resident_hang, settle_s=HELD_REQUEST_SETTLE_S),
        Kind("resident_trickle", resident_trickle, settle_s=HELD_REQUEST_SETTLE_S),
        Kind("truncated_answer", truncated_answer),
        Kind("malformed_answer", malformed_answer),
        Kind("errors_500", errors_500),
        Kind(
            "postgres_connections_dropped",
            postgres_connections_dropped,
            databases=("postgres",),
            settle_s=DB_FAULT_SETTLE_S,
        ),
        Kind("leave_rejoin", leave_rejoin),
        Kind("second_user_joins", second_user_joins),
        Kind("admin_abort", admin_abort),
    )
}


def kinds_for(dbs: list[str], wanted: list[str]) -> dict[str, list[str]]:
    """For each database, the ``wanted`` kinds that run on it, in order."""
    return {db: [k for k in wanted if db in KINDS[k].databases] for db in dbs}
