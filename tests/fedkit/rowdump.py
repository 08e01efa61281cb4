"""Dump the rows Synapse's event persistence writes for a set of events, table by
table, in a form two homeservers can be compared with (the bulk writers'
differential tests).

What differs between two servers storing the same events and does not carry
meaning is left out or normalised: stream orderings and instance names (each
server allocates its own), reception timestamps, rejection check times, and the
chain cover's chain IDs (allocated from a sequence, in an order that depends on
the batches): each chain is named by the smallest event ID in it, and the links
by those names and the sequence numbers.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from tests.fedkit.homeserver import Homeserver

#: table -> (columns compared, column holding the event ID). Every table
#: ``PersistEventsStore._persist_events_txn`` (Synapse 1.163.2) writes per event.
EVENT_TABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "events": (
        (
            "event_id",
            "topological_ordering",
            "depth",
            "room_id",
            "type",
            "processed",
            "outlier",
            "origin_server_ts",
            "sender",
            "contains_url",
            "state_key",
            "rejection_reason",
        ),
        "event_id",
    ),
    "event_json": (
        ("event_id", "room_id", "internal_metadata", "json", "format_version"),
        "event_id",
    ),
    "state_events": (("event_id", "room_id", "type", "state_key"), "event_id"),
    "event_auth": (("event_id", "room_id", "auth_id"), "event_id"),
    "rejections": (("event_id", "reason"), "event_id"),
    "redactions": (("event_id", "redacts", "have_censored"), "event_id"),
    "event_relations": (
        ("event_id", "relates_to_id", "relation_type", "aggregation_key"),
        "event_id",
    ),
    "room_memberships": (
        (
            "event_id",
            "user_id",
            "sender",
            "room_id",
            "membership",
            "forgotten",
            "display_name",
            "avatar_url",
            "participant",
        ),
        "event_id",
    ),
    "event_search": (("event_id", "room_id", "key"), "event_id"),
    "event_edges": (("event_id", "prev_event_id"), "event_id"),
    "event_labels": (
        ("event_id", "label", "room_id", "topological_ordering"),
        "event_id",
    ),
    "event_expiry": (("event_id", "expiry_ts"), "event_id"),
    "event_auth_chain_to_calculate": (
        ("event_id", "room_id", "type", "state_key"),
        "event_id",
    ),
}

#: Every table :func:`dump_event_rows` returns.
ALL_TABLES = (*EVENT_TABLES, "event_auth_chains", "event_auth_chain_links")

#: Events per IN list (under SQLite's default limit of bound parameters).
_BATCH = 400


def _in_batches(hs: Homeserver, sql: str, ids: Sequence[str]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for start in range(0, len(ids), _BATCH):
        part = ids[start : start + _BATCH]
        marks = ",".join("?" for _ in part)
        rows.extend(hs.sql(sql.format(marks=marks), tuple(part)))
    return rows


def _normal(value: Any) -> Any:
    """Booleans as SQLite stores them, so both databases read the same."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def dump_event_rows(
    hs: Homeserver, event_ids: Collection[str]
) -> dict[str, list[tuple[Any, ...]]]:
    """The rows of ``event_ids`` in every table of :data:`ALL_TABLES`, sorted."""
    ids = sorted(event_ids)
    dump: dict[str, list[tuple[Any, ...]]] = {}
    for table, (columns, key) in EVENT_TABLES.items():
        rows = _in_batches(
            hs,
            f"SELECT {', '.join(columns)} FROM {table} WHERE {key} IN ({{marks}})",
            ids,
        )
        dump[table] = sorted((tuple(_normal(v) for v in row) for row in rows), key=repr)
    chains, links = _chain_cover(hs, ids)
    dump["event_auth_chains"] = chains
    dump["event_auth_chain_links"] = links
    return dump


def _chain_cover(
    hs: Homeserver, ids: Sequence[str]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(event, chain name, sequence number) rows, and the links between the
    chains of ``ids`` by chain name."""
    rows = _in_batches(
        hs,
        "SELECT event_id, chain_id, sequence_number FROM event_auth_chains"
        " WHERE event_id IN ({marks})",
        ids,
    )
    chain_ids = sorted({chain_id for _, chain_id, _ in rows})
    # A chain's name: its smallest event ID (of every event in it, not only ids).
    members = (
        _in_batches(
            hs,
            "SELECT chain_id, event_id FROM event_auth_chains WHERE chain_id IN ({marks})",
            [str(c) for c in chain_ids],
        )
        if chain_ids
        else []
    )
    name: dict[Any, str] = {}
    for chain_id, event_id in members:
        key = str(chain_id)
        if key not in name or event_id < name[key]:
            name[key] = event_id
    chains = sorted(
        (event_id, name[str(chain_id)], seq) for event_id, chain_id, seq in rows
    )
    link_rows = (
        _in_batches(
            hs,
            "SELECT origin_chain_id, origin_sequence_number, target_chain_id,"
            " target_sequence_number FROM event_auth_chain_links"
            " WHERE origin_chain_id IN ({marks})",
            [str(c) for c in chain_ids],
        )
        if chain_ids
        else []
    )
    links = sorted(
        (
            name.get(str(o), f"chain {o} (outside)"),
            os_,
            name.get(str(t), f"chain {t} (outside)"),
            ts,
        )
        for o, os_, t, ts in link_rows
    )
    return chains, links


def diff_dumps(
    left: dict[str, list[tuple[Any, ...]]], right: dict[str, list[tuple[Any, ...]]]
) -> dict[str, tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
    """Per table whose rows differ: (rows only in left, rows only in right)."""
    out = {}
    for table in sorted(set(left) | set(right)):
        a, b = left.get(table, []), right.get(table, [])
        if a != b:
            only_a = [r for r in a if r not in b]
            only_b = [r for r in b if r not in a]
            out[table] = (only_a, only_b)
    return out
