"""The bulk signature and hash checks (``joining/verify.py``), on genuinely signed
events: real ed25519 keys, signed with Synapse's own ``add_hashes_and_signatures``
(no homeserver)."""

from __future__ import annotations

import copy
import functools
import os
import signal
import time
from collections.abc import Iterable
from typing import Any

from signedjson.key import generate_signing_key
from signedjson.types import SigningKey
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS, EventFormatVersions
from synapse.crypto import keyring
from synapse.crypto.event_signing import (
    add_hashes_and_signatures,
    check_event_content_hash,
)
from synapse.events import make_event_from_dict
from synapse.federation.federation_base import event_from_pdu_json
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from unpaddedbase64 import encode_base64

from synapse_partial_state.compat.state_fetch import banned_signing_keys
from synapse_partial_state.joining import verify
from synapse_partial_state.joining.verify import (
    BAD_SIGNATURE,
    INVALID,
    OK,
    UNCERTAIN,
    VerifierPool,
    content_hash_matches,
    event_from_json,
    key_ids_needed,
    required_servers,
    verify_chunk,
    verify_chunk_events,
    verify_chunk_json,
)

NAMES = {
    OK: "OK",
    BAD_SIGNATURE: "BAD_SIGNATURE",
    UNCERTAIN: "UNCERTAIN",
    INVALID: "INVALID",
}

#: Far in the future (ms): a key valid for every event here.
FOREVER = 10**13
TS = 1_700_000_000_000

#: One signing key per server, key ID ``ed25519:<first letter>1``.
SIGNING_KEYS: dict[str, SigningKey] = {
    server: generate_signing_key(f"{server[0]}1")
    for server in ("a.test", "b.test", "c.test")
}


def key_id(server: str) -> str:
    return f"ed25519:{SIGNING_KEYS[server].version}"


def held(*servers: str, valid_until: int = FOREVER) -> dict[tuple[str, str], Any]:
    """The keys the joiner holds for ``servers``, as ``StateFetchOps`` gives them."""
    return {
        (s, key_id(s)): (bytes(SIGNING_KEYS[s].verify_key), valid_until)
        for s in servers
    }


def v1_ids(version: str) -> bool:
    return bool(
        KNOWN_ROOM_VERSIONS[version].event_format == EventFormatVersions.ROOM_V1_V2
    )


_counter = iter(range(1, 10**9))


def make_pdu(
    version: str,
    *,
    sender: str = "@alice:a.test",
    event_type: str = "m.room.message",
    content: dict[str, Any] | None = None,
    state_key: str | None = None,
    signers: Iterable[str] | None = None,
    id_server: str | None = None,
    ts: int = TS,
) -> dict[str, Any]:
    """A federation pdu of ``version``, hashed and signed by ``signers`` (default:
    the sender's server) with Synapse's own signing code. ``id_server``: the
    domain of the event ID in v1-format rooms (default: the sender's)."""
    sender_server = sender.split(":", 1)[1]
    n = next(_counter)
    pdu: dict[str, Any] = {
        "room_id": "!room:a.test",
        "type": event_type,
        "sender": sender,
        "content": {"msgtype": "m.text", "body": f"hello {n}"}
        if content is None
        else content,
        "auth_events": [],
        "prev_events": [],
        "depth": n,
        "origin_server_ts": ts,
    }
    if state_key is not None:
        pdu["state_key"] = state_key
    if v1_ids(version):
        pdu["event_id"] = f"$e{n}:{id_server or sender_server}"
        pdu["origin"] = sender_server
    room_version = KNOWN_ROOM_VERSIONS[version]
    signers = [sender_server] if signers is None else list(signers)
    for server in signers or [sender_server]:
        add_hashes_and_signatures(room_version, pdu, server, SIGNING_KEYS[server])
    if not signers:
        pdu["signatures"] = {}  # hashed, signed by nobody
    return pdu


def verdicts(version: str, pdus: list[dict[str, Any]], keys: Any) -> list[str]:
    return [NAMES[v] for v, _ in verify_chunk(version, pdus, keys)]


def verdict(version: str, pdu: dict[str, Any], keys: Any) -> str:
    return verdicts(version, [pdu], keys)[0]


def forge(pdu: dict[str, Any], server: str) -> None:
    """Replace ``server``'s signature with a well-formed but wrong one: the same
    key ID, another key."""
    impostor = generate_signing_key(SIGNING_KEYS[server].version)
    clean = {k: v for k, v in pdu.items() if k != "signatures"}
    add_hashes_and_signatures(KNOWN_ROOM_VERSIONS["10"], clean, server, impostor)
    pdu["signatures"][server] = clean["signatures"][server]


