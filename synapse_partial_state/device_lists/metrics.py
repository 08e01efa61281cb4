"""Prometheus metrics of the device-list queues (each with a ``server_name``
label, as Synapse's own)."""

from __future__ import annotations

from prometheus_client import Counter

_QUEUED = Counter(
    "synapse_partial_state_device_list_queued_total",
    "Device-list updates queued while a room was partial",
    ["server_name", "direction"],
)
_REPLAYED = Counter(
    "synapse_partial_state_device_list_replayed_total",
    "Device-list updates replayed at the end of a resync (outgoing: one per "
    "destination; incoming: one per device applied)",
    ["server_name", "direction"],
)


class DeviceListMetrics:
    def __init__(self, server_name: str) -> None:
        self._server_name = server_name

    def queued(self, direction: str, n: int = 1) -> None:
        _QUEUED.labels(self._server_name, direction).inc(n)

    def replayed(self, direction: str, n: int = 1) -> None:
        _REPLAYED.labels(self._server_name, direction).inc(n)
