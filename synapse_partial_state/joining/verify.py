"""Checking the signatures and hashes of a room's state in bulk, on every core.

Synapse checks each pulled event on its own: a ``VerifyJsonRequest``, a trip
through the keyring's batching queue and a few Deferreds per signature, all on the
reactor thread. For the 10,000 events of a big room's state that is seconds of the
main thread. Here the same checks run over whole chunks in worker processes, with
the keys looked up once for the chunk:

* the signature of every server Synapse requires (``_check_sigs_on_pdu``: the
  sender's server; the event ID's server in v1/v2 rooms; the authorising server of
  a restricted join), over the redacted event, with every key we hold that is valid
  at the event's ``origin_server_ts`` (when the room version enforces key validity);
* the content hash.

The verdicts are deliberately conservative: only :data:`OK` is taken as verified.
Anything Synapse might judge differently (a key we do not hold, a banned key, a
third-party invite, a content hash mismatch that Synapse would answer by
redacting) is :data:`UNCERTAIN` and goes through Synapse's own per-event check;
:data:`BAD_SIGNATURE` and :data:`INVALID` events are not accepted from this server
at all.

The worker functions use Synapse's own event classes and redaction, imported in the
worker, so the bytes signed are the bytes Synapse would check.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import attr
from twisted.internet import defer

logger = logging.getLogger(__name__)

OK = 0
BAD_SIGNATURE = 1
UNCERTAIN = 2
INVALID = 3

#: (server name, key id) -> (raw ed25519 verify key, valid until ms).
Keys = Mapping[tuple[str, str], tuple[bytes, int]]

#: Fewer events than this are checked in a thread: starting workers costs more.
WORKERS_MIN_EVENTS = 3000

#: Events per task sent to a worker: big enough to amortise pickling, small enough
#: to keep both workers busy to the end.
CHUNK = 500

#: Times a chunk goes to fresh workers after the workers checking it died (e.g.
#: the OOM killer's SIGKILL); it is then checked in a thread.
WORKER_RETRIES = 2


def _domain(user_or_event_id: Any) -> str | None:
    if not isinstance(user_or_event_id, str) or ":" not in user_or_event_id:
        return None
    return user_or_event_id.split(":", 1)[1]


def required_servers(
    pdu: Mapping[str, Any], v1_event_ids: bool, restricted: bool
) -> list[str] | None:
    """The servers whose signatures Synapse requires on ``pdu``
    (``synapse.federation.federation_base._check_sigs_on_pdu``), or None when
    Synapse's own check must decide (third-party invites, malformed senders)."""
    content = pdu.get("content")
    if not isinstance(content, Mapping):
        return None
    membership = content.get("membership")
    if (
        pdu.get("type") == "m.room.member"
        and membership == "invite"
        and "third_party_invite" in content
    ):
        return None
    sender = _domain(pdu.get("sender"))
    if sender is None:
        return None
    servers = [sender]
    if v1_event_ids:
        event_domain = _domain(pdu.get("event_id"))
        if event_domain is None:
            return None
        if event_domain != sender:
            servers.append(event_domain)
    if (
        restricted
        and pdu.get("type") == "m.room.member"
        and membership == "join"
        and "join_authorised_via_users_server" in content
    ):
        authorising = _domain(content["join_authorised_via_users_server"])
        if authorising is None:
            return None
        if authorising not in servers:
            servers.append(authorising)
    return servers


def key_ids_needed(
    pdu: Mapping[str, Any], v1_event_ids: bool, restricted: bool
) -> set[tuple[str, str]]:
    """Every (server, key id) that checking ``pdu`` may use (none for a pdu too
    malformed to name them: the check itself then rejects it)."""
    servers = required_servers(pdu, v1_event_ids, restricted)
    signatures = pdu.get("signatures")
    if not servers or not isinstance(signatures, Mapping):
        return set()
    wanted: set[tuple[str, str]] = set()
    for server in servers:
        by_key = signatures.get(server)
        if isinstance(by_key, Mapping):
            wanted.update((server, key_id) for key_id in by_key)
    return wanted


