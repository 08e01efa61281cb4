"""The campaign's report: a table of runs by fault kind and outcome, the
headline figure, the failed runs, and the JSON results."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from faults.runner import OUTCOMES


def _key(record: dict[str, Any]) -> tuple[str, str]:
    return record["spec"]["kind"], record["spec"]["db"]


def table(records: list[dict[str, Any]]) -> str:
    """Runs by fault kind and database (rows) and outcome (columns); ``hit``
    counts the runs whose fault caught the resync running."""
    columns = ["kind", "db", "runs", "hit", *OUTCOMES]
    rows: list[list[str]] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(_key(record), []).append(record)
    for (kind, db), group in sorted(groups.items()):
        rows.append([kind, db, *_counts(group)])
    for db in sorted({r["spec"]["db"] for r in records}):
        rows.append(
            ["all", db, *_counts([r for r in records if r["spec"]["db"] == db])]
        )
    rows.append(["all", "both", *_counts(records)])
    widths = [
        max(len(str(x)) for x in col) for col in zip(columns, *rows, strict=False)
    ]

    def line(cells: list[str]) -> str:
        return " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))

    out = [line(columns), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _counts(group: list[dict[str, Any]]) -> list[str]:
    outcomes = Counter(r["outcome"] for r in group)
    hit = sum(1 for r in group if r.get("notes", {}).get("hit"))
    return [str(len(group)), str(hit), *(str(outcomes.get(o, 0)) for o in OUTCOMES)]


def headline(records: list[dict[str, Any]]) -> str:
    """E.g. "300 runs, 11 fault kinds, 0 stuck, 0 lost, 0 state differences"."""
    outcomes = Counter(r["outcome"] for r in records)
    kinds = {r["spec"]["kind"] for r in records}
    dbs = sorted({r["spec"]["db"] for r in records})
    others = len(records) - outcomes["ok"]
    others -= outcomes["stuck"] + outcomes["message lost"] + outcomes["state differs"]
    return (
        f"{len(records)} runs ({', '.join(dbs)}), {len(kinds)} fault kinds,"
        f" {outcomes['stuck']} stuck, {outcomes['message lost']} lost,"
        f" {outcomes['state differs']} state differences, {others} other failures"
    )


def failures(records: list[dict[str, Any]]) -> str:
    """One paragraph per failed run: what to replay it with, what broke, logs."""
    out = []
    for r in records:
        if r["outcome"] == "ok":
            continue
        spec = r["spec"]
        out.append(
            f"{spec['index']:4d} {spec['kind']} on {spec['db']}: {r['outcome']}"
            f" (seed {spec['seed']}, {spec['members']} members, room v"
            f"{spec['room_version']}, fault {r.get('notes', {}).get('injected')!r}"
            f" at {r.get('notes', {}).get('moment')!r})"
        )
        for v in r.get("violations", []):
            out.append(f"       {v['outcome']}: {v['detail'][:500]}")
        if r.get("logs"):
            out.append(f"       logs: {r['logs']}")
    return "\n".join(out)


def write_json(path: str, data: Any) -> None:
    """Write ``data`` atomically (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)
