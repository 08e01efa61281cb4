"""What each run of a campaign does: its fault kind, database, seed and room.

The plan is a pure function of the options, so that a run can be replayed alone
(``--only-run``, or ``--runs 1 --seed S --kinds K`` with the seed it printed).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

#: Room versions a run's room is drawn from (the fake peer's; Synapse's default
#: for new rooms is 12).
DEFAULT_ROOM_VERSIONS = ("10", "11", "12")


@dataclass(frozen=True)
class RunSpec:
    """One run: a fault kind on a database, in a room drawn from ``seed``."""

    index: int
    db: str
    kind: str
    seed: int
    #: Members of the room besides its creator (the fake peer's ``members``).
    members: int
    #: Fake servers the members are spread over.
    servers: int
    room_version: str

    @property
    def name(self) -> str:
        return f"run{self.index:04d}-{self.db}-{self.kind}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def interleave(
    dbs: list[str], kinds_for: dict[str, list[str]]
) -> list[tuple[str, str]]:
    """One cycle of (database, kind) pairs: every kind valid on each database,
    the databases alternating, so that a campaign cut short still covers
    every kind on both."""
    columns = [[(db, kind) for kind in kinds_for[db]] for db in dbs]
    cycle: list[tuple[str, str]] = []
    for i in range(max((len(c) for c in columns), default=0)):
        for column in columns:
            if i < len(column):
                cycle.append(column[i])
    return cycle


def make_plan(
    runs: int,
    dbs: list[str],
    kinds_for: dict[str, list[str]],
    seed: int,
    members_min: int,
    members_max: int,
    room_versions: tuple[str, ...] = DEFAULT_ROOM_VERSIONS,
) -> list[RunSpec]:
    """``runs`` runs cycling through every (database, kind) pair; each run's
    seed, room size (members in ``[members_min, members_max]``, over 3 to 8
    fake servers) and room version are drawn from ``seed``."""
    cycle = interleave(dbs, kinds_for)
    if not cycle:
        raise ValueError("no fault kind runs on the chosen databases")
    rng = random.Random(seed)
    plan = []
    for index in range(runs):
        db, kind = cycle[index % len(cycle)]
        run_seed = rng.randrange(1 << 31)
        room_rng = random.Random(run_seed)
        members = room_rng.randint(members_min, members_max)
        plan.append(
            RunSpec(
                index=index + 1,
                db=db,
                kind=kind,
                seed=run_seed,
                members=members,
                servers=room_rng.randint(3, 8),
                room_version=room_rng.choice(room_versions),
            )
        )
    return plan