def verify_chunk(
    room_version_id: str,
    pdus: Sequence[bytes | dict[str, Any]],
    keys: Keys,
    banned: frozenset[str] = frozenset(),
) -> list[tuple[int, str | None]]:
    """Check ``pdus`` (federation JSON); one (verdict, event ID) per pdu.

    Runs in a worker process (or a thread when there are no workers). The event ID
    is the one Synapse computes (the reference hash in v3+ rooms), None when the
    pdu does not even make an event."""
    checker = _ChunkChecker(room_version_id, keys, banned)
    return [checker.check(raw)[:2] for raw in pdus]


def verify_chunk_events(
    room_version_id: str,
    pdus: Sequence[bytes | dict[str, Any]],
    keys: Keys,
    banned: frozenset[str] = frozenset(),
) -> list[tuple[int, str | None, Any]]:
    """:func:`verify_chunk`, each verdict with the event Synapse's
    ``event_from_pdu_json`` makes of the pdu (None where it raises: the verdict
    is then :data:`INVALID`), for checks run in a thread of the process that
    uses the events: they are built once, off the reactor, instead of once here
    and again by the caller."""
    checker = _ChunkChecker(room_version_id, keys, banned, build_events=True)
    return [checker.check(raw) for raw in pdus]


def verify_chunk_json(
    room_version_id: str,
    pdus: Sequence[bytes | dict[str, Any]],
    keys: Keys,
    banned: frozenset[str] = frozenset(),
) -> list[tuple[int, str | None, str | None]]:
    """:func:`verify_chunk_events` for a worker process, whose events cannot
    come back as they are: each verdict with the JSON Synapse's
    ``event_from_pdu_json`` built its event from (the pdu after its parse, as
    canonical JSON), None where it raises. :func:`event_from_json` makes the
    same event of it in the calling process, a fraction of the parse's cost
    there (no JSON validation, no second encoding)."""
    from canonicaljson import encode_canonical_json

    checker = _ChunkChecker(room_version_id, keys, banned, build_events=True)
    out: list[tuple[int, str | None, str | None]] = []
    for raw in pdus:
        verdict, event_id, event = checker.check(raw)
        built = None
        if event is not None:
            built = encode_canonical_json(checker.last_pdu).decode("utf-8")
        out.append((verdict, event_id, built))
    return out


def event_from_json(event_json: str, room_version_id: str) -> Any:
    """The event :func:`verify_chunk_json` built in the worker, from its JSON,
    as Synapse's ``make_event_from_dict`` makes it of the same pdu."""
    from synapse.api.room_versions import KNOWN_ROOM_VERSIONS
    from synapse.events import make_event_from_json

    return make_event_from_json(event_json, KNOWN_ROOM_VERSIONS[room_version_id])


