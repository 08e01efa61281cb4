"""Prometheus metrics of the ``/state`` server, served by Synapse's metrics listener.

Every series carries ``server_name`` like Synapse's own (homeserver-scoped metrics).
The same shape as :class:`synapse_partial_state.joining.metrics.ResyncMetrics`: one
instance per process, registry injectable for tests.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge


class StateServerMetrics:
    """``synapse_partial_state_state_*``: answers by endpoint, variant and cache
    outcome, events loaded or taken from the cache, bytes served, cache size and
    evictions."""

    def __init__(
        self, server_name: str, registry: CollectorRegistry = REGISTRY
    ) -> None:
        self._server = server_name
        self.requests = Counter(
            "synapse_partial_state_state_requests_total",
            "/state and /state_ids answers served by the module, by endpoint, "
            "variant and whether the state-group entry was cached (hit) or built "
            "(miss)",
            ["server_name", "endpoint", "variant", "entry"],
            registry=registry,
        )
        self.events_loaded = Counter(
            "synapse_partial_state_state_events_loaded_total",
            "Events loaded and encoded because they were not in the /state cache",
            ["server_name"],
            registry=registry,
        )
        self.events_cached = Counter(
            "synapse_partial_state_state_events_cached_total",
            "Events of /state answers taken already encoded from the cache",
            ["server_name"],
            registry=registry,
        )
        self.bytes_served = Counter(
            "synapse_partial_state_state_bytes_total",
            "Bytes of /state and /state_ids answers written by the module",
            ["server_name", "endpoint"],
            registry=registry,
        )
        self.cache_bytes = Gauge(
            "synapse_partial_state_state_cache_bytes",
            "Memory accounted to the /state cache",
            ["server_name"],
            registry=registry,
        )
        self.cache_evictions = Counter(
            "synapse_partial_state_state_cache_evictions_total",
            "Entries evicted from the /state cache to stay within its byte budget",
            ["server_name"],
            registry=registry,
        )

    def served(self, endpoint: str, variant: str, hit: bool, length: int) -> None:
        entry = "hit" if hit else "miss"
        self.requests.labels(self._server, endpoint, variant, entry).inc()
        self.bytes_served.labels(self._server, endpoint).inc(length)

    def events(self, cached: int, loaded: int) -> None:
        self.events_cached.labels(self._server).inc(cached)
        self.events_loaded.labels(self._server).inc(loaded)

    def cache(self, size_bytes: int, new_evictions: int) -> None:
        self.cache_bytes.labels(self._server).set(size_bytes)
        if new_evictions:
            self.cache_evictions.labels(self._server).inc(new_evictions)
