"""Read the package's gauges from the in-memory reader, per engine, every interval on a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint

from otel_vllm_kv.names import (
    ENGINE_INDEX,
    GAUGES,
    KV_CACHE_ADMISSION_HEADROOM,
    KV_CACHE_BLOCK_EVICTABLE,
    KV_CACHE_BLOCK_LIMIT,
    KV_CACHE_BLOCK_SIZE,
    KV_CACHE_BLOCK_USAGE,
    KV_CACHE_EVICTABLE,
    KV_CACHE_GROUP_INDEX,
    KV_CACHE_GROUP_TYPE,
    KV_CACHE_HELD,
    KV_CACHE_LIMIT,
    KV_CACHE_RESIDENCY,
    KV_CACHE_STATE,
    KV_CACHE_USAGE,
    KV_CACHE_UTILIZATION,
    KV_CACHE_WRITTEN,
    LORA_NAME,
    MODEL_NAME,
    OVERFLOW,
    TENANT,
)

if TYPE_CHECKING:
    from typing_extensions import Self


class GroupReading(NamedTuple):
    """One KV-cache group of an engine: vLLM's attention type, tokens per block, evictable blocks."""

    attention_type: str
    block_size: int | None = None
    evictable_blocks: int | None = None


@dataclass(frozen=True)
class EngineReading:
    """One engine's gauges in one collection. None: no point of that gauge for the engine in it (an
    engine reported from vLLM's scheduler statistics has no evictable, headroom or group gauges; one
    that appeared or went away during the collection lacks some of the others)."""

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
    groups: dict[int, GroupReading] = field(default_factory=dict)
    """By KV-cache group index."""

    @property
    def reports_tokens(self) -> bool:
        """Whether it has used, free, limit and utilization (what the demo shows and charts)."""
        return None not in (self.used, self.free, self.limit, self.utilization)


class HolderReading(NamedTuple):
    """What one (LoRA adapter, tenant) of one engine holds, in one collection (``read_holders``)."""

    engine_index: int
    adapter: str | None
    tenant: str | None
    overflow: bool
    token_seconds: float | None
    held_tokens: float | None


@dataclass(frozen=True)
class Sample:
    at: float  # wall clock, seconds since the epoch
    engines: dict[int, EngineReading]  # by vllm.engine.index; only those that report tokens
    holders: dict[int, dict[str | None, HolderReading]] = field(default_factory=dict)
    """By engine index, then tenant (None: requests without one); adapters are summed in the demo's
    base model (it serves none)."""


#: The field of ``EngineReading`` each per-engine gauge without a state attribute fills.
_PER_ENGINE = {
    KV_CACHE_LIMIT: "limit",
    KV_CACHE_UTILIZATION: "utilization",
    KV_CACHE_EVICTABLE: "evictable",
    KV_CACHE_ADMISSION_HEADROOM: "headroom",
    KV_CACHE_BLOCK_LIMIT: "limit_blocks",
}


def _points(reader: InMemoryMetricReader, names: Collection[str]) -> Iterator[tuple[str, Mapping[str, Any], Any]]:
    """(metric name, attributes, value) of every point of the metrics ``names`` in one collection."""
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name in names:
                    for point in cast("list[NumberDataPoint]", metric.data.data_points):  # gauges and sums
                        yield metric.name, point.attributes or {}, point.value


def read_engines(reader: InMemoryMetricReader) -> dict[int, EngineReading]:
    """One collection: every engine any of the package's gauges reports, by engine index (in index
    order). Empty when nothing was observed; other metrics the reader holds are left out."""
    engines: dict[int, dict[str, Any]] = {}
    groups: dict[int, dict[int, dict[str, Any]]] = {}
    for name, attributes, value in _points(reader, GAUGES):
        index = attributes[ENGINE_INDEX]
        engine = engines.setdefault(index, {"model_name": attributes[MODEL_NAME]})
        if name == KV_CACHE_USAGE:
            engine[attributes[KV_CACHE_STATE]] = value  # "used" or "free"
        elif name == KV_CACHE_BLOCK_USAGE:
            engine[f"{attributes[KV_CACHE_STATE]}_blocks"] = value
        elif name in _PER_ENGINE:
            engine[_PER_ENGINE[name]] = value
        elif name in (KV_CACHE_BLOCK_SIZE, KV_CACHE_BLOCK_EVICTABLE):  # per group
            group = groups.setdefault(index, {}).setdefault(attributes[KV_CACHE_GROUP_INDEX], {})
            group["attention_type"] = attributes[KV_CACHE_GROUP_TYPE]
            group["block_size" if name == KV_CACHE_BLOCK_SIZE else "evictable_blocks"] = value
    return {
        index: EngineReading(
            **engine,
            groups={group: GroupReading(**values) for group, values in sorted(groups.get(index, {}).items())},
        )
        for index, engine in sorted(engines.items())
    }


def read_holders(reader: InMemoryMetricReader) -> dict[tuple[int, str | None, str | None, bool], HolderReading]:
    """One collection of ``vllm.kv_cache.residency`` and ``vllm.kv_cache.held``, by (engine index,
    adapter, tenant, overflow)."""
    holders: dict[tuple[int, str | None, str | None, bool], dict[str, Any]] = {}
    for name, attributes, value in _points(reader, (KV_CACHE_RESIDENCY, KV_CACHE_HELD)):
        key = (
            attributes[ENGINE_INDEX],
            attributes.get(LORA_NAME),
            attributes.get(TENANT),
            bool(attributes.get(OVERFLOW)),
        )
        reading = holders.setdefault(key, {"token_seconds": None, "held_tokens": None})
        reading["token_seconds" if name == KV_CACHE_RESIDENCY else "held_tokens"] = value
    return {key: HolderReading(*key, **values) for key, values in sorted(holders.items(), key=str)}


def read_written(reader: InMemoryMetricReader) -> dict[int, float]:
    """One collection of ``vllm.kv_cache.written``, by engine index."""
    return {attributes[ENGINE_INDEX]: value for _, attributes, value in _points(reader, (KV_CACHE_WRITTEN,))}


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
        engines = {index: engine for index, engine in read_engines(self._reader).items() if engine.reports_tokens}
        holders: dict[int, dict[str | None, HolderReading]] = {}
        for reading in read_holders(self._reader).values():
            holders.setdefault(reading.engine_index, {})[reading.tenant] = reading
        sample = Sample(time.time(), engines, holders)
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
