"""Pure decisions of the device-list replay (no I/O)."""

from __future__ import annotations

from collections.abc import Collection


def replay_targets(
    candidates: Collection[str],
    reached: Collection[str],
    later_pokes: Collection[str],
    server_name: str,
) -> set[str]:
    """Where one queued change still has to go.

    ``candidates``: the servers that should have it (those the full state shows
    in the room during the resync). ``reached``: those it was sent to while the
    room was partial. ``later_pokes``: those with an outbound poke of the same
    device after the change (from another room, an earlier replay that was cut
    short by a restart, or a later change): they get the device as it is now
    anyway, so a second update would be a duplicate. Never ourselves."""
    return set(candidates) - set(reached) - set(later_pokes) - {server_name}
