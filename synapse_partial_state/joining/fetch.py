"""The engine's own fetch of the state at a partial join.

Stock Synapse de-partial-states the join event by asking for ``/state_ids`` and
``/state`` before the join's prev event, checking each event's signatures on the
reactor thread one by one, and persisting what passed. What failed the check is
silently left out: a resident that serves forged copies of its own users' events
leaves the room "complete" with members missing (stock's "missing state at that
event is a warning, not a blocker").

:class:`StateFetcher` runs first, for the same destination and the same prev
events, and leaves Synapse nothing to fetch:

1. ``/state_ids`` (remembered, so Synapse's own request reuses it);
2. ``/state`` for what is not stored yet, members only when the resident offers
   it (MSC2775, unstable; a stock resident answers in full);
3. signatures and hashes of the whole answer in bulk, in worker processes
   (:mod:`.verify`); events the bulk check cannot vouch for go through Synapse's
   own per-event check, which asks the sender's server for a genuine copy;
4. what is still missing, one by one from the other servers in the room;
5. Synapse's own auth-and-persist of outliers, in large batches;
6. a completeness check: every event of ``/state_ids`` must now be stored, and not
   as rejected, or this destination failed (:class:`StateIncomplete`) and the
   engine tries the next.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

import attr
from synapse.module_api import make_deferred_yieldable

from synapse_partial_state.compat.runtime import concurrently_execute
from synapse_partial_state.compat.state_fetch import uses_v1_event_ids
from synapse_partial_state.joining import verify
from synapse_partial_state.joining.inflight import InflightFetches, StateIds
from synapse_partial_state.joining.state_parser import StatePdusParser
from synapse_partial_state.joining.writer import (
    ANALYZE_FIRST_AT,
    FetchReport,
    OutlierWriter,
    Progress,
)

if TYPE_CHECKING:
    from synapse.events import EventBase
    from twisted.internet import defer

    from synapse_partial_state.compat.state_fetch import StateFetchOps

logger = logging.getLogger(__name__)

#: Up to this many missing events are fetched one by one instead of by /state.
SINGLE_FETCH_MAX = 50
#: Events the bulk check runs ahead of the store (a few of the bulk writer's
#: transactions).
CHECK_AHEAD = 4000
#: Concurrent single-event fetches.
FETCH_CONCURRENCY = 10
#: A store of at least this many events is followed by a release of the freed
#: memory to the system (see ``compat/memory.py``).
RELEASE_MIN_EVENTS = 10_000
#: Other servers asked for an event the destination could not vouch for.
OTHER_SERVERS_PER_EVENT = 5
#: Time allowed for a /state answer: a floor, plus this much per state event
#: (a generous 10x what a stock resident needs), at most native's 10 minutes. A
#: resident that hangs is failed over in minutes, not always ten.
STATE_TIMEOUT_FLOOR_MS = 60_000
STATE_TIMEOUT_PER_EVENT_MS = 5
STATE_TIMEOUT_MAX_MS = 600_000


class StateIncomplete(Exception):
    """The destination's state could not be completed: the engine fails it over."""

    def __init__(
        self, destination: str, missing: int, total: int, rejected: int = 0
    ) -> None:
        super().__init__(
            f"{missing} of {total} state event(s) from {destination} could not be "
            "fetched with valid signatures"
            + (f" ({rejected} of them stored as rejected)" if rejected else "")
        )
        self.destination = destination
        self.missing = missing


#: Waits (a bounded time) until the signing keys of the room's servers are stored.
KeysReady = Callable[[], Awaitable[None]]