class _ChunkChecker:
    """One room version's checks with one set of keys (decoded once each)."""

    def __init__(
        self,
        room_version_id: str,
        keys: Keys,
        banned: frozenset[str],
        build_events: bool = False,
    ):
        # Outside the compat layer on purpose: worker processes import only this
        # file, and the bytes checked must be the ones Synapse's own classes make.
        from synapse.api.room_versions import KNOWN_ROOM_VERSIONS, EventFormatVersions

        self.room_version = KNOWN_ROOM_VERSIONS[room_version_id]
        self.v1_ids = self.room_version.event_format == EventFormatVersions.ROOM_V1_V2
        self.restricted = self.room_version.restricted_join_rule
        self.enforce_validity = self.room_version.enforce_key_validity
        self.keys = keys
        self.banned = banned
        self.build_events = build_events
        #: with :attr:`build_events`, the pdu the last event was built from
        #: (after Synapse's parse edited it)
        self.last_pdu: dict[str, Any] | None = None
        self._decoded: dict[tuple[str, str], Any] = {}

    def check(self, raw: bytes | dict[str, Any]) -> tuple[int, str | None, Any]:
        """(verdict, event ID, the event when :attr:`build_events` else None)."""
        from synapse.events import make_event_from_dict, make_event_from_json

        try:
            if self.build_events:
                # What the caller would build: Synapse's own federation parse
                # (it strips ``unsigned``, checks depth and canonical JSON).
                from synapse.federation.federation_base import event_from_pdu_json

                if isinstance(raw, bytes):
                    pdu = json.loads(raw)
                else:  # Synapse's parse edits ``unsigned``: not the caller's
                    pdu = dict(raw)
                    if isinstance(pdu.get("unsigned"), dict):
                        pdu["unsigned"] = dict(pdu["unsigned"])
                event = event_from_pdu_json(pdu, self.room_version)
                self.last_pdu = pdu
            elif isinstance(raw, bytes):
                # canonical JSON already: what make_event_from_dict would build
                event = make_event_from_json(raw.decode("utf-8"), self.room_version)
                pdu = json.loads(raw)
            else:
                event = make_event_from_dict(raw, self.room_version)
                pdu = raw
            event_id = event.event_id
        except Exception:
            return INVALID, None, None
        kept = event if self.build_events else None
        servers = required_servers(pdu, self.v1_ids, self.restricted)
        if servers is None:
            return UNCERTAIN, event_id, kept
        verdict = self._signatures(event, servers)
        if verdict == OK and not content_hash_matches(event.get_pdu_json()):
            verdict = UNCERTAIN  # Synapse redacts; let it decide
        return verdict, event_id, kept

    def _signatures(self, event: Any, servers: list[str]) -> int:
        """OK when every server in ``servers`` signed ``event`` with a key held
        and valid at its timestamp; UNCERTAIN when a key is missing or banned
        (Synapse decides); BAD_SIGNATURE otherwise."""
        from signedjson.sign import SignatureVerifyException, verify_signed_json
        from synapse.synapse_rust.events import redact_event

        min_valid = event.origin_server_ts if self.enforce_validity else 0
        redacted: dict[str, Any] | None = None
        for server in servers:
            key_ids = (
                list(event.signatures[server]) if server in event.signatures else []
            )
            if not key_ids:
                return BAD_SIGNATURE  # Synapse: "Not signed by <server>"
            verified = False
            for key_id in key_ids:
                held = self.keys.get((server, key_id))
                if held is None or held[1] < min_valid:
                    continue
                if _b64(held[0]) in self.banned:
                    return UNCERTAIN
                if redacted is None:
                    redacted = redact_event(event).get_pdu_json()
                try:
                    verify_signed_json(redacted, server, self._key(server, key_id))
                except SignatureVerifyException:
                    return BAD_SIGNATURE
                verified = True
            if not verified:
                return UNCERTAIN  # no key held: Synapse fetches it
        return OK

    def _key(self, server: str, key_id: str) -> Any:
        from signedjson.key import decode_verify_key_bytes

        if (server, key_id) not in self._decoded:
            raw, _ = self.keys[(server, key_id)]
            self._decoded[(server, key_id)] = decode_verify_key_bytes(key_id, raw)
        return self._decoded[(server, key_id)]


#: Fields outside the content hash: the spec's three, and Synapse's internal ones
#: (which never come over federation, but never count either).
_UNHASHED = ("unsigned", "signatures", "hashes", "age_ts", "outlier", "destinations")


def content_hash_matches(pdu: Mapping[str, Any]) -> bool:
    """The spec's content hash check (sha256 of the canonical JSON of the event
    without its unhashed fields, against ``hashes.sha256``)."""
    from canonicaljson import encode_canonical_json
    from unpaddedbase64 import decode_base64

    hashes = pdu.get("hashes")
    if not isinstance(hashes, Mapping) or not isinstance(hashes.get("sha256"), str):
        return False
    try:
        expected = decode_base64(hashes["sha256"])
    except Exception:
        return False
    hashed = {k: v for k, v in pdu.items() if k not in _UNHASHED}
    return hashlib.sha256(encode_canonical_json(hashed)).digest() == expected


def _b64(raw: bytes) -> str:
    from unpaddedbase64 import encode_base64

    return encode_base64(raw)


def _warm_up() -> None:
    """Worker initialiser: import what :func:`verify_chunk` needs, once (Synapse's
    event classes, ~50 MiB; not its keyring, which would double that)."""
    import signedjson.sign  # noqa: F401
    import synapse.events  # noqa: F401
    import synapse.synapse_rust.events  # noqa: F401


