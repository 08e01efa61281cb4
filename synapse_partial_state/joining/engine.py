"""The resync engine: brings a partial-state room to full state, and never gives up.

Synapse calls :meth:`ResyncEngine.sync_room` (through the compat hook) when a partial
join completes and, at start-up, for every room still in ``partial_state_rooms``.
Each room has one durable job row (``sps_resync_jobs``) saying where it is:

``fetching -> applying -> replaying -> done``, with ``retrying`` whenever
every known server failed (capped exponential back-off, forever) and ``aborted``
when the last local user left or the room was purged.

Per event, Synapse's own ``update_state_for_partial_state_event`` does the work
(fetch the state at the join, re-check auth of every later event against full state,
repoint state groups), so Synapse's tables and caches stay consistent; the engine owns
the policy around it: which server, when to retry, when to stop, and the record.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection

from synapse.module_api import ModuleApi
from synapse.module_api.errors import SynapseError

from synapse_partial_state.compat.resync import ResyncOps
from synapse_partial_state.config import ResyncConfig
from synapse_partial_state.joining import jobs
from synapse_partial_state.joining.attempts import Aborted, EventAttempts
from synapse_partial_state.joining.fetch import StateFetcher
from synapse_partial_state.joining.jobs import Job, Phase
from synapse_partial_state.joining.keys import KeyPrefetch
from synapse_partial_state.joining.metrics import ResyncMetrics
from synapse_partial_state.joining.store import JobStore
from synapse_partial_state.joining.wakeups import Wakeups

logger = logging.getLogger(__name__)

#: Longest wait for Synapse's federation sender before purging an aborted room.
SENDER_WAIT_S = 30


class ResyncEngine:
    def __init__(
        self,
        api: ModuleApi,
        config: ResyncConfig,
        ops: ResyncOps,
        metrics: ResyncMetrics,
        fetcher: StateFetcher | None = None,
    ) -> None:
        self._api = api
        self._fetcher = fetcher
        self._keys = KeyPrefetch(api, ops)
        self._config = config
        self._ops = ops
        self._metrics = metrics
        self._wakeups = Wakeups(ops)
        #: rooms an admin asked to abort
        self._abort_requested: set[str] = set()
        #: aborted rooms not purged, for local members' pending invites, knocks
        #: and kicks (see :meth:`_abort`)
        self._kept: set[str] = set()
        #: called with the room ID once a room is given up and purged
        self._abandon_listeners: list[Callable[[str], Awaitable[None]]] = []
        #: called with the room ID once a room's resync is complete
        self._complete_listeners: list[Callable[[str], Awaitable[None]]] = []
        #: called with the room ID just before a given-up room is purged
        self._before_purge_listeners: list[Callable[[str], Awaitable[None]]] = []
        self._store = JobStore(api)
        #: the latest copy of every job this process runs or ran
        self._jobs: dict[str, Job] = {}
        self._attempts = EventAttempts(
            config,
            ops,
            metrics,
            fetcher,
            self._keys,
            self._wakeups,
            self._save,
            self._jobs.get,
            self._check_still_wanted,
        )

    # -- entry points -----------------------------------------------------------

    async def sync_room(
        self,
        initial_destination: str | None,
        other_destinations: Collection[str],
        room_id: str,
    ) -> None:
        """Resync ``room_id`` until it is complete or aborted. Never raises for
        federation failures: it waits and tries again."""
        if self._fetcher is not None:
            # Before any wait: Synapse handles the events that arrived during the
            # join right now, and would fetch the room's whole state for them.
            self._fetcher.expect_join_state(room_id)
        try:
            await self._sync_room(room_id, initial_destination, other_destinations)
        finally:
            if self._fetcher is not None:
                self._fetcher.release_join_state(room_id)

    async def _sync_room(
        self,
        room_id: str,
        initial_destination: str | None,
        other_destinations: Collection[str],
    ) -> None:
        job: Job | None = None
        faults = 0
        while True:
            try:
                if job is None:
                    job = await self._begin(
                        room_id, initial_destination, other_destinations
                    )
                await self._run_until_over(job)
                return
            except Exception as e:
                # Not a remote server's failure (those fail over inside): a
                # database outage that outlasted Synapse's retries, an error in
                # Synapse's own code or ours. The job stays alive, backs off and
                # goes round again; a leave, an admin's retry or abort still act.
                faults += 1
                job = await self._back_off_after_fault(room_id, job, faults, e)

    async def _begin(
        self,
        room_id: str,
        initial_destination: str | None,
        other_destinations: Collection[str],
    ) -> Job:
        self._kept.discard(room_id)
        job = await self._start_job(room_id, initial_destination, other_destinations)
        self._metrics.started()
        delay = self._config.start_delay_seconds
        if delay > 0 and job.events_persisted == 0 and job.events_applied == 0:
            # Just joined: the joining user's client asks for the room and
            # sends its first message now; the resync's first steps (the
            # state's download and parse, the key prefetch) would hold the
            # reactor and the database under them. An admin's "retry now"
            # ends the wait.
            logger.info(
                "Resync of %s: first request in %.1f s (the joining user's first "
                "requests go first)",
                room_id,
                delay,
            )
            await self._wakeups.sleep(room_id, int(delay * 1000))
        if job.events_applied > 0 and self._fetcher is not None:
            # The join's state is stored already.
            self._fetcher.release_join_state(room_id)
        if job.events_applied == 0:
            # The state at the join will carry members of every server in the
            # room: get their signing keys now, while the state itself downloads.
            self._keys.start(room_id, job.destinations)
        return job

    async def _run_until_over(self, job: Job) -> None:
        """Run ``job`` until the room is complete, or aborted and purged."""
        room_id = job.room_id
        while True:
            try:
                await self._run(job)
                return
            except Aborted as e:
                if await self._abort(room_id, str(e)):
                    return
            # A local user joined again while we were aborting: carry on.
            job = self._jobs[room_id]

    async def _back_off_after_fault(
        self, room_id: str, job: Job | None, faults: int, error: Exception
    ) -> Job | None:
        """Log ``error`` with its traceback, record it on the job (if the
        database takes the write), and sleep the back-off of ``faults`` faults
        in a row, ended early by :meth:`poke`. Returns the job to go on with
        (None: it could not even be started; start it again)."""
        delay = jobs.backoff_ms(
            faults,
            self._config.initial_backoff_seconds,
            self._config.max_backoff_seconds,
        )
        logger.exception(
            "Resync of %s: unexpected error (fault %d in a row); trying again in "
            "%.1f s",
            room_id,
            faults,
            delay / 1000,
        )
        self._metrics.failure(f"internal:{type(error).__name__}")
        job = self._jobs.get(room_id, job)
        if job is not None and not job.phase.final:
            now = self._ops.now_ms()
            job = job.evolve(
                now,
                phase=Phase.RETRYING,
                next_attempt_ts=now + delay,
                last_error=f"internal error: {type(error).__name__}: {error}"[:1000],
            )
            try:
                job = await self._save(job)
            except Exception:
                logger.warning(
                    "Resync of %s: could not record the error either", room_id
                )
        if not self._wakeups.poked(room_id):
            await self._wakeups.sleep(room_id, delay)
        self._wakeups.clear(room_id)
        return job

    def poke(self, room_id: str) -> None:
        """Something changed for ``room_id`` (a local leave, a new server, an admin
        'retry now'): end its back-off sleep so the engine looks again."""
        self._wakeups.poke(room_id)

    def request_abort(self, room_id: str) -> None:
        self._abort_requested.add(room_id)
        self._wakeups.interrupt(room_id)

    def on_local_membership(self, room_id: str, user_id: str, membership: str) -> None:
        """A local user's membership of ``room_id`` changed (any process's
        event, seen as Synapse notifies it). A leave, kick or ban while the room
        resyncs may have been the last local member's: look at once, instead of
        after the request in flight (which may hang at a resident for minutes)."""
        if room_id in self._kept and membership not in ("join", "invite", "knock"):
            # A membership that kept the room went away: purge it now, if
            # nothing else keeps it.
            self._api.run_as_background_process(
                "sps_kept_room", self._abort, room_id, "no local membership left"
            )
            return
        if membership in ("join", "invite", "knock") or not self.is_running(room_id):
            return
        self._api.run_as_background_process(
            "sps_local_leave", self._after_local_leave, room_id
        )

    async def _after_local_leave(self, room_id: str) -> None:
        if await self._ops.local_users_in_room(room_id):
            return
        logger.info(
            "Resync of %s: the last local user left; stopping the attempt in flight",
            room_id,
        )
        self._wakeups.interrupt(room_id)

    def now_ms(self) -> int:
        return self._ops.now_ms()

    async def retry_now(self, room_id: str) -> bool:
        """Admin "retry now": end a running job's back-off, or start a resync for
        a partial-state room that has none running. True if one was started."""
        if self.is_running(room_id):
            self.poke(room_id)
            return False
        if not await self._ops.is_partial_state_room(room_id):
            raise SynapseError(
                404, f"{room_id} is not a partial-state room", "M_NOT_FOUND"
            )
        self._ops.start_resync(room_id)
        return True

    async def abort_now(self, room_id: str) -> None:
        """Admin "abort": give up a partial-state room no local user is in (its
        incomplete copy is purged). The running job stops at its next check, at
        once if it is backing off. Refused while local users are joined: remove
        them first (e.g. with Synapse's delete-room admin API)."""
        if not await self._ops.is_partial_state_room(room_id):
            raise SynapseError(
                404, f"{room_id} is not a partial-state room", "M_NOT_FOUND"
            )
        if await self._ops.local_users_in_room(room_id):
            raise SynapseError(
                409,
                "Local users are still in the room; remove them first "
                "(e.g. with the delete-room admin API)",
                "M_UNKNOWN",
            )
        if self.is_running(room_id):
            self.request_abort(room_id)
            return
        await self._abort(room_id, "aborted by an admin")

    async def list_jobs(self, include_finished: bool) -> list[Job]:
        return await self._store.list(include_finished)

    async def get_job(self, room_id: str) -> Job | None:
        return await self._store.get(room_id)

    def is_running(self, room_id: str) -> bool:
        job = self._jobs.get(room_id)
        return job is not None and not job.phase.final

    # -- the loop -------------------------------------------------------------------

    async def _start_job(
        self,
        room_id: str,
        initial_destination: str | None,
        other_destinations: Collection[str],
    ) -> Job:
        now = self._ops.now_ms()
        existing = await self.get_job(room_id)
        joined_via, servers = await self._ops.resync_info(room_id)
        join_event_id = await self._ops.join_event_id(room_id)
        destinations = jobs.order_destinations(
            initial_destination or joined_via,
            sorted(set(other_destinations) | servers),
            [],
            self._ops.server_name,
        )
        job = jobs.start_or_resume(
            existing,
            room_id,
            now,
            join_event_id,
            initial_destination or joined_via,
            destinations,
        )
        if existing is not None and not existing.phase.final:
            logger.info(
                "Resuming resync of %s (attempts so far: %d, %d state events "
                "stored, %d events brought to full state)",
                room_id,
                job.attempts,
                job.events_persisted,
                job.events_applied,
            )
        else:
            logger.info(
                "Starting resync of %s: %d server(s) to ask, first %s",
                room_id,
                len(job.destinations),
                job.current_destination,
            )
        await self._save(job)
        return job

    async def _run(self, job: Job) -> None:
        room_id = job.room_id
        while True:
            if not await self._ops.is_partial_state_room(room_id):
                # Finished by someone else, or purged under us.
                if await self._ops.room_exists(room_id):
                    await self._finish(job)
                else:
                    await self._tell_abandoned(room_id)
                    await self._mark_aborted(job, "the room was purged")
                return
            await self._check_still_wanted(job)
            batch = await self._ops.partial_state_events_batch(room_id)
            if not batch:
                job = await self._save(
                    job.evolve(self._ops.now_ms(), phase=Phase.REPLAYING)
                )
                logger.info(
                    "Resync of %s: all events have full state; finishing", room_id
                )
                if await self._ops.complete(room_id):
                    if self._fetcher is not None:
                        # The finish wrote the room's whole current state.
                        fetched = (self._jobs.get(room_id) or job).events_fetched
                        await self._fetcher.after_finish(room_id, fetched)
                    await self._finish(job)
                    return
                continue  # new partial-state events raced in
            remaining = await self._ops.count_partial_state_events(room_id)
            job = await self._save(
                job.evolve(self._ops.now_ms(), events_remaining=remaining)
            )
            for event in batch:
                job = await self._attempts.update_event(job, event)

    async def _check_still_wanted(self, job: Job) -> None:
        room_id = job.room_id
        if room_id in self._abort_requested:
            self._abort_requested.discard(room_id)
            raise Aborted("aborted by an admin")
        if not await self._ops.local_users_in_room(room_id):
            raise Aborted("no local user is in the room any more")

    async def _finish(self, job: Job) -> None:
        now = self._ops.now_ms()
        job = await self._save(
            job.evolve(
                now,
                phase=Phase.DONE,
                completed_ts=now,
                events_remaining=0,
                current_destination=None,
                next_attempt_ts=None,
            )
        )
        self._metrics.completed((now - job.created_ts) / 1000)
        if self._fetcher is not None:
            self._fetcher.forget(job.room_id)
        await self._tell(self._complete_listeners, job.room_id)
        logger.info(
            "Resync of %s complete in %.1f s (%d state events stored, %d events "
            "brought to full state, %d failed round(s))",
            job.room_id,
            (now - job.created_ts) / 1000,
            job.events_persisted,
            job.events_applied,
            job.attempts,
        )

    async def _abort(self, room_id: str, why: str) -> bool:
        """Purge the room (see ``ResyncOps.abort``); False if a local user is
        joined again, in which case the resync goes on."""
        logger.info("Aborting resync of %s: %s", room_id, why)
        if await self._ops.is_partial_state_room(room_id):
            kept = jobs.memberships_to_keep(await self._ops.local_memberships(room_id))
            if kept:
                # Not purged: that would take these memberships from their
                # users. Purged once they are gone (:meth:`on_local_membership`).
                self._kept.add(room_id)
                why += "; the room is kept for " + ", ".join(
                    f"{user} ({membership})" for user, membership in kept
                )
            else:
                await self._wait_for_federation_sender(room_id)
                await self._tell(self._before_purge_listeners, room_id)
                if not await self._ops.abort(room_id):
                    logger.info(
                        "Resync of %s goes on: a local user is in the room", room_id
                    )
                    return False
                self._kept.discard(room_id)
                await self._tell_abandoned(room_id)
        job = self._jobs.get(room_id) or await self.get_job(room_id)
        if job is not None:
            await self._mark_aborted(job, why)
        return True

    def add_abandon_listener(
        self,
        listener: Callable[[str], Awaitable[None]],
        before_purge: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """Call ``listener(room_id)`` once a room is given up and purged, and
        ``before_purge(room_id)`` just before the engine purges it."""
        self._abandon_listeners.append(listener)
        if before_purge is not None:
            self._before_purge_listeners.append(before_purge)

    def add_complete_listener(self, listener: Callable[[str], Awaitable[None]]) -> None:
        """Call ``listener(room_id)`` once a room's resync is complete."""
        self._complete_listeners.append(listener)

    async def _tell_abandoned(self, room_id: str) -> None:
        await self._tell(self._abandon_listeners, room_id)

    @staticmethod
    async def _tell(
        listeners: list[Callable[[str], Awaitable[None]]], room_id: str
    ) -> None:
        for listener in listeners:
            try:
                await listener(room_id)
            except Exception:
                logger.exception("Room listener failed for %s", room_id)

    async def _wait_for_federation_sender(self, room_id: str) -> None:
        """Until Synapse's federation sender has handed the local users' last
        membership events (the leave) to the room's servers, at most
        :data:`SENDER_WAIT_S`: purging before makes the sender fail, and the
        leave never reaches them."""
        deadline = self._ops.now_ms() + SENDER_WAIT_S * 1000
        while not await self._ops.federation_sender_is_past(room_id):
            if self._ops.now_ms() >= deadline:
                logger.warning(
                    "Resync of %s: the federation sender has not sent the last "
                    "local membership after %d s; purging anyway",
                    room_id,
                    SENDER_WAIT_S,
                )
                return
            await self._wakeups.sleep(room_id, 100)

    async def _mark_aborted(self, job: Job, why: str) -> None:
        now = self._ops.now_ms()
        await self._save(
            job.evolve(
                now,
                phase=Phase.ABORTED,
                completed_ts=now,
                last_error=why,
                current_destination=None,
                next_attempt_ts=None,
            )
        )
        self._metrics.aborted()
        if self._fetcher is not None:
            self._fetcher.forget(job.room_id)
        logger.info("Resync of %s aborted: %s", job.room_id, why)

    async def _save(self, job: Job) -> Job:
        previous = self._jobs.get(job.room_id)
        self._jobs[job.room_id] = job
        self._metrics.set_phase(previous.phase if previous else None, job.phase)
        await self._store.save(job)
        return job
