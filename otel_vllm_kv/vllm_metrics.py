"""The token gauges on vLLM's own Prometheus endpoint, beside ``vllm:kv_cache_usage_perc``.

vLLM's OpenAI server serves ``prometheus_client``'s default registry on ``/metrics``
(except with several API-server processes, when it aggregates a multiprocess directory
instead and this collector is not part of it). A collector registered there reads the
relay at scrape time, so operators who already scrape vLLM get tokens without an
OpenTelemetry exporter. Names and labels follow vLLM's: ``model_name`` and ``engine``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

from otel_vllm_kv.relay import SnapshotReader

USAGE_TOKENS = "vllm:kv_cache_usage_tokens"
LIMIT_TOKENS = "vllm:kv_cache_limit_tokens"
EVICTABLE_TOKENS = "vllm:kv_cache_evictable_tokens"
HEADROOM_TOKENS = "vllm:kv_cache_admission_headroom_tokens"
_LABELS = ["model_name", "engine"]
_logger = logging.getLogger(__name__)


class RelayCollector:
    """A ``prometheus_client`` collector of every live engine's tokens, read from the relay."""

    def __init__(self, reader: SnapshotReader) -> None:
        self._reader = reader
        self._owner_pid = os.getpid()
        self._warned = False

    def describe(self) -> list:
        # Nothing to check against other collectors' names at registration; collect() is cheap anyway.
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        usage = GaugeMetricFamily(
            USAGE_TOKENS, "KV-cache tokens by state (used or free); used + free = limit.", labels=[*_LABELS, "state"]
        )
        per_engine = {
            "limit_tokens": GaugeMetricFamily(
                LIMIT_TOKENS, "KV-cache token capacity: (blocks - 1 reserved null block) x block size, "
                "or vLLM's kv_cache_size_tokens for hybrid models.", labels=_LABELS,
            ),
            "evictable_tokens": GaugeMetricFamily(
                EVICTABLE_TOKENS, "Free KV-cache tokens still holding an unreferenced cached prefix.", labels=_LABELS
            ),
            "headroom_tokens": GaugeMetricFamily(
                HEADROOM_TOKENS, "Free KV-cache tokens beyond vLLM's admission watermark.", labels=_LABELS
            ),
        }
        try:
            self._add_engines(usage, per_engine)
        except Exception:  # A failure here must not turn vLLM's whole /metrics into an error.
            if not self._warned:
                self._warned = True
                _logger.warning("otel-vllm-kv: cannot read the KV-cache relay for /metrics", exc_info=True)
            return
        yield usage
        yield from per_engine.values()

    def _add_engines(self, usage: Any, per_engine: dict[str, Any]) -> None:
        # A forked child inherits the registry; only the owner reports.
        snapshots = self._reader.read() if os.getpid() == self._owner_pid else []
        for snapshot in snapshots:
            occupancy = snapshot.occupancy()
            if occupancy.limit_tokens is None:
                continue
            labels = [snapshot.model_name, str(snapshot.engine_index)]
            usage.add_metric([*labels, "used"], occupancy.used_tokens)
            usage.add_metric([*labels, "free"], occupancy.free_tokens)
            for field, family in per_engine.items():
                family.add_metric(labels, getattr(occupancy, field))


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