class VerifierPool:
    """Worker processes for :func:`verify_chunk`; none means a thread.

    The processes are started on first use ("spawn": a fresh interpreter, never a
    fork of the reactor, told not to re-import Synapse's ``__main__``: see
    :func:`_without_parent_main`) and stopped by :meth:`close`.

    A worker that dies (the OOM killer's SIGKILL) breaks Python's process pool for
    good: every later submit raises ``BrokenProcessPool``, and so would every
    large resync until Synapse restarts. A broken pool is dropped when a submit
    or a chunk's outcome says so, and fresh workers are started; the chunks it
    was checking go to them (:data:`WORKER_RETRIES` times at most, then to the
    thread), so callers still get every verdict."""

    def __init__(self, workers: int, banned_keys: frozenset[str] = frozenset()) -> None:
        self.workers = workers
        #: base64 verify keys Synapse refuses (``BANNED_SERVER_SIGNING_KEYS``)
        self._banned = banned_keys
        self._executor: ProcessPoolExecutor | None = None
        self._thread_executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _thread(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._thread_executor is None:
                self._thread_executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="sps-verify"
                )
            return self._thread_executor

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_warm_up,
                )
                logger.info("Started %d signature-checking worker(s)", self.workers)
            return self._executor

    def _drop_broken(self, pool: ProcessPoolExecutor, error: BaseException) -> None:
        """``pool`` is broken: forget it, so that the next submit starts fresh
        workers. Every chunk it was checking fails the same way: only the first
        failure drops it (and not the fresh pool that replaced it)."""
        with self._lock:
            if self._executor is not pool:
                return
            self._executor = None
        pool.shutdown(wait=False, cancel_futures=True)
        logger.warning(
            "A signature-checking worker process died (%s; killed by the OOM "
            "killer?): starting new workers, and checking what it was checking "
            "again",
            error,
        )

    def warm(self) -> None:
        """Start the workers now (they import Synapse, ~1 s), e.g. while the state
        downloads, so the first chunk does not wait for them."""
        if self.workers <= 0:
            return
        for _ in range(2):  # a broken pool, then a fresh one (never broken at once)
            pool = self._pool()
            try:
                with _without_parent_main():
                    for _ in range(self.workers):
                        pool.submit(_warm_up)
                return
            except BrokenProcessPool as e:
                self._drop_broken(pool, e)

    def worth_it(self, events: int) -> bool:
        """Whether checking ``events`` events is worth starting the workers for
        (they take about a second to start; a thread checks ~5,000 events/s)."""
        return self.workers > 0 and events >= WORKERS_MIN_EVENTS

    def verify_chunks(
        self,
        room_version_id: str,
        pdus: Sequence[bytes | dict[str, Any]],
        keys: Keys,
        use_workers: bool = True,
        build_events: bool = False,
    ) -> list[tuple[int, defer.Deferred[list[Any]]]]:
        """Submit ``pdus`` in chunks: (start index, Deferred verdicts) per chunk,
        in order. The chunks are checked in parallel (in a thread when there are
        no workers or ``use_workers`` is false); await them in order to overlap
        what follows with the checking of the rest.

        A verdict is (verdict, event ID); with ``build_events``, (verdict, event
        ID, event), the event as :func:`verify_chunk_events` builds it (a
        worker process sends its JSON back, made into the event here), None
        where Synapse's parse refuses the pdu."""
        keys = dict(keys)
        out = []
        for start in range(0, len(pdus), CHUNK):
            task = _Task(
                room_version_id, list(pdus[start : start + CHUNK]), keys, build_events
            )
            d: defer.Deferred[list[Any]] = defer.Deferred()
            if self.workers <= 0 or not use_workers:
                # One thread, chunk after chunk: more threads would only fight
                # the reactor for the GIL (ten of them, in Twisted's pool, made
                # the storing of a 10,000-member state twice as slow).
                self._in_thread(task, d)
            else:
                self._in_worker(task, d, WORKER_RETRIES)
            out.append((start, d))
        return out

    def _in_thread(self, task: _Task, d: defer.Deferred[Any]) -> None:
        from twisted.internet import reactor

        future = self._thread().submit(
            verify_chunk_events if task.build_events else verify_chunk,
            task.room_version_id,
            task.pdus,
            task.keys,
            self._banned,
        )
        future.add_done_callback(functools.partial(_from_pool, reactor, d))

    def _in_worker(self, task: _Task, d: defer.Deferred[Any], retries: int) -> None:
        from twisted.internet import reactor

        pool = self._pool()
        try:
            with _without_parent_main():
                future = pool.submit(
                    verify_chunk_json if task.build_events else verify_chunk,
                    task.room_version_id,
                    task.pdus,
                    task.keys,
                    self._banned,
                )
        except BrokenProcessPool as e:
            self._workers_died(task, d, retries, pool, e)
            return
        future.add_done_callback(
            lambda done: reactor.callFromThread(
                self._worker_done, task, d, retries, pool, done
            )
        )

    def _worker_done(
        self,
        task: _Task,
        d: defer.Deferred[Any],
        retries: int,
        pool: ProcessPoolExecutor,
        future: Future[Any],
    ) -> None:
        """A chunk's outcome from ``pool`` (on the reactor thread), copied to
        ``d``, unless the workers died."""
        error = None if future.cancelled() else future.exception()
        if isinstance(error, BrokenProcessPool):
            self._workers_died(task, d, retries, pool, error)
        elif task.build_events and error is None and not future.cancelled():
            try:
                built = _events_from_json(task.room_version_id, future.result())
            except Exception:
                d.errback()
            else:
                d.callback(built)
        else:
            _copy_outcome(d, future)

    def _workers_died(
        self,
        task: _Task,
        d: defer.Deferred[Any],
        retries: int,
        pool: ProcessPoolExecutor,
        error: BrokenProcessPool,
    ) -> None:
        """``pool`` broke before checking ``task`` (found so on submitting it, or
        its outcome says so): the chunk goes to fresh workers, or to the thread
        once it has seen ``WORKER_RETRIES`` more pools break."""
        self._drop_broken(pool, error)
        if d.called:
            return  # cancelled by the caller meanwhile
        if retries > 0:
            self._in_worker(task, d, retries - 1)
            return
        logger.warning(
            "Checking a chunk of %d events in a thread: the signature-checking "
            "workers died %d times while checking it",
            len(task.pdus),
            WORKER_RETRIES + 1,
        )
        self._in_thread(task, d)

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
            if self._thread_executor is not None:
                self._thread_executor.shutdown(wait=False, cancel_futures=True)
                self._thread_executor = None


