"""Exporter: the KV-cache gauges' points, from the relay's latest snapshots at collection time (``collection``).

Definitions (per engine; see ``kv_cache`` for the why): N blocks, one reserved null block,
F free of which E are evictable prefix-cache blocks, W the admission watermark, and
``tokens(x) = floor(x * limit / (N - 1))``, which is x * block_size for one KV-cache group.
``block.limit = N - 1``, ``block.usage{state=free} = F``, ``block.usage{state=used} = N - 1 - F``;
``limit`` = (N - 1) * block_size, or vLLM's ``kv_cache_size_tokens`` for hybrid models;
``usage{state=used} = tokens(N - 1 - F)``, ``usage{state=free} = limit - used``;
``utilization = 1 - F / (N - 1)``; ``evictable = tokens(E)``; ``admission.headroom = tokens(max(F - W, 0))``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import Meter, Observation

from otel_vllm_kv.exporter.collection import ObservedEngine, engine_callback
from otel_vllm_kv.kv_cache import KVCacheOccupancy
from otel_vllm_kv.names import (
    GAUGES,
    KV_CACHE_ADMISSION_HEADROOM,
    KV_CACHE_BLOCK_EVICTABLE,
    KV_CACHE_BLOCK_LIMIT,
    KV_CACHE_BLOCK_SIZE,
    KV_CACHE_BLOCK_USAGE,
    KV_CACHE_EVICTABLE,
    KV_CACHE_LIMIT,
    KV_CACHE_STATE,
    KV_CACHE_STATE_FREE,
    KV_CACHE_STATE_USED,
    KV_CACHE_USAGE,
    KV_CACHE_UTILIZATION,
)


def _states(used: int | None, free: int | None, attributes: dict) -> Iterable[Observation]:
    if used is not None and free is not None:
        yield Observation(used, {**attributes, KV_CACHE_STATE: KV_CACHE_STATE_USED})
        yield Observation(free, {**attributes, KV_CACHE_STATE: KV_CACHE_STATE_FREE})


def _per_engine(value: Callable[[KVCacheOccupancy], int | float | None]):
    def points(engine: ObservedEngine) -> Iterable[Observation]:
        observed = value(engine.occupancy)
        if observed is not None:
            yield Observation(observed, engine.attributes)

    return points


def _usage(engine: ObservedEngine) -> Iterable[Observation]:
    return _states(engine.occupancy.used_tokens, engine.occupancy.free_tokens, engine.attributes)


def _block_usage(engine: ObservedEngine) -> Iterable[Observation]:
    return _states(engine.occupancy.used_blocks, engine.occupancy.free_blocks, engine.attributes)


def _block_evictable(engine: ObservedEngine) -> Iterable[Observation]:
    for attributes, _, evictable in engine.group_attributes():
        yield Observation(evictable, attributes)


def _block_size(engine: ObservedEngine) -> Iterable[Observation]:
    for attributes, group, _ in engine.group_attributes():
        yield Observation(group.block_size, attributes)


#: The points of one engine, per gauge (units and descriptions: ``names.GAUGES``).
POINTS: dict[str, Callable[[ObservedEngine], Iterable[Observation]]] = {
    KV_CACHE_USAGE: _usage,
    KV_CACHE_LIMIT: _per_engine(lambda o: o.limit_tokens),
    KV_CACHE_UTILIZATION: _per_engine(lambda o: o.utilization),
    KV_CACHE_EVICTABLE: _per_engine(lambda o: o.evictable_tokens),
    KV_CACHE_ADMISSION_HEADROOM: _per_engine(lambda o: o.headroom_tokens),
    KV_CACHE_BLOCK_USAGE: _block_usage,
    KV_CACHE_BLOCK_LIMIT: _per_engine(lambda o: o.limit_blocks),
    KV_CACHE_BLOCK_EVICTABLE: _block_evictable,
    KV_CACHE_BLOCK_SIZE: _block_size,
}


CALLBACKS = {name: engine_callback(name, POINTS[name]) for name in GAUGES}


def create_instruments(meter: Meter) -> None:
    """Register the gauges on ``meter`` (``collection.first_registration`` decides when)."""
    for name, gauge in GAUGES.items():
        meter.create_observable_gauge(name, [CALLBACKS[name]], unit=gauge.unit, description=gauge.description)
