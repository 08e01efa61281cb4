"""A simple progress bar on stderr: steps done, elapsed, estimate, current phase."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _hms(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Weighted steps (e.g. one per measurement, weighted by expected cost).

    On a terminal the bar redraws in place; otherwise each phase is one line.
    """

    def __init__(
        self, total_weight: float, stream: TextIO | None = None, width: int = 24
    ) -> None:
        self.total = max(total_weight, 1e-9)
        self.done = 0.0
        self.stream = stream or sys.stderr
        self.width = width
        self.started = time.monotonic()
        self.label = ""
        self.phase_text = ""
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_len = 0

    def step_started(self, label: str) -> None:
        self.label = label
        self.phase_text = ""
        self._draw()

    def phase(self, text: str) -> None:
        self.phase_text = text
        self._draw()

    def step_done(self, weight: float) -> None:
        self.done = min(self.total, self.done + weight)
        self.phase_text = "done"
        self._draw()

    def line(self, text: str) -> None:
        """A message above the bar."""
        self._clear()
        self.stream.write(text + "\n")
        if self._tty:
            self._draw()
        else:
            self.stream.flush()

    def finish(self) -> None:
        self._clear()
        self.stream.write(f"finished in {_hms(time.monotonic() - self.started)}\n")
        self.stream.flush()

    def render(self) -> str:
        frac = self.done / self.total
        filled = int(round(frac * self.width))
        elapsed = time.monotonic() - self.started
        eta = ""
        if 0 < self.done < self.total:
            eta = f", ~{_hms(elapsed / frac - elapsed)} left"
        text = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {frac * 100:3.0f}%"
            f" {_hms(elapsed)}{eta}"
        )
        if self.label:
            text += f" | {self.label}"
        if self.phase_text:
            text += f": {self.phase_text}"
        return text

    def _clear(self) -> None:
        if self._tty and self._last_len:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self._last_len = 0

    def _draw(self) -> None:
        text = self.render()
        if self._tty:
            self._clear()
            self.stream.write(text)
            self._last_len = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
