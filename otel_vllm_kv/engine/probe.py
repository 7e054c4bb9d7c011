"""Engine: hook the V1 scheduler so every engine publishes its pool after each change.

``Scheduler.__init__`` attaches a probe as soon as the engine exists (and publishes the
empty pool). The probe then hooks that scheduler's own methods, each hook a closure over the
probe, so a step pays one plain call and no lookup (``patching.hook_methods``):

* ``make_stats``, called at the end of every engine step (also when stats are disabled,
  then returning None), after the step's finished requests were freed;
* ``finish_requests``, which frees aborted requests between steps, when an idle engine
  would otherwise run no step at all;
* ``shutdown``, which withdraws the engine as soon as vLLM stops it (its process may
  linger, or be killed, afterwards);
* the admission path (``admission``) and the block pool's free-queue moves, to count
  evictable prefix-cache blocks (``prefix_cache``);
* with ``OTEL_PYTHON_VLLM_KV_RESIDENCY=true``, the block pool's allocations and prefix hits and
  the manager's frees, for what each request holds over time (``residency``), summed by LoRA
  adapter and tenant (``holders``), whose holders section of the relay file a step rewrites at
  most once a second (an idle engine's: ``idle_passes``). Off, none of these is hooked.

Publishing after the first two keeps the snapshot equal to the pool's state at the last
change, also once the engine is idle. A scheduler built before ``instrument()`` is
attached at its next ``make_stats``, through the class, which its own hook then shadows.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable
from time import monotonic as _monotonic
from typing import Any

from otel_vllm_kv import holdings
from otel_vllm_kv.diagnostics import WarnOnce
from otel_vllm_kv.engine import holders, prefix_cache, residency
from otel_vllm_kv.engine.admission import HOOKED_PARAMETERS, AdmissionRecorder
from otel_vllm_kv.engine.idle_passes import IdlePasses
from otel_vllm_kv.engine.pool_reading import free_block_queue, read_engine_identity, read_layout
from otel_vllm_kv.engine.residency import ResidencyLedger
from otel_vllm_kv.internals import method
from otel_vllm_kv.kv_cache import PoolLayout
from otel_vllm_kv.patching import apply_patches, hook_methods, remove_patches, unhook_methods
from otel_vllm_kv.relay import NoSpace, SnapshotWriter, warn_no_space

_logger = logging.getLogger(__name__)

SCHEDULER_MODULE = "vllm.v1.core.sched.scheduler"
KV_CACHE_MANAGER_MODULE = "vllm.v1.core.kv_cache_manager"

#: The scheduler's and the KV-cache manager's own methods each probe hooks.
SCHEDULER_METHODS = ("make_stats", "finish_requests", "shutdown", "_preempt_request")
MANAGER_METHODS = ("record_prefix_cache_stats", "get_blocks")


class EngineProbe:
    """One scheduler's view: publishes its free and evictable block counts when they change."""

    __slots__ = (
        "_queue",
        "_evictable",
        "_counts",
        "_writer",
        "_last",
        "_last_counts",
        "close",
        "layout",
        "engine_index",
        "scheduler",
        "recorder",
        "residency",
        "holders",
        "_holders_failed",
        "_holders_stale",
        "_last_publish",
    )

    def __init__(
        self,
        scheduler: Any,
        writer: SnapshotWriter,
        layout: PoolLayout,
        engine_index: int,
        holder_limit: int | None = holders.DEFAULT_LIMIT,
    ) -> None:
        """``holder_limit`` None: residency off (no ledger, no holders)."""
        self._queue = free_block_queue(scheduler)
        self._evictable = prefix_cache.watch(scheduler.kv_cache_manager.block_pool, len(layout.groups))
        self._writer = writer
        self._counts = self._evictable.per_group  # updated in place by the pool hooks
        self._last = -1
        #: Whether the pool changed since the last holders pass, and when the engine last published.
        self._holders_stale = False
        self._last_publish = 0.0
        self._last_counts: list[int] = []
        self.layout = layout
        self.engine_index = engine_index
        self.scheduler = weakref.ref(scheduler)
        # Admission records carry -1 where the capacity is unknown.
        limit_tokens = -1 if layout.limit_tokens is None else layout.limit_tokens
        self.residency = None if holder_limit is None else ResidencyLedger(scheduler)
        self.recorder = AdmissionRecorder(scheduler, engine_index, layout.num_blocks, limit_tokens, self.residency)
        self.holders = None if holder_limit is None else holders.Holders(scheduler, holder_limit)
        if self.residency is not None:
            self.residency.on_release = self.recorder.finisher()
            self.residency.holders = self.holders
        self._holders_failed = WarnOnce(
            _logger, "otel-vllm-kv: counting who holds the KV cache failed; it is no longer reported for this engine"
        )
        #: Withdraws the relay file, at the latest when the scheduler is garbage-collected.
        self.close = weakref.finalize(scheduler, writer.close)

    def publish(self) -> None:
        """After a step: publish the pool if it changed, and let the step's outputs' records go."""
        free_blocks = self._queue.num_free_blocks
        counts = self._counts
        if self._evictable.failed:
            raise RuntimeError("a block-pool hook failed: the evictable count is no longer exact")
        if free_blocks != self._last or counts != self._last_counts:
            self._last = free_blocks
            self._last_counts = counts.copy()
            self._holders_stale = True
            self._writer.write(free_blocks, counts)
        if self.recorder.undelivered:
            self.recorder.deliver()
        counted = self.holders
        if counted is not None:
            now = self._last_publish = _monotonic()
            if now >= counted.next_pass:
                self.publish_holders()

    def publish_holders(self) -> None:
        """A holders pass (``holders``), at most once a second; its failure stops only the holders."""
        counted = self.holders
        if counted is None:  # residency off
            return
        counted.next_pass = _monotonic() + holders.PASS_INTERVAL_SECONDS
        self._holders_stale = False
        try:
            self._writer.write_holders(holdings.encode(counted.count()))
        except Exception:  # noqa: BLE001 - the gauges and records go on
            counted.next_pass = math.inf
            self._holders_failed()

    def idle_pass(self, now: float) -> None:
        """From ``idle_passes``' thread: the pass of an engine that changed since its last pass and
        has published nothing for an interval. Any failure (the engine stepping again meanwhile) is dropped."""
        counted = self.holders
        if counted is None or not self._holders_stale or now - self._last_publish < holders.PASS_INTERVAL_SECONDS:
            return
        if counted.next_pass == math.inf:
            return
        try:
            self._holders_stale = False
            self._writer.write_holders(holdings.encode(counted.count()))
        except Exception:  # noqa: BLE001 - a table changed under the pass: the engine is stepping again
            self._holders_stale = True


