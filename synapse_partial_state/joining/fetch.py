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
6. a completeness check: every event of ``/state_ids`` must now be stored, or this
   destination failed (:class:`StateIncomplete`) and the engine tries the next.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

import attr
from synapse.logging.context import make_deferred_yieldable
from synapse.util.async_helpers import concurrently_execute

from synapse_partial_state.joining import verify

if TYPE_CHECKING:
    from synapse.events import EventBase

    from synapse_partial_state._synapse import StateFetchOps

logger = logging.getLogger(__name__)

#: Up to this many missing events are fetched one by one instead of by /state.
FEW = 50
#: Concurrent single-event fetches.
FETCH_CONCURRENCY = 10
#: Other servers asked for an event the destination could not vouch for.
OTHER_SERVERS_PER_EVENT = 5
#: Time allowed for a /state answer: a floor, plus this much per state event
#: (a generous 10x what a stock resident needs), at most native's 10 minutes. A
#: resident that hangs is failed over in minutes, not always ten.
STATE_TIMEOUT_FLOOR_MS = 60_000
STATE_TIMEOUT_PER_EVENT_MS = 5
STATE_TIMEOUT_MAX_MS = 600_000
#: Events per outlier persistence call (progress is reported between calls).
PERSIST_BATCH = 2000
#: Events stored before the planner's statistics are first refreshed (then each
#: time the count doubles; see ``StateFetchOps.refresh_planner_stats``).
ANALYZE_FIRST_AT = 1000


class StateIncomplete(Exception):
    """The destination's state could not be completed: the engine fails it over."""

    def __init__(self, destination: str, missing: int, total: int) -> None:
        super().__init__(
            f"{missing} of {total} state event(s) from {destination} could not be "
            "fetched with valid signatures"
        )
        self.destination = destination
        self.missing = missing


@attr.s(slots=True, auto_attribs=True)
class FetchReport:
    """What one fetch did, for the engine's log line and job counters."""

    state_events: int = 0
    #: Events of the state and its auth chain already stored when this fetch
    #: began (partial state, or stored by an attempt before a restart).
    already_stored: int = 0
    #: Events this fetch had to store.
    to_store: int = 0
    fetched: int = 0
    verified: int = 0
    rechecked: int = 0
    one_by_one: int = 0
    repaired: int = 0
    persisted: int = 0
    members_only: bool = False
    stages: dict[str, float] = attr.Factory(dict)

    def describe(self) -> str:
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in self.stages.items())
        return (
            f"{self.state_events} state events, {self.fetched} fetched"
            f"{' (members only)' if self.members_only else ''}, {self.verified} "
            f"verified in bulk, {self.rechecked} checked one by one, "
            f"{self.one_by_one} fetched one by one ({self.repaired} from other "
            f"servers), {self.persisted} stored ({stages})"
        )


#: Called with the report as it grows: once the events to store are known, then
#: after each batch stored.
Progress = Callable[[FetchReport], Awaitable[None]]
#: Waits (a bounded time) until the signing keys of the room's servers are stored.
KeysReady = Callable[[], Awaitable[None]]