def _events_from_json(
    room_version_id: str, verdicts: Sequence[tuple[int, str | None, str | None]]
) -> list[tuple[int, str | None, Any]]:
    """A worker's :func:`verify_chunk_json` verdicts with their events built."""
    return [
        (
            verdict,
            event_id,
            None if built is None else event_from_json(built, room_version_id),
        )
        for verdict, event_id, built in verdicts
    ]


@attr.s(slots=True, frozen=True, auto_attribs=True)
class _Task:
    """One chunk to check, kept until it has its verdicts (to send it again)."""

    room_version_id: str
    pdus: list[bytes | dict[str, Any]]
    keys: dict[tuple[str, str], tuple[bytes, int]]
    #: the verdicts with the events (a worker process sends their JSON)
    build_events: bool = False


@contextlib.contextmanager
def _without_parent_main() -> Iterator[None]:
    """Start worker processes without re-running this process's ``__main__``.

    multiprocessing makes every new process import the parent's main module
    (for Synapse, ``synapse.app.homeserver``: all of Synapse, ~130 MiB per
    worker) unless ``__main__`` names neither a module nor a file. Processes are
    only started inside ``ProcessPoolExecutor.submit`` (spawn never starts them
    elsewhere), so hiding the two attributes around it is enough."""
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__spec__", "__file__") if hasattr(main, k)}
    try:
        if main is not None:
            main.__spec__ = None
            if "__file__" in saved:
                del main.__file__
        yield
    finally:
        for key, value in saved.items():
            setattr(main, key, value)


def _from_pool(reactor: Any, d: defer.Deferred[Any], future: Future[Any]) -> None:
    reactor.callFromThread(_copy_outcome, d, future)


def _copy_outcome(d: defer.Deferred[Any], future: Future[Any]) -> None:
    if future.cancelled():  # the pool was closed
        d.cancel()
        return
    error = future.exception()
    if error is not None:
        d.errback(error)
    else:
        d.callback(future.result())


def default_workers() -> int:
    """Worker processes only pay off with cores to spare: the reactor, the
    database thread (and a local PostgreSQL) already keep two busy. On two cores a
    thread was faster (10,000 members: 9.9 s with a thread, 10.3 s with one
    worker, 13.4 s with two) and costs no memory; from four cores, one worker per
    core beyond the first two, at most four (not measured here)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return 0 if cores < 4 else min(cores - 2, 4)
