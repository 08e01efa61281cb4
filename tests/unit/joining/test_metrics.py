"""The resync engine's Prometheus series (pure: a private registry)."""

from __future__ import annotations

import unittest

from prometheus_client import CollectorRegistry

from synapse_partial_state.joining.jobs import Phase
from synapse_partial_state.joining.metrics import ResyncMetrics


class MetricsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = ResyncMetrics("hs.example", registry=self.registry)

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(
            name, {"server_name": "hs.example", **labels}
        )

    def test_rooms_by_phase_follow_transitions(self) -> None:
        m = self.metrics
        m.set_phase(None, Phase.FETCHING)
        m.set_phase(Phase.FETCHING, Phase.RETRYING)
        m.set_phase(Phase.RETRYING, Phase.RETRYING)  # no change, no double count
        self.assertEqual(
            self.value("synapse_partial_state_resync_rooms", phase="fetching"), 0
        )
        self.assertEqual(
            self.value("synapse_partial_state_resync_rooms", phase="retrying"), 1
        )
        m.set_phase(Phase.RETRYING, Phase.DONE)
        self.assertEqual(
            self.value("synapse_partial_state_resync_rooms", phase="retrying"), 0
        )
        self.assertIsNone(
            self.value("synapse_partial_state_resync_rooms", phase="done")
        )

    def test_state_fetch_stages(self) -> None:
        m = self.metrics
        m.state_fetch(100, 98, 99, {"verify": 0.5, "persist": 2.0})
        m.state_fetch(10, 10, 10, {"persist": 1.0})
        ev = "synapse_partial_state_resync_events_total"
        secs = "synapse_partial_state_resync_event_seconds_total"
        self.assertEqual(self.value(ev, stage="state_fetched"), 110)
        self.assertEqual(self.value(ev, stage="state_verified"), 108)
        self.assertEqual(self.value(ev, stage="state_stored"), 109)
        self.assertEqual(self.value(secs, stage="state:persist"), 3.0)
        self.assertEqual(self.value(secs, stage="state:verify"), 0.5)

    def test_events_failures_and_outcomes(self) -> None:
        m = self.metrics
        m.event_done(Phase.FETCHING, 2.5)
        m.event_done(Phase.APPLYING, 0.5)
        m.event_done(Phase.APPLYING, 0.25)
        m.failure("HttpResponseException:502")
        m.started()
        m.completed(12.0)
        m.aborted()
        self.assertEqual(
            self.value("synapse_partial_state_resync_events_total", stage="applying"), 2
        )
        self.assertEqual(
            self.value(
                "synapse_partial_state_resync_event_seconds_total", stage="fetching"
            ),
            2.5,
        )
        self.assertEqual(
            self.value(
                "synapse_partial_state_resync_failures_total",
                reason="HttpResponseException:502",
            ),
            1,
        )
        for outcome in ("started", "completed", "aborted"):
            self.assertEqual(
                self.value(
                    "synapse_partial_state_resync_outcomes_total", outcome=outcome
                ),
                1,
            )
        self.assertEqual(
            self.value("synapse_partial_state_resync_duration_seconds_count"), 1
        )
        self.assertEqual(
            self.value("synapse_partial_state_resync_duration_seconds_sum"), 12.0
        )
