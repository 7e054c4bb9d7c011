"""The KV-cache gauges, exported only by the owning process from the relay's latest snapshots.

Definitions (per engine, single KV-cache group; see ``kv_cache`` for the why):
``limit = (num_gpu_blocks - 1) * block_size``, ``usage{state=free} = free_blocks * block_size``,
``usage{state=used} = limit - free``, ``utilization = 1 - free_blocks / (num_gpu_blocks - 1)``.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from otel_vllm_kv.kv_cache import KVCacheTokens, to_tokens
from otel_vllm_kv.relay import EngineSnapshot, SnapshotReader

KV_CACHE_USAGE = "vllm.kv_cache.usage"
KV_CACHE_LIMIT = "vllm.kv_cache.limit"
KV_CACHE_UTILIZATION = "vllm.kv_cache.utilization"

KV_CACHE_STATE = "vllm.kv_cache.state"
KV_CACHE_STATE_USED = "used"
KV_CACHE_STATE_FREE = "free"
ENGINE_INDEX = "vllm.engine.index"
#: The engine's served model name: what clients send as ``model``.
MODEL_NAME = "gen_ai.request.model"

# The SDK keeps the first registration of a name and ignores (with a warning) later
# ones, and callbacks cannot be unregistered: create once per meter, read ``_source``.
_meters_with_instruments: weakref.WeakSet[Meter] = weakref.WeakSet()
#: A snapshot older than this is read again even within what looks like one collection.
_MAX_SNAPSHOT_AGE = 0.5


class _CollectionSnapshot:
    """Serves the callbacks of one collection from one relay read, so its points agree.

    A collection calls each callback once; a callback called a second time is the
    start of the next collection and triggers a fresh read.
    """

    def __init__(self, reader: SnapshotReader) -> None:
        self._reader = reader
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()
        self._engines: list[tuple[dict, KVCacheTokens]] = []
        self._served: set[str] = set()
        self._read_at = float("-inf")

    def engines(self, instrument: str) -> list[tuple[dict, KVCacheTokens]]:
        # A forked child inherits the callbacks and a running metric reader: only the owner reports.
        if os.getpid() != self._owner_pid:
            return []
        with self._lock:
            now = time.monotonic()
            if instrument in self._served or now - self._read_at > _MAX_SNAPSHOT_AGE:
                self._engines = [_to_observed(snapshot) for snapshot in self._reader.read()]
                self._served = set()
                self._read_at = now
            self._served.add(instrument)
            return self._engines


def _to_observed(snapshot: EngineSnapshot) -> tuple[dict, KVCacheTokens]:
    attributes = {ENGINE_INDEX: snapshot.engine_index, MODEL_NAME: snapshot.model_name}
    return attributes, to_tokens(snapshot.layout, snapshot.free_blocks)


_source: _CollectionSnapshot | None = None


def set_source(reader: SnapshotReader | None) -> None:
    """Point the callbacks at a relay (owned by this process), or at nothing."""
    global _source
    _source = None if reader is None else _CollectionSnapshot(reader)


def _engines(instrument: str) -> list[tuple[dict, KVCacheTokens]]:
    source = _source
    return [] if source is None else source.engines(instrument)


def _observe_usage(options: CallbackOptions) -> Iterable[Observation]:
    for attributes, tokens in _engines(KV_CACHE_USAGE):
        if tokens.used_tokens is not None:
            yield Observation(tokens.used_tokens, {**attributes, KV_CACHE_STATE: KV_CACHE_STATE_USED})
            yield Observation(tokens.free_tokens, {**attributes, KV_CACHE_STATE: KV_CACHE_STATE_FREE})


def _observe_limit(options: CallbackOptions) -> Iterable[Observation]:
    for attributes, tokens in _engines(KV_CACHE_LIMIT):
        if tokens.limit_tokens is not None:
            yield Observation(tokens.limit_tokens, attributes)


def _observe_utilization(options: CallbackOptions) -> Iterable[Observation]:
    for attributes, tokens in _engines(KV_CACHE_UTILIZATION):
        yield Observation(tokens.utilization, attributes)


def create_instruments(meter: Meter) -> None:
    """Register the gauges on ``meter`` unless this meter already has them."""
    if meter in _meters_with_instruments:
        return
    _meters_with_instruments.add(meter)
    meter.create_observable_gauge(
        KV_CACHE_USAGE, [_observe_usage], unit="{token}",
        description="KV-cache tokens by state (used or free); used + free = limit. "
        "Evictable prefix-cached blocks count as free.",
    )
    meter.create_observable_gauge(
        KV_CACHE_LIMIT, [_observe_limit], unit="{token}",
        description="Allocatable KV-cache tokens: (blocks - 1 reserved null block) x block size.",
    )
    meter.create_observable_gauge(
        KV_CACHE_UTILIZATION, [_observe_utilization], unit="1",
        description="Fraction of allocatable KV-cache blocks in use; equals vLLM's kv_cache_usage.",
    )
