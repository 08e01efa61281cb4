"""Measurements from logs and processes: federation bytes per endpoint, stages, RSS/CPU.

The parsers are pure functions over log lines (unit-tested on sample lines):

* :func:`parse_access_line`: a resident's federation access log line
  (``{origin} Processed request: 0.022sec/0.005sec ... 426B 200 "GET /path HTTP/1.1"``);
* :func:`parse_outgoing_line`: a joiner's outgoing federation request line
  (``{GET-O-12} [dest] Completed request: 200 OK in 0.50 secs, got 1234 bytes - GET
  matrix-federation://dest/path``);
* :func:`aggregate_peer_requests`: the fake peer's request log (``requests()``);
* :func:`stage_times`: when each stage of a join/resync shows up in a joiner's log.

A stage is one ``(name, regex)`` entry of :data:`STAGES` (optionally a third element
``"last"`` to take the last matching line instead of the first). In a regex,
``{room}`` is replaced by the escaped room ID and ``{room_q}`` by the escaped,
percent-encoded room ID (as in request URIs); a named group ``stage`` makes the stage
name dynamic (``<name>:<group value>``), which is how the module's own
``synapse_partial_state.joining`` stage lines are picked up without listing them.
"""

from __future__ import annotations

import datetime
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

MIB = 1024 * 1024

#: (stage name, regex[, "first"|"last"]) looked for in the joiner's log.
STAGES: list[tuple[str, ...]] = [
    # Stock Synapse (synapse/handlers/federation.py, 1.163) | the module's engine.
    ("resync started", r"Syncing state for room {room} via|Starting resync of {room}:"),
    (
        "state_ids received",
        r"Completed request: \d+ .* - GET matrix-federation://[^/]+"
        r"/_matrix/federation/v1/state_ids/{room_q}",
    ),
    (
        "state received",
        r"Completed request: \d+ .* - GET matrix-federation://[^/]+"
        r"/_matrix/federation/v1/state/{room_q}",
    ),
    (
        "last key fetched",
        r"Completed request: \d+ .* - (?:GET|POST) matrix-federation://[^/]+"
        r"/_matrix/key/v2/",
        "last",
    ),
    # The module's key prefetch at the start of the resync is over (the keys
    # stored: a notary's answer is checked and stored after it has arrived).
    ("module:keys prefetched", r"Resync of {room}: prefetched signing keys"),
    ("first server failed", r"Resync of {room}: \S+ failed"),
    ("all events have full state", r"Resync of {room}: all events have full state"),
    ("updating current state", r"Updating current state for {room}"),
    ("partial-state flag cleared", r"Clearing partial-state flag for {room}"),
    ("resync complete", r"State resync complete for {room}|Resync of {room} complete"),
    # The module's joining engine: any other line of its loggers naming the room
    # and a stage ("stage=<name>").
    (
        "module",
        r"^(?=.*{room}).* - synapse_partial_state\.joining[\w.]* - .*?\bstage[=: ]+"
        r"(?P<stage>[\w.-]+)",
    ),
]

_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)[,.](\d{3})")

_ACCESS_RE = re.compile(
    r"\{(?P<origin>[^}]*)\} Processed request: (?P<proc>-?[\d.]+)sec/(?P<send>-?[\d.]+)sec"
    r" .*? (?P<bytes>\d+)B (?P<status>\d+)!? \"(?P<method>[A-Z]+) (?P<uri>\S+) [^\"]*\""
)

_OUTGOING_RE = re.compile(
    r"\{(?P<txn>[^}]*)\} \[(?P<dest>[^\]]*)\] Completed request: (?P<status>\d+) .*?"
    r" in (?P<secs>[\d.]+) secs, got (?P<bytes>\d+) bytes - (?P<method>[A-Z]+)"
    r" (?P<uri>\S+)"
)


@dataclass(frozen=True)
class Request:
    """One federation request seen in a log."""

    time: float | None  # epoch seconds of the log line
    peer: str  # origin (access log) or destination (outgoing log)
    endpoint: str
    method: str
    path: str
    status: int
    bytes: int  # response body bytes
    #: Access log: processing + response sending time; outgoing log: round trip.
    seconds: float


def parse_log_time(line: str) -> float | None:
    """Epoch seconds of a Synapse log line (local time, millisecond precision)."""
    m = _TIME_RE.match(line)
    if not m:
        return None
    dt = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")
    return dt.timestamp() + int(m.group(2)) / 1000


