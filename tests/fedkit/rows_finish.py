"""The rows a room's finish (its current state made full) leaves in Synapse's
tables, read from outside with :meth:`Homeserver.sql` and normalised so that two
joiners of the same room compare equal when their finishes wrote the same rows.

Normalised away: stream orderings and instance names (each server numbers its
own streams; a stream ordering column is replaced by whether it is the one of
the event it names), the joiner's own user (``@LOCAL``) and join event
(``$LOCAL_JOIN``); rows naming the *other* joiner's user or join event are left
out (each joiner's room also holds the other one's membership, as a remote
member on one side and not necessarily at all on the other).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from tests.fedkit.homeserver import Homeserver

#: Synapse's magic cache name for current-state invalidations
#: (``synapse.storage.databases.main.cache.CURRENT_STATE_CACHE_NAME``).
CURRENT_STATE_CACHE = "cs_cache_fake"
DEVICE_LIST_CACHE = "get_device_list_last_stream_id_for_remote"

LOCAL_USER = "@LOCAL"
LOCAL_JOIN = "$LOCAL_JOIN"

Rows = Counter[tuple[Any, ...]]


class Normaliser:
    """Replaces this joiner's own names, and drops rows naming the other's."""

    def __init__(self, local: dict[str, str], foreign: Iterable[str]) -> None:
        self.local = local
        self.foreign = set(foreign)

    def row(self, row: Iterable[Any]) -> tuple[Any, ...] | None:
        values = tuple(row)
        if any(isinstance(v, str) and v in self.foreign for v in values):
            return None
        return tuple(self.local.get(v, v) if isinstance(v, str) else v for v in values)

    def rows(self, rows: Iterable[Iterable[Any]]) -> Rows:
        out: Rows = Counter()
        for row in rows:
            normal = self.row(row)
            if normal is not None:
                out[normal] += 1
        return out


def local_join_event(hs: Homeserver, room_id: str, user_id: str) -> str:
    rows = hs.sql(
        "SELECT event_id FROM current_state_events"
        " WHERE room_id = ? AND type = 'm.room.member' AND state_key = ?",
        (room_id, user_id),
    )
    assert rows, f"{user_id} has no membership of {room_id} on {hs.name}"
    return str(rows[0][0])


def finish_rows(hs: Homeserver, room_id: str, norm: Normaliser) -> dict[str, Rows]:
    """Every table the finish writes (or Synapse writes because of it), as a
    multiset of normalised rows, by table name."""
    q = hs.sql
    same = "(CASE WHEN {0} = {1} THEN 1 WHEN {0} IS NULL AND {1} IS NULL THEN 1 ELSE 0 END)"
    tables: dict[str, Rows] = {}
    tables["current_state_events"] = norm.rows(
        q(
            "SELECT c.type, c.state_key, c.event_id, c.membership, "
            + same.format("c.event_stream_ordering", "e.stream_ordering")
            + " FROM current_state_events AS c LEFT JOIN events AS e"
            " ON e.event_id = c.event_id WHERE c.room_id = ?",
            (room_id,),
        )
    )
    # The delta stream, grouped by stream ID (one group per transaction),
    # without the IDs: the multiset of groups.
    groups: dict[Any, list[tuple[Any, ...]]] = {}
    for stream_id, *row in q(
        "SELECT stream_id, type, state_key, event_id, prev_event_id"
        " FROM current_state_delta_stream WHERE room_id = ?",
        (room_id,),
    ):
        groups.setdefault(stream_id, []).append(tuple(row))
    delta_groups: Rows = Counter()
    for rows in groups.values():
        normal = norm.rows(rows)
        if normal:
            delta_groups[tuple(sorted(normal.elements(), key=repr))] += 1
    tables["current_state_delta_stream (by transaction)"] = delta_groups
    tables["local_current_membership"] = norm.rows(
        q(
            "SELECT l.user_id, l.event_id, l.membership, "
            + same.format("l.event_stream_ordering", "e.stream_ordering")
            + " FROM local_current_membership AS l LEFT JOIN events AS e"
            " ON e.event_id = l.event_id WHERE l.room_id = ?",
            (room_id,),
        )
    )
    tables["sliding_sync_joined_rooms"] = norm.rows(
        q(
            "SELECT room_type, room_name, is_encrypted, tombstone_successor_room_id"
            " FROM sliding_sync_joined_rooms WHERE room_id = ?",
            (room_id,),
        )
    )
    tables["sliding_sync_membership_snapshots"] = norm.rows(
        q(
            "SELECT s.user_id, s.sender, s.membership_event_id, s.membership,"
            " s.forgotten, s.has_known_state, s.room_type, s.room_name,"
            " s.is_encrypted, s.tombstone_successor_room_id, "
            + same.format("s.event_stream_ordering", "e.stream_ordering")
            + " FROM sliding_sync_membership_snapshots AS s LEFT JOIN events AS e"
            " ON e.event_id = s.membership_event_id WHERE s.room_id = ?",
            (room_id,),
        )
    )
    tables["device_lists_remote_extremeties"] = norm.rows(
        q("SELECT user_id, stream_id FROM device_lists_remote_extremeties")
    )
    tables["room_stats_state"] = norm.rows(
        q(
            "SELECT name, canonical_alias, join_rules, history_visibility,"
            " encryption, avatar, guest_access, is_federatable, topic, room_type"
            " FROM room_stats_state WHERE room_id = ?",
            (room_id,),
        )
    )
    if hs.db == "postgres":
        tables.update(invalidations(hs, room_id, norm))
    return tables


def invalidations(hs: Homeserver, room_id: str, norm: Normaliser) -> dict[str, Rows]:
    """What the cache-invalidation replication stream tells workers about the
    room's members (PostgreSQL only: SQLite has no workers): the set of
    (room, member) current-state invalidations, however they are cut into rows,
    and the set of remote users whose device-list subscription was dropped."""
    members: Rows = Counter()
    device_lists: Rows = Counter()
    for cache, keys in hs.sql(
        "SELECT cache_func, keys FROM cache_invalidation_stream_by_instance"
        " WHERE cache_func IN (?, ?)",
        (CURRENT_STATE_CACHE, DEVICE_LIST_CACHE),
    ):
        keys = list(keys or [])
        if cache == CURRENT_STATE_CACHE and keys and keys[0] == room_id:
            for user_id in keys[1:]:
                row = norm.row((user_id,))
                if row is not None:
                    members[row] = 1
        elif cache == DEVICE_LIST_CACHE:
            row = norm.row(tuple(keys))
            if row is not None:
                device_lists[row] = 1
    return {
        "cache invalidations: current state (room, member)": members,
        "cache invalidations: " + DEVICE_LIST_CACHE: device_lists,
    }


def user_directory_rows(
    hs: Homeserver, room_id: str, norm: Normaliser
) -> dict[str, Rows]:
    """The user directory's rows for the room's members (filled after the
    finish, by Synapse's user directory handler reading the deltas), and the
    room's statistics (its stats handler reads the same deltas)."""
    members = (
        " IN (SELECT state_key FROM current_state_events"
        " WHERE room_id = ? AND type = 'm.room.member')"
    )
    search = "vector::text" if hs.db == "postgres" else "value"
    return {
        "users_in_public_rooms": norm.rows(
            hs.sql(
                "SELECT user_id FROM users_in_public_rooms WHERE room_id = ?",
                (room_id,),
            )
        ),
        "user_directory": norm.rows(
            hs.sql(
                "SELECT user_id, display_name, avatar_url FROM user_directory"
                " WHERE user_id" + members,
                (room_id,),
            )
        ),
        # (remote users only: a local user's entry holds its server's name)
        "user_directory_search": norm.rows(
            hs.sql(
                f"SELECT user_id, {search} FROM user_directory_search"
                " WHERE user_id NOT LIKE ? AND user_id" + members,
                (f"%:{hs.server_name}", room_id),
            )
        ),
        "users_who_share_private_rooms": norm.rows(
            hs.sql(
                "SELECT user_id, other_user_id FROM users_who_share_private_rooms"
                " WHERE room_id = ?",
                (room_id,),
            )
        ),
        "user_directory_stale_remote_users": norm.rows(
            hs.sql(
                "SELECT user_id, retry_counter"
                " FROM user_directory_stale_remote_users WHERE user_id" + members,
                (room_id,),
            )
        ),
        "room_stats_current": norm.rows(
            hs.sql(
                "SELECT current_state_events, joined_members, invited_members,"
                " left_members, banned_members, knocked_members, local_users_in_room"
                " FROM room_stats_current WHERE room_id = ?",
                (room_id,),
            )
        ),
    }