class StateFetcher:
    def __init__(self, ops: StateFetchOps, pool: verify.VerifierPool) -> None:
        self._ops = ops
        self._pool = pool

    async def fetch_state_before(
        self,
        destination: str,
        event: EventBase,
        other_servers: Sequence[str],
        progress: Progress | None = None,
        keys_ready: KeysReady | None = None,
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
            ops.begin_fetch(room_id, missing_prevs)
            try:
                return await self._fetch_state_at(
                    destination,
                    event,
                    missing_prevs,
                    other_servers,
                    progress,
                    keys_ready,
                )
            finally:
                ops.end_fetch(room_id, missing_prevs)
        finally:
            # Stored, or failed: Synapse's own requests for the room's state go
            # ahead (see ``expect``).
            ops.settle(room_id)

    def expect(self, room_id: str) -> None:
        """A resync of ``room_id`` starts: Synapse's own requests for state in
        the room wait until the join's state is fetched (or :meth:`settle`)."""
        self._ops.expect_fetch(room_id)

    def settle(self, room_id: str) -> None:
        self._ops.settle(room_id)

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
        self._ops.forget_state_ids(room_id)

    async def _fetch_state_at(
        self,
        destination: str,
        event: EventBase,
        missing_prevs: list[str],
        other_servers: Sequence[str],
        progress: Progress | None,
        keys_ready: KeysReady | None,
    ) -> FetchReport:
        ops = self._ops
        room_id = event.room_id
        report = FetchReport()
        clock = _Stages(report)
        room_version = await ops.room_version(room_id)

        wanted_state: set[str] = set()
        wanted_auth: set[str] = set()
        for prev in missing_prevs:
            state_ids, auth_ids = await ops.state_ids(destination, room_id, prev)
            wanted_state.update(state_ids)
            wanted_auth.update(auth_ids)
        clock.lap("state_ids")
        _milestone(room_id, "state_ids", f"{len(wanted_state)} state events")
        report.state_events = len(wanted_state)
        required = wanted_state | set(missing_prevs)
        wanted = required | wanted_auth
        missing = wanted - await ops.have_seen(room_id, wanted)
        report.already_stored = len(wanted) - len(missing)
        report.to_store = len(missing)
        if progress is not None:
            await progress(report)
        if not missing:
            return report

        writer = _Writer(ops, room_id, missing, report, progress)
        if len(missing) > FEW:
            for prev in missing_prevs:
                for members_only in (True, False):
                    if not members_only and not (
                        report.members_only and len(writer.outstanding()) > FEW
                    ):
                        break  # only when a members-only answer left real gaps
                    await self._fetch_bulk(
                        destination,
                        room_id,
                        prev,
                        room_version,
                        writer,
                        report,
                        clock,
                        members_only=members_only,
                        keys_ready=keys_ready,
                    )

            _milestone(room_id, "bulk_stored", f"{report.persisted} events stored")
        still = writer.outstanding()
        if still:
            servers = [destination] + [s for s in other_servers if s != destination]
            await self._fetch_one_by_one(still, servers, room_version, writer, report)
            clock.lap("single fetches")
        await writer.flush()
        await writer.settle_stats()
        clock.lap("persist")
        _milestone(room_id, "state_stored", f"{report.persisted} events stored")

        absent = required - await ops.have_seen(room_id, required)
        if absent:
            raise StateIncomplete(destination, len(absent), len(required))
        return report

    async def _fetch_bulk(
        self,
        destination: str,
        room_id: str,
        prev: str,
        room_version: Any,
        writer: _Writer,
        report: FetchReport,
        clock: _Stages,
        members_only: bool = True,
        keys_ready: KeysReady | None = None,
    ) -> None:
        """``/state`` at ``prev``; checked in bulk chunk by chunk, each chunk
        stored while the workers check the next ones."""
        ops = self._ops
        use_workers = self._pool.worth_it(writer.size)
        if use_workers:
            self._pool.warm()  # workers start while the answer downloads
        timeout_ms = min(
            STATE_TIMEOUT_MAX_MS,
            STATE_TIMEOUT_FLOOR_MS + STATE_TIMEOUT_PER_EVENT_MS * writer.size,
        )
        wanted_keys: set[tuple[str, str]] = set()
        v1_ids = _v1_event_ids(room_version)
        restricted = room_version.restricted_join_rule

        def on_pdu(pdu: dict[str, Any]) -> None:
            for server in verify.required_servers(pdu, v1_ids, restricted) or ():
                by_key = pdu.get("signatures", {}).get(server)
                if isinstance(by_key, dict):
                    wanted_keys.update((server, key_id) for key_id in by_key)

        answer = await ops.state_pdus(
            destination, room_id, prev, members_only, timeout_ms, on_pdu
        )
        report.members_only = report.members_only or answer.members_only
        # Auth chain first: it holds the earlier memberships the state's
        # memberships are authorised by, so fewer events wait for theirs.
        pdus = answer.auth_chain + answer.pdus
        del answer
        report.fetched += len(pdus)
        clock.lap("fetch /state")
        _milestone(room_id, "state_fetched", f"{len(pdus)} events")

        if keys_ready is not None:
            await keys_ready()  # the prefetch ran while the state downloaded
            clock.lap("key prefetch wait")
        keys = await ops.signing_keys(wanted_keys)
        per_event = await ops.needs_per_event_checks(room_id)
        chunks = self._pool.verify_chunks(
            room_version.identifier, pdus, keys, use_workers
        )
        try:
            for start, pending in chunks:
                verdicts = await make_deferred_yieldable(pending)
                chunk = pdus[start : start + len(verdicts)]
                accepted, recheck = self._sort_out(
                    destination,
                    room_id,
                    room_version,
                    chunk,
                    verdicts,
                    writer,
                    per_event,
                )
                report.verified += len(accepted)
                clock.lap("verify")
                if recheck:
                    accepted.extend(
                        await self._check_one_by_one(
                            recheck, destination, room_version, writer, report
                        )
                    )
                    clock.lap("per-event checks")
                await writer.add(accepted)
                clock.lap("persist")
        finally:
            for _, pending in chunks:
                if not pending.called:
                    pending.addErrback(lambda _: None)
                    pending.cancel()

    def _sort_out(
        self,
        destination: str,
        room_id: str,
        room_version: Any,
        pdus: Sequence[bytes],
        verdicts: Sequence[tuple[int, str | None]],
        writer: _Writer,
        per_event: bool,
    ) -> tuple[list[EventBase], list[EventBase]]:
        """(events verified in bulk, events for Synapse's per-event check)."""
        accepted: list[EventBase] = []
        recheck: list[EventBase] = []
        for pdu, (verdict, event_id) in zip(pdus, verdicts, strict=True):
            if event_id is None or verdict == verify.INVALID:
                continue
            if not writer.wants(event_id):
                continue  # not wanted, or a duplicate
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
        return accepted, recheck

    async def _check_one_by_one(
        self,
        events: list[EventBase],
        destination: str,
        room_version: Any,
        writer: _Writer,
        report: FetchReport,
    ) -> list[EventBase]:
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
        self,
        event_ids: Collection[str],
        servers: Sequence[str],
        room_version: Any,
        writer: _Writer,
        report: FetchReport,
    ) -> None:
        """Each of ``event_ids`` from the first of ``servers`` that has a good copy
        (the destination first, then a few others)."""
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