def endpoint_of(path: str) -> str:
    """A short name for a federation path: ``state_ids``, ``send_join``, ``key/server``."""
    path = urlsplit(path).path
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 3 and parts[0] == "_matrix" and parts[1] == "federation":
        rest = parts[3:] if re.fullmatch(r"v\d+|unstable", parts[2]) else parts[2:]
        if not rest:
            return "federation"
        if rest[0] in ("query", "user") and len(rest) > 1:
            return f"{rest[0]}/{rest[1]}"
        return rest[0]
    if len(parts) >= 4 and parts[0] == "_matrix" and parts[1] == "key":
        return f"key/{parts[3]}"
    return "/".join(parts[:3]) or "/"


def parse_access_line(line: str) -> Request | None:
    """A federation access log line of the resident, or None."""
    m = _ACCESS_RE.search(line)
    if not m:
        return None
    path = unquote(urlsplit(m.group("uri")).path)
    return Request(
        time=parse_log_time(line),
        peer=m.group("origin"),
        endpoint=endpoint_of(path),
        method=m.group("method"),
        path=path,
        status=int(m.group("status")),
        bytes=int(m.group("bytes")),
        # Synapse may log a tiny negative send time ("-0.000sec").
        seconds=round(
            max(0.0, float(m.group("proc"))) + max(0.0, float(m.group("send"))), 3
        ),
    )


def parse_outgoing_line(line: str) -> Request | None:
    """An outgoing federation request the joiner completed, or None."""
    m = _OUTGOING_RE.search(line)
    if not m:
        return None
    path = unquote(urlsplit(m.group("uri")).path)
    return Request(
        time=parse_log_time(line),
        peer=m.group("dest"),
        endpoint=endpoint_of(path),
        method=m.group("method"),
        path=path,
        status=int(m.group("status")),
        bytes=int(m.group("bytes")),
        seconds=float(m.group("secs")),
    )


def access_requests(
    lines: Iterable[str], origin: str | None = None, since: float | None = None
) -> list[Request]:
    """Access-log requests, optionally only from ``origin`` and not before ``since``."""
    out = []
    for line in lines:
        r = parse_access_line(line)
        if r is None or (origin is not None and r.peer != origin):
            continue
        if since is not None and r.time is not None and r.time < since:
            continue
        out.append(r)
    return out


def outgoing_requests(
    lines: Iterable[str], since: float | None = None, until: float | None = None
) -> list[Request]:
    """Outgoing requests completed between ``since`` and ``until`` (epoch seconds)."""
    out = []
    for line in lines:
        r = parse_outgoing_line(line)
        if r is None:
            continue
        if r.time is not None:
            if since is not None and r.time < since:
                continue
            if until is not None and r.time > until:
                continue
        out.append(r)
    return out


def aggregate(requests: Iterable[Request]) -> dict[str, dict[str, float]]:
    """{endpoint: {"count", "bytes", "seconds" (summed), "max_seconds"}}."""
    out: dict[str, dict[str, float]] = {}
    for r in requests:
        agg = out.setdefault(
            r.endpoint, {"count": 0, "bytes": 0, "seconds": 0.0, "max_seconds": 0.0}
        )
        agg["count"] += 1
        agg["bytes"] += r.bytes
        agg["seconds"] += r.seconds
        agg["max_seconds"] = max(agg["max_seconds"], r.seconds)
    return out


def aggregate_peer_requests(
    entries: Iterable[Mapping[str, Any]],
    origin: str | None = None,
    since: float | None = None,
) -> dict[str, dict[str, float]]:
    """Aggregate the fake peer's request log like :func:`aggregate`.

    Entries are ``{time, method, path, origin, status, bytes, ms, ...}``; unsigned
    requests (key fetches) have no origin and are kept whatever ``origin`` is."""
    reqs = []
    for e in entries:
        if origin is not None and e.get("origin") not in (origin, None):
            continue
        if since is not None and float(e.get("time") or 0) < since:
            continue
        path = str(e.get("path") or "/")
        reqs.append(
            Request(
                time=e.get("time"),
                peer=str(e.get("origin") or ""),
                endpoint=endpoint_of(path),
                method=str(e.get("method") or ""),
                path=path,
                status=int(e.get("status") or 0),
                bytes=int(e.get("bytes") or 0),
                seconds=float(e.get("ms") or 0) / 1000,
            )
        )
    return aggregate(reqs)