#: Room versions with hash event IDs (v10 and v11 differ in redaction, which the
#: signatures cover) and one with v1 event IDs (server domain in the ID).
VERSIONS = ("10", "11", "12", "1")


class VerifyChunkTests(unittest.SynchronousTestCase):
    def test_genuine_events_are_ok_and_ids_are_synapses(self) -> None:
        for version in VERSIONS:
            with self.subTest(version=version):
                pdus = [
                    make_pdu(version),
                    make_pdu(
                        version,
                        sender="@bob:b.test",
                        event_type="m.room.member",
                        state_key="@bob:b.test",
                        content={"membership": "join", "displayname": "Bob"},
                    ),
                    make_pdu(
                        version,
                        event_type="m.room.topic",
                        state_key="",
                        content={"topic": "t"},
                    ),
                ]
                got = verify_chunk(version, pdus, held("a.test", "b.test"))
                self.assertEqual([NAMES[v] for v, _ in got], ["OK"] * 3)
                room_version = KNOWN_ROOM_VERSIONS[version]
                self.assertEqual(
                    [event_id for _, event_id in got],
                    [event_from_pdu_json(p, room_version).event_id for p in pdus],
                )
                if v1_ids(version):
                    self.assertEqual(
                        [event_id for _, event_id in got],
                        [p["event_id"] for p in pdus],
                    )
                else:
                    for _, event_id in got:
                        self.assertRegex(event_id or "", r"^\$[A-Za-z0-9_-]{43}$")

    def test_the_pdu_is_not_modified(self) -> None:
        pdu = make_pdu("10")
        before = copy.deepcopy(pdu)
        verify_chunk("10", [pdu], held("a.test"))
        self.assertEqual(pdu, before)

    def test_forged_signature_is_bad(self) -> None:
        for version in VERSIONS:
            with self.subTest(version=version):
                pdu = make_pdu(version)
                forge(pdu, "a.test")
                self.assertEqual(verdict(version, pdu, held("a.test")), "BAD_SIGNATURE")

    def test_signature_over_other_content_is_bad(self) -> None:
        """A state event's content is kept by redaction, so the signature covers
        it: changed content is a bad signature (not just a hash mismatch)."""
        pdu = make_pdu(
            "10",
            event_type="m.room.join_rules",
            state_key="",
            content={"join_rule": "public"},
        )
        pdu["content"]["join_rule"] = "invite"
        self.assertEqual(verdict("10", pdu, held("a.test")), "BAD_SIGNATURE")

    def test_one_bad_signature_among_good_ones_is_bad(self) -> None:
        """Synapse checks every held key of the server and fails on any bad one."""
        pdu = make_pdu("10")
        extra = generate_signing_key("a2")
        clean = {k: v for k, v in pdu.items() if k != "signatures"}
        add_hashes_and_signatures(KNOWN_ROOM_VERSIONS["10"], clean, "a.test", extra)
        pdu["signatures"]["a.test"]["ed25519:a2"] = clean["signatures"]["a.test"][
            "ed25519:a2"
        ]
        keys = held("a.test")
        # a2 not held: the good a1 signature suffices
        self.assertEqual(verdict("10", pdu, keys), "OK")
        # a2 held, but as another key than the one that signed
        keys[("a.test", "ed25519:a2")] = (
            bytes(generate_signing_key("a2").verify_key),
            FOREVER,
        )
        self.assertEqual(verdict("10", pdu, keys), "BAD_SIGNATURE")

    def test_not_signed_by_the_senders_server_is_bad(self) -> None:
        for version in VERSIONS:
            with self.subTest(version=version):
                # signed, validly, by another server only
                pdu = make_pdu(
                    version, sender="@alice:a.test", signers=["b.test"], id_server=None
                )
                keys = held("a.test", "b.test")
                self.assertEqual(verdict(version, pdu, keys), "BAD_SIGNATURE")
                # no signatures at all
                pdu = make_pdu(version, signers=[])
                self.assertEqual(verdict(version, pdu, keys), "BAD_SIGNATURE")

    def test_v1_event_id_domain_must_sign_too(self) -> None:
        """In v1/v2 rooms the event ID's server signs too (joins made by a resident
        for a remote user); hash-ID rooms have no such requirement."""
        keys = held("a.test", "b.test")
        pdu = make_pdu("1", id_server="b.test", signers=["a.test"])
        self.assertEqual(pdu["event_id"].split(":")[1], "b.test")
        self.assertEqual(verdict("1", pdu, keys), "BAD_SIGNATURE")
        pdu = make_pdu("1", id_server="b.test", signers=["a.test", "b.test"])
        self.assertEqual(verdict("1", pdu, keys), "OK")
        self.assertEqual(verdict("1", pdu, held("a.test")), "UNCERTAIN")
        self.assertEqual(
            required_servers(pdu, v1_event_ids=True, restricted=False),
            ["a.test", "b.test"],
        )

    def test_key_not_held_is_uncertain(self) -> None:
        for version in VERSIONS:
            with self.subTest(version=version):
                pdu = make_pdu(version)
                self.assertEqual(verdict(version, pdu, {}), "UNCERTAIN")
                self.assertEqual(verdict(version, pdu, held("b.test")), "UNCERTAIN")

    def test_key_expired_before_the_event(self) -> None:
        """Room versions 5+ check the key was valid at origin_server_ts: an expired
        key leaves it to Synapse (it may fetch a fresher one). Older versions
        accept any held key."""
        for version, enforced in (("10", True), ("11", True), ("1", False)):
            with self.subTest(version=version):
                self.assertEqual(
                    KNOWN_ROOM_VERSIONS[version].enforce_key_validity, enforced
                )
                pdu = make_pdu(version, ts=TS)
                expired = held("a.test", valid_until=TS - 1)
                self.assertEqual(
                    verdict(version, pdu, expired), "UNCERTAIN" if enforced else "OK"
                )
                # valid exactly until the event: fine everywhere
                self.assertEqual(
                    verdict(version, pdu, held("a.test", valid_until=TS)), "OK"
                )
        # an expired key does not verify, so it cannot condemn either
        pdu = make_pdu("10", ts=TS)
        forge(pdu, "a.test")
        self.assertEqual(
            verdict("10", pdu, held("a.test", valid_until=TS - 1)), "UNCERTAIN"
        )

    def test_content_hash_mismatch_is_uncertain(self) -> None:
        """A message's content is redacted away, so the signature still holds over
        changed content but the hash does not: Synapse redacts such events, so
        it decides."""
        for version in VERSIONS:
            with self.subTest(version=version):
                pdu = make_pdu(version)
                pdu["content"]["body"] = "tampered"
                self.assertEqual(verdict(version, pdu, held("a.test")), "UNCERTAIN")

    def test_third_party_invite_is_uncertain(self) -> None:
        for version in VERSIONS:
            with self.subTest(version=version):
                content = {
                    "membership": "invite",
                    "third_party_invite": {
                        "display_name": "c...@example.org",
                        "signed": {"mxid": "@carol:c.test", "token": "abc"},
                    },
                }
                # signed by an unrelated server, as such invites may be
                pdu = make_pdu(
                    version,
                    event_type="m.room.member",
                    state_key="@carol:c.test",
                    content=content,
                    signers=["b.test"],
                )
                self.assertEqual(
                    verdict(version, pdu, held("a.test", "b.test")), "UNCERTAIN"
                )
                self.assertIsNone(
                    required_servers(pdu, v1_ids(version), restricted=True)
                )
        # a plain invite is checked as usual
        pdu = make_pdu(
            "10",
            event_type="m.room.member",
            state_key="@carol:c.test",
            content={"membership": "invite"},
        )
        self.assertEqual(verdict("10", pdu, held("a.test")), "OK")

    def test_not_an_event_is_invalid(self) -> None:
        good = make_pdu("10")
        missing_ts = {k: v for k, v in good.items() if k != "origin_server_ts"}
        bad_hashes = dict(good, hashes={"sha256": 5})
        bad_depth = dict(good, depth="deep")
        for version, pdus in (
            ("10", [{}, {"type": "m.room.message"}, missing_ts, bad_hashes, bad_depth]),
            ("1", [{"type": "m.room.message"}, dict(make_pdu("1"), event_id=5)]),
        ):
            with self.subTest(version=version):
                got = verify_chunk(version, pdus, held("a.test"))
                self.assertEqual(got, [(INVALID, None)] * len(pdus))
        # one bad pdu does not spoil the rest of its chunk
        self.assertEqual(
            verdicts("10", [{}, good, bad_depth, good], held("a.test")),
            ["INVALID", "OK", "INVALID", "OK"],
        )

    def test_banned_key_is_uncertain(self) -> None:
        """Synapse refuses a banned key outright; the bulk check leaves it to it."""
        pdu = make_pdu("10")
        banned = frozenset({encode_base64(bytes(SIGNING_KEYS["a.test"].verify_key))})
        [(got, _)] = verify_chunk("10", [pdu], held("a.test"), banned)
        self.assertEqual(NAMES[got], "UNCERTAIN")
        # what the module passes in is Synapse's own list
        self.assertEqual(
            banned_signing_keys(),
            frozenset(keyring.BANNED_SERVER_SIGNING_KEYS),
        )
        self.assertTrue(banned_signing_keys())

    def test_content_hash_as_synapse_checks_it(self) -> None:
        """The workers' own content-hash check agrees with Synapse's
        ``check_event_content_hash`` (which the workers do not import)."""
        for version in VERSIONS:
            room_version = KNOWN_ROOM_VERSIONS[version]
            genuine = make_pdu(version)
            tampered = make_pdu(version)
            tampered["content"]["body"] = "changed"
            with_unsigned = dict(make_pdu(version), unsigned={"age": 5})
            other_hash = make_pdu(version)
            other_hash["hashes"] = dict(tampered["hashes"])
            for name, pdu, matches in (
                ("genuine", genuine, True),
                ("tampered", tampered, False),
                ("unsigned", with_unsigned, True),
                ("other hash", other_hash, False),
            ):
                with self.subTest(version=version, pdu=name):
                    event = make_event_from_dict(copy.deepcopy(pdu), room_version)
                    self.assertEqual(check_event_content_hash(event), matches)
                    self.assertEqual(
                        content_hash_matches(event.get_pdu_json()), matches
                    )
        # malformed hashes: Synapse raises, the bulk check says no (UNCERTAIN)
        malformed: list[Any] = [None, {}, {"sha256": "!!"}, {"sha256": 5}, []]
        for hashes in malformed:
            self.assertFalse(
                content_hash_matches(dict(make_pdu("10"), hashes=hashes)), hashes
            )

    def test_restricted_join_needs_the_authorising_servers_signature(self) -> None:
        content = {
            "membership": "join",
            "join_authorised_via_users_server": "@admin:b.test",
        }

        def join(signers: list[str], version: str = "10") -> dict[str, Any]:
            return make_pdu(
                version,
                sender="@alice:a.test",
                event_type="m.room.member",
                state_key="@alice:a.test",
                content=dict(content),
                signers=signers,
            )

        keys = held("a.test", "b.test")
        for version in ("8", "10", "11"):
            with self.subTest(version=version):
                self.assertTrue(KNOWN_ROOM_VERSIONS[version].restricted_join_rule)
                self.assertEqual(
                    verdict(version, join(["a.test"], version), keys), "BAD_SIGNATURE"
                )
                self.assertEqual(
                    verdict(version, join(["a.test", "b.test"], version), keys), "OK"
                )
                # the authorising server's key not held: Synapse fetches it
                self.assertEqual(
                    verdict(
                        version, join(["a.test", "b.test"], version), held("a.test")
                    ),
                    "UNCERTAIN",
                )
                forged = join(["a.test", "b.test"], version)
                forge(forged, "b.test")
                self.assertEqual(verdict(version, forged, keys), "BAD_SIGNATURE")
        # before restricted joins (v7) the field means nothing
        self.assertFalse(KNOWN_ROOM_VERSIONS["7"].restricted_join_rule)
        self.assertEqual(verdict("7", join(["a.test"], "7"), keys), "OK")
        # only joins need it
        leave = make_pdu(
            "10",
            event_type="m.room.member",
            state_key="@alice:a.test",
            content={
                "membership": "leave",
                "join_authorised_via_users_server": "@admin:b.test",
            },
        )
        self.assertEqual(verdict("10", leave, keys), "OK")
        # authorised by a user of the joining server itself: one signature
        self_authorised = make_pdu(
            "10",
            event_type="m.room.member",
            state_key="@alice:a.test",
            content={
                "membership": "join",
                "join_authorised_via_users_server": "@mod:a.test",
            },
        )
        self.assertEqual(verdict("10", self_authorised, held("a.test")), "OK")

    def test_key_ids_needed(self) -> None:
        restricted_join = make_pdu(
            "10",
            event_type="m.room.member",
            state_key="@alice:a.test",
            content={
                "membership": "join",
                "join_authorised_via_users_server": "@admin:b.test",
            },
            signers=["a.test", "b.test"],
        )
        # an extra signature by a server nobody requires
        message = make_pdu("10", signers=["a.test", "c.test"])
        third_party = make_pdu(
            "10",
            event_type="m.room.member",
            state_key="@carol:c.test",
            content={"membership": "invite", "third_party_invite": {}},
            signers=["b.test"],
        )
        unsigned = make_pdu("10", sender="@bob:b.test", signers=[])
        junk: list[dict[str, Any]] = [
            {},
            {"sender": 5, "signatures": {"x": {"ed25519:x": "s"}}},
            {"sender": "@u:x", "content": {}, "signatures": ["x"]},
        ]
        pdus = [restricted_join, message, third_party, unsigned, *junk]

        def needed(
            pdus: Iterable[dict[str, Any]], v1_event_ids: bool, restricted: bool
        ) -> set[tuple[str, str]]:
            wanted: set[tuple[str, str]] = set()
            for pdu in pdus:
                wanted |= key_ids_needed(pdu, v1_event_ids, restricted)
            return wanted

        self.assertEqual(
            needed(pdus, v1_event_ids=False, restricted=True),
            {("a.test", key_id("a.test")), ("b.test", key_id("b.test"))},
        )
        self.assertEqual(
            needed(pdus, v1_event_ids=False, restricted=False),
            {("a.test", key_id("a.test"))},
        )
        # v1 rooms: the event ID's server too
        v1 = make_pdu("1", id_server="c.test", signers=["a.test", "c.test"])
        self.assertEqual(
            needed([v1], v1_event_ids=True, restricted=False),
            {("a.test", key_id("a.test")), ("c.test", key_id("c.test"))},
        )
        self.assertEqual(
            needed([v1], v1_event_ids=False, restricted=False),
            {("a.test", key_id("a.test"))},
        )
        # every key ID the required server signed with
        two_keys = make_pdu("10")
        two_keys["signatures"]["a.test"]["ed25519:old"] = "sig"
        self.assertEqual(
            needed([two_keys], v1_event_ids=False, restricted=False),
            {("a.test", key_id("a.test")), ("a.test", "ed25519:old")},
        )

    def test_required_servers(self) -> None:
        pdu = {"sender": "@a:a.test", "type": "m.room.message", "content": {}}
        self.assertEqual(required_servers(pdu, False, True), ["a.test"])
        self.assertIsNone(required_servers(dict(pdu, sender="nocolon"), False, True))
        self.assertIsNone(required_servers(dict(pdu, content=[]), False, True))
        self.assertIsNone(required_servers(pdu, True, True))  # v1 without event_id
        self.assertEqual(
            required_servers(dict(pdu, event_id="$x:a.test"), True, True), ["a.test"]
        )


