"""Properties of the resident side's pure parts on any input (hypothesis).

A hostile joiner controls what it asks for and, through the events it gets into a
room, part of what the answers are assembled from (power-level contents, user
IDs). Whatever they are: the ``/state`` body is the JSON of its events, the state
before an event is stock's, and the partial ``/send_join`` state is a capped,
ordered subset of the state before the join; nothing raises.
"""

from __future__ import annotations

import json
import unittest
from typing import Any
from unittest.mock import Mock

from hypothesis import given, settings
from hypothesis import strategies as st
from synapse.events import EventBase

from synapse_partial_state.resident.answer import (
    blocks,
    slices,
    split_state,
    state_before,
    state_body_parts,
)
from synapse_partial_state.resident.send_join import (
    _power_users,
    order_candidates,
    pick_per_server,
    select_partial_state,
)
from synapse_partial_state.wire import MEMBERS_ONLY_PARAM

MEMBER = "m.room.member"
#: Pure code: no deadline (a loaded machine must not fail the tests).
PROPERTY = settings(max_examples=200, deadline=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=4)
#: User IDs, well formed or not, on a few servers.
user_ids = st.sampled_from(["@a:x", "@b:x", "@c:y", "@d:z", "@e:y"]) | st.text(
    max_size=10
)
event_types = st.sampled_from([MEMBER, "m.room.create", "m.room.power_levels", "x.y"])
state_keys = st.sampled_from(["", "@a:x", "@b:x", "@c:y", "@j:x"])


@st.composite
def state_maps(draw: Any) -> dict[tuple[str, str], str]:
    """A state map with a distinct event ID per key, as stored state is."""
    keys = draw(st.lists(st.tuples(event_types, state_keys), unique=True))
    return {key: f"$e{index}" for index, key in enumerate(keys)}


def stock_state_before(
    state: dict[tuple[str, str], str],
    event_type: str,
    state_key: str | None,
    event_id: str,
    unsigned: dict[str, Any],
) -> list[str]:
    """The tail of stock ``get_state_ids_for_pdu`` (1.163.2), on a state map."""
    state_map = dict(state)
    if state_key is not None:
        assert state_map.get((event_type, state_key)) == event_id
        if "replaces_state" in unsigned:
            state_map[(event_type, state_key)] = unsigned["replaces_state"]
        else:
            del state_map[(event_type, state_key)]
    return list(state_map.values())


class StateAnswerProperties(unittest.TestCase):
    @PROPERTY
    @given(
        st.lists(st.none() | json_objects, max_size=8),
        st.lists(st.none() | json_objects, max_size=8),
        st.booleans(),
    )
    def test_body_is_the_json_of_its_events(
        self,
        pdus: list[dict[str, Any] | None],
        auth: list[dict[str, Any] | None],
        members_only: bool,
    ) -> None:
        """None stands for an event loaded but never sent (``b""``)."""

        def encode(events: list[dict[str, Any] | None]) -> list[bytes]:
            return [b"" if e is None else json.dumps(e).encode() for e in events]

        length, parts = state_body_parts(encode(pdus), encode(auth), members_only)
        body = b"".join(parts)
        self.assertEqual(len(body), length)
        expected: dict[str, Any] = {
            "pdus": [e for e in pdus if e is not None],
            "auth_chain": [e for e in auth if e is not None],
        }
        if members_only:
            expected[MEMBERS_ONLY_PARAM] = True
        self.assertEqual(json.loads(body), expected)

    @PROPERTY
    @given(st.lists(st.binary(max_size=40), max_size=20), st.integers(1, 64))
    def test_blocks_keep_every_byte_in_order(
        self, parts: list[bytes], size: int
    ) -> None:
        out = list(blocks(parts, size))
        self.assertEqual(b"".join(out), b"".join(parts))
        longest = max((len(p) for p in parts), default=0)
        for block in out[:-1]:
            self.assertGreaterEqual(len(block), size)
        for block in out:
            self.assertLess(len(block), size + longest)

    @PROPERTY
    @given(st.binary(max_size=300), st.integers(1, 64))
    def test_slices_keep_every_byte_in_order(self, data: bytes, size: int) -> None:
        out = list(slices(data, size))
        self.assertEqual(b"".join(out), data)
        self.assertTrue(all(len(s) == size for s in out[:-1]))
        self.assertTrue(all(0 < len(s) <= size for s in out))

    @PROPERTY
    @given(
        state_maps(),
        st.none() | st.tuples(event_types, state_keys),
        st.booleans(),
        st.none() | st.sampled_from(["$e0", "$e1", "$other"]),
    )
    def test_state_before_is_stocks(
        self,
        state: dict[tuple[str, str], str],
        key: tuple[str, str] | None,
        own_event: bool,
        replaced: str | None,
    ) -> None:
        """Any state group, any event (state or not, in its group or not, having
        replaced something or not): stock's answer, or stock's assertion."""
        event_id = state.get(key, "$x") if key is not None and own_event else "$x"
        unsigned = {} if replaced is None else {"replaces_state": replaced}
        event_type, state_key = key if key is not None else ("m.room.message", None)
        before = dict(state)
        adjustment = None if key is None else (key, unsigned.get("replaces_state"))
        try:
            expected = stock_state_before(
                state, event_type, state_key, event_id, unsigned
            )
        except AssertionError:
            with self.assertRaises(AssertionError):
                state_before(state, adjustment, event_id)
        else:
            got = state_before(state, adjustment, event_id)
            self.assertEqual(list(got.values()), expected)
            all_ids, member_ids = split_state(got)
            self.assertEqual(list(all_ids), expected)
            self.assertEqual(
                list(member_ids), [e for (t, _), e in got.items() if t == MEMBER]
            )
        self.assertEqual(state, before, "the cached group's state was changed")


