"""Engine: wrap the V1 scheduler so every engine publishes its pool after each change.

``Scheduler.__init__`` publishes the empty pool as soon as the engine exists, and
``Scheduler.shutdown`` withdraws it as soon as vLLM stops the engine (its process may
linger, or be killed, afterwards). ``Scheduler.make_stats`` is called at the end of
every engine step (also when stats are disabled, then returning None), after the
step's finished requests were freed; ``Scheduler.finish_requests`` frees aborted
requests between steps, when an idle engine would otherwise run no step at all.
Publishing after both keeps the snapshot equal to the pool's state at the last
change, also once the engine is idle. The admission path is wrapped too (``admission``), and
the block pool's free-queue moves, to count evictable prefix-cache blocks (``prefix_cache``).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

from otel_vllm_kv.engine import admission, prefix_cache
from otel_vllm_kv.kv_cache import PoolLayout, free_block_reader, read_engine_identity, read_layout
from otel_vllm_kv.patching import apply_patches, remove_patches
from otel_vllm_kv.relay import SnapshotWriter

_logger = logging.getLogger(__name__)

SCHEDULER_MODULE = "vllm.v1.core.sched.scheduler"
KV_CACHE_MANAGER_MODULE = "vllm.v1.core.kv_cache_manager"


class EngineProbe:
    """One scheduler's view: publishes its free and evictable block counts when they change."""

    __slots__ = ("_free_blocks", "_evictable", "_writer", "_last", "_last_version", "close", "layout",
                 "limit_tokens", "engine_index", "scheduler")

    def __init__(self, scheduler: Any, writer: SnapshotWriter, layout: PoolLayout, engine_index: int) -> None:
        self._free_blocks = free_block_reader(scheduler)
        self._evictable = prefix_cache.watch(scheduler.kv_cache_manager.block_pool, len(layout.groups))
        self._writer = writer
        self._last = -1
        self._last_version = -1
        self.layout = layout
        #: As admission records carry it: -1 where the capacity is unknown.
        self.limit_tokens = -1 if layout.limit_tokens is None else layout.limit_tokens
        self.engine_index = engine_index
        self.scheduler = weakref.ref(scheduler)
        #: Withdraws the relay file, at the latest when the scheduler is garbage-collected.
        self.close = weakref.finalize(scheduler, writer.close)

    def free_blocks(self) -> int:
        return self._free_blocks()

    def publish(self) -> None:
        free_blocks = self._free_blocks()
        evictable = self._evictable
        if free_blocks != self._last or evictable.version != self._last_version:
            if evictable.failed:
                raise RuntimeError("a block-pool hook failed: the evictable count is no longer exact")
            self._last = free_blocks
            self._last_version = evictable.version
            self._writer.write(free_blocks, evictable.per_group)


