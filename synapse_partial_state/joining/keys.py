"""Signing keys fetched ahead: for the join itself, and for the resync.

The partial ``/send_join`` answer of a module resident carries the MSC2775
essentials (heroes, power users, bans, invites: a few hundred member events and
their auth chains), signed by many servers: Synapse checks their signatures
before ``/join`` returns, fetching each server's keys then. A module resident
names those servers in its ``/make_join`` answer; :class:`JoinKeyPrefetch`
fetches their keys while the resident validates the join and builds the answer,
and lets Synapse's check start once they are stored (waiting at most
:data:`JOIN_KEY_WAIT_S`).

The state at a join carries members of every server in the room: checking their
signatures needs every server's keys. :class:`KeyPrefetch` fetches them at the
start of a resync, so that they are stored by the time the state has downloaded,
instead of being fetched in waves during the check.

Both ask Synapse's trusted key servers (notaries) first, if it has any, a few
hundred servers per request, and the servers themselves for the keys no notary
vouched for, at most :data:`KEY_PREFETCH_CONCURRENCY` (:data:`JOIN_KEY_CONCURRENCY`)
at once (:mod:`synapse_partial_state.compat.keyfetch`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from synapse.module_api import ModuleApi
from twisted.internet import defer

from synapse_partial_state.compat.keyfetch import KeyFetchOutcome
from synapse_partial_state.compat.make_join import servers_with_stored_keys
from synapse_partial_state.compat.resync import ResyncOps
from synapse_partial_state.compat.runtime import wake_waiter, within

logger = logging.getLogger(__name__)

#: Key servers asked at once when prefetching signing keys at the start. Enough
#: to have the keys before the state is downloaded, few enough to leave room for
#: the room's traffic (at 100,000 members over 2,000 servers, 50 at once delayed
#: the joiner's first message by ~10 s; the prefetch still ends before the
#: state's download).
KEY_PREFETCH_CONCURRENCY = 16
#: Longest wait for the key prefetch before checking the state's signatures.
KEY_PREFETCH_WAIT_S = 20


#: Servers asked at once for the join's keys. Synapse's own check asks every
#: server at once; the hint is capped (``wire.MAX_SIGNING_SERVERS``).
JOIN_KEY_CONCURRENCY = 64
#: Servers whose keys the join fetches, the first of the hint (which names
#: those the join needs first, then those of the essentials by priority); the
#: essentials of the others come with the resync (``joining/join_check.py``).
#: Each fetch costs the joiner's one thread a TLS handshake, a certificate
#: check and a database write (~6 ms): the benchmark's real joiner at 100,000
#: members, hinted 250 servers, spent ~1.5 s of its /join on them, its
#: ``/send_join`` answer taking 0.4 s longer to arrive meanwhile.
JOIN_KEY_MAX_SERVERS = 64
#: Longest wait, once the ``/send_join`` answer has arrived, for the keys named
#: by the ``/make_join`` hint before Synapse checks the answer (which then
#: fetches what is still missing itself, as stock).
JOIN_KEY_WAIT_S = 5.0
#: The default of ``resync.essentials_key_wait_seconds``: the longest wait, once
#: the ``/send_join`` answer has arrived, for the keys of the essentials the
#: join does not need (members named for the joiner's clients: heroes, power
#: users, bans, invites); those still without keys then are left to the resync
#: (``joining/join_check.py``).
JOIN_EXTRAS_WAIT_S = 0.25
#: How long a finished join prefetch is remembered for its ``/send_join``.
_JOIN_KEY_KEEP_S = 120.0

#: (servers, valid at ms) -> those with a stored signing key valid then.
StoredKeys = Callable[[Iterable[str], int], Awaitable[set[str]]]


class JoinKeyPrefetch:
    """Fetches, during a join, the signing keys its resident's ``/make_join``
    answer says the partial ``/send_join`` answer will need."""

    def __init__(self, api: ModuleApi, ops: ResyncOps, stored_keys: StoredKeys) -> None:
        self._api = api
        self._ops = ops
        self._stored_keys = stored_keys
        #: per room: fires once the join's prefetch is over
        self._done: dict[str, defer.Deferred[None]] = {}
        #: per room: when the first wait for its prefetch started (ms)
        self._waiting_since: dict[str, int] = {}
        #: rooms whose last /make_join answer named servers (for a while)
        self._hinted: set[str] = set()

    def on_hint(self, room_id: str, servers: list[str]) -> None:
        """A ``/make_join`` answer for ``room_id`` named ``servers``: fetch the
        keys of those whose keys are not stored, in the background."""
        own = self._api.server_name
        self._hinted.add(room_id)
        wanted = [s for s in servers if s != own]
        if not wanted:
            return
        done: defer.Deferred[None] = defer.Deferred()
        self._done[room_id] = done
        self._waiting_since.pop(room_id, None)

        async def prefetch() -> None:
            try:
                await self._prefetch(room_id, wanted)
            finally:
                wake_waiter(done)

                def forget() -> None:
                    if self._done.get(room_id) is done:
                        del self._done[room_id]
                        self._waiting_since.pop(room_id, None)
                        self._hinted.discard(room_id)

                self._ops.call_later(_JOIN_KEY_KEEP_S, forget)

        self._api.run_as_background_process("sps_prefetch_join_keys", prefetch)

    def hinted(self, room_id: str) -> bool:
        """Whether the resident named the servers of the join's answer (a
        module resident; the servers past :data:`JOIN_KEY_MAX_SERVERS` are not
        fetched for the join)."""
        return room_id in self._hinted

    async def wait(self, room_id: str, seconds: float) -> bool:
        """The ``/send_join`` answer for ``room_id`` has arrived: wait for the
        keys the hint named, at most ``seconds`` (again and again, up to
        :data:`JOIN_KEY_WAIT_S` in all since the first wait); whether the
        prefetch is over (True without one)."""
        done = self._done.get(room_id)
        if done is None or done.called:
            self._done.pop(room_id, None)
            return True
        now = self._ops.now_ms()
        first = self._waiting_since.setdefault(room_id, now)
        left = JOIN_KEY_WAIT_S - (now - first) / 1000
        if left > 0:
            await wait_at_most(done, min(seconds, left), self._ops)
        over = done.called
        if over or seconds >= left:
            self._done.pop(room_id, None)
            self._waiting_since.pop(room_id, None)
        logger.info(
            "Join of %s: waited %.2f s for the signing-key prefetch (%s)",
            room_id,
            (self._ops.now_ms() - now) / 1000,
            "over" if over else "still going on",
        )
        return over

    async def _prefetch(self, room_id: str, servers: list[str]) -> None:
        started = self._ops.now_ms()
        stored = await self._stored_keys(servers, started)
        missing = [s for s in servers if s not in stored]
        later = max(0, len(missing) - JOIN_KEY_MAX_SERVERS)
        got = await self._ops.prefetch_server_keys(
            missing[:JOIN_KEY_MAX_SERVERS], JOIN_KEY_CONCURRENCY
        )
        logger.info(
            "Join of %s: prefetched signing keys of %d server(s) named by the "
            "resident in %.2f s (%s, %d already stored, %d left to the resync)",
            room_id,
            got.fetched,
            (self._ops.now_ms() - started) / 1000,
            describe(got),
            len(stored),
            later,
        )


class KeyPrefetch:
    def __init__(self, api: ModuleApi, ops: ResyncOps) -> None:
        self._api = api
        self._ops = ops
        #: per room: fires once the signing-key prefetch is over
        self._done: dict[str, defer.Deferred[None]] = {}

    def start(self, room_id: str, servers: tuple[str, ...]) -> None:
        """Fetch the keys of ``servers`` in the background."""
        done: defer.Deferred[None] = defer.Deferred()
        self._done[room_id] = done

        async def prefetch() -> None:
            try:
                await self._prefetch(room_id, servers)
            finally:
                wake_waiter(done)

        self._api.run_as_background_process("sps_prefetch_keys", prefetch)

    async def wait(self, room_id: str) -> None:
        """Until the room's prefetch is over, at most :data:`KEY_PREFETCH_WAIT_S`
        (the bulk check reads keys from the store: give the prefetch a moment)."""
        done = self._done.get(room_id)
        if done is not None and not done.called:
            await wait_at_most(done, KEY_PREFETCH_WAIT_S, self._ops)

    async def _prefetch(self, room_id: str, servers: tuple[str, ...]) -> None:
        started = self._ops.now_ms()
        # Those fetched during the join (and of other rooms) are not asked again.
        stored = await servers_with_stored_keys(self._api, servers, started)
        got = await self._ops.prefetch_server_keys(
            [s for s in servers if s not in stored], KEY_PREFETCH_CONCURRENCY
        )
        logger.info(
            "Resync of %s: prefetched signing keys of %d server(s) in %.2f s "
            "(%s, %d already stored)",
            room_id,
            got.fetched,
            (self._ops.now_ms() - started) / 1000,
            describe(got),
            len(stored),
        )


def describe(got: KeyFetchOutcome) -> str:
    """How a prefetch's keys came, for its log line."""
    return (
        f"{got.from_notary} from notaries in {got.notary_requests} request(s), "
        f"{got.direct} from the servers, {got.failed} failed"
    )


async def wait_at_most(d: defer.Deferred[None], seconds: float, ops: ResyncOps) -> None:
    """Wait for ``d`` (without consuming its result), or ``seconds``."""
    await within(d, seconds, ops.call_later)
