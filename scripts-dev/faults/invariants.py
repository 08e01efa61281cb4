"""What must hold after every run, one function each; each records what it
finds broken as a violation of the run (:meth:`faults.context.Run.violation`),
named by the outcome it stands for:

* ``stuck``: the room is still partial (:func:`check_complete`);
* ``state differs``: the joiner's current state is not the resident's, event
  by event (:func:`check_state`);
* ``message lost``: a message sent during the run is not visible to the local
  user (:func:`check_messages`);
* ``duplicates``: a row twice where there must be one (:func:`check_duplicates`);
* ``job disagrees``: the engine's job row and Synapse's partial-state tables
  say different things (:func:`check_job`).

Checks that depend on events still in flight (the resident's copy of the
joiner's last events, a message being processed) are retried for a while
before they count as broken.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from faults.context import Run
from faults.traffic import Sent
from tests.blackbox.resync_case import resident_state
from tests.fedkit.matrix_client import Client

#: What is checked for duplicates: (table, key columns). Synapse's schema
#: enforces most of them (a check there guards against the schema changing);
#: not ``state_groups_state`` (one state group holding a key twice) nor
#: ``event_auth`` (an event's auth event recorded twice, e.g. an event stored
#: by two attempts).
UNIQUE_ROWS = (
    ("state_groups_state", "state_group, type, state_key"),
    ("event_auth", "event_id, auth_id"),
    ("event_to_state_groups", "event_id"),
    ("events", "event_id"),
    ("event_json", "event_id"),
    ("state_events", "event_id"),
    ("room_memberships", "event_id"),
    ("current_state_events", "room_id, type, state_key"),
    ("local_current_membership", "room_id, user_id"),
    ("partial_state_rooms", "room_id"),
    ("sps_resync_jobs", "room_id"),
)


def settle(check: Callable[[], str | None], timeout: float) -> str | None:
    """``check()`` (None when fine, else what is wrong) until it is fine or
    ``timeout`` seconds have passed; returns its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        problem = check()
        if problem is None or time.monotonic() > deadline:
            return problem
        time.sleep(1)


def _note_slow_settle(run: Run, what: str, started: float) -> None:
    """Record a check that took more than a few seconds to come right."""
    took = time.monotonic() - started
    if took > 5:
        run.notes[f"{what}_settled_after_s"] = round(took, 1)


def check_complete(run: Run) -> None:
    """The room is complete (not in ``partial_state_rooms``) and bob is in it."""
    if run.is_partial():
        job = run.job() or {}
        run.violation(
            "stuck",
            f"still partial; job phase={job.get('phase')} attempts="
            f"{job.get('attempts')} last_error={job.get('last_error')!r}",
        )
        return
    rows = run.sql(
        "SELECT membership FROM local_current_membership"
        " WHERE room_id = ? AND user_id = ?",
        (run.room_id, run.bob.user_id),
    )
    if not rows or rows[0][0] != "join":
        run.violation("state differs", f"bob's membership is {rows}, not join")


def joiner_state(run: Run) -> dict[tuple[str, str], str]:
    rows = run.sql(
        "SELECT type, state_key, event_id FROM current_state_events WHERE room_id = ?",
        (run.room_id,),
    )
    return {(t, k): e for t, k, e in rows}


def state_differences(run: Run) -> dict[tuple[str, str], tuple[str | None, str | None]]:
    """(type, state_key) -> (joiner's event, resident's event), where they differ."""
    events = run.peer.room_events(run.room_id, limit=1_000_000)["events"]
    expected = resident_state(events)
    got = joiner_state(run)
    return {
        key: (got.get(key), expected.get(key))
        for key in set(got) | set(expected)
        if got.get(key) != expected.get(key)
    }


