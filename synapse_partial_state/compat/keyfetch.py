"""Signing keys fetched ahead, into Synapse's key store, the way Synapse's keyring
gets them: from the configured notaries (``trusted_key_servers``) first, many
servers per request, then from the servers themselves for those the notaries did
not vouch for.

Synapse's own check asks its notaries through ``PerspectivesKeyFetcher`` (one
``POST /_matrix/key/v2/query`` for everything queued meanwhile), and the servers
through ``ServerKeyFetcher``. Ahead of the check the key ids are not known, so a
notary is asked for all keys of each server (the spec's empty criteria; a
Synapse notary then answers from its cache only, and the server itself is asked
for the rest). Both fetchers check the signatures (the server's own, and the
notary's with the key configured for it) and store what they get.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

#: Servers named in one request to a notary. Big enough that a room's 2,000
#: servers take a few requests, small enough that one slow origin (a notary
#: may ask it) holds up only its share.
NOTARY_BATCH = 200
#: Requests to one notary at once.
NOTARY_CONCURRENCY = 3


class KeyFetchOutcome(NamedTuple):
    """What a prefetch got: servers vouched for by a notary, servers that gave
    their own keys, servers that gave none; and the requests to notaries."""

    from_notary: int = 0
    direct: int = 0
    failed: int = 0
    notary_requests: int = 0

    @property
    def fetched(self) -> int:
        return self.from_notary + self.direct


def batches(servers: Sequence[str], size: int) -> list[list[str]]:
    """``servers`` in consecutive batches of at most ``size``."""
    return [list(servers[i : i + size]) for i in range(0, len(servers), size)]


async def fetch_keys_ahead(
    servers: Collection[str],
    notaries: Any | None,
    direct: Any | None,
    now_ms: int,
    concurrency: int,
) -> KeyFetchOutcome:
    """Fetch and store the signing keys of ``servers``: through ``notaries``
    (Synapse's ``PerspectivesKeyFetcher``, None when no trusted key server is
    configured), then through ``direct`` (``ServerKeyFetcher``), at most
    ``concurrency`` servers at once, for those no notary vouched for. A server
    counts as vouched for when a notary gave a key of it valid at ``now_ms``.
    Failures are left for Synapse's own check, which fetches what is missing."""
    remaining = list(dict.fromkeys(servers))
    vouched: set[str] = set()
    requests = 0
    if notaries is not None and remaining:
        vouched, requests = await _from_notaries(notaries, remaining, now_ms)
        remaining = [s for s in remaining if s not in vouched]
    ok = failed = 0
    if direct is not None and remaining:
        ok, failed = await _direct(direct, remaining, concurrency)
    else:
        failed = len(remaining)
    return KeyFetchOutcome(len(vouched), ok, failed, requests)


async def _from_notaries(
    fetcher: Any, servers: list[str], now_ms: int
) -> tuple[set[str], int]:
    """Ask each of Synapse's trusted key servers in turn, in batches, for the
    servers not vouched for yet. Returns (vouched for, requests made)."""
    from synapse.crypto.keyring import _FetchKeyRequest

    vouched: set[str] = set()
    requests = 0
    for key_server in fetcher.key_servers:
        remaining = [s for s in servers if s not in vouched]
        if not remaining:
            break

        async def one(batch: list[str], key_server: Any = key_server) -> None:
            nonlocal requests
            requests += 1
            wanted = [_FetchKeyRequest(s, now_ms, []) for s in batch]
            try:
                got = await fetcher.get_server_verify_key_v2_indirect(
                    wanted, key_server
                )
            except Exception as e:  # an unreachable notary: the servers are asked
                logger.info(
                    "Key prefetch from notary %s failed: %s", key_server.server_name, e
                )
                return
            for server, keys in got.items():
                if any(k.valid_until_ts >= now_ms for k in keys.values()):
                    vouched.add(server)

        await _gather_limited(one, batches(remaining, NOTARY_BATCH), NOTARY_CONCURRENCY)
    return vouched, requests


async def _direct(
    fetcher: Any, servers: list[str], concurrency: int
) -> tuple[int, int]:
    """Each server's own ``/_matrix/key/v2/server``, ``concurrency`` at once
    (``ServerKeyFetcher.get_server_verify_keys_v2_direct``, which stores what it
    gets). Returns (fetched, failed)."""
    outcome = {"ok": 0, "failed": 0}

    async def one(server: str) -> None:
        try:
            await fetcher.get_server_verify_keys_v2_direct(server)
            outcome["ok"] += 1
        except Exception as e:  # a dead server: verification will say so later
            logger.debug("Key prefetch from %s failed: %s", server, e)
            outcome["failed"] += 1

    await _gather_limited(one, servers, concurrency)
    return outcome["ok"], outcome["failed"]


async def _gather_limited(f: Any, items: Sequence[Any], limit: int) -> None:
    """``f`` on every item, at most ``limit`` at once (Synapse's log contexts kept)."""
    from synapse.logging.context import make_deferred_yieldable
    from synapse.util.async_helpers import yieldable_gather_results
    from twisted.internet.defer import DeferredSemaphore

    semaphore = DeferredSemaphore(limit)

    async def one(item: Any) -> None:
        await make_deferred_yieldable(semaphore.acquire())
        try:
            await f(item)
        finally:
            semaphore.release()

    await yieldable_gather_results(one, items)