def _mixed_pdus(version: str) -> list[dict[str, Any]]:
    """Ten pdus with every verdict, in an order that chunks of 3 split."""
    forged = make_pdu(version)
    forge(forged, "a.test")
    hash_mismatch = make_pdu(version)
    hash_mismatch["content"]["body"] = "changed"
    return [
        make_pdu(version),
        forged,
        make_pdu(version, sender="@bob:b.test"),
        {"type": "nope"},
        make_pdu(version, sender="@carol:c.test"),  # key not held
        hash_mismatch,
        make_pdu(version, signers=[]),
        make_pdu(version),
        make_pdu(version, sender="@bob:b.test"),
        make_pdu(version),
    ]


class VerifyChunkEventsTests(unittest.SynchronousTestCase):
    """The events built with the verdicts (for checks run in a thread) are
    the ones Synapse's ``event_from_pdu_json`` makes of the pdus."""

    def test_same_verdicts_and_synapse_events(self) -> None:
        for version in ("10", "11", "12"):
            pdus = _mixed_pdus(version)
            with_unsigned = make_pdu(version)
            with_unsigned["unsigned"] = {"age": 5, "secret": "dropped", "age_ts": 1}
            pdus.append(with_unsigned)
            keys = held("a.test", "b.test")
            expected = verify_chunk(version, copy.deepcopy(pdus), keys)
            given = copy.deepcopy(pdus)
            got = verify_chunk_events(version, given, keys)
            self.assertEqual(given, pdus)  # not modified
            self.assertEqual([(v, e) for v, e, _ in got], expected, version)
            room_version = KNOWN_ROOM_VERSIONS[version]
            for pdu, (v, event_id, event) in zip(pdus, got, strict=True):
                if v == INVALID:
                    self.assertIsNone(event)
                    continue
                synapse_event = event_from_pdu_json(copy.deepcopy(pdu), room_version)
                self.assertEqual(event.event_id, event_id)
                self.assertEqual(event.get_dict(), synapse_event.get_dict())
                self.assertEqual(
                    event.get_pdu_json(), synapse_event.get_pdu_json(), version
                )
            # ``unsigned`` stripped as Synapse strips it (no age: no age_ts)
            self.assertNotIn("secret", got[-1][2].unsigned)
            self.assertNotIn("age_ts", got[-1][2].unsigned)

    def test_json_from_a_worker_makes_the_same_events(self) -> None:
        """What a worker process sends back (``verify_chunk_json``) makes,
        with ``event_from_json``, the events ``verify_chunk_events`` builds,
        from dicts and from bytes; none where Synapse's parse refuses."""
        import json

        for version in ("10", "11", "12"):
            pdus = _mixed_pdus(version)
            with_unsigned = make_pdu(version)
            with_unsigned["unsigned"] = {"age": 5, "secret": "dropped", "age_ts": 1}
            floaty = make_pdu(version, content={"membership": "join", "n": 1.5})
            pdus += [with_unsigned, floaty]
            keys = held("a.test", "b.test")
            expected = verify_chunk_events(version, copy.deepcopy(pdus), keys)
            for raw in (copy.deepcopy(pdus), [json.dumps(p).encode() for p in pdus]):
                got = verify_chunk_json(version, raw, keys)
                self.assertEqual(
                    [(v, e) for v, e, _ in got], [(v, e) for v, e, _ in expected]
                )
                for (_, _, built), (_, _, event) in zip(got, expected, strict=True):
                    if event is None:
                        self.assertIsNone(built)
                        continue
                    assert built is not None
                    made = event_from_json(built, version)
                    self.assertEqual(made.get_dict(), event.get_dict())
                    self.assertEqual(made.get_pdu_json(), event.get_pdu_json())
                    self.assertEqual(made.event_id, event.event_id)
                self.assertIsNone(got[-1][2])  # the float: refused

    def test_what_synapse_refuses_is_invalid_from_bytes_too(self) -> None:
        """A pdu Synapse's federation parse refuses (a float where strict
        canonical JSON forbids it, a negative depth) is INVALID with no event,
        given as bytes or as a dict."""
        import json

        floaty = make_pdu("10", content={"msgtype": "m.text", "body": "x", "n": 1.5})
        deep = make_pdu("10")
        deep["depth"] = -1
        good = make_pdu("10")
        for raw in (
            [floaty, deep, good],
            [json.dumps(p).encode() for p in (floaty, deep, good)],
        ):
            got = verify_chunk_events("10", raw, held("a.test"))
            self.assertEqual(
                [(NAMES[v], e is None) for v, _, e in got],
                [("INVALID", True), ("INVALID", True), ("OK", False)],
            )