def _compile_stage(regex: str, room_id: str) -> re.Pattern[str]:
    return re.compile(
        regex.replace("{room_q}", re.escape(quote(room_id, safe=""))).replace(
            "{room}", re.escape(room_id)
        )
    )


def stage_times(
    lines: Iterable[str],
    t0: float,
    room_id: str,
    stages: Sequence[tuple[str, ...]] = STAGES,
    until: float | None = None,
) -> dict[str, float]:
    """{stage: seconds after ``t0``} for every stage found in ``lines``.

    Lines without a timestamp, or (with ``until``) logged after it, are ignored. A stage regex with a ``stage`` group
    yields one entry per distinct group value, named ``<name>:<value>``."""
    compiled = [
        (s[0], _compile_stage(s[1], room_id), s[2] if len(s) > 2 else "first")
        for s in stages
    ]
    found: dict[str, float] = {}
    for line in lines:
        when: float | None = None
        for name, rx, which in compiled:
            m = rx.search(line)
            if not m:
                continue
            if when is None:
                when = parse_log_time(line)
                if when is None or (until is not None and when > until):
                    break
            key = name
            if "stage" in rx.groupindex and m.group("stage"):
                key = f"{name}:{m.group('stage')}"
            if which == "last" or key not in found:
                found[key] = round(when - t0, 3)
    return dict(sorted(found.items(), key=lambda kv: kv[1]))


