"""One partial-state event brought to full state: servers tried in turn.

:class:`EventAttempts` is the engine's inner loop. For one event it asks the
job's current server (the engine's own state fetch first, for the join), fails
over to the next on a remote failure, and when every server has failed backs off
(capped, forever) and starts a new round with a refreshed server list. A leave
or an admin's abort ends it (:class:`Aborted`), also while an attempt is in
flight (:meth:`Wakeups.interruptible`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from synapse.module_api import EventBase

from synapse_partial_state.compat.errors import (
    is_federation_failure,
    is_local_fault,
    is_pull_backoff,
    looks_remote,
)
from synapse_partial_state.compat.resync import ResyncOps
from synapse_partial_state.config import ResyncConfig
from synapse_partial_state.joining import jobs
from synapse_partial_state.joining.fetch import (
    FetchReport,
    StateFetcher,
    StateIncomplete,
)
from synapse_partial_state.joining.jobs import Job, Phase
from synapse_partial_state.joining.keys import KeyPrefetch
from synapse_partial_state.joining.metrics import ResyncMetrics
from synapse_partial_state.joining.wakeups import Interrupted, Wakeups
from synapse_partial_state.joining.writer import Abandoned

logger = logging.getLogger(__name__)

#: While backing off, look this often whether the room was left meanwhile.
CHECK_INTERVAL_MS = 5_000


class Aborted(Exception):
    """The room was left by its last local user (or an admin aborted the job)."""


class _FetchFailed(Exception):
    """The engine's own state fetch failed against one destination."""


