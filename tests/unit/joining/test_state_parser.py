"""The streamed ``/state`` parser (``joining/state_parser.py``): what it keeps of an
answer, what it drops, and what it refuses (pure: no Synapse)."""

from __future__ import annotations

import json
import random
import unittest
from collections.abc import Callable
from typing import Any

from canonicaljson import encode_canonical_json
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse_partial_state.joining.state_parser import (
    MAX_ITEM_VALUES,
    MAX_NESTING,
    MAX_PDU_SIZE,
    StateAnswerError,
    StatePdus,
    StatePdusParser,
)
from synapse_partial_state.joining.verify import key_ids_needed
from synapse_partial_state.wire import MEMBERS_ONLY_PARAM


def parse(
    body: bytes,
    step: int = 7,
    seen: list[Any] | None = None,
    v1_event_ids: bool = False,
) -> StatePdus:
    parser = StatePdusParser(
        seen.append if seen is not None else None, v1_event_ids=v1_event_ids
    )
    for start in range(0, len(body), step):
        parser.write(body[start : start + step])
    return parser.finish()


def body_of(
    pdus: list[Any], auth_chain: list[Any] | None = None, **fields: Any
) -> bytes:
    answer = {"pdus": pdus, **fields}
    if auth_chain is not None:
        answer["auth_chain"] = auth_chain
    return json.dumps(answer).encode()


def canonical(*items: Any) -> list[bytes]:
    return [encode_canonical_json(item) for item in items]


_n = iter(range(10**9))


def event(**fields: Any) -> dict[str, Any]:
    """A pdu with every field every room version requires, of the right JSON
    type (not signed: the parser does not check signatures)."""
    n = next(_n)
    pdu: dict[str, Any] = {
        "room_id": "!room:a.test",
        "type": "m.room.member",
        "state_key": f"@u{n}:a.test",
        "sender": f"@u{n}:a.test",
        "content": {"membership": "join", "weight": 1.5},
        "depth": n,
        "origin_server_ts": 1_700_000_000_000 + n,
        "prev_events": [],
        "auth_events": ["$create", "$power"],
        "hashes": {"sha256": "abc"},
        "signatures": {"a.test": {"ed25519:a1": "sig"}},
        "unsigned": {"age": 5},
    }
    pdu.update(fields)
    return pdu


#: Each field every pdu must have, and its JSON type.
REQUIRED = {
    "type": str,
    "sender": str,
    "room_id": str,
    "content": dict,
    "depth": int,
    "origin_server_ts": int,
    "prev_events": list,
    "auth_events": list,
    "hashes": dict,
}
#: A value of each JSON type.
SAMPLES: list[Any] = [None, True, False, 0, -3, 1.5, "x", [], [1], {}, {"a": 1}]


def wrong_for(kind: type) -> list[Any]:
    """JSON values not of ``kind`` (booleans are not integers in JSON)."""
    if kind is int:
        return [v for v in SAMPLES if type(v) is not int]
    return [v for v in SAMPLES if not isinstance(v, kind)]


