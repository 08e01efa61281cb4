"""The syncing signal in ``/sync``: which room objects carry
``org.matrix.msc2775.syncing``, and with which value.

Pure policy (no I/O); :mod:`..compat.sync` calls it from Synapse's sync handler
and servlets. The rules (MSC2775: "Once this field is missing or false, the
client knows that the joining server has fully synchronised the state"):

* a partial-state room in a response carries ``true``. Only lazy-loading syncs
  include such rooms (Synapse leaves them out of eager ones until complete);
* in an incremental lazy-loading sync, a joined room whose resync completed
  between the ``since`` token and now is included, even if nothing else changed
  in it, with ``false``: the client's last word on the room was ``true``, and
  without this it would wait for the room's next event to learn otherwise;
* every other room object is left as Synapse built it (no field): once a
  client has been told ``false``, the field disappears.

Eager (non-lazy-loading) syncs keep stock's behaviour: Synapse itself includes
a completed room in the next incremental sync as newly joined, whole.

Sliding sync (:class:`ToldSyncing`): a room object of a partial-state room
carries ``true``; once complete, the next response to the same client (user and
device) that includes the room carries ``false``, then the field disappears.
Which client was told ``true`` is kept in memory (after a restart the field
simply disappears, which MSC2775 reads the same way).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

from synapse_partial_state.wire import SYNCING_FIELD


def resynced_rooms(
    un_partial_stated: Iterable[str],
    partial_now: Mapping[str, bool],
    wanted: Iterable[str] | None = None,
) -> frozenset[str]:
    """Rooms to report ``false`` for: those whose resync completed since the
    client's token (``un_partial_stated``, Synapse's stream), unless partial
    again now (left and joined again: ``partial_now`` says, missing counts as
    partial) or not ``wanted`` by the client's room filter (None: every room)."""
    rooms = {
        room_id for room_id in un_partial_stated if not partial_now.get(room_id, True)
    }
    if wanted is not None:
        rooms &= set(wanted)
    return frozenset(rooms)


def syncing_flag(
    room_id: str, is_partial: bool, resynced: frozenset[str]
) -> bool | None:
    """The value of the field for ``room_id``'s object under ``rooms.join``:
    True while partial, False once right after completion, None (no field)."""
    if is_partial:
        return True
    if room_id in resynced:
        return False
    return None


def mark_room(room: dict[str, Any], flag: bool | None) -> None:
    """Add the field with ``flag`` to an encoded room object (nothing for None)."""
    if flag is not None:
        room[SYNCING_FIELD] = flag


#: A sliding sync client: (user ID, device ID).
Client: TypeAlias = tuple[str, "str | None"]


class ToldSyncing:
    """The rooms each sliding sync client was told ``true`` for and not yet
    ``false``: at most one entry per client and partial-state room it saw."""

    def __init__(self) -> None:
        self._told: dict[Client, set[str]] = {}

    def flag(self, client: Client, room_id: str, is_partial: bool) -> bool | None:
        """The field's value for ``room_id`` in a response to ``client`` that
        includes it: True while partial, False the first time after, else None."""
        if is_partial:
            self._told.setdefault(client, set()).add(room_id)
            return True
        told = self._told.get(client)
        if told is None or room_id not in told:
            return None
        told.discard(room_id)
        if not told:
            del self._told[client]
        return False