def _join(user: str) -> EventBase:
    event = Mock(spec_set=EventBase)
    event.state_key = user
    return event


class SendJoinSelectionProperties(unittest.TestCase):
    @PROPERTY
    @given(state_maps(), state_keys, st.lists(user_ids, max_size=8), st.integers(0, 4))
    def test_partial_state_is_a_capped_ordered_subset(
        self,
        state: dict[tuple[str, str], str],
        joiner: str,
        extras: list[str],
        cap: int,
    ) -> None:
        got = select_partial_state(_join(joiner), state, {}, extras, cap)
        self.assertLessEqual(got, set(state.values()))
        non_members = {e for (t, _), e in state.items() if t != MEMBER}
        self.assertLessEqual(non_members, got)
        own = state.get((MEMBER, joiner))
        if own is not None:
            self.assertIn(own, got)
        added = {sk for (t, sk), e in state.items() if t == MEMBER and e in got} - {
            joiner
        }
        self.assertLessEqual(len(added), cap)
        self.assertLessEqual(added, set(extras))
        # A member left out despite being asked for: the cap was reached by
        # members asked for before it.
        for index, user in enumerate(extras):
            if user in added or user == joiner or (MEMBER, user) not in state:
                continue
            self.assertEqual(len(added & set(extras[:index])), cap, user)

    @PROPERTY
    @given(st.lists(user_ids, max_size=12), st.integers(0, 3))
    def test_per_server_picks_are_bounded_and_in_order(
        self, joined: list[str], per_server: int
    ) -> None:
        picked = pick_per_server(joined, per_server)
        # A subsequence of the input.
        remaining = iter(joined)
        self.assertTrue(all(any(p == j for j in remaining) for p in picked))
        servers = [p.split(":", 1)[1] for p in picked]
        for server in set(servers):
            self.assertLessEqual(servers.count(server), per_server)

    @PROPERTY
    @given(json_values | st.dictionaries(st.just("users"), json_values))
    def test_power_users_of_any_content(self, content: Any) -> None:
        if not isinstance(content, dict):
            content = {"junk": content}
        users = _power_users(content)
        self.assertTrue(all(isinstance(u, str) and u.startswith("@") for u in users))
        listed = content.get("users")
        self.assertLessEqual(
            set(users), set(listed) if isinstance(listed, dict) else set()
        )

    @PROPERTY
    @given(st.lists(st.lists(user_ids, max_size=5), min_size=5, max_size=5))
    def test_candidates_are_each_once_in_first_order(
        self, groups: list[list[str]]
    ) -> None:
        got = order_candidates(*groups)
        flat = [u for group in groups for u in group]
        self.assertEqual(list(got), list(dict.fromkeys(flat)))