class StatePdusParserTests(unittest.TestCase):
    def test_pdus_and_auth_chain_as_canonical_json_in_any_chunking(self) -> None:
        pdu, auth = event(), event(type="m.room.create", state_key="")
        body = body_of([pdu], [auth])
        for step in (1, 7, len(body)):
            result = parse(body, step)
            self.assertEqual(result.pdus, canonical(pdu))
            self.assertEqual(result.auth_chain, canonical(auth))
            self.assertFalse(result.members_only)
            self.assertEqual(result.dropped, 0)

    def test_on_pdu_sees_every_kept_item_of_both_lists(self) -> None:
        seen: list[Any] = []
        pdu, auth = event(), event()
        parse(body_of([pdu, {}], [auth, {"type": "x"}]), seen=seen)
        self.assertCountEqual(seen, [pdu, auth])

    def test_items_that_are_not_objects_are_dropped(self) -> None:
        pdu = event()
        result = parse(body_of([1, "x", None, [pdu], pdu]))
        self.assertEqual(result.pdus, canonical(pdu))
        self.assertEqual(result.dropped, 4)

    def test_members_only_marker_only_when_true(self) -> None:
        for value, want in (
            (True, True),
            (False, False),
            ("true", False),
            ({"x": True}, False),
            ([True], False),
        ):
            body = json.dumps({"pdus": [], MEMBERS_ONLY_PARAM: value}).encode()
            self.assertEqual(parse(body).members_only, want, value)
        # a top-level field only
        body = json.dumps({"pdus": [{MEMBERS_ONLY_PARAM: True}]}).encode()
        self.assertFalse(parse(body).members_only)

    def test_junk_objects_are_dropped_and_counted(self) -> None:
        """An empty object costs 3 bytes of the answer and was kept as ~40 bytes
        of Python: 500 MiB of them made ~10 GiB. Now nothing is kept of them."""
        good = event()
        result = parse(
            b'{"pdus": [' + b"{}," * 10_000 + json.dumps(good).encode() + b"]}"
        )
        self.assertEqual(result.pdus, canonical(good))
        self.assertEqual(result.dropped, 10_000)

    def test_every_required_field_with_its_json_type(self) -> None:
        for field, kind in REQUIRED.items():
            missing = event()
            del missing[field]
            wrong = [event(**{field: value}) for value in wrong_for(kind)]
            with self.subTest(field=field):
                result = parse(body_of([missing, *wrong], [event()]))
                self.assertEqual(result.pdus, [])
                self.assertEqual(len(result.auth_chain), 1)
                self.assertEqual(result.dropped, 1 + len(wrong))

    def test_nothing_more_is_required_than_synapse_requires(self) -> None:
        """Nothing is required beyond what Synapse requires in every room
        version: a v12 create event has no room ID, ``signatures`` may be missing
        (Synapse's own check then decides), other fields are not looked at."""
        kept = [
            event(),
            {k: v for k, v in event(type="m.room.create").items() if k != "room_id"},
            {k: v for k, v in event().items() if k not in ("signatures", "unsigned")},
            event(redacts=5, unknown={"x": [1.5, None]}, hashes={}),
            event(depth=0, origin_server_ts=-1, content={}, prev_events=[["$a", {}]]),
        ]
        dropped = [
            {k: v for k, v in event(type="m.room.message").items() if k != "room_id"},
            event(signatures=["a.test"]),
            event(signatures="a.test"),
        ]
        result = parse(body_of(kept + dropped))
        self.assertEqual(result.pdus, canonical(*kept))
        self.assertEqual(result.dropped, len(dropped))

    def test_room_versions_1_and_2_require_an_event_id(self) -> None:
        with_id = event(event_id="$e:a.test")
        without = event()
        bad_id = event(event_id=5)
        self.assertEqual(
            parse(body_of([with_id, without, bad_id]), v1_event_ids=True).pdus,
            canonical(with_id),
        )
        self.assertEqual(
            parse(body_of([with_id, without]), v1_event_ids=False).pdus,
            canonical(with_id, without),
        )

    def test_a_pdu_whose_signatures_is_a_list_among_good_ones(self) -> None:
        """Such a pdu used to abort the whole answer (the fetch's own key
        collection called ``.get`` on it). The key collection the fetch now
        uses (``key_ids_needed``) takes it in its stride, and the parser leaves
        it out: the good pdus still come through."""
        bad = event(sender="@mallory:b.test", signatures=["b.test"])
        self.assertEqual(key_ids_needed(bad, False, True), set())
        self.assertEqual(key_ids_needed(bad, True, False), set())
        goods = [event(), event(sender="@bob:b.test")]
        wanted: set[tuple[str, str]] = set()

        def on_pdu(pdu: dict[str, Any]) -> None:
            wanted.update(key_ids_needed(pdu, False, True))

        parser = StatePdusParser(on_pdu)
        parser.write(body_of([goods[0], bad, goods[1]], [bad]))
        result = parser.finish()
        self.assertEqual(result.pdus, canonical(*goods))
        self.assertEqual(result.auth_chain, [])
        self.assertEqual(result.dropped, 2)
        self.assertEqual(wanted, {("a.test", "ed25519:a1")})

    def test_items_over_the_pdu_size_limit_are_dropped(self) -> None:
        """Synapse never stores an event whose canonical JSON is over
        ``MAX_PDU_SIZE`` bytes (measured with its ``unsigned`` reduced to the
        little it keeps: here, without it)."""
        self.assertEqual(MAX_PDU_SIZE, 65536)

        def sized(size: int) -> dict[str, Any]:
            pdu = event(content={"body": ""})
            del pdu["unsigned"]
            pdu["content"]["body"] = "x" * (size - len(encode_canonical_json(pdu)))
            self.assertEqual(len(encode_canonical_json(pdu)), size)
            return pdu

        at_limit = sized(MAX_PDU_SIZE)
        over = sized(MAX_PDU_SIZE + 1)
        # over only with its unsigned, which Synapse strips (but ``age``)
        unsigned = sized(MAX_PDU_SIZE)
        unsigned["unsigned"] = {"age": 5, "junk": "y" * 500}
        result = parse(body_of([at_limit, over, unsigned]), step=4096)
        self.assertEqual(result.pdus, canonical(at_limit, unsigned))
        self.assertEqual(result.dropped, 1)

    def test_what_is_kept_never_outgrows_what_was_received(self) -> None:
        """Numbers written short are kept longer (``1E15``: 4 bytes received,
        ``1000000000000000.0`` kept), e.g. in room versions 1-5 which allow
        floats: the pdus that would make the kept bytes outgrow the received
        ones are dropped."""
        floats = "[" + ",".join(["1E15"] * 1000) + "]"
        template = json.dumps(event(content={"f": "FLOATS"}))
        pdu = template.replace('"FLOATS"', floats).encode()
        body = b'{"pdus": [' + b",".join([pdu] * 20) + b"]}"
        for step in (1000, len(body)):
            result = parse(body, step)
            kept = sum(map(len, result.pdus))
            self.assertLessEqual(kept, len(body))
            self.assertGreater(result.dropped, 0)
            self.assertEqual(len(result.pdus) + result.dropped, 20)
            self.assertEqual(
                result.pdus, [encode_canonical_json(json.loads(pdu))] * len(result.pdus)
            )

    def test_a_body_that_is_not_json_raises_a_value_error(self) -> None:
        """Synapse's HTTP client turns a ``ValueError`` from the parser into a
        failed request (``RequestSendFailed``, "Failed to parse response"),
        which the engine fails over like any other."""
        good = json.dumps({"pdus": [event()]}).encode()
        bodies = {
            "html": b"<html>502 Bad Gateway</html>",
            "empty": b"",
            "truncated": good[:-3],
            "trailing garbage": good + b"{}",
            "NaN": b'{"pdus": [NaN]}',
            "invalid UTF-8": b'{"pdus": ["\xc3"]}',
            "lone surrogate": b'{"pdus": ["\\udc00"]}',
            "integer overflow": b'{"pdus": [' + b"9" * 30 + b"]}",
            "float overflow": b'{"pdus": [1E400]}',
        }
        for what, body in bodies.items():
            with self.subTest(what):
                with self.assertRaises(StateAnswerError) as raised:
                    parse(body)
                self.assertIsInstance(raised.exception, ValueError)
        # JSON, but not an object of lists: nothing in it
        for body in (b"[1, 2]", b'"x"', b'{"pdus": {"a": {}}}', b"{}"):
            result = parse(body)
            self.assertEqual((result.pdus, result.auth_chain), ([], []), body)

    def test_deep_nesting(self) -> None:
        """A pdu nested 200 deep is kept (Synapse's check finds it invalid: it
        reads no event nested over 127 deep)."""
        deep = event()
        deep["content"]["nested"] = json.loads("[" * 200 + "]" * 200)
        body = body_of([deep, event()])
        self.assertEqual(len(parse(body, step=1000).pdus), 2)


