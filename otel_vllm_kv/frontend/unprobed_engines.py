"""Frontend: report the engines that run no probe, from the statistics vLLM already sends.

An engine whose process tree nobody instrumented (``vllm serve --headless`` started without
``opentelemetry-instrument`` on another node, a Ray actor that did not inherit the exporter's
variables) has no probe. Its frontend still learns from vLLM:

* at start, each engine's ``EngineCoreReadyResponse`` (decoded by
  ``MPClient._apply_ready_response``): its data-parallel rank, N (``num_gpu_blocks``), the
  block size, the decode-context-parallel size and ``kv_cache_size_tokens``;
* with statistics on (``vllm serve``'s default; ``LLM`` turns them off), the
  ``SchedulerStats`` of every engine step, on the outputs of one of the frontends
  (``Scheduler.update_from_output``): ``kv_cache_usage`` is ``BlockPool.get_usage()``,
  1 - F / (N - 1), so F = round((1 - usage) * (N - 1)) exactly.

Whether an engine runs a probe is read off its outputs, never assumed: the output that ends a
request's first prefill (the one with ``prefill_stats``) carries the admission record of a
probed engine (``admission``), or its resumption's if it was preempted before; a record counts
only if it decodes and names this engine (its index and block count), since an application can
put the key in a request's ``trace_headers`` itself and an unprobed engine echoes it. An
engine seen without one is reported from its statistics, written into the relay by this
frontend with their arrival time (the exporter keeps the newest, as several API servers each
receive some steps' statistics), and one warning names it. vLLM's statistics have no
evictable count, no watermark and no groups: those series are not reported for such an
engine, and its requests' spans carry no admission attributes.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

from otel_vllm_kv.admission_records import PREEMPTED, TRACE_HEADER_KEY, decode
from otel_vllm_kv.diagnostics import WarnOnce
from otel_vllm_kv.kv_cache import PoolLayout
from otel_vllm_kv.patching import apply_patches, remove_patches
from otel_vllm_kv.relay import NoSpace, StatsSnapshotWriter, warn_no_space

_logger = logging.getLogger(__name__)

CORE_CLIENT_MODULE = "vllm.v1.engine.core_client"


class _KnownEngine:
    """What one frontend knows of one engine; ``probed`` is None until its first prefill ends."""

    __slots__ = ("index", "model_name", "layout", "probed", "writer")

    def __init__(self, index: int, model_name: str, layout: PoolLayout) -> None:
        self.index = index
        self.model_name = model_name
        self.layout = layout
        self.probed: bool | None = None
        self.writer: StatsSnapshotWriter | None = None

    def admitted_by_probe(self, headers: Any) -> bool:
        """Whether ``headers`` carry this engine's probe's record of an admission (or resumption)."""
        text = headers.get(TRACE_HEADER_KEY) if headers else None
        if text is None:
            return False
        try:
            records = decode(text)
        except ValueError:  # forged or foreign: not this engine's probe
            return False
        num_blocks = self.layout.num_blocks
        return any(
            record.kind != PREEMPTED and record.engine_index == self.index and record.num_blocks == num_blocks
            for record in records
        )

    def publish(self, kv_cache_usage: float) -> None:
        allocatable = self.layout.allocatable_blocks
        free_blocks = min(max(round((1.0 - kv_cache_usage) * allocatable), 0), allocatable)
        if self.writer is not None:
            self.writer.write(free_blocks)


class _Reporter:
    """The engines of each engine-core client (``MPClient``) of this process, by engine index."""

    def __init__(self) -> None:
        self.relay_directory: str | None = None
        self.clients: weakref.WeakKeyDictionary[Any, dict[int, _KnownEngine]] = weakref.WeakKeyDictionary()
        #: Engines not seen end a prefill yet: while there are any, every request asks for records (``spans``),
        #: which is how a probe shows itself.
        self.undecided = 0
        self.warn_once = WarnOnce(_logger, "otel-vllm-kv could not read vLLM's engine outputs; engines are unaffected")

    def add_engine(self, client: Any, payload: bytes) -> None:
        if not payload or self.relay_directory is None:
            return
        import msgspec
        from vllm.v1.engine import EngineCoreReadyResponse

        response = msgspec.msgpack.decode(payload, type=EngineCoreReadyResponse)
        model_config = client.vllm_config.model_config
        served = model_config.served_model_name
        model_name = str(served[0] if isinstance(served, (list, tuple)) else served)
        engines = self.clients.get(client)
        if engines is None:
            engines = self.clients[client] = {}
            weakref.finalize(client, self._forget, engines)
        replaced = engines.get(response.data_parallel_rank)
        engines[response.data_parallel_rank] = _KnownEngine(
            response.data_parallel_rank, model_name, layout_from_ready_response(response, model_config)
        )
        self.undecided += 1 if replaced is None or replaced.probed is not None else 0
        if replaced is not None and replaced.writer is not None:
            replaced.writer.close()  # the rank's engine was replaced (elastic scaling): its file goes with it

    def _forget(self, engines: dict[int, _KnownEngine]) -> None:
        """A client went: its engines are undecided no more (0 at least: ``clear`` may have counted them out)."""
        self.undecided = max(self.undecided - sum(engine.probed is None for engine in engines.values()), 0)

    def observe(self, client: Any, outputs: Any) -> None:
        engines = self.clients.get(client)
        engine = engines.get(outputs.engine_index) if engines else None
        if engine is None or engine.probed:
            return
        if engine.probed is None:
            for output in outputs.outputs:
                if output.prefill_stats is not None:
                    engine.probed = engine.admitted_by_probe(output.trace_headers)
                    self.undecided -= 1
                    if not engine.probed:
                        self._report_from_stats(client, engine)
                    break
        stats = outputs.scheduler_stats
        if engine.writer is not None and stats is not None:
            engine.publish(stats.kv_cache_usage)

    def _report_from_stats(self, client: Any, engine: _KnownEngine) -> None:
        if self.relay_directory is None:  # uninstrumented meanwhile
            return
        try:
            engine.writer = StatsSnapshotWriter(self.relay_directory, engine.index, engine.model_name, engine.layout)
        except NoSpace as error:
            warn_no_space(error)
            return
        weakref.finalize(client, engine.writer.close)
        _logger.warning(
            "otel-vllm-kv: vLLM engine %d (data-parallel rank %d) runs no probe: its node was started "
            "without otel-vllm-kv instrumentation (or its probe stopped). Its KV-cache gauges are derived from vLLM's "
            "scheduler statistics (used, free, limit, utilization, blocks; no evictable, headroom or "
            "per-group series) and its requests' spans carry no admission attributes. Start that node "
            "under opentelemetry-instrument to probe it (docs/topologies.md).",
            engine.index,
            engine.index,
        )

    def clear(self) -> None:
        for engines in self.clients.values():
            for engine in engines.values():
                if engine.writer is not None:
                    engine.writer.close()
        self.clients = weakref.WeakKeyDictionary()
        self.undecided = 0


reporter = _Reporter()


def layout_from_ready_response(response: Any, model_config: Any) -> PoolLayout:
    """N and the token capacity of an engine, as its ready response and the model config give them.

    One KV-cache group (a model whose layers all use one attention type) holds
    (N - 1) x block size x DCP size tokens, exactly as a probe computes it. Hybrid models
    (several groups) take vLLM's group-aware ``kv_cache_size_tokens``. The watermark is unknown.
    """
    num_blocks = response.num_gpu_blocks
    layer_types = getattr(model_config.hf_text_config, "layer_types", None) or ()
    if not model_config.is_hybrid and len(set(layer_types)) <= 1:
        block_size = response.block_size * max(response.decode_context_parallel_size, 1)
        limit = (num_blocks - 1) * block_size
    else:
        limit = getattr(response, "kv_cache_size_tokens", None)
    return PoolLayout(num_blocks, limit, watermark_blocks=None)


def _after_ready_response(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    result = wrapped(*args, **kwargs)
    try:
        reporter.add_engine(instance, args[0] if args else kwargs["payload"])
    except Exception:  # noqa: BLE001 - the frontend must never see our failure
        reporter.warn_once()
    return result


def _observed(outputs: Any, client: Any) -> Any:
    try:
        reporter.observe(client, outputs)
    except Exception:  # noqa: BLE001
        reporter.warn_once()
    return outputs


def _after_get_output(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    return _observed(wrapped(*args, **kwargs), instance)


async def _after_get_output_async(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    return _observed(await wrapped(*args, **kwargs), instance)


#: (module, "Class.method", wrapper): every vLLM function the reporter of unprobed engines wraps.
PATCHES = (
    (CORE_CLIENT_MODULE, "MPClient._apply_ready_response", _after_ready_response),
    (CORE_CLIENT_MODULE, "SyncMPClient.get_output", _after_get_output),
    (CORE_CLIENT_MODULE, "AsyncMPClient.get_output_async", _after_get_output_async),
)


def install(relay_directory: str) -> None:
    """Report, into ``relay_directory``, the engines this process's clients see running no probe."""
    reporter.relay_directory = relay_directory
    apply_patches(PATCHES)


def uninstall() -> None:
    remove_patches(PATCHES)
    reporter.relay_directory = None
    reporter.clear()