class _ProbeRegistry:
    """One probe per scheduler, created on first use; None marks a scheduler given up on."""

    def __init__(self) -> None:
        self.relay_directory: str | None = None
        self._probes: weakref.WeakKeyDictionary[Any, EngineProbe | None] = weakref.WeakKeyDictionary()
        self._by_manager: weakref.WeakKeyDictionary[Any, EngineProbe] = weakref.WeakKeyDictionary()
        self._warned = False

    def probe(self, scheduler: Any) -> EngineProbe | None:
        probe = self._probes.get(scheduler, False)
        if probe is False:
            probe = self._probes[scheduler] = self._attach(scheduler)
        return probe

    def probe_for_manager(self, manager: Any) -> EngineProbe | None:
        return self._by_manager.get(manager)

    def publish(self, scheduler: Any) -> None:
        try:
            probe = self.probe(scheduler)
            if probe is not None:
                probe.publish()
                admission.deliver_pending()
        except Exception:  # noqa: BLE001 - the engine must never see our failure
            self.give_up(scheduler)

    def withdraw(self, scheduler: Any) -> None:
        try:
            probe = self._probes.pop(scheduler, None)
            if probe is not None:
                probe.close()
                prefix_cache.forget(scheduler.kv_cache_manager.block_pool)
            self._probes[scheduler] = None  # a stopped engine publishes nothing more
        except Exception:  # noqa: BLE001
            self.give_up(scheduler)

    def clear(self) -> None:
        for probe in list(self._probes.values()):
            if probe is not None:
                probe.close()
        self._probes = weakref.WeakKeyDictionary()
        self._by_manager = weakref.WeakKeyDictionary()

    def _attach(self, scheduler: Any) -> EngineProbe | None:
        if self.relay_directory is None:
            return None
        layout = read_layout(scheduler)
        if layout.limit_tokens is None:
            _logger.warning(
                "vLLM reports no token capacity for this KV cache (%d groups): "
                "it is reported in blocks only", len(layout.groups),
            )
        engine_index, model_name = read_engine_identity(scheduler)
        writer = SnapshotWriter(self.relay_directory, engine_index, model_name, layout)
        probe = EngineProbe(scheduler, writer, layout, engine_index)
        self._by_manager[scheduler.kv_cache_manager] = probe
        return probe

    def give_up(self, scheduler: Any) -> None:
        """Stop observing this engine and withdraw its relay file: no series is better than a stale one."""
        try:
            probe = self._probes.get(scheduler)
            self._probes[scheduler] = None
            self._by_manager.pop(scheduler.kv_cache_manager, None)
            prefix_cache.forget(scheduler.kv_cache_manager.block_pool)
            if probe is not None:
                probe.close()
        except Exception:  # noqa: BLE001
            pass
        if not self._warned:
            self._warned = True
            _logger.warning(
                "otel-vllm-kv could not read the KV cache of this vLLM scheduler; "
                "it stops observing this engine (the engine is unaffected)", exc_info=True,
            )


registry = _ProbeRegistry()


def _publish_after(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    result = wrapped(*args, **kwargs)
    registry.publish(instance)
    return result


def _withdraw_after(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    result = wrapped(*args, **kwargs)
    registry.withdraw(instance)
    return result


def _observe(record: Callable[..., None]) -> Callable:
    """A wrapper that calls vLLM, then ``record(probe, result, *args)``; a failure stops observing."""

    def wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        result = wrapped(*args, **kwargs)
        probe = None
        try:
            manager = getattr(instance, "kv_cache_manager", instance)
            probe = registry.probe_for_manager(manager)
            if probe is not None:
                record(probe, result, *args, **kwargs)
        except Exception:  # noqa: BLE001 - the engine must never see our failure
            scheduler = probe.scheduler() if probe is not None else None
            if scheduler is not None:
                registry.give_up(scheduler)
        return result

    return wrapper


#: (module, "Class.method", wrapper): every vLLM function the probe wraps.
PATCHES = (
    (SCHEDULER_MODULE, "Scheduler.__init__", _publish_after),
    (SCHEDULER_MODULE, "Scheduler.make_stats", _publish_after),
    (SCHEDULER_MODULE, "Scheduler.finish_requests", _publish_after),
    (SCHEDULER_MODULE, "Scheduler.shutdown", _withdraw_after),
    (SCHEDULER_MODULE, "Scheduler._preempt_request", _observe(admission.record_preemption)),
    (KV_CACHE_MANAGER_MODULE, "KVCacheManager.record_prefix_cache_stats", _observe(admission.record_prefix_hits)),
    (KV_CACHE_MANAGER_MODULE, "KVCacheManager.get_blocks", _observe(admission.record_admission)),
)


def install_probe(relay_directory: str) -> None:
    """Wrap the scheduler methods; every engine built in this process publishes into the relay."""
    registry.relay_directory = relay_directory
    apply_patches(PATCHES)


def remove_probe() -> None:
    remove_patches(PATCHES)
    registry.clear()
    admission.clear()
    prefix_cache.clear()