class _ProbeRegistry:
    """One probe per scheduler; None marks a scheduler given up on (or stopped)."""

    def __init__(self) -> None:
        self.relay_directory: str | None = None
        #: None: residency off (``EngineProbe``).
        self.holder_limit: int | None = None
        self._probes: weakref.WeakKeyDictionary[Any, EngineProbe | None] = weakref.WeakKeyDictionary()
        self._warned = False

    def attach(self, scheduler: Any) -> EngineProbe | None:
        """The scheduler's probe, attached (its methods hooked) on first sight."""
        if scheduler in self._probes:
            return self._probes[scheduler]
        self._probes[scheduler] = None  # until attached: a failure leaves it given up
        try:
            probe = self._probes[scheduler] = self._attach(scheduler)
        except Exception:  # noqa: BLE001 - the engine must never see our failure
            self.give_up(scheduler)
            return None
        return probe

    def _attach(self, scheduler: Any) -> EngineProbe | None:
        if self.relay_directory is None:
            return None
        layout = read_layout(scheduler)
        if layout.limit_tokens is None:
            _logger.warning(
                "vLLM reports no token capacity for this KV cache (%d groups): it is reported in blocks only",
                len(layout.groups),
            )
        engine_index, model_name = read_engine_identity(scheduler)
        try:
            writer = SnapshotWriter(self.relay_directory, engine_index, model_name, layout)
        except NoSpace as error:
            warn_no_space(error)  # it names the directory and the setting
            return None
        probe = self._probes[scheduler] = EngineProbe(
            scheduler, writer, layout, engine_index, self.holder_limit
        )  # give_up detaches it
        on_scheduler, on_manager = probe.recorder.hooks(lambda: _give_up(probe))
        hook_methods(scheduler, {**_scheduler_hooks(probe), **on_scheduler}, beneath=(_attach_after,))
        if probe.residency is None:
            hook_methods(scheduler.kv_cache_manager, on_manager)
        else:
            on_pool, on_manager_residency = probe.residency.hooks(lambda: _give_up(probe))
            hook_methods(scheduler.kv_cache_manager, {**on_manager, **on_manager_residency})
            hook_methods(scheduler.kv_cache_manager.block_pool, on_pool)
            idle_passes.ensure_running()
        probe.publish()
        return probe

    def withdraw(self, scheduler: Any) -> None:
        """vLLM stopped the engine: withdraw its relay file; it publishes nothing more."""
        probe = self._probes.get(scheduler)
        self._probes[scheduler] = None
        if probe is not None:
            _detach(scheduler, probe)

    def clear(self) -> None:
        for scheduler, probe in list(self._probes.items()):
            if probe is not None:
                _detach(scheduler, probe)
        self._probes = weakref.WeakKeyDictionary()

    def give_up(self, scheduler: Any) -> None:
        """Stop observing this engine and withdraw its relay file: no series is better than a stale one."""
        try:
            self.withdraw(scheduler)
        except Exception:  # noqa: BLE001
            pass
        if not self._warned:
            self._warned = True
            _logger.warning(
                "otel-vllm-kv could not read the KV cache of this vLLM scheduler; "
                "it stops observing this engine (the engine is unaffected)",
                exc_info=True,
            )


