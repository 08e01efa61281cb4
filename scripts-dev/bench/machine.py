"""What the benchmark ran on, and what else was using the CPU meanwhile."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

import psutil

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or None


def git_commit() -> str | None:
    """HEAD of the checkout, with ``-dirty`` when tracked files changed."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def postgres_version() -> str | None:
    """``SHOW server_version`` of the kit's PostgreSQL cluster, None if unreachable."""
    try:
        from tests.fedkit.postgres import pg_connect

        conn = pg_connect()
    except Exception:
        return None
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            row = cur.fetchone()
            return str(row[0]) if row else None
    finally:
        conn.close()


def machine_info(with_postgres: bool = True) -> dict[str, Any]:
    mem = psutil.virtual_memory()
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": _cpu_model(),
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_gib": round(mem.total / 2**30, 1),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "synapse": _version("matrix-synapse"),
        "synapse_partial_state": _version("synapse_partial_state"),
        "postgres": postgres_version() if with_postgres else None,
        "git_commit": git_commit(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def describe_machine(info: dict[str, Any]) -> str:
    """One paragraph for the stdout report."""
    return (
        f"{info.get('cpu') or 'unknown CPU'}, {info.get('cores_logical')} cores,"
        f" {info.get('memory_gib')} GiB; {info.get('os')}; Python {info.get('python')};"
        f" Synapse {info.get('synapse')}; PostgreSQL {info.get('postgres') or '-'};"
        f" commit {info.get('git_commit') or '-'}"
    )


def _tree_pids(pids: Iterable[int | None]) -> set[int]:
    out: set[int] = set()
    for pid in pids:
        if pid is None:
            continue
        out.add(pid)
        with contextlib.suppress(psutil.Error):
            out.update(c.pid for c in psutil.Process(pid).children(recursive=True))
    return out


def _cpu_snapshot() -> dict[tuple[int, float], tuple[str, float]]:
    snap: dict[tuple[int, float], tuple[str, float]] = {}
    for p in psutil.process_iter(["name", "cpu_times", "create_time"]):
        info = p.info
        times = info.get("cpu_times")
        if times is None or info.get("create_time") is None:
            continue
        snap[(p.pid, info["create_time"])] = (
            info.get("name") or "?",
            times.user + times.system,
        )
    return snap


class OtherLoad:
    """CPU seconds used by processes other than ours during a window.

    Ours are this process and the given PIDs with their children. PostgreSQL
    backends are left out (they serve our homeservers in PostgreSQL runs), as
    are processes that start and end inside the window."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self._snap: dict[tuple[int, float], tuple[str, float]] = {}

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._snap = _cpu_snapshot()

    def stop(self, our_pids: Iterable[int | None]) -> dict[str, Any]:
        ours = _tree_pids([os.getpid(), *our_pids])
        per_name: dict[str, float] = {}
        for key, (name, cpu) in _cpu_snapshot().items():
            if key[0] in ours or name.startswith("postgres"):
                continue
            before = self._snap.get(key)
            used = cpu - (before[1] if before else 0.0)
            if before is None and key[1] < time.time() - (time.monotonic() - self._t0):
                used = 0.0  # existed before the window but was not seen: skip
            if used > 0.05:
                per_name[name] = per_name.get(name, 0.0) + used
        wall = time.monotonic() - self._t0
        total = sum(per_name.values())
        top = sorted(per_name.items(), key=lambda kv: -kv[1])[:5]
        return {
            "wall_s": round(wall, 1),
            "cpu_s": round(total, 1),
            "share_of_machine": round(total / (wall * (os.cpu_count() or 1)), 3)
            if wall > 0
            else 0.0,
            "top": [[n, round(c, 1)] for n, c in top],
        }