class ShapeGuardTests(unittest.TestCase):
    """Bodies shaped as no answer of events can be are refused before ijson
    builds anything of them: nested deeper than an answer of events can be,
    keys on one path longer than an event, items of more values than an event
    has. ijson keeps the path to every value it reads, one string per level:
    without these limits memory grows with the square of the body (20,000
    levels of ``[``, 40 KB, took 1 GB; long keys, 1 GB from 9 MiB), and it builds
    each item whole before it can be dropped."""

    def assert_refused(self, body: bytes) -> None:
        for step in (1000, len(body)):
            with self.assertRaises(StateAnswerError):
                parse(body, step)

    def test_nesting(self) -> None:
        # the limit, counting the answer and its list: parsed as usual
        within = "[" * (MAX_NESTING - 2) + "]" * (MAX_NESTING - 2)
        body = ('{"pdus": [' + within + "]}").encode()
        self.assertEqual(parse(body, 1000).dropped, 1)
        for depth in (MAX_NESTING - 1, 5000):
            deep = "[" * depth + "]" * depth
            self.assert_refused(('{"pdus": [' + deep + "]}").encode())
            # anywhere in the answer
            self.assert_refused(('{"junk": [' + deep + '], "pdus": []}').encode())
            self.assert_refused(('{"auth_chain": [' + deep + "]}").encode())
            objects = '{"a":' * depth + "1" + "}" * depth
            self.assert_refused(('{"pdus": [' + objects + "]}").encode())

    def test_keys_along_one_path(self) -> None:
        half = MAX_PDU_SIZE // 2
        # long keys side by side: parsed (the event, over the size limit, is
        # dropped)
        side = {f"{i}{'k' * half}": 1 for i in range(4)}
        good = event()
        result = parse(body_of([event(content=side), good]), 4096)
        self.assertEqual((result.pdus, result.dropped), (canonical(good), 1))
        # nested: more than an event's size on one path
        nested = {"a" * half: {"b" * half: {"c" * 100: 1}}}
        self.assert_refused(body_of([event(content=nested)]))
        self.assert_refused(json.dumps({"x" * half: nested}).encode())

    def test_values_in_one_item(self) -> None:
        self.assertEqual(MAX_ITEM_VALUES, 4 * MAX_PDU_SIZE)
        # an item of the limit's count of values: dropped (not an event)
        zeros = "[" + ",".join(["0"] * (MAX_ITEM_VALUES - 2)) + "]"
        self.assertEqual(parse(('{"pdus": [' + zeros + "]}").encode(), 4096).dropped, 1)
        # one more: refused, in either list, an event's content too
        zeros = "[" + ",".join(["0"] * (MAX_ITEM_VALUES - 1)) + "]"
        self.assert_refused(('{"pdus": [' + zeros + "]}").encode())
        self.assert_refused(('{"auth_chain": [1, ' + zeros + "]}").encode())
        template = json.dumps(event(content={"z": "ZEROS"}))
        self.assert_refused(
            ('{"pdus": [' + template.replace('"ZEROS"', zeros) + "]}").encode()
        )
        # empty objects: 3 bytes each in the answer, 72 in Python
        empties = "[" + ",".join(["{}"] * MAX_ITEM_VALUES) + "]"
        self.assert_refused(('{"pdus": [' + empties + "]}").encode())
        # values outside the lists of items are not built: no limit
        good = event()
        body = '{"junk": ' + zeros + ', "pdus": [' + json.dumps(good) + "]}"
        self.assertEqual(parse(body.encode(), 65536).pdus, canonical(good))


