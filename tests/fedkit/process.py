"""One Synapse subprocess: its environment, spawning, readiness probes, signals
and output (stderr and the log file).

Plain functions used by :class:`~tests.fedkit.homeserver.Homeserver`, which owns
the process and its lifecycle.

Synapse runs in its own session (so the whole process group can be signalled)
and, on Linux, with ``PR_SET_PDEATHSIG`` so that it dies with the test process
even when that one is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO

import psutil
import requests

logger = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")

_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """Runs in the child between fork and exec: die with the parent (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


def synapse_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Synapse process: no proxies, the repository importable,
    and ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn_synapse(
    config_path: str,
    workdir: str,
    output: IO[bytes],
    env: Mapping[str, str] | None = None,
    app: str = "synapse.app.homeserver",
    extra_config_paths: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start ``<app> -c config_path [-c extra ...]`` in a new session.

    ``app`` is ``synapse.app.homeserver`` (the main process) or
    ``synapse.app.generic_worker`` (a worker, whose own file comes in
    ``extra_config_paths``). Its stdout and stderr go to ``output``; ``env`` is
    added to its environment."""
    argv = [sys.executable, "-m", app, "-c", config_path]
    for path in extra_config_paths:
        argv += ["-c", path]
    return spawn_command(argv, workdir, output, synapse_env(env))


def spawn_command(
    argv: Sequence[str],
    workdir: str,
    output: IO[bytes],
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session (so its whole group can be signalled),
    dying with the test process; stdout and stderr go to ``output``."""
    in_main = threading.current_thread() is threading.main_thread()
    return subprocess.Popen(
        list(argv),
        cwd=workdir,
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=output,
        start_new_session=True,
        # PDEATHSIG fires when the *thread* that forked exits, so only
        # use it when forking from the main thread.
        preexec_fn=_child_setup if in_main else None,
    )


# -- readiness probes ----------------------------------------------------------


def speaks_tls(port: int, cafile: str) -> bool:
    """True if a TLS handshake with ``127.0.0.1:port`` verifies against ``cafile``."""
    ctx = ssl.create_default_context(cafile=cafile)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            with ctx.wrap_socket(s, server_hostname="127.0.0.1"):
                return True
    except (OSError, ssl.SSLError):
        return False


def is_healthy(session: requests.Session, client_url: str) -> bool:
    """True if ``/health`` answers 200."""
    try:
        return session.get(client_url + "/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def listens_on(pid: int, ports: set[int]) -> bool:
    """True if process ``pid`` itself holds listening sockets on all ``ports``.

    Guards against another process that happens to own one of our ports
    answering the readiness probes while our Synapse is dying of EADDRINUSE."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    listening = {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}
    return ports <= listening


# -- signals -------------------------------------------------------------------


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def terminate_group(
    proc: subprocess.Popen[bytes], pgid: int, grace: float, name: str
) -> None:
    """SIGTERM the process group, SIGKILL after ``grace`` s (at once if 0); reap."""
    # Only signal the group while its leader is unreaped: after that the
    # process group id may be reused by an unrelated process.
    if proc.poll() is None:
        _signal_group(pgid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        try:
            proc.wait(grace if grace > 0 else None)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %ss: SIGKILL", name, grace)
            _signal_group(pgid, signal.SIGKILL)
            proc.wait()


# -- output --------------------------------------------------------------------


def read_from(path: str, offset: int) -> str:
    """The text of ``path`` after byte ``offset`` ("" if there is no file)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf8", "replace")
    except FileNotFoundError:
        return ""


def output_tail(
    stderr_path: str, stderr_offset: int, log_path: str, log_offset: int, lines: int
) -> str:
    """The last ``lines`` of stderr and of the log written after the offsets."""
    parts = []
    err = read_from(stderr_path, stderr_offset)
    if err.strip():
        parts.append("--- stderr ---\n" + "\n".join(err.splitlines()[-lines:]))
    log = read_from(log_path, log_offset)
    if log.strip():
        parts.append(f"--- {log_path} ---\n" + "\n".join(log.splitlines()[-lines:]))
    return "\n".join(parts) or "(no output)"


def read_text(path: str) -> str:
    """The whole file as text ("" if there is none)."""
    try:
        with open(path, encoding="utf8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def file_size(path: str) -> int:
    """Size of ``path`` in bytes (0 if there is no file)."""
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def wait_for_line(
    path: str, pattern: re.Pattern[str], timeout: float, since: int, label: str
) -> re.Match[str]:
    """Wait until a line of ``path`` after byte ``since`` matches ``pattern``.

    Raises :class:`TimeoutError` (its message starts with ``label``)."""
    deadline = time.monotonic() + timeout
    offset = since
    pending = b""
    while True:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")  # keep a partial last line
            for line in lines:
                m = pattern.search(line.decode("utf8", "replace"))
                if m:
                    return m
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{label}: no log line matching {pattern.pattern!r} after {timeout}s"
            )
        time.sleep(0.1)
