"""Workloads for real engines: distinct prompts (no shared prefix) and what they must occupy."""

from __future__ import annotations

import threading
import time

from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_vllm_kv.demo.sampling import EngineReading, read_engines
from otel_vllm_kv.demo.tiny_model import NUM_GPU_BLOCKS

#: Tokens per block of the tiny model's engines: vLLM's default on CPU (``engine_kwargs`` sets none).
BLOCK_SIZE = 128
#: The blocks requests can hold: every block but vLLM's reserved null block.
ALLOCATABLE_BLOCKS = NUM_GPU_BLOCKS - 1
#: The KV-cache limit in tokens of every engine on the tiny model (``engine_kwargs``), 63 x 128 = 8064:
#: every test takes it from here.
LIMIT = ALLOCATABLE_BLOCKS * BLOCK_SIZE


def distinct_prompts(count: int, length: int, first: int = 0) -> list[str]:
    """ASCII prompts (one token per byte) whose first block already differs."""
    return [(f"{index:04d} " * length)[:length] for index in range(first, first + count)]


def blocks_for(prompt_tokens: int, output_tokens: int) -> int:
    """Blocks a running request holds once it has sampled ``output_tokens`` tokens."""
    return -(-(prompt_tokens + output_tokens - 1) // BLOCK_SIZE)


def assert_consistent(gauges: EngineReading) -> None:
    """Invariants of every observation: used + free = limit, whole blocks, vLLM's usage formula."""
    assert gauges.limit == LIMIT
    assert gauges.used + gauges.free == gauges.limit
    assert gauges.used % BLOCK_SIZE == 0
    assert gauges.utilization == 1.0 - gauges.free / gauges.limit


class GaugePoller:
    """Collects the gauges every few milliseconds from another thread while an engine works."""

    def __init__(self, reader: InMemoryMetricReader, interval: float = 0.02) -> None:
        self._reader = reader
        self._interval = interval
        self._stop = threading.Event()
        self.observations: list[dict[int, EngineReading]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.observations.append(read_engines(self._reader))
            time.sleep(self._interval)

    def __enter__(self) -> GaugePoller:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