# -- Properties ---------------------------------------------------------------

#: JSON values ijson (yajl) reads back as they were: integers within 64 bits
#: (beyond, it refuses the whole body: see the test above), finite floats.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
#: Smaller values, for the fields of events.
small_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=5,
)
ints = st.integers(min_value=-(2**53), max_value=2**53)
TYPES: dict[type, st.SearchStrategy[Any]] = {
    str: st.text(max_size=20),
    int: ints,
    dict: st.dictionaries(st.text(max_size=5), small_json, max_size=3),
    list: st.lists(small_json, max_size=3),
}


@st.composite
def events(draw: Callable[..., Any], v1_event_ids: bool) -> dict[str, Any]:
    """Plausible events: every required field of its type, other fields
    anything (a create event may lack a room ID)."""
    pdu = draw(
        st.dictionaries(
            st.text(max_size=10).filter(
                lambda k: k not in REQUIRED and k != "signatures"
            ),
            small_json,
            max_size=3,
        )
    )
    pdu.pop("event_id", None)
    for field, kind in REQUIRED.items():
        pdu[field] = draw(TYPES[kind])
    if draw(st.booleans()):
        pdu["signatures"] = draw(TYPES[dict])
    if draw(st.booleans()):
        pdu["type"] = "m.room.create"
        if draw(st.booleans()):
            del pdu["room_id"]
    if v1_event_ids:
        pdu["event_id"] = draw(st.text(max_size=20))
    return pdu