registry = _ProbeRegistry()
idle_passes = IdlePasses(lambda: [probe for probe in registry._probes.values() if probe is not None])


def _detach(scheduler: Any, probe: EngineProbe) -> None:
    unhook_methods(scheduler, SCHEDULER_METHODS)
    unhook_methods(scheduler.kv_cache_manager, (*MANAGER_METHODS, *residency.MANAGER_METHODS))
    unhook_methods(scheduler.kv_cache_manager.block_pool, residency.POOL_METHODS)
    prefix_cache.forget(scheduler.kv_cache_manager.block_pool)
    probe.recorder.clear()
    probe.close()


def _scheduler_hooks(probe: EngineProbe) -> dict[str, Callable[[Callable], Callable]]:
    """The hooks of one scheduler's own methods, bound to its probe (any signature: vLLM's vary)."""

    def publish_after(original: Callable) -> Callable:
        def hook(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            try:
                probe.publish()
            except Exception:  # noqa: BLE001 - the engine must never see our failure
                _give_up(probe)
            return result

        return hook

    def withdraw_after(original: Callable) -> Callable:
        def hook(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            scheduler = probe.scheduler()
            if scheduler is not None:
                try:
                    registry.withdraw(scheduler)
                except Exception:  # noqa: BLE001
                    registry.give_up(scheduler)
            return result

        return hook

    return {"make_stats": publish_after, "finish_requests": publish_after, "shutdown": withdraw_after}


def _give_up(probe: EngineProbe) -> None:
    scheduler = probe.scheduler()
    if scheduler is not None:
        registry.give_up(scheduler)


def _attach_after(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``make_stats`` reaches this only on a scheduler without a hook of its own: one built
    before ``instrument()`` (attached now), or one given up on (a lookup, then nothing)."""
    result = wrapped(*args, **kwargs)
    registry.attach(instance)
    return result


#: (module, "Class.method", wrapper): the class patches; every other hook is on one scheduler's own methods.
PATCHES = (
    (SCHEDULER_MODULE, "Scheduler.__init__", _attach_after),
    (SCHEDULER_MODULE, "Scheduler.make_stats", _attach_after),
)
#: The methods the per-scheduler hooks shadow (``internals``).
REQUIRED = (
    *(method(SCHEDULER_MODULE, f"Scheduler.{name}") for name in SCHEDULER_METHODS),
    *(method(KV_CACHE_MANAGER_MODULE, f"KVCacheManager.{name}", HOOKED_PARAMETERS[name]) for name in MANAGER_METHODS),
)


def install(relay_directory: str, residency: bool = False, holder_limit: int = holders.DEFAULT_LIMIT) -> None:
    """Wrap the scheduler class; every engine built in this process publishes into the relay (with
    ``residency``, also what each request holds, and who holds the cache: at most ``holder_limit`` keys)."""
    registry.relay_directory = relay_directory
    registry.holder_limit = holder_limit if residency else None
    apply_patches(PATCHES)


def uninstall() -> None:
    remove_patches(PATCHES)
    idle_passes.stop()
    registry.relay_directory = None  # a scheduler met after this is not attached
    registry.clear()
    prefix_cache.clear()
