"""Runs of a plan in sequence, each recorded as it ends: the command line
(:mod:`faults.cli`) and the test suite (``tests/blackbox/test_faults.py``) both
call :func:`run_campaign`.

``out`` receives ``runs/<run>.json`` per run, ``results.json`` (every run so
far, and the campaign's parameters) after each run, and ``logs/<run>/`` for
the runs that failed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from faults import report
from faults.plan import RunSpec
from faults.runner import Settings, run_one
from tests.fedkit.certs import KitCA

Say = Callable[[str], None]


def describe(spec: RunSpec) -> str:
    return (
        f"{spec.kind} on {spec.db}, {spec.members + 1:,} members over"
        f" {spec.servers} servers, room v{spec.room_version}, seed {spec.seed}"
    )


def verdict(record: dict[str, Any]) -> str:
    """One line: the outcome, how long, and what broke."""
    notes = record.get("notes", {})
    text = f"{record['outcome']} ({record['seconds']:.0f} s"
    if notes.get("moment"):
        text += f"; {notes.get('injected')} {notes['moment']}"
        text += ", resync running" if notes.get("hit") else ", resync not running"
    text += ")"
    for v in record.get("violations", []):
        text += f"\n    {v['outcome']}: {v['detail'][:300]}"
    if record.get("logs"):
        text += f"\n    logs kept: {record['logs']}"
    return text


def run_campaign(
    plan: list[RunSpec],
    settings: Settings,
    out: str,
    params: dict[str, Any] | None = None,
    workdir: str | None = None,
    say: Say = print,
    into: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every run of ``plan``, one after the other; their records (appended to
    ``into`` as they end, if given: what ran before an interruption)."""
    if workdir:
        os.makedirs(workdir, exist_ok=True)
    base = tempfile.mkdtemp(prefix="sps-faults-", dir=workdir)
    ca = KitCA(os.path.join(base, "ca"))
    records: list[dict[str, Any]] = [] if into is None else into
    started = time.time()
    try:
        for n, spec in enumerate(plan, 1):
            say(f"[{n}/{len(plan)}] run {spec.index}: {describe(spec)}")
            record = run_one(
                spec,
                settings,
                ca,
                os.path.join(base, spec.name),
                os.path.join(out, "logs", spec.name),
            )
            records.append(record)
            report.write_json(os.path.join(out, "runs", f"{spec.name}.json"), record)
            report.write_json(
                os.path.join(out, "results.json"),
                {
                    "parameters": params or {},
                    "started_at": started,
                    "seconds": round(time.time() - started),
                    "runs": records,
                },
            )
            say(f"    {verdict(record)}")
    finally:
        if settings.keep:
            say(f"work directories kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return records
