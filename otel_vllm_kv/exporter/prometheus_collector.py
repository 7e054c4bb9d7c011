"""Exporter: the token gauges on vLLM's own Prometheus endpoint, beside ``vllm:kv_cache_usage_perc``.

Operators who already scrape vLLM get tokens without an OpenTelemetry exporter. With one API
server (or ``LLM``) vLLM serves ``/metrics`` from ``prometheus_client``'s default registry in
the exporter process: a collector registered there reads the relay at scrape time. With
several API servers, see ``frontend.multiprocess_metrics``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from otel_vllm_kv.names import PROMETHEUS_FAMILIES
from otel_vllm_kv.prometheus_samples import label_names, read_samples, warn_once
from otel_vllm_kv.relay_reader import SnapshotReader


class RelayCollector:
    """A ``prometheus_client`` collector of every live engine's tokens, read from the relay."""

    def __init__(self, reader: SnapshotReader) -> None:
        self._reader = reader
        self._registering_pid = os.getpid()
        self._warn = warn_once()

    def describe(self) -> list:
        # Nothing to check against other collectors' names at registration; collect() is cheap anyway.
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        families = {
            name: GaugeMetricFamily(name, family.help, labels=label_names(name))
            for name, family in PROMETHEUS_FAMILIES.items()
        }
        # A forked child inherits the registry; only the process that registered it reports.
        if os.getpid() == self._registering_pid:
            try:
                for name, labels, value in read_samples(self._reader):
                    families[name].add_metric(list(labels), value)
            except Exception:  # noqa: BLE001
                self._warn()
                return
        yield from families.values()


_registered: RelayCollector | None = None


def register(reader: SnapshotReader) -> None:
    """Add the collector to ``prometheus_client``'s default registry, if it is installed."""
    global _registered
    if _registered is not None:
        return
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return
    _registered = RelayCollector(reader)
    REGISTRY.register(_registered)


def unregister() -> None:
    global _registered
    if _registered is None:
        return
    from prometheus_client import REGISTRY

    REGISTRY.unregister(_registered)
    _registered = None
