"""Exporter: the KV-cache gauges' callbacks, which read the relay's latest snapshots at collection time.

Definitions (per engine; see ``kv_cache`` for the why): N blocks, one reserved null block,
F free of which E are evictable prefix-cache blocks, W the admission watermark, and
``tokens(x) = floor(x * limit / (N - 1))``, which is x * block_size for one KV-cache group.
``block.limit = N - 1``, ``block.usage{state=free} = F``, ``block.usage{state=used} = N - 1 - F``;
``limit`` = (N - 1) * block_size, or vLLM's ``kv_cache_size_tokens`` for hybrid models;
``usage{state=used} = tokens(N - 1 - F)``, ``usage{state=free} = limit - used``;
``utilization = 1 - F / (N - 1)``; ``evictable = tokens(E)``; ``admission.headroom = tokens(max(F - W, 0))``.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import NamedTuple

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from otel_vllm_kv.kv_cache import GroupLayout, KVCacheOccupancy
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
    KV_CACHE_LIMIT,
    KV_CACHE_STATE,
    KV_CACHE_STATE_FREE,
    KV_CACHE_STATE_USED,
    KV_CACHE_USAGE,
    KV_CACHE_UTILIZATION,
    MODEL_NAME,
)
from otel_vllm_kv.relay import EngineSnapshot
from otel_vllm_kv.relay_reader import SnapshotReader


class _ObservedEngine(NamedTuple):
    attributes: dict
    occupancy: KVCacheOccupancy
    groups: tuple[GroupLayout, ...]
    evictable_blocks: tuple[int, ...] | None

    def group_attributes(self) -> Iterable[tuple[dict, GroupLayout, int]]:
        # A probe's relay file carries one evictable count per group; statistics carry no groups.
        for index, (group, evictable) in enumerate(zip(self.groups, self.evictable_blocks or ())):
            attributes = {**self.attributes, KV_CACHE_GROUP_INDEX: index, KV_CACHE_GROUP_TYPE: group.kind}
            yield attributes, group, evictable


# The SDK keeps the first registration of a name and ignores (with a warning) later
# ones, and callbacks cannot be unregistered: create once per meter, read ``_source``.
_meters_with_instruments: weakref.WeakSet[Meter] = weakref.WeakSet()
#: A snapshot older than this is read again even within what looks like one collection.
_MAX_SNAPSHOT_AGE = 2.0  # longer than one collection takes, also on a loaded machine (0.5 s may not be)


class _CollectionSnapshot:
    """Serves the callbacks of one collection from one relay read, so its points agree.

    A collection calls each callback once; a callback called a second time is the
    start of the next collection and triggers a fresh read.
    """

    def __init__(self, reader: SnapshotReader) -> None:
        self._reader = reader
        self._exporter_pid = os.getpid()
        self._lock = threading.Lock()
        self._engines: list[_ObservedEngine] = []
        self._served: set[str] = set()
        self._read_at = float("-inf")

    def engines(self, instrument: str) -> list[_ObservedEngine]:
        # A forked child inherits the callbacks and a running metric reader: only the exporter reports.
        if os.getpid() != self._exporter_pid:
            return []
        with self._lock:
            now = time.monotonic()
            if instrument in self._served or now - self._read_at > _MAX_SNAPSHOT_AGE:
                self._engines = [_to_observed(snapshot) for snapshot in self._reader.read()]
                self._served = set()
                self._read_at = now
            self._served.add(instrument)
            return self._engines


def _to_observed(snapshot: EngineSnapshot) -> _ObservedEngine:
    attributes = {ENGINE_INDEX: snapshot.engine_index, MODEL_NAME: snapshot.model_name}
    return _ObservedEngine(attributes, snapshot.occupancy(), snapshot.layout.groups, snapshot.evictable_blocks)


_source: _CollectionSnapshot | None = None


def set_source(reader: SnapshotReader | None) -> None:
    """Point the callbacks at a relay (owned by this process), or at nothing."""
    global _source
    _source = None if reader is None else _CollectionSnapshot(reader)


def _engines(instrument: str) -> list[_ObservedEngine]:
    source = _source
    return [] if source is None else source.engines(instrument)


def _states(used: int | None, free: int | None, attributes: dict) -> Iterable[Observation]:
    if used is not None and free is not None:
        yield Observation(used, {**attributes, KV_CACHE_STATE: KV_CACHE_STATE_USED})
        yield Observation(free, {**attributes, KV_CACHE_STATE: KV_CACHE_STATE_FREE})


def _per_engine(value: Callable[[KVCacheOccupancy], int | float | None]):
    def points(engine: _ObservedEngine) -> Iterable[Observation]:
        observed = value(engine.occupancy)
        if observed is not None:
            yield Observation(observed, engine.attributes)

    return points


def _usage(engine: _ObservedEngine) -> Iterable[Observation]:
    return _states(engine.occupancy.used_tokens, engine.occupancy.free_tokens, engine.attributes)


def _block_usage(engine: _ObservedEngine) -> Iterable[Observation]:
    return _states(engine.occupancy.used_blocks, engine.occupancy.free_blocks, engine.attributes)


def _block_evictable(engine: _ObservedEngine) -> Iterable[Observation]:
    for attributes, _, evictable in engine.group_attributes():
        yield Observation(evictable, attributes)


def _block_size(engine: _ObservedEngine) -> Iterable[Observation]:
    for attributes, group, _ in engine.group_attributes():
        yield Observation(group.block_size, attributes)


#: The points of one engine, per gauge (units and descriptions: ``names.GAUGES``).
POINTS: dict[str, Callable[[_ObservedEngine], Iterable[Observation]]] = {
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


def _callback(name: str, points: Callable[[_ObservedEngine], Iterable[Observation]]):
    def observe(options: CallbackOptions) -> Iterable[Observation]:
        for engine in _engines(name):
            yield from points(engine)

    return observe


CALLBACKS = {name: _callback(name, POINTS[name]) for name in GAUGES}


def create_instruments(meter: Meter) -> None:
    """Register the gauges on ``meter`` unless this meter already has them."""
    if meter in _meters_with_instruments:
        return
    _meters_with_instruments.add(meter)
    for name, gauge in GAUGES.items():
        meter.create_observable_gauge(name, [CALLBACKS[name]], unit=gauge.unit, description=gauge.description)


def install(meter: Meter, reader: SnapshotReader) -> None:
    create_instruments(meter)
    set_source(reader)


def uninstall() -> None:
    set_source(None)
