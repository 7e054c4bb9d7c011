"""Exporter: who holds each engine's KV cache, from the holders section of its relay file.

``vllm.kv_cache.residency`` (an observable counter, token-seconds) and ``vllm.kv_cache.held``
(a gauge, tokens) have one point per engine and (LoRA adapter, tenant) the engine has seen,
adapters and tenants that never ran having none; ``vllm.kv_cache.written`` one per engine.
Blocks become tokens at the pool's rate, ``limit / (N - 1)`` (``kv_cache``), unrounded: a block
shared by k requests counts 1/k, and the held points add up to ``usage{state=used}`` of the
same pass. No points where the pool's token capacity is unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import Meter, Observation

from otel_vllm_kv.exporter.collection import ObservedEngine, engine_callback
from otel_vllm_kv.holdings import OVERFLOW as OVERFLOW_KEY
from otel_vllm_kv.holdings import HolderKey
from otel_vllm_kv.names import (
    HOLDER_COUNTERS,
    HOLDER_METRICS,
    KV_CACHE_HELD,
    KV_CACHE_RESIDENCY,
    KV_CACHE_WRITTEN,
    LORA_NAME,
    OVERFLOW,
    TENANT,
)


def _tokens_per_block(engine: ObservedEngine) -> float | None:
    layout = engine.layout
    if layout.limit_tokens is None or layout.allocatable_blocks <= 0:
        return None
    return layout.limit_tokens / layout.allocatable_blocks


def _key_attributes(engine: ObservedEngine, key: HolderKey) -> dict:
    if key == OVERFLOW_KEY:
        return {**engine.attributes, OVERFLOW: True}
    adapter, tenant = key
    attributes = dict(engine.attributes)
    if adapter is not None:
        attributes[LORA_NAME] = adapter
    if tenant is not None:
        attributes[TENANT] = tenant
    return attributes


def _by_holder(value: Callable[[float, float], float]):
    def points(engine: ObservedEngine) -> Iterable[Observation]:
        rate = _tokens_per_block(engine)
        if engine.holders is None or rate is None:
            return
        for holding in engine.holders.holdings:
            yield Observation(
                value(holding.block_seconds, holding.held_blocks) * rate, _key_attributes(engine, holding.key)
            )

    return points


def _written(engine: ObservedEngine) -> Iterable[Observation]:
    if engine.holders is not None and engine.holders.written_tokens is not None:
        yield Observation(engine.holders.written_tokens, engine.attributes)


POINTS: dict[str, Callable[[ObservedEngine], Iterable[Observation]]] = {
    KV_CACHE_RESIDENCY: _by_holder(lambda block_seconds, held: block_seconds),
    KV_CACHE_HELD: _by_holder(lambda block_seconds, held: held),
    KV_CACHE_WRITTEN: _written,
}


def create_instruments(meter: Meter) -> None:
    """Register the holder metrics on ``meter`` (``collection.first_registration`` decides when)."""
    for name, instrument in HOLDER_METRICS.items():
        create = meter.create_observable_counter if name in HOLDER_COUNTERS else meter.create_observable_gauge
        create(name, [engine_callback(name, POINTS[name])], unit=instrument.unit, description=instrument.description)
