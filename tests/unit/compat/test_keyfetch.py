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


class _Clock:
    def time_msec(self) -> int:
        return NOW


class _Notaries:
    """Synapse's ``PerspectivesKeyFetcher`` as the prefetch uses it: its
    trusted key servers, its federation client's ``post_json``, and its checks
    and store of one answer entry (an entry with ``"bad"`` fails them)."""

    def __init__(
        self, knows: dict[str, dict[str, int]], down: frozenset[str] = frozenset()
    ) -> None:
        self.key_servers = [_KeyServer(n) for n in knows]
        self.knows = knows  # notary -> {server: valid until}
        self.down = down
        self.asked: list[tuple[str, list[str], list[int]]] = []
        self.stored: list[tuple[str, str, int]] = []
        self.client = self
        self.clock = _Clock()

    async def post_json(
        self, destination: str, path: str, data: dict[str, Any]
    ) -> dict[str, Any]:
        assert path == "/_matrix/key/v2/query"
        query = data["server_keys"]
        self.asked.append(
            (destination, list(query), [len(ids) for ids in query.values()])
        )
        if destination in self.down:
            raise RuntimeError("unreachable")
        known = self.knows[destination]
        entries: list[Any] = [
            {"server_name": s, "valid_until_ts": known[s]} for s in query if s in known
        ]
        # never asked for, and malformed: ignored
        return {"server_keys": [*entries, {"server_name": "unasked"}, "junk"]}

    def _validate_perspectives_response(
        self, key_server: _KeyServer, entry: dict[str, Any]
    ) -> None:
        if entry["valid_until_ts"] == "bad":
            raise ValueError("not signed by the notary")

    async def process_v2_response(
        self, from_server: str, entry: dict[str, Any], time_added_ms: int
    ) -> dict[str, FetchKeyResult]:
        self.stored.append((entry["server_name"], from_server, time_added_ms))
        return {"ed25519:a": _key(entry["valid_until_ts"])}


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
        # n1 knows all but s0 and s1, s2's key is stale and s3's entry does not
        # verify; n2 knows s1 only
        n1: dict[str, Any] = dict.fromkeys(servers[4:], NOW * 2)
        n1["s2"] = NOW - 1
        n1["s3"] = "bad"
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
            [("n2", ["s0", "s1", "s2", "s3"])],
        )
        self.assertEqual(sorted(direct.asked), ["s0", "s2", "s3"])
        self.assertEqual(got, KeyFetchOutcome(len(servers) - 3, 3, 0, 4))
        # stored as from the notary that vouched (s2's stale key too), at the
        # time of the answer; nothing unasked for
        stored = {s: (n, t) for s, n, t in notaries.stored}
        self.assertEqual(set(stored), (set(servers) - {"s0", "s3"}))
        self.assertEqual(stored["s1"], ("n2", NOW))
        self.assertEqual(stored["s9"], ("n1", NOW))

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
