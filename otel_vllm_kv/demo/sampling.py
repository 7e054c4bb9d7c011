"""Read the package's gauges from the in-memory reader, per engine, every interval on a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from otel_vllm_kv.exporter.gauges import (
    ENGINE_INDEX,
    KV_CACHE_EVICTABLE,
    KV_CACHE_LIMIT,
    KV_CACHE_STATE,
    KV_CACHE_USAGE,
    KV_CACHE_UTILIZATION,
)

if TYPE_CHECKING:
    from typing_extensions import Self


@dataclass(frozen=True)
class EngineGauges:
    used: int
    free: int
    limit: int
    utilization: float
    evictable: int = 0


@dataclass(frozen=True)
class Sample:
    at: float  # wall clock, seconds since the epoch
    engines: dict[int, EngineGauges]  # by vllm.engine.index


def read_engines(reader: InMemoryMetricReader) -> dict[int, EngineGauges]:
    """One collection: the gauges of every engine that reports tokens, by engine index."""
    values: dict[int, dict[str, Any]] = {}
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in cast("list[NumberDataPoint]", metric.data.data_points):  # gauges only
                    attributes: Mapping[str, Any] = point.attributes or {}
                    engine = values.setdefault(attributes[ENGINE_INDEX], {})
                    if metric.name == KV_CACHE_USAGE:
                        engine[attributes[KV_CACHE_STATE]] = point.value  # "used" or "free"
                    elif metric.name == KV_CACHE_LIMIT:
                        engine["limit"] = point.value
                    elif metric.name == KV_CACHE_UTILIZATION:
                        engine["utilization"] = point.value
                    elif metric.name == KV_CACHE_EVICTABLE:
                        engine["evictable"] = point.value
    return {
        index: EngineGauges(**engine)
        for index, engine in sorted(values.items())
        if {"used", "free", "limit", "utilization"} <= engine.keys()
    }


class Sampler:
    """Takes a sample when entered, every ``interval`` seconds, and on exit; keeps them all, hands each on."""

    def __init__(self, reader: InMemoryMetricReader, interval: float, on_sample: Callable[[Sample], None]) -> None:
        self._reader = reader
        self._interval = interval
        self._on_sample = on_sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-cache-sampler", daemon=True)
        self.samples: list[Sample] = []

    def _take(self) -> None:
        sample = Sample(time.time(), read_engines(self._reader))
        self.samples.append(sample)
        self._on_sample(sample)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._take()

    def __enter__(self) -> Self:
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self._take()  # the state once the load is over
