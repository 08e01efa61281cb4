"""Signing keys fetched ahead, into Synapse's key store, the way Synapse's keyring
gets them: from the configured notaries (``trusted_key_servers``) first, many
servers per request, then from the servers themselves for those the notaries did
not vouch for.

Synapse's own check asks its notaries through ``PerspectivesKeyFetcher`` (one
``POST /_matrix/key/v2/query`` for everything queued meanwhile), and the servers
through ``ServerKeyFetcher``. Ahead of the check the key ids are not known, so a
notary is asked for all keys of each server (the spec's empty criteria; a
Synapse notary then answers from its cache only, and the server itself is asked
for the rest). The keyring's fetchers check the signatures (the server's own,
and the notary's with the key configured for it) and store what they get; the
entries of a notary's answer are checked and stored several at once.
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
#: Entries of notary answers checked and stored at once (one database
#: transaction each, as Synapse stores them).
NOTARY_STORE_CONCURRENCY = 16


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
    from twisted.internet.defer import DeferredSemaphore

    vouched: set[str] = set()
    requests = 0
    # Entries of the answers checked and stored at once, over every batch.
    storing = DeferredSemaphore(NOTARY_STORE_CONCURRENCY)
    for key_server in fetcher.key_servers:
        remaining = [s for s in servers if s not in vouched]
        if not remaining:
            break

        async def one(batch: list[str], key_server: Any = key_server) -> None:
            nonlocal requests
            requests += 1
            got = await _notary_batch(fetcher, key_server, batch, now_ms, storing)
            vouched.update(got)

        await _gather_limited(one, batches(remaining, NOTARY_BATCH), NOTARY_CONCURRENCY)
    return vouched, requests


async def _notary_batch(
    fetcher: Any, key_server: Any, servers: list[str], now_ms: int, storing: Any
) -> set[str]:
    """One ``POST /_matrix/key/v2/query`` to ``key_server`` for all keys of
    ``servers`` (through Synapse's federation client), each entry of the answer
    checked and stored by Synapse's ``PerspectivesKeyFetcher`` (the notary's
    signature with its configured key, then the server's own, then stored as
    fetched from the notary), ``storing`` entries at once: Synapse's own
    ``get_server_verify_key_v2_indirect`` does them one after the other, one
    database transaction each, which on a busy joiner took 13 ms per server.
    Returns the servers with a key valid at ``now_ms``."""
    from synapse.logging.context import make_deferred_yieldable
    from synapse.util.async_helpers import yieldable_gather_results

    name = key_server.server_name
    try:
        answer = await fetcher.client.post_json(
            destination=name,
            path="/_matrix/key/v2/query",
            data={"server_keys": {s: {} for s in servers}},
        )
        entries = answer["server_keys"]
        if not isinstance(entries, list):
            raise ValueError("server_keys is not a list")
    except Exception as e:  # an unreachable notary: the servers are asked
        logger.info("Key prefetch from notary %s failed: %s", name, e)
        return set()
    asked = set(servers)
    vouched: set[str] = set()
    time_added_ms = fetcher.clock.time_msec()

    async def check_and_store(entry: Any) -> None:
        server = entry.get("server_name") if isinstance(entry, dict) else None
        if not isinstance(server, str) or server not in asked:
            return  # not asked for (or malformed): not stored
        await make_deferred_yieldable(storing.acquire())
        try:
            fetcher._validate_perspectives_response(key_server, entry)
            keys = await fetcher.process_v2_response(name, entry, time_added_ms)
        except Exception as e:  # a bad entry: that server is asked itself
            logger.info("Key prefetch: notary %s on %s: %s", name, server, e)
            return
        finally:
            storing.release()
        if any(k.valid_until_ts >= now_ms for k in keys.values()):
            vouched.add(server)

    await yieldable_gather_results(check_and_store, entries)
    return vouched


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