class EventAttempts:
    def __init__(
        self,
        config: ResyncConfig,
        ops: ResyncOps,
        metrics: ResyncMetrics,
        fetcher: StateFetcher | None,
        keys: KeyPrefetch,
        wakeups: Wakeups,
        save: Callable[[Job], Awaitable[Job]],
        latest: Callable[[str], Job | None],
        check_still_wanted: Callable[[Job], Awaitable[None]],
    ) -> None:
        self._config = config
        self._ops = ops
        self._metrics = metrics
        self._fetcher = fetcher
        self._keys = keys
        self._wakeups = wakeups
        #: writes a job row (and the engine's copy), returns the job
        self._save = save
        #: the engine's latest copy of a room's job
        self._latest = latest
        #: raises :class:`Aborted` when the room is no longer wanted
        self._check_still_wanted = check_still_wanted

    async def update_event(self, job: Job, event: EventBase) -> Job:
        """De-partial-state one event, trying servers and backing off until it
        succeeds (or the room is abandoned)."""
        room_id = job.room_id
        fetching = job.events_applied == 0 or event.event_id == job.join_event_id
        phase = Phase.FETCHING if fetching else Phase.APPLYING
        if job.phase != phase:
            job = await self._save(job.evolve(self._ops.now_ms(), phase=phase))
        #: (event, server) pairs for which Synapse's pull back-off was cleared
        cleared: set[tuple[str, str]] = set()
        while True:
            destination = job.current_destination
            if destination is None:
                job = await self._wait_for_next_round(job)
                continue
            started = self._ops.now_ms()
            try:
                job = await self._wakeups.interruptible(
                    room_id,
                    functools.partial(self._attempt, job, destination, event, fetching),
                )
            except Interrupted:
                # A leave or an admin's abort while the attempt was in flight.
                job = self._latest(room_id) or job
                await self._check_still_wanted(job)
                continue
            except Exception as e:
                # What the failed attempt stored still counts (the fetch saved
                # its progress as it went).
                job = self._latest(room_id) or job
                if await self._cleared_pull_backoff(event, destination, e, cleared):
                    continue
                if not _is_destination_failure(e):
                    raise
                job = await self._destination_failed(job, destination, e)
                continue
            self._metrics.event_done(phase, (self._ops.now_ms() - started) / 1000)
            remaining = (
                None
                if job.events_remaining is None
                else max(job.events_remaining - 1, 0)
            )
            return job.evolve(
                self._ops.now_ms(),
                events_applied=job.events_applied + 1,
                events_remaining=remaining,
            )

    async def _attempt(
        self,
        job: Job,
        destination: str,
        event: EventBase,
        fetching: bool,
        abandoned: Callable[[], bool],
    ) -> Job:
        """One try at de-partial-stating ``event`` through ``destination``
        (stopping before any write once ``abandoned()``)."""
        if fetching and self._fetcher is not None:
            job = await self._fetch_state(job, destination, event, abandoned)
        if abandoned():
            raise Interrupted()
        await self._ops.update_state_for_partial_state_event(destination, event)
        return job

    async def _cleared_pull_backoff(
        self,
        event: EventBase,
        destination: str,
        error: Exception,
        cleared: set[tuple[str, str]],
    ) -> bool:
        """Whether ``error`` is Synapse's pull back-off for ``event``'s prev
        events, now cleared for another try at ``destination``.

        Synapse failed to pull them recently (often from one server that could
        not help) and would wait hours before trying again (native waits it
        out). Those failures are forgotten once per (event, server), and this
        server tries; if it cannot help either, it fails over like any other
        error."""
        retry_after = is_pull_backoff(error)
        if retry_after is None or (event.event_id, destination) in cleared:
            return False
        cleared.add((event.event_id, destination))
        await self._ops.clear_pull_backoff(event.room_id, event.prev_event_ids())
        logger.info(
            "Resync of %s: %s; asking %s instead of waiting %d s",
            event.room_id,
            error,
            destination,
            retry_after // 1000,
        )
        return True

    async def _fetch_state(
        self,
        job: Job,
        destination: str,
        event: EventBase,
        abandoned: Callable[[], bool],
    ) -> Job:
        """The engine's own bulk fetch of the state before ``event`` (see
        ``fetch.py``), so that Synapse's per-event path finds it all stored."""
        assert self._fetcher is not None
        room_id = job.room_id

        async def keys_ready() -> None:
            await self._keys.wait(room_id)

        counters = {"job": job}

        async def progress(report: FetchReport) -> None:
            if abandoned():
                raise Abandoned(room_id)  # the job row is no longer this attempt's
            counters["job"] = await self._save(
                counters["job"].evolve(
                    self._ops.now_ms(),
                    events_fetched=report.fetched,
                    events_verified=report.verified,
                    events_persisted=report.already_stored + report.persisted,
                    events_remaining=max(report.to_store - report.persisted, 0),
                )
            )

        try:
            report = await self._fetcher.fetch_state_before(
                destination,
                event,
                [d for d in job.destinations if d != destination],
                progress,
                keys_ready,
                abandoned,
            )
        except StateIncomplete:
            raise
        except Exception as e:
            if is_local_fault(e):
                # Our database or signature workers, not the destination: the
                # engine's fault back-off, with no server blamed or skipped.
                raise
            if not is_federation_failure(e):
                logger.warning(
                    "Resync of %s: fetching the state from %s failed",
                    room_id,
                    destination,
                    exc_info=not looks_remote(e),
                )
            raise _FetchFailed(f"{type(e).__name__}: {e}") from e
        job = counters["job"]
        if report is not None:
            self._metrics.state_fetch(
                report.fetched, report.verified, report.persisted, report.stages
            )
            logger.info(
                "Resync of %s: state from %s: %s",
                room_id,
                destination,
                report.describe(),
            )
        return job

    async def _destination_failed(
        self, job: Job, destination: str, error: Exception
    ) -> Job:
        reason = _reason(error)
        self._metrics.failure(reason)
        await self._check_still_wanted(job)
        tried = job.tried + (destination,)
        destinations = await self._refresh_destinations(job)
        nxt = jobs.next_destination(destinations, tried)
        logger.info(
            "Resync of %s: %s failed (%s); %s",
            job.room_id,
            destination,
            reason,
            f"trying {nxt} instead" if nxt else "every known server failed",
        )
        return await self._save(
            job.evolve(
                self._ops.now_ms(),
                tried=tried,
                destinations=destinations,
                current_destination=nxt,
                last_error=f"{destination}: {error}"[:1000],
            )
        )

    async def _wait_for_next_round(self, job: Job) -> Job:
        """Every server failed this round: back off (capped), then start again with
        a refreshed server list. Never gives up."""
        attempts = job.attempts + 1
        delay = jobs.backoff_ms(
            attempts,
            self._config.initial_backoff_seconds,
            self._config.max_backoff_seconds,
        )
        job = await self._save(
            job.evolve(
                self._ops.now_ms(),
                phase=Phase.RETRYING,
                attempts=attempts,
                next_attempt_ts=self._ops.now_ms() + delay,
            )
        )
        logger.warning(
            "Resync of %s: all %d server(s) failed (round %d, last error: %s); "
            "retrying in %.1f s",
            job.room_id,
            len(job.destinations),
            attempts,
            job.last_error,
            delay / 1000,
        )
        wake_at = self._ops.now_ms() + delay
        while True:
            await self._check_still_wanted(job)
            left = wake_at - self._ops.now_ms()
            if left <= 0 or self._wakeups.poked(job.room_id):
                break
            await self._wakeups.sleep(job.room_id, min(left, CHECK_INTERVAL_MS))
        self._wakeups.clear(job.room_id)
        destinations = await self._refresh_destinations(job)
        return await self._save(
            job.evolve(
                self._ops.now_ms(),
                phase=Phase.FETCHING,
                tried=(),
                destinations=destinations,
                current_destination=jobs.next_destination(destinations, ()),
                next_attempt_ts=None,
            )
        )

    async def _refresh_destinations(self, job: Job) -> tuple[str, ...]:
        """Joined-via, then ``/send_join``'s servers, then servers seen since."""
        _, servers = await self._ops.resync_info(job.room_id)
        learned = await self._ops.recent_sender_servers(job.room_id)
        return jobs.order_destinations(
            job.joined_via,
            list(job.destinations) + sorted(servers - set(job.destinations)),
            learned,
            self._ops.server_name,
        )


def _is_destination_failure(error: BaseException) -> bool:
    """Whether ``error`` means "this server could not help" (fail over), as
    opposed to a fault here."""
    return (
        is_pull_backoff(error) is not None
        or is_federation_failure(error)
        or isinstance(error, (StateIncomplete, _FetchFailed))
    )


def _reason(error: BaseException) -> str:
    """A short, low-cardinality reason for metrics and logs."""
    cause = error.__cause__ or error.__context__ or error
    code = getattr(cause, "code", None)
    name = type(cause).__name__
    return f"{name}:{code}" if isinstance(code, int) else name
