"""Exporter: one relay read per metric collection, served to every callback of that collection.

The package's instruments (``gauges``, ``holder_metrics``) each read the engines through
``observed_engines``; the points of one export then describe the same engine steps.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import NamedTuple

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from otel_vllm_kv.holdings import HoldersPass
from otel_vllm_kv.kv_cache import GroupLayout, KVCacheOccupancy, PoolLayout
from otel_vllm_kv.names import ENGINE_INDEX, KV_CACHE_GROUP_INDEX, KV_CACHE_GROUP_TYPE, MODEL_NAME
from otel_vllm_kv.relay import EngineSnapshot
from otel_vllm_kv.relay_reader import SnapshotReader


class ObservedEngine(NamedTuple):
    attributes: dict
    occupancy: KVCacheOccupancy
    groups: tuple[GroupLayout, ...]
    evictable_blocks: tuple[int, ...] | None
    layout: PoolLayout
    holders: HoldersPass | None

    def group_attributes(self) -> Iterable[tuple[dict, GroupLayout, int]]:
        # A probe's relay file carries one evictable count per group; statistics carry no groups.
        for index, (group, evictable) in enumerate(zip(self.groups, self.evictable_blocks or ())):
            attributes = {**self.attributes, KV_CACHE_GROUP_INDEX: index, KV_CACHE_GROUP_TYPE: group.kind}
            yield attributes, group, evictable


# The SDK keeps the first registration of a name and ignores (with a warning) later
# ones, and callbacks cannot be unregistered: create once per meter, read ``_source``.
_meters_with_instruments: weakref.WeakSet[Meter] = weakref.WeakSet()


def first_registration(meter: Meter) -> bool:
    """True the first time only: the caller then registers the package's instruments on ``meter``."""
    if meter in _meters_with_instruments:
        return False
    _meters_with_instruments.add(meter)
    return True


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
        self._engines: list[ObservedEngine] = []
        self._served: set[str] = set()
        self._read_at = float("-inf")

    def engines(self, instrument: str) -> list[ObservedEngine]:
        # A forked child inherits the callbacks and a running metric reader: only the exporter reports.
        if os.getpid() != self._exporter_pid:
            return []
        with self._lock:
            now = time.monotonic()
            if instrument in self._served or now - self._read_at > _MAX_SNAPSHOT_AGE:
                self._engines = [_to_observed(snapshot) for snapshot in self._reader.read(holders=True)]
                self._served = set()
                self._read_at = now
            self._served.add(instrument)
            return self._engines


def _to_observed(snapshot: EngineSnapshot) -> ObservedEngine:
    attributes = {ENGINE_INDEX: snapshot.engine_index, MODEL_NAME: snapshot.model_name}
    return ObservedEngine(
        attributes,
        snapshot.occupancy(),
        snapshot.layout.groups,
        snapshot.evictable_blocks,
        snapshot.layout,
        snapshot.holders,
    )


_source: _CollectionSnapshot | None = None


def set_source(reader: SnapshotReader | None) -> None:
    """Point the callbacks at a relay (owned by this process), or at nothing."""
    global _source
    _source = None if reader is None else _CollectionSnapshot(reader)


def observed_engines(instrument: str) -> list[ObservedEngine]:
    """The engines of this collection, read once for all of its callbacks (``instrument`` names the caller)."""
    source = _source
    return [] if source is None else source.engines(instrument)


def engine_callback(name: str, points: Callable[[ObservedEngine], Iterable[Observation]]):
    """An observable instrument's callback: ``points`` of every engine in this collection."""

    def observe(options: CallbackOptions) -> Iterable[Observation]:
        for engine in observed_engines(name):
            yield from points(engine)

    return observe
