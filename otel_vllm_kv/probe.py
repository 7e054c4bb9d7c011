"""Engine-core side: wrap the V1 scheduler so every engine publishes its pool after each change.

``Scheduler.__init__`` publishes the empty pool as soon as the engine exists, and
``Scheduler.shutdown`` withdraws it as soon as vLLM stops the engine (its process may
linger, or be killed, afterwards).
``Scheduler.make_stats`` is called at the end of every engine step (also when stats
are disabled, then returning None), after the step's finished requests were freed;
``Scheduler.finish_requests`` frees aborted requests between steps, when an idle
engine would otherwise run no step at all. Publishing after both keeps the
snapshot equal to the pool's state at the last change, also once the engine is idle.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable

from opentelemetry.instrumentation.utils import unwrap
from wrapt import wrap_function_wrapper

from otel_vllm_kv.kv_cache import free_block_reader, read_engine_identity, read_layout
from otel_vllm_kv.relay import SnapshotWriter

_logger = logging.getLogger(__name__)

SCHEDULER_MODULE = "vllm.v1.core.sched.scheduler"
PUBLISHING_METHODS = ("__init__", "make_stats", "finish_requests")
PATCHED_METHODS = (*PUBLISHING_METHODS, "shutdown")


class EngineProbe:
    """Publishes one scheduler's free-block count when it changes."""

    __slots__ = ("_free_blocks", "_writer", "_last", "close")

    def __init__(self, scheduler: Any, writer: SnapshotWriter) -> None:
        self._free_blocks = free_block_reader(scheduler)
        self._writer = writer
        self._last = -1
        #: Withdraws the relay file, at the latest when the scheduler is garbage-collected.
        self.close = weakref.finalize(scheduler, writer.close)

    def publish(self) -> None:
        free_blocks = self._free_blocks()
        if free_blocks != self._last:
            self._last = free_blocks
            self._writer.write(free_blocks)


class _ProbeRegistry:
    """One probe per scheduler, created on first use; None marks a scheduler given up on."""

    def __init__(self) -> None:
        self.relay_directory: str | None = None
        self._probes: weakref.WeakKeyDictionary[Any, EngineProbe | None] = weakref.WeakKeyDictionary()
        self._warned = False

    def publish(self, scheduler: Any) -> None:
        try:
            probe = self._probes.get(scheduler, False)
            if probe is False:
                probe = self._probes[scheduler] = self._attach(scheduler)
            if probe is not None:
                probe.publish()
        except Exception:  # noqa: BLE001 - the engine must never see our failure
            self._give_up(scheduler)

    def withdraw(self, scheduler: Any) -> None:
        try:
            probe = self._probes.pop(scheduler, None)
            if probe is not None:
                probe.close()
            self._probes[scheduler] = None  # a stopped engine publishes nothing more
        except Exception:  # noqa: BLE001
            self._give_up(scheduler)

    def clear(self) -> None:
        for probe in list(self._probes.values()):
            if probe is not None:
                probe.close()
        self._probes = weakref.WeakKeyDictionary()

    def _attach(self, scheduler: Any) -> EngineProbe | None:
        if self.relay_directory is None:
            return None
        layout = read_layout(scheduler)
        if layout.is_hybrid:
            _logger.warning(
                "KV cache has %d groups (hybrid model): token gauges are not reported for it, "
                "only vllm.kv_cache.utilization", layout.num_groups,
            )
        engine_index, model_name = read_engine_identity(scheduler)
        writer = SnapshotWriter(self.relay_directory, engine_index, model_name, layout)
        return EngineProbe(scheduler, writer)

    def _give_up(self, scheduler: Any) -> None:
        try:
            self._probes[scheduler] = None
        except TypeError:
            pass
        if not self._warned:
            self._warned = True
            _logger.warning(
                "otel-vllm-kv could not read the KV cache of this vLLM scheduler; "
                "its gauges stop for this engine (the engine is unaffected)", exc_info=True,
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


def install_probe(relay_directory: str) -> None:
    """Wrap the scheduler methods; every engine built in this process publishes into the relay."""
    registry.relay_directory = relay_directory
    for method in PUBLISHING_METHODS:
        wrap_function_wrapper(SCHEDULER_MODULE, f"Scheduler.{method}", _publish_after)
    wrap_function_wrapper(SCHEDULER_MODULE, "Scheduler.shutdown", _withdraw_after)


def remove_probe() -> None:
    for method in PATCHED_METHODS:
        unwrap(f"{SCHEDULER_MODULE}.Scheduler", method)
    registry.clear()