@st.composite
def broken_events(draw: Callable[..., Any], v1_event_ids: bool) -> dict[str, Any]:
    """Events with one field required of every pdu missing or of another type."""
    pdu = draw(events(v1_event_ids))
    required = dict(REQUIRED)
    if v1_event_ids:
        required["event_id"] = str
    fields = sorted(field for field in required if field in pdu)
    if "room_id" not in pdu:
        fields.append("not a create event")  # which alone may lack a room ID
    field = draw(st.sampled_from(fields))
    if field == "not a create event":
        pdu["type"] = draw(st.text(max_size=10).filter(lambda t: t != "m.room.create"))
    elif draw(st.booleans()) and (field, pdu["type"]) != ("room_id", "m.room.create"):
        del pdu[field]  # (a create event without a room ID is fine)
    else:
        kind = required[field]
        pdu[field] = draw(
            json_values.filter(
                lambda v: (
                    (type(v) is not int) if kind is int else not isinstance(v, kind)
                )
            )
        )
    return pdu


def junk() -> st.SearchStrategy[Any]:
    """Any JSON value but an object with ``hashes`` (which no junk here has)."""
    return json_values.filter(lambda v: not (isinstance(v, dict) and "hashes" in v))


@st.composite
def answers(draw: Callable[..., Any]) -> tuple[bool, list[tuple[bool, Any]], bytes]:
    """(v1 event IDs, the items of ``pdus`` tagged whether they are events, the
    body, encoded as ``json.dumps`` does: floats written in full, non-ASCII
    escaped)."""
    v1 = draw(st.booleans())
    tagged = draw(
        st.lists(
            st.tuples(st.just(True), events(v1))
            | st.tuples(st.just(False), broken_events(v1))
            | st.tuples(st.just(False), junk()),
            max_size=8,
        )
    )
    body = json.dumps(
        {"pdus": [item for _, item in tagged]}, ensure_ascii=draw(st.booleans())
    ).encode()
    return v1, tagged, body


