"""Read the package's gauges back from an SDK in-memory reader, keyed by engine."""

from __future__ import annotations

from dataclasses import dataclass, field

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_vllm_kv.exporter.gauges import (
    ENGINE_INDEX,
    KV_CACHE_ADMISSION_HEADROOM,
    KV_CACHE_BLOCK_EVICTABLE,
    KV_CACHE_BLOCK_LIMIT,
    KV_CACHE_BLOCK_SIZE,
    KV_CACHE_BLOCK_USAGE,
    KV_CACHE_EVICTABLE,
    KV_CACHE_GROUP_INDEX,
    KV_CACHE_GROUP_TYPE,
    KV_CACHE_LIMIT,
    KV_CACHE_STATE,
    KV_CACHE_USAGE,
    KV_CACHE_UTILIZATION,
    MODEL_NAME,
)


def new_reader() -> tuple[InMemoryMetricReader, MeterProvider]:
    reader = InMemoryMetricReader()
    return reader, MeterProvider(metric_readers=[reader])


@dataclass
class EngineGauges:
    model_name: str
    used: int | None = None
    free: int | None = None
    limit: int | None = None
    utilization: float | None = None
    evictable: int | None = None
    headroom: int | None = None
    used_blocks: int | None = None
    free_blocks: int | None = None
    limit_blocks: int | None = None
    #: {group index: [attention type, tokens per block, evictable blocks]}
    groups: dict = field(default_factory=dict)


_PER_ENGINE = {
    KV_CACHE_LIMIT: "limit", KV_CACHE_UTILIZATION: "utilization", KV_CACHE_EVICTABLE: "evictable",
    KV_CACHE_ADMISSION_HEADROOM: "headroom", KV_CACHE_BLOCK_LIMIT: "limit_blocks",
}


def read_gauges(reader: InMemoryMetricReader) -> dict[int, EngineGauges]:
    """One collection; {engine index: its gauges}. Empty when nothing was observed."""
    engines: dict[int, EngineGauges] = {}
    data = reader.get_metrics_data()
    if data is None:
        return engines
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    attributes = dict(point.attributes)
                    gauges = engines.setdefault(
                        attributes[ENGINE_INDEX], EngineGauges(attributes[MODEL_NAME])
                    )
                    if metric.name == KV_CACHE_USAGE:
                        setattr(gauges, attributes[KV_CACHE_STATE], point.value)
                    elif metric.name == KV_CACHE_BLOCK_USAGE:
                        setattr(gauges, f"{attributes[KV_CACHE_STATE]}_blocks", point.value)
                    elif metric.name in _PER_ENGINE:
                        setattr(gauges, _PER_ENGINE[metric.name], point.value)
                    elif metric.name in (KV_CACHE_BLOCK_SIZE, KV_CACHE_BLOCK_EVICTABLE):
                        group = gauges.groups.setdefault(attributes[KV_CACHE_GROUP_INDEX], [None, None, None])
                        group[0] = attributes[KV_CACHE_GROUP_TYPE]
                        group[1 if metric.name == KV_CACHE_BLOCK_SIZE else 2] = point.value
    return engines


def metric_units(reader: InMemoryMetricReader) -> dict[str, str]:
    data = reader.get_metrics_data()
    return {
        metric.name: metric.unit
        for resource_metrics in data.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
    }
