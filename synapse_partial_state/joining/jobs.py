"""A resync job: one per partial-state room, as stored in ``sps_resync_jobs``.

Pure data and policy (no I/O): phases, back-off, the order servers are tried in.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import attr


class Phase(str, enum.Enum):
    """Where a job is. ``done`` and ``aborted`` are final."""

    FETCHING = "fetching"  # getting the state at the join from a resident
    APPLYING = "applying"  # bringing later partial-state events up to full state
    REPLAYING = "replaying"  # current state, device-list replay, clearing the flag
    RETRYING = "retrying"  # every server failed; waiting for next_attempt_ts
    DONE = "done"
    ABORTED = "aborted"  # the room was left or purged mid-resync

    @property
    def final(self) -> bool:
        return self in (Phase.DONE, Phase.ABORTED)


@attr.s(frozen=True, auto_attribs=True, slots=True)
class Job:
    room_id: str
    phase: Phase
    created_ts: int
    updated_ts: int
    join_event_id: str | None = None
    joined_via: str | None = None
    #: Servers to ask, best first (joined-via, servers in the room, learned ones).
    destinations: tuple[str, ...] = ()
    #: Servers that failed in the current round.
    tried: tuple[str, ...] = ()
    current_destination: str | None = None
    #: Completed rounds in which every server failed.
    attempts: int = 0
    next_attempt_ts: int | None = None
    last_error: str | None = None
    #: State events at the join downloaded by the engine's fetch (this attempt).
    events_fetched: int = 0
    #: Of those, signatures and hashes checked in bulk.
    events_verified: int = 0
    #: State events at the join stored (before a restart too).
    events_persisted: int = 0
    #: Events received since the join brought to full state (re-authed).
    events_applied: int = 0
    #: While fetching: state events still to store; then: events still partial.
    events_remaining: int | None = None
    started_ts: int | None = None
    completed_ts: int | None = None

    def evolve(self, now: int, **changes: object) -> Job:
        return attr.evolve(self, updated_ts=now, **changes)  # type: ignore[arg-type]


def backoff_ms(attempts: int, initial_s: float, max_s: float) -> int:
    """Delay before round ``attempts + 1``: initial * 2^(attempts-1), capped."""
    if attempts <= 0:
        return 0
    delay = initial_s * (2 ** min(attempts - 1, 32))
    return int(min(delay, max_s) * 1000)


def order_destinations(
    joined_via: str | None,
    servers_in_room: Iterable[str],
    learned: Iterable[str],
    own_server: str,
) -> tuple[str, ...]:
    """Joined-via first, then the servers from ``/send_join``, then learned ones.

    Repeats and our own server name are dropped; the order within each group is
    kept (callers pass sorted input for stable behaviour)."""
    seen: dict[str, None] = {}
    for group in ([joined_via] if joined_via else [], servers_in_room, learned):
        for server in group:
            if server and server != own_server:
                seen.setdefault(server, None)
    return tuple(seen)


def next_destination(
    destinations: tuple[str, ...], tried: tuple[str, ...]
) -> str | None:
    """The first destination not tried in this round, or None if all were."""
    for server in destinations:
        if server not in tried:
            return server
    return None


def eta_seconds(job: Job, now: int) -> float | None:
    """A rough time to completion: what remains at the rate of the work done so
    far (state events stored and events brought to full state, all counted
    alike; elapsed since the job started, download and waits included)."""
    done = job.events_persisted + job.events_applied
    if job.started_ts is None or not job.events_remaining or done <= 0:
        return None
    elapsed = max(now - job.started_ts, 1) / 1000
    return job.events_remaining / (done / elapsed)


def start_or_resume(
    existing: Job | None,
    room_id: str,
    now: int,
    join_event_id: str | None,
    joined_via: str | None,
    destinations: tuple[str, ...],
) -> Job:
    """The job a resync starts with: ``existing`` resumed (attempts, counters and
    timestamps kept, a fresh round of servers) unless it is missing or over,
    else a new one; either way in the fetching phase, at its first server."""
    if existing is not None and not existing.phase.final:
        job = existing.evolve(
            now,
            destinations=destinations or existing.destinations,
            join_event_id=join_event_id or existing.join_event_id,
            tried=(),
            phase=Phase.FETCHING,
            next_attempt_ts=None,
        )
    else:
        job = Job(
            room_id=room_id,
            phase=Phase.FETCHING,
            created_ts=now,
            updated_ts=now,
            started_ts=now,
            join_event_id=join_event_id,
            joined_via=joined_via,
            destinations=destinations,
        )
    return job.evolve(now, current_destination=next_destination(job.destinations, ()))


def memberships_to_keep(
    memberships: Iterable[tuple[str, str, str]],
) -> list[tuple[str, str]]:
    """Of local users' (user, membership, sender) in a room no local user is
    joined to, those a purge would take from them: a pending invite or knock,
    and a kick or ban by someone else (the user's clients must see it)."""
    kept = []
    for user_id, membership, sender in memberships:
        if membership in ("invite", "knock") or (
            membership in ("leave", "ban") and sender != user_id
        ):
            kept.append((user_id, membership))
    return kept