class _Writer:
    """Stores fetched events as outliers as they come, each once its auth events
    are stored (Synapse drops an outlier whose auth events it cannot find)."""

    def __init__(
        self,
        ops: StateFetchOps,
        room_id: str,
        missing: set[str],
        report: FetchReport,
        progress: Progress | None,
    ) -> None:
        self._ops = ops
        self._room_id = room_id
        #: wanted and not stored yet
        self._pending = set(missing)
        self.size = len(missing)
        #: fetched and checked, waiting for their auth events
        self._held: dict[str, EventBase] = {}
        self._report = report
        self._progress = progress
        #: refresh the planner's statistics once this many events are stored
        self._next_analyze = ANALYZE_FIRST_AT

    def wants(self, event_id: str) -> bool:
        return event_id in self._pending and event_id not in self._held

    def outstanding(self) -> set[str]:
        """Wanted events not fetched yet."""
        return self._pending - self._held.keys()

    async def add(self, events: list[EventBase]) -> None:
        for event in events:
            if self.wants(event.event_id):
                self._held[event.event_id] = event
        await self._store(self._ready())

    async def flush(self) -> None:
        """Store everything held, ready or not (Synapse drops those whose auth
        events are missing; the completeness check then fails the fetch)."""
        await self._store(self._ready(everything=True))

    async def settle_stats(self) -> None:
        """Once everything is stored: the planner's statistics for what follows
        (Synapse's finish replaces the room's current state with all of it)."""
        if self._report.persisted >= ANALYZE_FIRST_AT:
            await self._refresh_stats()

    async def _refresh_stats(self) -> None:
        if await self._ops.refresh_planner_stats():
            logger.info(
                "Resync of %s: planner statistics refreshed (%d events stored)",
                self._room_id,
                self._report.persisted,
            )

    def _ready(self, everything: bool = False) -> list[EventBase]:
        """Held events whose auth events are stored or ready, auth events first."""
        from synapse.util.iterutils import sorted_topologically

        held = self._held
        deps = {
            event_id: [a for a in event.auth_event_ids() if a in self._pending]
            for event_id, event in held.items()
        }
        ready: list[EventBase] = []
        ok: set[str] = set()
        graph = {k: [d for d in v if d in held] for k, v in deps.items()}
        for event_id in sorted_topologically(held, graph):
            if everything or all(d in ok for d in deps[event_id]):
                ok.add(event_id)
                ready.append(held[event_id])
        return ready

    async def _store(self, events: list[EventBase]) -> None:
        for start in range(0, len(events), PERSIST_BATCH):
            batch = events[start : start + PERSIST_BATCH]
            await self._ops.persist_outliers(self._room_id, batch)
            for event in batch:
                self._pending.discard(event.event_id)
                self._held.pop(event.event_id, None)
            self._report.persisted += len(batch)
            if self._report.persisted >= self._next_analyze:
                # The tables have doubled since the planner last looked.
                await self._refresh_stats()
                self._next_analyze = 2 * self._report.persisted
            if self._progress is not None:
                await self._progress(self._report)


def _milestone(room_id: str, stage: str, detail: str) -> None:
    """A log line the benchmark reads as a stage of the resync."""
    logger.info("Resync of %s: stage=%s (%s)", room_id, stage, detail)


def _v1_event_ids(room_version: Any) -> bool:
    from synapse.api.room_versions import EventFormatVersions

    return bool(room_version.event_format == EventFormatVersions.ROOM_V1_V2)


class _Stages:
    def __init__(self, report: FetchReport) -> None:
        self._report = report
        self._last = time.monotonic()

    def lap(self, stage: str) -> None:
        now = time.monotonic()
        stages = self._report.stages
        stages[stage] = stages.get(stage, 0.0) + now - self._last
        self._last = now
