"""The bulk outlier writer: the state at a join stored as outliers in a few large
transactions instead of Synapse's one hundred events per transaction.

Synapse stores a fetched state through
``FederationEventHandler._auth_and_persist_outliers`` (1.163.2): it auths each
event against its own auth events, then hands them in batches of 1,000 to the
event persistence queue, which writes them 100 per database transaction
(``EventsPersistenceStorageController._persist_event_batch``: a chain cover
transaction, a stream-ordering allocation and the ``persist_events``
transaction each time). Profiled at 10,000 members, the time goes to those
transactions' fixed costs (commits: a WAL or SQLite fsync each, the chain
cover's look-ups, the id generator's round trips) while Python's one thread and
the database mostly wait for each other.

This writer keeps every verdict and every row Synapse's: the same auth calls
(:meth:`BulkOutlierWriter.auth_outliers`, as ``_auth_and_persist_outliers``),
then the same persistence functions, run through the room's own persistence
queue (one transaction per room at a time, as Synapse), but on chunks of
:data:`BULK_CHUNK` events: ``calculate_chain_cover_index_for_events`` once per
chunk and ``_persist_events_and_state_updates`` with backfill (negative) stream
orderings from Synapse's own id generator, as Synapse does for outliers. So
caches (the event cache, ``have_seen_event``), cache invalidation and the
backfill replication stream behave as with Synapse's path; so does the
notifier (Synapse notifies only the replication stream for outliers persisted
as backfilled, which this does too). On PostgreSQL the per-event tables' rows
of these transactions go with ``COPY`` instead of ``INSERT ... VALUES``
(:mod:`.copy`: the same rows; about half the client and server CPU in a
100,000-event measurement).

Tables written for such events (``PersistEventsStore._persist_events_txn``,
1.163.2, backfilled outliers): ``events``, ``event_json``, ``state_events``,
``redactions`` (redaction events; ``have_censored`` of redactions of an
unredacted event), ``event_auth``, ``event_auth_chains``,
``event_auth_chain_links`` (the chain cover), ``event_auth_chain_to_calculate``
(never for outliers with a chain-cover room), ``rejections``, ``event_edges``
(every event's prev events, outliers included), ``event_relations``,
``event_search`` (name, topic, message), ``room_memberships`` (members),
``room_retention``, ``event_labels``, ``event_expiry``, ``room_depth`` (its
minimum depth, with 0 for outliers, as Synapse), ``event_push_actions`` (from
the staging table: none for remote outliers), ``event_txn_id_device_id``
(local events with a transaction id only); not for outliers:
``event_backward_extremities``, ``local_current_membership`` (backfilled),
forward extremities and current state. ``_update_outliers_txn`` leaves events
already stored as they are (outliers stay outliers: these are outliers too).
The differential test (``tests/blackbox/test_bulk_outliers.py``) compares the
per-event tables among these.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import attr
from synapse.storage.controllers.persist_events import _PersistEventsTask

from synapse_partial_state.compat.bulk.copy import COPIED, copying, install_copy
from synapse_partial_state.compat.bulk.gate import BulkGate
from synapse_partial_state.compat.patching import wrap_instance_method

if TYPE_CHECKING:
    from synapse.events import EventBase
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

#: Events per persistence transaction (Synapse: 100).
BULK_CHUNK = 2000
#: Events authed between two yields to the reactor (as Synapse: 1,000).
YIELD_EVERY = 1000
#: A bulk task's ``backfilled``: truthy, and unequal to ``True``, so that the
#: backfilled task queued just before it (events received meanwhile, pulled by
#: Synapse) does not take its events in (``_PersistEventsTask.try_merge``
#: merges tasks whose ``backfilled`` are equal); only :meth:`_persist_bulk`
#: reads it.
BULK_BACKFILLED: Any = object()


@attr.s(auto_attribs=True, slots=True)
class BulkOutliersTask(_PersistEventsTask):
    """A batch of outliers for the room's persistence queue, written by
    :meth:`BulkOutlierWriter._persist_bulk` in large chunks.

    Later tasks are not merged into it, and it is not merged into the task
    queued before it (its ``backfilled`` is :data:`BULK_BACKFILLED`): merged,
    its events were written by Synapse's own batch, 100 per transaction
    without ``COPY`` (same rows, several times slower: seen in 4 of 9 chunks
    of a 10,000-member resync under traffic)."""

    name: ClassVar[str] = "sps_bulk_outliers"

    def try_merge(self, task: Any) -> bool:
        return False


class BulkOutlierWriter:
    """Auths and stores outliers as ``_auth_and_persist_outliers`` does, in
    chunks of :data:`BULK_CHUNK` events per transaction."""

    #: events per transaction
    chunk = BULK_CHUNK

    def __init__(self, hs: HomeServer) -> None:
        self._hs = hs
        self._store: Any = hs.get_datastores().main
        controllers = hs.get_storage_controllers()
        self._storage_controllers = controllers
        self._persistence: Any = controllers.persistence
        self._handler: Any = hs.get_federation_event_handler()
        self._clock = hs.get_clock()
        self._instance_name = hs.get_instance_name()
        self._shards = hs.config.worker.events_shard_config
        #: first event ID of each chunk being written (its transaction copies)
        self._copy_chunks: set[str] = set()
        if self._persistence is not None:
            self._install()

    def _install(self) -> None:
        persistence = self._persistence

        def wrap(native: Any) -> Any:
            async def _persist_event_batch(room_id: str, task: Any) -> Any:
                if isinstance(task, BulkOutliersTask):
                    return await self._persist_bulk(room_id, task)
                return await native(room_id, task)

            return _persist_event_batch

        wrap_instance_method(
            persistence,
            "_persist_event_batch",
            wrap,
            "synapse.storage.controllers.persist_events."
            "EventsPersistenceStorageController._persist_event_batch",
            "write the resync's outliers in chunks of 2,000 events per "
            "transaction (Synapse's own functions; other batches unchanged)",
        )
        chunks = self._copy_chunks

        def wrap_txn(native: Any) -> Any:
            def _persist_events_txn(txn: Any, **kw: Any) -> Any:
                events = kw.get("events_and_contexts") or ()
                if events and events[0][0].event_id in chunks:
                    with copying():
                        return native(txn, **kw)
                return native(txn, **kw)

            return _persist_events_txn

        install_copy()
        wrap_instance_method(
            persistence.persist_events_store,
            "_persist_events_txn",
            wrap_txn,
            "synapse.storage.databases.main.events.PersistEventsStore."
            "_persist_events_txn",
            "the bulk outlier writer's transactions insert the per-event "
            "tables' rows with COPY on PostgreSQL (see compat/bulk/copy.py)",
        )

    def persists_here(self, room_id: str) -> bool:
        """Whether this process persists the room's events (else Synapse's path
        sends them to the event persister over replication)."""
        return self._persistence is not None and (
            self._shards.get_instance(room_id) == self._instance_name
        )

    async def persist_outliers(self, room_id: str, events: Iterable[EventBase]) -> None:
        """``_auth_and_persist_outliers(room_id, events)``, stored in bulk."""
        started = time.monotonic()
        to_persist = await self.auth_outliers(room_id, events)
        if not to_persist:
            return
        authed = time.monotonic()
        copied = COPIED["rows"]
        replaced = await self._persistence._event_persist_queue.add_to_queue(
            room_id,
            BulkOutliersTask(
                events_and_contexts=to_persist, backfilled=BULK_BACKFILLED
            ),
        )
        logger.info(
            "Stored %d outliers of %s in bulk: auth %.3f s, write %.3f s "
            "(%d rows copied)",
            len(to_persist),
            room_id,
            authed - started,
            time.monotonic() - authed,
            COPIED["rows"] - copied,
        )
        # As persist_events_and_notify(backfilled=True): the workers are told,
        # clients are not (backfilled); ephemeral messages get their expiry.
        self._hs.get_notifier().notify_replication()
        if self._handler._ephemeral_messages_enabled:
            for event, _ in to_persist:
                if event.event_id not in replaced:
                    self._handler._message_handler.maybe_schedule_expiry(event)

    async def auth_outliers(
        self, room_id: str, events: Iterable[EventBase]
    ) -> list[tuple[EventBase, Any]]:
        """The events to persist with their contexts, as
        ``_auth_and_persist_outliers`` (1.163.2) decides them: events already
        stored skipped; auth events first; an event whose auth event is found
        neither in the batch nor stored is dropped (and so are events relying on
        it); the auth checks (``validate_event_for_room_version``,
        ``check_state_independent_auth_rules`` with the batch as batched auth
        events, ``check_state_dependent_auth_rules``) reject with
        ``AUTH_ERROR``; an oversized event is rejected, an unpersistable one
        raises."""
        from synapse.api.constants import RejectedReason
        from synapse.api.errors import AuthError, EventSizeError
        from synapse.event_auth import (
            check_state_dependent_auth_rules,
            check_state_independent_auth_rules,
            validate_event_for_room_version,
        )
        from synapse.events.snapshot import EventContext
        from synapse.storage.databases.main.events_worker import EventRedactBehaviour
        from synapse.util.iterutils import sorted_topologically

        event_map = {event.event_id: event for event in events}
        seen = await self._store.have_seen_events(room_id, event_map.keys())
        for event_id in seen:
            event_map.pop(event_id, None)

        auth_graph = {
            ev.event_id: [a for a in ev.auth_event_ids() if a in event_map]
            for ev in event_map.values()
        }
        ordered = [event_map[e] for e in sorted_topologically(event_map, auth_graph)]

        auth_event_ids = {a for ev in ordered for a in ev.auth_event_ids()}
        auth_map: dict[str, EventBase] = {
            ev.event_id: ev for ev in ordered if ev.event_id in auth_event_ids
        }
        missing = auth_event_ids.difference(auth_map)
        if missing:
            auth_map.update(
                await self._store.get_events(
                    missing,
                    allow_rejected=True,
                    redact_behaviour=EventRedactBehaviour.as_is,
                )
            )

        result: list[tuple[EventBase, Any]] = []
        for i, event in enumerate(ordered):
            auth = []
            for auth_event_id in event.auth_event_ids():
                ae = auth_map.get(auth_event_id)
                if not ae:
                    logger.warning(
                        "Dropping event %s, which relies on auth_event %s, which "
                        "could not be found",
                        event,
                        auth_event_id,
                    )
                    auth_map.pop(event.event_id, None)
                    break
                auth.append(ae)
            else:
                event.internal_metadata.outlier = True
                context = EventContext.for_outlier(self._storage_controllers)
                try:
                    validate_event_for_room_version(event)
                    await check_state_independent_auth_rules(
                        self._store, event, batched_auth_events=auth_map
                    )
                    check_state_dependent_auth_rules(event, auth)
                except AuthError as e:
                    logger.warning("Rejecting %r because %s", event, e)
                    context.rejected = RejectedReason.AUTH_ERROR
                except EventSizeError as e:
                    if e.unpersistable:
                        raise
                    logger.warning("While validating received event %r: %s", event, e)
                    context.rejected = RejectedReason.OVERSIZED_EVENT
                result.append((event, context))
            if (i + 1) % YIELD_EVERY == 0:
                await self._clock.sleep(_zero_duration())
        return result

    async def _persist_bulk(self, room_id: str, task: BulkOutliersTask) -> dict:
        """``_persist_event_batch`` for backfilled events (no forward
        extremities, no current state), in chunks of :data:`BULK_CHUNK`."""
        persistence = self._persistence
        events_and_contexts = task.events_and_contexts
        replaced = await persistence.main_store.get_already_persisted_events(
            event for event, _ in events_and_contexts
        )
        if replaced:
            events_and_contexts = [
                (e, ctx) for e, ctx in events_and_contexts if e.event_id not in replaced
            ]
        events_store = persistence.persist_events_store
        for start in range(0, len(events_and_contexts), BULK_CHUNK):
            chunk = events_and_contexts[start : start + BULK_CHUNK]
            links = await events_store.calculate_chain_cover_index_for_events(
                room_id, [e for e, _ in chunk]
            )
            first = chunk[0][0].event_id
            self._copy_chunks.add(first)
            try:
                async with (
                    persistence._state_deletion_store.persisting_state_group_references(
                        chunk
                    )
                ):
                    await events_store._persist_events_and_state_updates(
                        room_id,
                        chunk,
                        state_delta_for_room=None,
                        new_forward_extremities=None,
                        use_negative_stream_ordering=True,
                        inhibit_local_membership_updates=True,
                        new_event_links=links,
                        new_state_dag_forward_extremities=None,
                    )
            finally:
                self._copy_chunks.discard(first)
        return replaced


#: True while ``FederationEventHandler.process_remote_join`` runs (in its task).
_IN_REMOTE_JOIN: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sps_in_remote_join", default=False
)


def install_join_outliers(writer: BulkOutlierWriter) -> None:
    """Store a join's ``/send_join`` answer (its state and auth chain, a few
    hundred outliers from a module resident) through ``writer`` too: one
    transaction instead of Synapse's one per hundred events (0.3 s of the
    benchmark's real joiner's ``/join`` at 100,000 members, 436 events).

    ``FederationEventHandler.process_remote_join`` (1.163.2: checks the create
    event, then one ``_auth_and_persist_outliers`` of the answer's auth chain
    and state, then persists the join) is wrapped on the handler instance to
    mark its task; ``_auth_and_persist_outliers`` is wrapped on the instance to
    go through ``writer`` when called in that task, for a room this process
    persists (else native)."""
    handler = writer._handler

    def wrap_join(native: Callable[..., Any]) -> Callable[..., Any]:
        async def process_remote_join(*args: Any, **kwargs: Any) -> Any:
            token = _IN_REMOTE_JOIN.set(True)
            try:
                return await native(*args, **kwargs)
            finally:
                _IN_REMOTE_JOIN.reset(token)

        return process_remote_join

    def wrap_outliers(native: Callable[..., Any]) -> Callable[..., Any]:
        async def _auth_and_persist_outliers(
            room_id: str, events: Iterable[EventBase]
        ) -> None:
            if _IN_REMOTE_JOIN.get() and writer.persists_here(room_id):
                await writer.persist_outliers(room_id, events)
                return
            await native(room_id, events)

        return _auth_and_persist_outliers

    wrap_instance_method(
        handler,
        "process_remote_join",
        wrap_join,
        "synapse.handlers.federation_event.FederationEventHandler.process_remote_join",
        "mark the join's task, whose outliers go through the bulk outlier writer",
    )
    wrap_instance_method(
        handler,
        "_auth_and_persist_outliers",
        wrap_outliers,
        "synapse.handlers.federation_event.FederationEventHandler"
        "._auth_and_persist_outliers",
        "store a join's /send_join answer through the bulk outlier writer "
        "(one transaction; Synapse's auth checks and rows)",
    )


def bulk_outlier_writer(hs: HomeServer, verdict: BulkGate) -> BulkOutlierWriter | None:
    """The writer where the bulk gate's ``verdict`` (``resync.bulk_writer``,
    the Synapse release and schema) allows it (else None: the resync stores
    through Synapse's ``_auth_and_persist_outliers``)."""
    return BulkOutlierWriter(hs) if verdict.allowed else None


def _zero_duration() -> Any:
    """``Duration(seconds=0)`` (what Synapse's clock sleeps take in 1.163)."""
    from synapse.util.duration import Duration

    return Duration(seconds=0)
