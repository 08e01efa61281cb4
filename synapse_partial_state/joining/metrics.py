"""Prometheus metrics of the resync engine, served by Synapse's metrics listener.

Every series carries ``server_name`` like Synapse's own (homeserver-scoped metrics).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from synapse_partial_state.joining.jobs import Phase


class ResyncMetrics:
    """``synapse_partial_state_resync_*``: rooms by phase, events per stage,
    durations and failures by reason. One instance per process."""

    def __init__(
        self, server_name: str, registry: CollectorRegistry = REGISTRY
    ) -> None:
        self._server = server_name
        self.rooms = Gauge(
            "synapse_partial_state_resync_rooms",
            "Partial-state rooms by resync phase (this process's jobs)",
            ["server_name", "phase"],
            registry=registry,
        )
        self.events = Counter(
            "synapse_partial_state_resync_events",
            "Events brought to full state, by stage",
            ["server_name", "stage"],
            registry=registry,
        )
        self.event_seconds = Counter(
            "synapse_partial_state_resync_event_seconds",
            "Seconds spent bringing events to full state, by stage",
            ["server_name", "stage"],
            registry=registry,
        )
        self.duration = Histogram(
            "synapse_partial_state_resync_duration_seconds",
            "From the partial join to the room being complete",
            ["server_name"],
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200),
            registry=registry,
        )
        self.failures = Counter(
            "synapse_partial_state_resync_failures",
            "Failed attempts to get state from a server, by reason",
            ["server_name", "reason"],
            registry=registry,
        )
        self.outcomes = Counter(
            "synapse_partial_state_resync_outcomes",
            "Resyncs started, completed and aborted",
            ["server_name", "outcome"],
            registry=registry,
        )

    def set_phase(self, previous: Phase | None, current: Phase) -> None:
        if previous == current:
            return
        if previous is not None and not previous.final:
            self.rooms.labels(self._server, previous.value).dec()
        if not current.final:
            self.rooms.labels(self._server, current.value).inc()

    def event_done(self, phase: Phase, seconds: float) -> None:
        self.events.labels(self._server, phase.value).inc()
        self.event_seconds.labels(self._server, phase.value).inc(seconds)

    def state_fetch(
        self, fetched: int, verified: int, stored: int, stages: dict[str, float]
    ) -> None:
        """One fetch of the state at a join (``fetch.py``): events per stage
        (``state_fetched``, ``state_verified`` in bulk, ``state_stored``) and
        seconds per stage (``state:<stage>``, e.g. ``state:persist``)."""
        for stage, count in (
            ("state_fetched", fetched),
            ("state_verified", verified),
            ("state_stored", stored),
        ):
            self.events.labels(self._server, stage).inc(count)
        for stage, seconds in stages.items():
            self.event_seconds.labels(self._server, f"state:{stage}").inc(seconds)

    def failure(self, reason: str) -> None:
        self.failures.labels(self._server, reason).inc()

    def started(self) -> None:
        self.outcomes.labels(self._server, "started").inc()

    def completed(self, seconds: float) -> None:
        self.outcomes.labels(self._server, "completed").inc()
        self.duration.labels(self._server).observe(seconds)

    def aborted(self) -> None:
        self.outcomes.labels(self._server, "aborted").inc()
