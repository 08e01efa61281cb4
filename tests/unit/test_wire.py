"""The federation answer shapes the module checks (``wire.py``), against
arbitrary JSON (hypothesis)."""

from __future__ import annotations

import unittest
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from synapse_partial_state.wire import (
    MAX_EVENT_ID_LENGTH,
    MAX_SIGNING_SERVERS,
    SIGNING_SERVERS_FIELD,
    WireError,
    parse_signing_servers,
    parse_state_ids,
)

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
EVENT_ID = st.text(min_size=1, max_size=40).map(lambda s: "$" + s)


def plausible(ids: Any) -> bool:
    return isinstance(ids, list) and all(
        isinstance(i, str) and 1 < len(i) <= MAX_EVENT_ID_LENGTH and i[0] == "$"
        for i in ids
    )


class ParseStateIdsTests(unittest.TestCase):
    @given(st.lists(EVENT_ID, max_size=20), st.lists(EVENT_ID, max_size=20))
    def test_a_well_formed_answer_is_taken_as_is(
        self, pdu_ids: list[str], auth_ids: list[str]
    ) -> None:
        body = {"pdu_ids": pdu_ids, "auth_chain_ids": auth_ids, "extra": 1}
        self.assertEqual(parse_state_ids(body), (pdu_ids, auth_ids))
        self.assertEqual(parse_state_ids({"pdu_ids": pdu_ids}), (pdu_ids, []))

    @given(JSON)
    def test_any_json_is_taken_or_refused_with_a_clear_error(self, body: Any) -> None:
        try:
            got = parse_state_ids(body)
        except WireError as e:
            self.assertIn("/state_ids answer", str(e))
            self.assertLess(len(str(e)), 300)  # bounded, whatever the input
            ok = isinstance(body, dict) and plausible(body.get("pdu_ids"))
            ok = ok and plausible(body.get("auth_chain_ids", []))
            self.assertFalse(ok, body)
        else:
            assert isinstance(body, dict)
            self.assertEqual(got, (body["pdu_ids"], body.get("auth_chain_ids", [])))

    @given(JSON.filter(lambda v: not plausible(v)))
    def test_either_list_malformed_is_refused(self, junk: Any) -> None:
        for body in ({"pdu_ids": junk}, {"pdu_ids": [], "auth_chain_ids": junk}):
            with self.assertRaises(WireError):
                parse_state_ids(body)

    def test_over_long_or_empty_ids_are_refused(self) -> None:
        for bad in ("$" + "a" * MAX_EVENT_ID_LENGTH, "$", "", "e", 5):
            with self.assertRaises(WireError, msg=repr(bad)):
                parse_state_ids({"pdu_ids": [bad]})


class ParseSigningServersTests(unittest.TestCase):
    """The /make_join hint: server names only, in order, once each, capped; any
    other JSON gives none (it is a hint: the join goes on without it)."""

    def test_server_names_are_taken_in_order_once(self) -> None:
        body = {
            SIGNING_SERVERS_FIELD: [
                "b.example.org",
                "127.0.0.1:8448",
                "[::1]:8448",
                "b.example.org",
                "a.example.org",
            ]
        }
        self.assertEqual(
            parse_signing_servers(body),
            ["b.example.org", "127.0.0.1:8448", "[::1]:8448", "a.example.org"],
        )

    def test_what_is_not_a_server_name_is_left_out(self) -> None:
        body = {
            SIGNING_SERVERS_FIELD: [
                "ok.org",
                "evil.org/path",
                "a b",
                "",
                "x" * 300,
                "host:99999999",
                17,
                None,
                ["nested.org"],
            ]
        }
        self.assertEqual(parse_signing_servers(body), ["ok.org"])

    def test_capped(self) -> None:
        body = {SIGNING_SERVERS_FIELD: [f"s{i}.org" for i in range(5000)]}
        got = parse_signing_servers(body)
        self.assertEqual(len(got), MAX_SIGNING_SERVERS)
        self.assertEqual(got[0], "s0.org")

    @given(JSON)
    def test_any_json_gives_a_list_of_strings(self, body: Any) -> None:
        for wrapped in (body, {SIGNING_SERVERS_FIELD: body}):
            got = parse_signing_servers(wrapped)
            self.assertIsInstance(got, list)
            self.assertTrue(all(isinstance(s, str) and s for s in got))
            self.assertEqual(len(got), len(set(got)))