def read_log_lines(path: str, offset: int = 0, end: int | None = None) -> list[str]:
    """Lines of a log file from byte ``offset`` (to ``end``), decoded leniently."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read() if end is None else f.read(max(0, end - offset))
    except FileNotFoundError:
        return []
    return data.decode("utf8", "replace").splitlines()


def log_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


class ResourceWindow:
    """Peak RSS and CPU seconds of a kit :class:`Homeserver` over a window.

    ``start()`` resets the kernel's peak-RSS counter (VmHWM) and notes the CPU
    time; ``stop()`` returns ``{"peak_rss_mib", "cpu_s"}`` for the window."""

    def __init__(self, hs: Any, reset_rss: bool = True) -> None:
        self.hs = hs
        self.reset_rss = reset_rss
        self._cpu0 = 0.0

    def start(self) -> None:
        if self.reset_rss:
            self.hs.reset_rss_peak()
        self._cpu0 = self.hs.cpu_seconds()

    def stop(self) -> dict[str, float]:
        return {
            "peak_rss_mib": round(self.hs.rss_peak_bytes() / MIB, 1),
            "cpu_s": round(self.hs.cpu_seconds() - self._cpu0, 2),
        }


#: One CPU sample: (epoch seconds, joiner CPU seconds so far, its database's
#: PostgreSQL backends' CPU seconds so far).
CpuSample = tuple[float, float, float]


def cpu_at(samples: Sequence[CpuSample], when: float, column: int) -> float | None:
    """CPU seconds of ``column`` (1 joiner, 2 PostgreSQL) at ``when``, linearly
    interpolated between the samples around it; None outside the samples."""
    if not samples or when < samples[0][0] or when > samples[-1][0]:
        return None
    for before, after in zip(samples, samples[1:], strict=False):
        if before[0] <= when <= after[0]:
            span = after[0] - before[0]
            if span <= 0:
                return before[column]
            frac = (when - before[0]) / span
            return before[column] + frac * (after[column] - before[column])
    return samples[-1][column]


def after_metrics(
    samples: Sequence[CpuSample],
    t_full: float,
    after_s: float,
    below: float = 0.15,
    quiet_for: float = 2.0,
) -> dict[str, float]:
    """What the joiner did in the ``after_s`` seconds after its full member
    list (``t_full``): its CPU seconds (``cpu_after_s``), its PostgreSQL
    backends' (``db_cpu_after_s``), and how long after ``t_full`` it was last
    busy (``busy_after_s``: the end of the last ``quiet_for``-second stretch
    using ``below`` cores or more; 0 if it was quiet at once)."""
    end = t_full + after_s
    out: dict[str, float] = {}
    for column, name in ((1, "cpu_after_s"), (2, "db_cpu_after_s")):
        start_cpu, end_cpu = (
            cpu_at(samples, t_full, column),
            cpu_at(samples, end, column),
        )
        if start_cpu is not None and end_cpu is not None:
            out[name] = round(end_cpu - start_cpu, 2)
    busy_until = t_full
    window = [s for s in samples if t_full <= s[0] <= end]
    for i, (t, cpu, _) in enumerate(window):
        # The stretch ending at this sample: from the first sample at least
        # quiet_for seconds before it.
        j = i
        while j > 0 and t - window[j][0] < quiet_for:
            j -= 1
        t_start, cpu_start, _ = window[j]
        if t > t_start and (cpu - cpu_start) / (t - t_start) >= below:
            busy_until = t
    out["busy_after_s"] = round(busy_until - t_full, 1)
    return out


def stage_spans(
    stages: Mapping[str, float], t0: float, samples: Sequence[CpuSample]
) -> dict[str, float]:
    """Per stage: how long it took and what ran meanwhile.

    ``stages``: {stage: seconds after ``t0``}. Each stage's span runs from the
    stage before it (in time; the first from ``t0``) to it. Returns, per stage,
    ``took:<stage>`` (seconds), and where the samples cover the span
    ``cores:<stage>`` (the joiner's CPU seconds per second: at most about 1 for
    one Python process) and, when a database CPU was sampled, ``dbcores:<stage>``
    (its database backends' CPU per second). Spans under 0.2 s get no cores
    (too short to sample)."""
    out: dict[str, float] = {}
    has_db = any(sample[2] > 0 for sample in samples)  # SQLite: all zero
    previous = 0.0
    for stage, at in sorted(stages.items(), key=lambda kv: kv[1]):
        took = max(0.0, at - previous)
        out[f"took:{stage}"] = round(took, 3)
        if took >= 0.2:
            for column, prefix in ((1, "cores"), (2, "dbcores")):
                a = cpu_at(samples, t0 + previous, column)
                b = cpu_at(samples, t0 + at, column)
                if a is not None and b is not None and (column == 1 or has_db):
                    out[f"{prefix}:{stage}"] = round(max(0.0, b - a) / took, 2)
        previous = max(previous, at)
    return out


class CpuTimeline:
    """Samples a kit :class:`Homeserver`'s CPU (with helper processes) and, on
    PostgreSQL, the CPU of the backends serving its database, every ``interval``
    seconds in a thread, for :func:`stage_spans`."""

    def __init__(self, hs: Any, interval: float = 0.5) -> None:
        self.hs = hs
        self.interval = interval
        self.samples: list[CpuSample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backend_cpu: dict[int, float] = {}

    def _db_cpu(self) -> float:
        name = getattr(self.hs, "database_name", None)
        if getattr(self.hs, "db", None) != "postgres" or not name:
            return 0.0
        import psutil

        for proc in psutil.process_iter(["name", "cmdline"]):
            try:
                if not (proc.info["name"] or "").startswith("postgres"):
                    continue
                cmdline = " ".join(proc.info["cmdline"] or [])
                if f" {name} " not in f" {cmdline} ":
                    continue
                times = proc.cpu_times()
                # Backends that exit keep what they used.
                self._backend_cpu[proc.pid] = times.user + times.system
            except psutil.Error:
                continue
        return sum(self._backend_cpu.values())

    def _sample(self) -> None:
        self.samples.append((time.time(), self.hs.cpu_seconds(), self._db_cpu()))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except Exception:  # a sample lost is not a reason to stop
                continue

    def start(self) -> None:
        self._sample()  # the baseline: CPU used before the window
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> list[CpuSample]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        return self.samples


def wait_until_idle(
    cpu_seconds: Callable[[], float],
    below: float = 0.15,
    quiet_for: float = 2.0,
    max_wait: float = 60.0,
    interval: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Wait until a process has used under ``below`` cores for ``quiet_for``
    seconds (at most ``max_wait``); returns the seconds waited.

    Before measuring a resident, so that what it still does after the join (a
    late event's state resolution, its own statistics refresh) is not charged
    to the request being measured, for stock and module alike."""
    started = clock()
    window: list[tuple[float, float]] = [(started, cpu_seconds())]
    while True:
        sleep(interval)
        now = clock()
        window.append((now, cpu_seconds()))
        # Keep the samples of the last ``quiet_for`` seconds (and one before).
        while len(window) > 2 and now - window[1][0] >= quiet_for:
            window.pop(0)
        t_first, cpu_first = window[0]
        if (
            now - t_first >= quiet_for
            and (window[-1][1] - cpu_first) / (now - t_first) < below
        ) or now - started >= max_wait:
            return now - started
