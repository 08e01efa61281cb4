"""Signing keys fetched ahead (``compat/keyfetch.py``): notaries first, in
batches, then the servers no notary vouched for, directly. The fetchers are
stand-ins for Synapse's ``PerspectivesKeyFetcher`` and ``ServerKeyFetcher``
(their interface: ``key_servers``, ``get_server_verify_key_v2_indirect``,
``get_server_verify_keys_v2_direct``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from synapse.storage.keys import FetchKeyResult
from twisted.internet import defer
from twisted.trial import unittest

from synapse_partial_state.compat import keyfetch
from synapse_partial_state.compat.keyfetch import KeyFetchOutcome, fetch_keys_ahead

NOW = 1_000_000


@dataclass
class _KeyServer:
    server_name: str


def _key(valid_until: int) -> FetchKeyResult:
    return FetchKeyResult(verify_key=None, valid_until_ts=valid_until)  # type: ignore[arg-type]


class _Notaries:
    def __init__(
        self, knows: dict[str, dict[str, int]], down: frozenset[str] = frozenset()
    ) -> None:
        self.key_servers = [_KeyServer(n) for n in knows]
        self.knows = knows  # notary -> {server: valid until}
        self.down = down
        self.asked: list[tuple[str, list[str], list[int]]] = []

    async def get_server_verify_key_v2_indirect(
        self, requests: list[Any], key_server: _KeyServer
    ) -> dict[str, dict[str, FetchKeyResult]]:
        name = key_server.server_name
        self.asked.append(
            (
                name,
                [r.server_name for r in requests],
                [len(r.key_ids) for r in requests],
            )
        )
        if name in self.down:
            raise RuntimeError("unreachable")
        known = self.knows[name]
        return {
            r.server_name: {"ed25519:a": _key(known[r.server_name])}
            for r in requests
            if r.server_name in known
        }


class _Direct:
    def __init__(self, dead: frozenset[str] = frozenset()) -> None:
        self.dead = dead
        self.asked: list[str] = []

    async def get_server_verify_keys_v2_direct(self, server: str) -> dict[str, Any]:
        self.asked.append(server)
        if server in self.dead:
            raise RuntimeError("no answer")
        return {"ed25519:a": _key(NOW * 2)}


def _run(*args: Any) -> KeyFetchOutcome:
    d = defer.ensureDeferred(fetch_keys_ahead(*args))
    assert d.called
    got = d.result
    assert isinstance(got, KeyFetchOutcome), got
    return got


class FetchKeysAheadTests(unittest.TestCase):
    def test_without_notaries_every_server_is_asked_directly(self) -> None:
        direct = _Direct(dead=frozenset({"b"}))
        got = _run(["a", "b", "c", "a"], None, direct, NOW, 4)
        self.assertEqual(sorted(direct.asked), ["a", "b", "c"])
        self.assertEqual(got, KeyFetchOutcome(0, 2, 1, 0))
        self.assertEqual(got.fetched, 2)

    def test_notaries_in_batches_then_the_rest_directly(self) -> None:
        servers = [f"s{i}" for i in range(2 * keyfetch.NOTARY_BATCH + 5)]
        # n1 knows all but s0 and s1, and s2's key is stale; n2 knows s1 only
        n1 = dict.fromkeys(servers[3:], NOW * 2)
        n1["s2"] = NOW - 1
        notaries = _Notaries({"n1": n1, "n2": {"s1": NOW}})
        direct = _Direct()
        got = _run(servers, notaries, direct, NOW, 4)
        asked_n1 = [batch for name, batch, _ in notaries.asked if name == "n1"]
        self.assertEqual(
            [len(b) for b in asked_n1],
            [keyfetch.NOTARY_BATCH, keyfetch.NOTARY_BATCH, 5],
        )
        self.assertEqual(sum(asked_n1, []), servers)
        # all keys of each server (no key ids known ahead)
        self.assertEqual({n for _, _, ns in notaries.asked for n in ns}, {0})
        # n2 asked only for those n1 did not vouch for
        self.assertEqual(
            [(name, batch) for name, batch, _ in notaries.asked if name == "n2"],
            [("n2", ["s0", "s1", "s2"])],
        )
        self.assertEqual(sorted(direct.asked), ["s0", "s2"])
        self.assertEqual(got, KeyFetchOutcome(len(servers) - 2, 2, 0, 4))

    def test_an_unreachable_notary_leaves_its_servers_to_the_direct_path(self) -> None:
        notaries = _Notaries(
            {"n1": {"a": NOW * 2, "b": NOW * 2}}, down=frozenset({"n1"})
        )
        direct = _Direct()
        got = _run(["a", "b"], notaries, direct, NOW, 4)
        self.assertEqual(sorted(direct.asked), ["a", "b"])
        self.assertEqual(got, KeyFetchOutcome(0, 2, 0, 1))

    def test_nothing_to_fetch_asks_nobody(self) -> None:
        notaries = _Notaries({"n1": {}})
        direct = _Direct()
        self.assertEqual(_run([], notaries, direct, NOW, 4), KeyFetchOutcome())
        self.assertEqual((notaries.asked, direct.asked), ([], []))
