"""The signing keys of a room's servers, fetched while its state downloads.

The state at a join carries members of every server in the room: checking their
signatures needs every server's keys. Fetched at the start of a resync, at most
:data:`KEY_PREFETCH_CONCURRENCY` servers at once, they are stored by the time the
state has downloaded, instead of being fetched in waves during the check.
"""

from __future__ import annotations

import logging

from synapse.module_api import ModuleApi, make_deferred_yieldable
from twisted.internet import defer

from synapse_partial_state.compat.resync import ResyncOps
from synapse_partial_state.compat.runtime import wake_waiter

logger = logging.getLogger(__name__)

#: Key servers asked at once when prefetching signing keys at the start. Enough
#: to have the keys before the state is downloaded, few enough to leave room for
#: the room's traffic (at 100,000 members over 2,000 servers, 50 at once delayed
#: the joiner's first message by ~10 s; the prefetch still ends before the
#: state's download).
KEY_PREFETCH_CONCURRENCY = 16
#: Longest wait for the key prefetch before checking the state's signatures.
KEY_PREFETCH_WAIT_S = 20


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
        ok, failed = await self._ops.prefetch_server_keys(
            servers, KEY_PREFETCH_CONCURRENCY
        )
        logger.info(
            "Resync of %s: prefetched signing keys of %d server(s) in %.2f s (%d failed)",
            room_id,
            ok,
            (self._ops.now_ms() - started) / 1000,
            failed,
        )


async def wait_at_most(d: defer.Deferred[None], seconds: float, ops: ResyncOps) -> None:
    """Wait for ``d`` (without consuming its result), or ``seconds``."""
    waiter: defer.Deferred[None] = defer.Deferred()

    def done() -> None:
        wake_waiter(waiter)

    def passthrough(result: object) -> object:
        done()
        return result

    d.addBoth(passthrough)
    call = ops.call_later(seconds, done)
    try:
        await make_deferred_yieldable(waiter)
    finally:
        if call.active():
            call.cancel()