class VerifierPoolTests(unittest.TestCase):
    def setUp(self) -> None:
        self.patch(verify, "CHUNK", 3)

    def _pool(self, workers: int) -> VerifierPool:
        pool = VerifierPool(workers)
        self.addCleanup(pool.close)
        return pool

    async def _same_as_in_process(self, pool: VerifierPool) -> None:
        keys = held("a.test", "b.test")
        for version in ("10", "1"):
            pdus = _mixed_pdus(version)
            expected = verify_chunk(version, pdus, keys)
            self.assertEqual(
                [NAMES[v] for v, _ in expected],
                [
                    "OK",
                    "BAD_SIGNATURE",
                    "OK",
                    "INVALID",
                    "UNCERTAIN",
                    "UNCERTAIN",
                    "BAD_SIGNATURE",
                    "OK",
                    "OK",
                    "OK",
                ],
            )
            self.assertEqual(await verify_all(pool, version, pdus, keys), expected)
            chunks = pool.verify_chunks(version, pdus, keys)
            self.assertEqual([start for start, _ in chunks], [0, 3, 6, 9])
            got = []
            for start, d in chunks:
                chunk = await d
                self.assertEqual(chunk, expected[start : start + 3])
                got.extend(chunk)
            self.assertEqual(got, expected)
        self.assertEqual(await verify_all(pool, "10", [], keys), [])

    def test_thread(self) -> defer.Deferred[None]:
        pool = self._pool(0)
        pool.warm()  # nothing to start
        self.assertIsNone(pool._executor)
        return defer.ensureDeferred(self._same_as_in_process(pool))

    def test_worker_process(self) -> defer.Deferred[None]:
        pool = self._pool(1)

        async def go() -> None:
            pool.warm()
            await self._same_as_in_process(pool)
            executor = pool._executor
            assert executor is not None
            processes = list(executor._processes.values())  # type: ignore[attr-defined]
            self.assertEqual(len(processes), 1)
            self.assertTrue(processes[0].is_alive())
            pool.close()
            self.assertIsNone(pool._executor)
            await deferToThread(_wait_dead, processes, 30)
            self.assertFalse(any(p.is_alive() for p in processes))
            # a closed pool starts afresh when used again
            pdus = _mixed_pdus("10")[:2]
            self.assertEqual(
                [v for v, _ in await verify_all(pool, "10", pdus, held("a.test"))],
                [OK, BAD_SIGNATURE],
            )

        return defer.ensureDeferred(go())

    def test_banned_keys_reach_the_checks(self) -> defer.Deferred[None]:
        banned = frozenset({encode_base64(bytes(SIGNING_KEYS["b.test"].verify_key))})
        pdus = [make_pdu("10"), make_pdu("10", sender="@bob:b.test")]

        async def go() -> None:
            for workers in (0, 1):
                pool = VerifierPool(workers, banned)
                self.addCleanup(pool.close)
                got = await verify_all(pool, "10", pdus, held("a.test", "b.test"))
                self.assertEqual([v for v, _ in got], [OK, UNCERTAIN], workers)

        return defer.ensureDeferred(go())

    def test_small_work_stays_in_a_thread(self) -> defer.Deferred[None]:
        pool = self._pool(2)
        self.assertFalse(pool.worth_it(verify.WORKERS_MIN_EVENTS - 1))
        self.assertTrue(pool.worth_it(verify.WORKERS_MIN_EVENTS))
        self.assertFalse(self._pool(0).worth_it(10**6))
        pdus = _mixed_pdus("10")
        keys = held("a.test", "b.test")

        async def go() -> None:
            got = []
            for _, d in pool.verify_chunks("10", pdus, keys, use_workers=False):
                got.extend(await d)
            self.assertEqual(got, verify_chunk("10", pdus, keys))
            self.assertIsNone(pool._executor)  # no worker was started

        return defer.ensureDeferred(go())

    def test_events_come_back_from_the_thread_and_the_workers(
        self,
    ) -> defer.Deferred[None]:
        """With ``build_events``, the verdicts carry the events Synapse's
        federation parse makes of the pdus: built in the thread, or sent back
        by a worker process as JSON and made into the same events here."""
        pdus = _mixed_pdus("10")
        with_unsigned = make_pdu("10")
        with_unsigned["unsigned"] = {"age": 5, "secret": "dropped"}
        pdus.append(with_unsigned)
        keys = held("a.test", "b.test")
        expected = verify_chunk("10", pdus, keys)
        room_version = KNOWN_ROOM_VERSIONS["10"]

        async def go() -> None:
            for workers in (0, 1):
                pool = self._pool(workers)
                got = []
                for _, d in pool.verify_chunks("10", pdus, keys, build_events=True):
                    got.extend(await d)
                self.assertEqual([(v, e) for v, e, _ in got], expected)
                for pdu, (v, event_id, event) in zip(pdus, got, strict=True):
                    if v == INVALID:
                        self.assertIsNone(event, workers)
                        continue
                    synapse_event = event_from_pdu_json(
                        copy.deepcopy(pdu), room_version
                    )
                    self.assertEqual(event.event_id, event_id)
                    self.assertEqual(event.get_dict(), synapse_event.get_dict())
                    self.assertEqual(
                        event.get_pdu_json(), synapse_event.get_pdu_json(), workers
                    )
                    self.assertEqual(event.room_version, room_version)
                self.assertNotIn("secret", got[-1][2].unsigned)

        return defer.ensureDeferred(go())

    def _workers(self, pool: VerifierPool) -> list[Any]:
        executor = pool._executor
        assert executor is not None
        return list(executor._processes.values())  # type: ignore[attr-defined]

    async def _kill_worker(self, pool: VerifierPool) -> Any:
        """SIGKILL ``pool``'s worker, as the OOM killer does, and wait until it is
        dead and its executor knows (every later submit raises
        ``BrokenProcessPool``). Returns that executor."""
        executor = pool._executor
        [process] = self._workers(pool)
        os.kill(process.pid, signal.SIGKILL)
        await deferToThread(_wait_dead, [process], 30)
        await deferToThread(_wait_broken, executor, 30)
        self.assertFalse(process.is_alive())
        self.assertTrue(executor._broken)  # type: ignore[union-attr]
        return executor

    def test_a_killed_worker_is_replaced(self) -> defer.Deferred[None]:
        """A worker killed by the OOM killer breaks Python's process pool for good;
        the pool starts fresh workers and the verdicts stay right, resync after
        resync (the death noticed when submitting, and when warming up)."""
        pool = self._pool(1)

        async def go() -> None:
            pool.warm()
            broken = await self._kill_worker(pool)
            with self.assertLogs(verify.__name__, "WARNING") as logs:
                await self._same_as_in_process(pool)
            self.assertEqual(len(logs.output), 1, logs.output)
            self.assertIn("worker process died", logs.output[0])
            await self._same_as_in_process(pool)
            self.assertIsNot(pool._executor, broken)
            self.assertTrue(self._workers(pool)[0].is_alive())
            # killed again, noticed by warm(), which starts new workers
            broken = await self._kill_worker(pool)
            with self.assertLogs(verify.__name__, "WARNING"):
                pool.warm()
            self.assertIsNot(pool._executor, broken)
            await self._same_as_in_process(pool)

        return defer.ensureDeferred(go())

    def test_chunks_in_flight_when_the_worker_dies_are_checked_again(
        self,
    ) -> defer.Deferred[None]:
        """Chunks sent to a worker that dies before answering go to fresh workers
        (one replacement for all of them) and still get the right verdicts."""
        pool = self._pool(1)
        keys = held("a.test", "b.test")
        pdus = _mixed_pdus("10")
        expected = verify_chunk("10", pdus, keys)

        async def go() -> None:
            with self.assertLogs(verify.__name__, "WARNING") as logs:
                chunks = pool.verify_chunks("10", pdus, keys)
                self.assertEqual(len(chunks), 4)
                # the worker is still starting (importing Synapse): every chunk
                # is waiting for it
                broken = pool._executor
                [process] = self._workers(pool)
                os.kill(process.pid, signal.SIGKILL)
                got = []
                for _, d in chunks:
                    got.extend(await d)
            self.assertEqual(got, expected)
            self.assertIsNot(pool._executor, broken)
            self.assertEqual(len(logs.output), 1, logs.output)
            self.assertIn("worker process died", logs.output[0])
            self.assertEqual(await verify_all(pool, "10", pdus, keys), expected)

        return defer.ensureDeferred(go())

    def test_workers_that_keep_dying_leave_the_chunks_to_a_thread(
        self,
    ) -> defer.Deferred[None]:
        """Workers that die every time (here: as they start) are restarted a
        bounded number of times; then the chunks are checked in a thread."""
        self.patch(verify, "_warm_up", functools.partial(os._exit, 3))
        pool = self._pool(1)
        keys = held("a.test", "b.test")
        pdus = _mixed_pdus("10")
        expected = verify_chunk("10", pdus, keys)

        async def go() -> None:
            with self.assertLogs(verify.__name__, "INFO") as logs:
                got = await verify_all(pool, "10", pdus, keys)
            self.assertEqual(got, expected)
            in_thread = [line for line in logs.output if "in a thread" in line]
            self.assertEqual(len(in_thread), 4, logs.output)  # each chunk
            # Each chunk saw 1 + WORKER_RETRIES pools die (usually the same
            # ones: a pool that dies takes every chunk it holds with it).
            started = [line for line in logs.output if "Started" in line]
            died = [line for line in logs.output if "worker process died" in line]
            tries = 1 + verify.WORKER_RETRIES
            self.assertGreaterEqual(len(started), tries, logs.output)
            self.assertLessEqual(len(started), 4 * tries, logs.output)
            self.assertEqual(len(died), len(started), logs.output)
            # a later resync tries workers again
            self.assertIsNone(pool._executor)

        return defer.ensureDeferred(go())

    def test_worker_errors_reach_the_caller(self) -> defer.Deferred[None]:
        pool = self._pool(1)

        async def go() -> None:
            with self.assertRaises(KeyError):
                await verify_all(pool, "no such version", [make_pdu("10")], {})

        return defer.ensureDeferred(go())


async def verify_all(
    pool: VerifierPool, room_version_id: str, pdus: list[Any], keys: Any
) -> list[tuple[int, str | None]]:
    """Every verdict, chunk after chunk, as the state fetch awaits them."""
    verdicts: list[tuple[int, str | None]] = []
    for _, d in pool.verify_chunks(room_version_id, pdus, keys):
        verdicts.extend(await d)
    return verdicts


def _wait_dead(processes: list[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        time.sleep(0.1)


def _wait_broken(executor: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not executor._broken and time.monotonic() < deadline:
        time.sleep(0.05)