class StateFetcher:
    def __init__(
        self,
        ops: StateFetchOps,
        pool: verify.VerifierPool,
        inflight: InflightFetches,
    ) -> None:
        self._ops = ops
        self._pool = pool
        self._inflight = inflight

    async def fetch_state_before(
        self,
        destination: str,
        event: EventBase,
        other_servers: Sequence[str],
        progress: Progress | None = None,
        keys_ready: KeysReady | None = None,
        abandoned: Callable[[], bool] = lambda: False,
    ) -> FetchReport | None:
        """Store, as outliers, the full state before ``event`` (at each of its prev
        events that is not stored), from ``destination``. None when every prev
        event is local (Synapse computes the state itself). Raises
        :class:`StateIncomplete`, or Synapse's federation errors, when the
        destination fails."""
        ops = self._ops
        room_id = event.room_id
        prevs = list(event.prev_event_ids())
        # As Synapse decides: a prev event stored only as an outlier (e.g. by an
        # earlier attempt of ours) still has no state here.
        try:
            seen = await ops.in_timeline(prevs)
            missing_prevs = [p for p in prevs if p not in seen]
            if not missing_prevs:
                return None
            self._inflight.begin(room_id, missing_prevs)
            try:
                return await self._fetch_state_at(
                    destination,
                    event,
                    missing_prevs,
                    other_servers,
                    progress,
                    keys_ready,
                    abandoned,
                )
            finally:
                self._inflight.end(room_id, missing_prevs)
        finally:
            # Stored, or failed: Synapse's own requests for the room's state go
            # ahead (see ``expect_join_state``).
            self._inflight.release_join_state(room_id)

    def expect_join_state(self, room_id: str) -> None:
        """A resync of ``room_id`` starts: Synapse's own requests for state in
        the room wait until the join's state is fetched (or
        :meth:`release_join_state`)."""
        self._inflight.expect_join_state(room_id)

    def release_join_state(self, room_id: str) -> None:
        self._inflight.release_join_state(room_id)

    async def after_finish(self, room_id: str, fetched: int) -> None:
        """Synapse's finish has written the room's whole current state (as many
        rows as state events): refresh the planner's statistics for what
        follows (room summaries, member lists, our resident answers)."""
        if fetched >= ANALYZE_FIRST_AT and await self._ops.refresh_planner_stats():
            logger.info(
                "Resync of %s: planner statistics refreshed after the finish",
                room_id,
            )

    def forget(self, room_id: str) -> None:
        """The room's resync is over: drop what was kept for Synapse to reuse."""
        self._inflight.forget(room_id)

    async def _fetch_state_at(
        self,
        destination: str,
        event: EventBase,
        missing_prevs: list[str],
        other_servers: Sequence[str],
        progress: Progress | None,
        keys_ready: KeysReady | None,
        abandoned: Callable[[], bool],
    ) -> FetchReport:
        ops = self._ops
        room_id = event.room_id
        report = FetchReport()
        timer = _StageTimer(report)
        required, wanted, answers = await self._wanted(
            destination, room_id, missing_prevs, report
        )
        timer.lap("state_ids")
        missing = wanted - await ops.have_seen(room_id, wanted)
        report.already_stored = len(wanted) - len(missing)
        report.to_store = len(missing)
        if progress is not None:
            await progress(report)
        if not missing:
            self._hand_over(room_id, answers)
            return report

        attempt = _Attempt(
            destination=destination,
            room_id=room_id,
            room_version=await ops.room_version(room_id),
            writer=OutlierWriter(ops, room_id, missing, report, progress, abandoned),
            report=report,
            timer=timer,
            keys_ready=keys_ready,
        )
        if len(missing) > SINGLE_FETCH_MAX:
            await self._fetch_in_bulk(attempt, missing_prevs)
        still = attempt.writer.outstanding()
        if still:
            servers = [destination] + [s for s in other_servers if s != destination]
            self._inflight.local_work(room_id, False)
            await self._fetch_one_by_one(attempt, still, servers)
            self._inflight.local_work(room_id, True)
            timer.lap("single fetches")
        await attempt.writer.flush()
        await attempt.writer.refresh_stats_if_big()
        timer.lap("persist")
        _milestone(room_id, "state_stored", f"{report.persisted} events stored")
        if report.persisted >= RELEASE_MIN_EVENTS:
            # What storing freed (the answer's JSON, the events built from it,
            # their rows) goes back to the system before the finish allocates
            # anew: it was the process's peak.
            await self._ops.release_free_memory(room_id, "after storing the state")

        await self._check_complete(attempt, required, missing_prevs)
        self._hand_over(room_id, answers)
        return report

    def _hand_over(self, room_id: str, answers: dict[str, StateIds]) -> None:
        """``/state_ids`` answers whose every event is now stored, for Synapse's
        own requests for the same state (see :mod:`.inflight`). Only checked
        answers: one that failed the completeness check is never reused."""
        for prev, answer in answers.items():
            self._inflight.remember(room_id, prev, answer)

    async def _check_complete(
        self, attempt: _Attempt, required: set[str], missing_prevs: list[str]
    ) -> None:
        """Raise :class:`StateIncomplete` unless every event of ``required`` is
        stored: the state events and not as rejected (a rejected event is not
        part of the state it was listed in), the prev events rejected or not (a
        rejected prev event is part of the room's graph all the same, and
        Synapse takes the state after it as the state before it).

        Events stored as rejected are not fetched again (the events to fetch
        are those not stored at all: fetching them again would change nothing),
        so an attempt that finds nothing to fetch goes ahead without this
        check."""
        ops, room_id = self._ops, attempt.room_id
        prevs = set(missing_prevs)
        state = required - prevs
        absent = state - await ops.stored_not_rejected(state)
        rejected = len(await ops.have_seen(room_id, absent)) if absent else 0
        absent |= prevs - await ops.have_seen(room_id, prevs)
        if absent:
            raise StateIncomplete(
                attempt.destination, len(absent), len(required), rejected
            )

    async def _wanted(
        self,
        destination: str,
        room_id: str,
        missing_prevs: list[str],
        report: FetchReport,
    ) -> tuple[set[str], set[str], dict[str, StateIds]]:
        """``/state_ids`` at each missing prev event: (the state and the prev
        events, which must all be stored in the end; those and the auth chain,
        which should be; the answers by prev event)."""
        wanted_state: set[str] = set()
        wanted_auth: set[str] = set()
        answers: dict[str, StateIds] = {}
        for prev in missing_prevs:
            state_ids, auth_ids = await self._ops.state_ids(destination, room_id, prev)
            answers[prev] = (state_ids, auth_ids)
            wanted_state.update(state_ids)
            wanted_auth.update(auth_ids)
        _milestone(room_id, "state_ids", f"{len(wanted_state)} state events")
        report.state_events = len(wanted_state)
        required = wanted_state | set(missing_prevs)
        return required, required | wanted_auth, answers

    async def _fetch_in_bulk(self, attempt: _Attempt, missing_prevs: list[str]) -> None:
        """``/state`` at each missing prev event: members only first, and in full
        only when a members-only answer left real gaps."""
        for prev in missing_prevs:
            for members_only in (True, False):
                if not members_only and not (
                    attempt.report.members_only
                    and len(attempt.writer.outstanding()) > SINGLE_FETCH_MAX
                ):
                    break
                pdus, keys = await self._download(attempt, prev, members_only)
                await self._check_and_store(attempt, pdus, keys)
        _milestone(
            attempt.room_id, "bulk_stored", f"{attempt.report.persisted} events stored"
        )

    async def _download(
        self, attempt: _Attempt, prev: str, members_only: bool
    ) -> tuple[list[bytes], set[tuple[str, str]]]:
        """``/state`` at ``prev``: its pdus, auth chain first (it holds the earlier
        memberships the state's memberships are authorised by, so fewer events
        wait for theirs), and the signing keys checking them may use."""
        writer, report = attempt.writer, attempt.report
        if self._pool.worth_it(writer.size):
            self._pool.warm()  # workers start while the answer downloads
        timeout_ms = min(
            STATE_TIMEOUT_MAX_MS,
            STATE_TIMEOUT_FLOOR_MS + STATE_TIMEOUT_PER_EVENT_MS * writer.size,
        )
        wanted_keys: set[tuple[str, str]] = set()
        v1_ids = uses_v1_event_ids(attempt.room_version)
        restricted = attempt.room_version.restricted_join_rule

        def on_pdu(pdu: dict[str, Any]) -> None:
            wanted_keys.update(verify.key_ids_needed(pdu, v1_ids, restricted))

        self._inflight.local_work(attempt.room_id, False)
        answer = await self._ops.state_pdus(
            attempt.destination,
            attempt.room_id,
            prev,
            members_only,
            timeout_ms,
            StatePdusParser(on_pdu, v1_ids),
        )
        # Only checking and storing left: Synapse's own requests for the room's
        # state now wait for it rather than download it again (see .inflight).
        self._inflight.local_work(attempt.room_id, True)
        if answer.dropped:
            logger.warning(
                "Resync of %s: %d item(s) of the /state answer from %s left out: "
                "not events (fields missing or of the wrong type), bigger than "
                "Synapse allows, or beyond the size of the answer",
                attempt.room_id,
                answer.dropped,
                attempt.destination,
            )
        report.members_only = report.members_only or answer.members_only
        pdus = answer.auth_chain + answer.pdus
        del answer
        report.fetched += len(pdus)
        attempt.timer.lap("fetch /state")
        _milestone(attempt.room_id, "state_fetched", f"{len(pdus)} events")
        return pdus, wanted_keys

    async def _check_and_store(
        self, attempt: _Attempt, pdus: list[bytes], wanted_keys: set[tuple[str, str]]
    ) -> None:
        """Check ``pdus`` in bulk chunk by chunk, each chunk stored while the
        workers check the next ones."""
        ops, timer = self._ops, attempt.timer
        if attempt.keys_ready is not None:
            await attempt.keys_ready()  # the prefetch ran while the state downloaded
            timer.lap("key prefetch wait")
        keys = await ops.signing_keys(wanted_keys)
        per_event = await ops.needs_per_event_checks(attempt.room_id)
        use_workers = self._pool.worth_it(attempt.writer.size)
        chunks: collections.deque[tuple[int, defer.Deferred[list[Any]]]] = (
            collections.deque()
        )
        submitted = 0

        def check_ahead(until: int) -> None:
            """Submit the pdus up to ``until`` for checking: the check runs at
            most :data:`CHECK_AHEAD` events ahead of the store, as the events
            it builds wait in memory until stored (the whole state at 100,000
            members, ~250 MiB, when it ran ahead unbounded)."""
            nonlocal submitted
            end = min(until, len(pdus))
            if end <= submitted:
                return
            for start, pending in self._pool.verify_chunks(
                attempt.room_version.identifier,
                pdus[submitted:end],
                keys,
                use_workers,
                build_events=True,
            ):
                chunks.append((submitted + start, pending))
            submitted = end

        check_ahead(CHECK_AHEAD)
        try:
            while chunks:
                start, pending = chunks.popleft()
                verdicts = await make_deferred_yieldable(pending)
                end = start + len(verdicts)
                check_ahead(end + CHECK_AHEAD)
                chunk = pdus[start:end]
                pdus[start:end] = [b""] * len(chunk)  # the raw answer goes too
                accepted, recheck = self._triage(attempt, chunk, verdicts, per_event)
                del chunk
                attempt.report.verified += len(accepted)
                timer.lap("verify")
                if recheck:
                    accepted.extend(await self._check_one_by_one(attempt, recheck))
                    timer.lap("per-event checks")
                await attempt.writer.add(accepted)
                timer.lap("persist")
        finally:
            for _, pending in chunks:
                if not pending.called:
                    pending.addErrback(lambda _: None)
                    pending.cancel()

    def _triage(
        self,
        attempt: _Attempt,
        pdus: Sequence[bytes],
        verdicts: Sequence[tuple[int, str | None, EventBase | None]],
        per_event: bool,
    ) -> tuple[list[EventBase], list[EventBase]]:
        """(events verified in bulk, events for Synapse's per-event check).
        Each verdict comes with the event the check built (in its thread, or
        from a worker process's JSON); where it did not, the event is built
        here."""
        destination, room_id = attempt.destination, attempt.room_id
        room_version, writer = attempt.room_version, attempt.writer
        accepted: list[EventBase] = []
        recheck: list[EventBase] = []
        invalid = 0
        for pdu, (verdict, event_id, built) in zip(pdus, verdicts, strict=True):
            if event_id is None or verdict == verify.INVALID:
                invalid += 1
                continue
            if not writer.wants(event_id):
                continue  # not wanted, or a duplicate
            if built is not None:
                event = built
            else:
                try:
                    event = self._ops.event_from_pdu(pdu, room_version)
                except Exception as e:
                    logger.info("Ignoring a bad pdu from %s: %s", destination, e)
                    continue
            if event.room_id != room_id or event.event_id != event_id:
                continue
            if verdict == verify.OK and not per_event:
                accepted.append(event)
            else:
                recheck.append(event)
        if invalid:
            logger.info(
                "Ignoring %d pdu(s) from %s that are not valid events",
                invalid,
                destination,
            )
        return accepted, recheck

    async def _check_one_by_one(
        self, attempt: _Attempt, events: list[EventBase]
    ) -> list[EventBase]:
        destination, room_version = attempt.destination, attempt.room_version
        writer, report = attempt.writer, attempt.report
        logger.info(
            "Checking %d event(s) from %s one by one (signature, hash or key the "
            "bulk check could not settle)",
            len(events),
            destination,
        )
        good: list[EventBase] = []

        async def check(event: EventBase) -> None:
            checked = await self._ops.check_event(event, destination, room_version)
            if checked is not None and writer.wants(checked.event_id):
                good.append(checked)
                report.rechecked += 1

        await concurrently_execute(check, events, FETCH_CONCURRENCY)
        return good

    async def _fetch_one_by_one(
        self, attempt: _Attempt, event_ids: Collection[str], servers: Sequence[str]
    ) -> None:
        """Each of ``event_ids`` from the first of ``servers`` that has a good copy
        (the destination first, then a few others)."""
        room_version, writer, report = (
            attempt.room_version,
            attempt.writer,
            attempt.report,
        )
        candidates = list(servers[: OTHER_SERVERS_PER_EVENT + 1])
        fetched: list[EventBase] = []

        async def one(event_id: str) -> None:
            pulled = await self._ops.fetch_event(candidates, event_id, room_version)
            if pulled is None:
                return
            event, origin = pulled
            if writer.wants(event.event_id):
                fetched.append(event)
                report.one_by_one += 1
                if origin != candidates[0]:
                    report.repaired += 1

        await concurrently_execute(one, list(event_ids), FETCH_CONCURRENCY)
        await writer.add(fetched)


@attr.s(slots=True, auto_attribs=True, frozen=True)
class _Attempt:
    """One fetch of the state before an event from one destination."""

    destination: str
    room_id: str
    room_version: Any
    writer: OutlierWriter
    report: FetchReport
    timer: _StageTimer
    keys_ready: KeysReady | None


def _milestone(room_id: str, stage: str, detail: str) -> None:
    """A log line the benchmark reads as a stage of the resync."""
    logger.info("Resync of %s: stage=%s (%s)", room_id, stage, detail)


class _StageTimer:
    def __init__(self, report: FetchReport) -> None:
        self._report = report
        self._last = time.monotonic()

    def lap(self, stage: str) -> None:
        now = time.monotonic()
        stages = self._report.stages
        stages[stage] = stages.get(stage, 0.0) + now - self._last
        self._last = now
