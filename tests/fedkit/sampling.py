"""Resident memory and CPU time of a homeserver process and its helpers.

A :class:`ResourceSampler` reads a process (and its child processes, e.g. the
module's signature-checking workers) with :mod:`psutil` and the kernel's peak
RSS counter (``VmHWM``), on demand or every few hundred milliseconds from a
background thread. The last values seen stay available after the process
stopped.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import psutil


def vm_hwm(pid: int) -> int:
    """The kernel's peak resident set size (``VmHWM``) of ``pid``, bytes; 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _clear_peak(pid: int) -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of ``pid``."""
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")


class ResourceSampler:
    """RSS and CPU of one process plus its child processes.

    Args:
        name: label of the sampling thread (``sampler-<name>``).
        running_pid: returns the process id while the process runs, else None.
    """

    def __init__(self, name: str, running_pid: Callable[[], int | None]) -> None:
        self.name = name
        self._running_pid = running_pid
        self._sampler: threading.Thread | None = None
        self._sampler_stop = threading.Event()
        self.samples: list[tuple[float, int, float]] = []  # (time, rss, cpu seconds)
        self._last_rss_peak = 0
        self._last_rss = 0
        self._last_cpu = 0.0
        self._child_cpu: dict[int, float] = {}
        self._child_peak: dict[int, int] = {}

    def forget_process(self) -> None:
        """Zero the last values seen, for a new process (the samples stay)."""
        self._last_rss_peak = 0
        self._last_rss = 0
        self._last_cpu = 0.0
        self._child_cpu.clear()
        self._child_peak.clear()

    def _psutil(self) -> psutil.Process | None:
        pid = self._running_pid()
        if pid is None:
            return None
        try:
            return psutil.Process(pid)
        except psutil.Error:
            return None

    def sample_once(self) -> None:
        """Read the process now (no-op once it stopped)."""
        p = self._psutil()
        if p is None:
            return
        try:
            with p.oneshot():
                times = p.cpu_times()
                cpu = times.user + times.system
                rss = p.memory_info().rss
            peak = vm_hwm(p.pid) or rss
            children = p.children(recursive=True)
        except psutil.Error:
            return
        rss += self._sample_children(children)
        # (list(): the benchmark's CPU timeline samples from its own thread.)
        cpu += sum(list(self._child_cpu.values()))
        peak += sum(list(self._child_peak.values()))
        self._last_cpu = cpu
        self._last_rss = rss
        self._last_rss_peak = max(self._last_rss_peak, peak)
        if self._sampler is not None:
            self.samples.append((time.time(), rss, cpu))

    def _sample_children(self, children: list[psutil.Process]) -> int:
        """Record the children's CPU and peak RSS; returns their summed RSS now.

        Helper processes (e.g. the module's signature-checking workers) count
        towards the homeserver: CPU summed, peak RSS summed (an upper bound)."""
        rss = 0
        for child in children:
            try:
                ctimes = child.cpu_times()
                self._child_cpu[child.pid] = ctimes.user + ctimes.system
                child_rss = child.memory_info().rss
                self._child_peak[child.pid] = max(
                    self._child_peak.get(child.pid, 0), vm_hwm(child.pid) or child_rss
                )
                rss += child_rss
            except psutil.Error:
                continue
        return rss

    def rss_peak_bytes(self) -> int:
        """Peak resident set size of the process (kernel VmHWM), plus its helper
        processes' peaks, bytes.

        Still available after the process stopped (last value seen)."""
        self.sample_once()
        return self._last_rss_peak

    def rss_bytes(self) -> int:
        """Resident set size now, plus its helper processes', bytes (last value
        seen once the process stopped)."""
        self.sample_once()
        return self._last_rss

    def reset_rss_peak(self) -> None:
        """Reset the kernel's peak-RSS counter (VmHWM), e.g. before a measured step."""
        pid = self._running_pid()
        if pid is not None:
            _clear_peak(pid)
            for child_pid in list(self._child_peak):
                _clear_peak(child_pid)
        self._child_peak.clear()
        self._last_rss_peak = 0

    def cpu_seconds(self) -> float:
        """User + system CPU time consumed by the process so far."""
        self.sample_once()
        return self._last_cpu

    def start_sampling(self, interval: float = 0.25) -> None:
        """Record (time, rss, cpu) into :attr:`samples` every ``interval`` s."""
        if self._sampler is not None:
            return
        self._sampler_stop.clear()

        def run() -> None:
            while not self._sampler_stop.wait(interval):
                self.sample_once()

        self._sampler = threading.Thread(
            target=run, name=f"sampler-{self.name}", daemon=True
        )
        self._sampler.start()

    def stop_sampling(self) -> None:
        if self._sampler is None:
            return
        self._sampler_stop.set()
        self._sampler.join()
        self._sampler = None
