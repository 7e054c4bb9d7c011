"""Read the package's gauges back from an SDK in-memory reader, keyed by engine."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_vllm_kv.instruments import (
    ENGINE_INDEX,
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
                    elif metric.name == KV_CACHE_LIMIT:
                        gauges.limit = point.value
                    elif metric.name == KV_CACHE_UTILIZATION:
                        gauges.utilization = point.value
    return engines


def metric_units(reader: InMemoryMetricReader) -> dict[str, str]:
    data = reader.get_metrics_data()
    return {
        metric.name: metric.unit
        for resource_metrics in data.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
    }