def chunked(draw: Callable[..., Any], body: bytes) -> list[bytes]:
    cuts = sorted(draw(st.sets(st.integers(0, len(body)), max_size=6)))
    bounds = [0, *cuts, len(body)]
    return [body[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def odd_json(rnd: random.Random, value: Any) -> str:
    """``value`` as JSON no canonical encoder writes (see
    ``test_non_canonical_json``)."""
    space = rnd.choice(["", " ", "\n\t "])
    if isinstance(value, float):
        forms = [repr(value), f"{value:.17E}", f"{value:e}"]
        if value.is_integer() and abs(value) < 1e17:
            forms.append(f"{int(value)}E0")
            forms.append(f"{int(value)}.000e+00")
        return rnd.choice(forms)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=rnd.random() < 0.5)
    if isinstance(value, list):
        return "[" + space + ("," + space).join(odd_json(rnd, v) for v in value) + "]"
    if isinstance(value, dict):
        members = (
            odd_json(rnd, k) + space + ":" + odd_json(rnd, v) for k, v in value.items()
        )
        return "{" + space + ("," + space).join(members) + space + "}"
    return json.dumps(value)


def is_subsequence(items: list[Any], of: list[Any]) -> bool:
    rest = iter(of)
    return all(any(item == other for other in rest) for item in items)


def run(v1: bool, chunks: list[bytes]) -> tuple[StatePdus, list[Any]]:
    seen: list[Any] = []
    parser = StatePdusParser(seen.append, v1_event_ids=v1)
    for chunk in chunks:
        parser.write(chunk)
    return parser.finish(), seen


class StatePdusParserProperties(unittest.TestCase):
    @settings(max_examples=100, deadline=None, database=None)
    @given(answer=answers(), data=st.data())
    def test_keeps_exactly_the_events_in_order(
        self, answer: tuple[bool, list[tuple[bool, Any]], bytes], data: st.DataObject
    ) -> None:
        v1, tagged, body = answer
        result, seen = run(v1, chunked(data.draw, body))
        events_in = [item for is_event, item in tagged if is_event]
        self.assertEqual(result.pdus, canonical(*events_in))
        self.assertEqual(seen, events_in)
        self.assertEqual(result.dropped, len(tagged) - len(events_in))
        self.assertLessEqual(sum(map(len, result.pdus)), len(body))

    @settings(max_examples=100, deadline=None, database=None)
    @given(answer=answers(), data=st.data())
    def test_non_canonical_json(
        self, answer: tuple[bool, list[tuple[bool, Any]], bytes], data: st.DataObject
    ) -> None:
        """The same answers written as no canonical encoder would: floats as
        ``1.5E+00`` (kept longer than received when short: ``1E15``), strings
        escaped or not, whitespace anywhere. Never an error, only events kept,
        in order, never more bytes than received."""
        v1, tagged, _ = answer
        rnd = data.draw(st.randoms(use_true_random=False))
        pdus = [odd_json(rnd, item) for _, item in tagged]
        body = ('{ "pdus" :[' + " ,\n".join(pdus) + "]}").encode()
        result, seen = run(v1, chunked(data.draw, body))
        self.assertLessEqual(sum(map(len, result.pdus)), len(body))
        self.assertEqual(len(result.pdus) + result.dropped, len(tagged))
        self.assertEqual(result.pdus, canonical(*seen))
        events_in = [
            json.loads(odd)
            for (is_event, _), odd in zip(tagged, pdus, strict=True)
            if is_event
        ]
        self.assertTrue(is_subsequence(seen, events_in), (seen, events_in))

    @settings(max_examples=100, deadline=None, database=None)
    @given(data=st.data(), items=st.lists(json_values, max_size=6))
    def test_arbitrary_json_items_never_raise(
        self, data: st.DataObject, items: list[Any]
    ) -> None:
        """(None of them has the nine fields of an event: all dropped.)"""
        body = json.dumps({"auth_chain": items, "pdus": items}).encode()
        result, _ = run(data.draw(st.booleans()), chunked(data.draw, body))
        self.assertEqual(len(result.pdus) + len(result.auth_chain), 0)
        self.assertEqual(result.dropped, 2 * len(items))

    @settings(max_examples=100, deadline=None, database=None)
    @given(item=json_values)
    def test_key_ids_needed_takes_any_object(self, item: Any) -> None:
        pdu = item if isinstance(item, dict) else {"signatures": item}
        for v1 in (True, False):
            for restricted in (True, False):
                self.assertIsInstance(key_ids_needed(pdu, v1, restricted), set)