def check_state(run: Run, timeout: float = 30) -> None:
    """The joiner's current state is the resident's, event by event."""

    def problem() -> str | None:
        diff = state_differences(run)
        if not diff:
            return None
        sample = "; ".join(
            f"{t} {k}: joiner {mine} resident {theirs}"
            for (t, k), (mine, theirs) in sorted(diff.items())[:5]
        )
        return f"{len(diff)} state key(s) differ: {sample}"

    started = time.monotonic()
    found = settle(problem, timeout)
    _note_slow_settle(run, "state", started)
    if found is not None:
        run.violation("state differs", found)


def visible_bodies(client: Client, room_id: str, pages: int = 30) -> Counter[str]:
    """The bodies of every message ``client`` can page back through, counted."""
    seen: Counter[str] = Counter()
    token: str | None = None
    for _ in range(pages):
        page = client.messages(
            room_id,
            dir="b",
            limit=500,
            from_token=token,
            filter={"types": ["m.room.message"]},
        )
        for event in page.get("chunk", []):
            body = (event.get("content") or {}).get("body")
            if isinstance(body, str):
                seen[body] += 1
        token = page.get("end")
        if not page.get("chunk") or not token:
            break
    return seen


def required_messages(run: Run, sent: list[Sent]) -> list[Sent]:
    """The messages bob must see: those created after his last join."""
    return [m for m in sent if m.event_id and m.at >= run.window_start]


def check_messages(run: Run, sent: list[Sent], timeout: float = 30) -> None:
    """Every message sent (by remote users or locally) since bob's last join is
    visible to him, once."""
    wanted = required_messages(run, sent)
    run.notes["messages_required"] = len(wanted)
    run.notes["messages_sent"] = len(sent)
    seen: Counter[str] = Counter()

    def problem() -> str | None:
        seen.clear()
        seen.update(visible_bodies(run.bob, run.room_id))
        missing = [m for m in wanted if seen[m.body] == 0]
        if not missing:
            return None
        sample = ", ".join(f"{m.body} ({m.event_id})" for m in missing[:5])
        return f"{len(missing)} of {len(wanted)} message(s) not visible: {sample}"

    started = time.monotonic()
    found = settle(problem, timeout)
    _note_slow_settle(run, "messages", started)
    if found is not None:
        run.violation("message lost", found)
    twice = sorted(m.body for m in wanted if seen[m.body] > 1)
    if twice:
        run.violation("duplicates", f"messages shown more than once: {twice[:5]}")


def check_duplicates(run: Run) -> None:
    """No row twice in :data:`UNIQUE_ROWS` (all rooms of the joiner)."""
    for table, key in UNIQUE_ROWS:
        rows = run.sql(
            f"SELECT {key}, COUNT(*) FROM {table} GROUP BY {key} HAVING COUNT(*) > 1"
        )
        if rows:
            run.violation(
                "duplicates", f"{len(rows)} duplicate key(s) in {table}: {rows[:3]}"
            )


def job_disagreement(run: Run) -> str | None:
    """What the job row and Synapse's partial-state tables disagree on, if
    anything: the job is done (or aborted) exactly when the room has no row in
    ``partial_state_rooms`` (nor in its satellite tables)."""
    room = (run.room_id,)
    job = run.sql("SELECT phase FROM sps_resync_jobs WHERE room_id = ?", room)
    phase: Any = job[0][0] if job else None
    partial = run.is_partial()
    if partial:
        if phase in (None, "done", "aborted"):
            return f"the room is partial but its job is {phase}"
        return None
    if phase not in ("done", "aborted"):
        return f"the room is not partial but its job is {phase}"
    for table in ("partial_state_events", "partial_state_rooms_servers"):
        left = run.sql(f"SELECT COUNT(*) FROM {table} WHERE room_id = ?", room)
        if left[0][0]:
            return f"job {phase}, but {left[0][0]} row(s) left in {table}"
    return None


def check_job(run: Run, timeout: float = 10) -> None:
    """The job row and Synapse's partial-state tables agree (within
    ``timeout``: the job is written a moment after Synapse's finish)."""
    found = settle(lambda: job_disagreement(run), timeout)
    if found is not None:
        run.violation("job disagrees", found)
