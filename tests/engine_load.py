"""Workloads for real engines: distinct prompts (no shared prefix) and what they must occupy."""

from __future__ import annotations

import threading
import time

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from telemetry import EngineGauges, read_gauges

BLOCK_SIZE = 128  # vLLM's CPU block size for the tiny model
LIMIT = (64 - 1) * BLOCK_SIZE


def distinct_prompts(count: int, length: int, first: int = 0) -> list[str]:
    """ASCII prompts (one token per byte) whose first block already differs."""
    return [(f"{index:04d} " * length)[:length] for index in range(first, first + count)]


def blocks_for(prompt_tokens: int, output_tokens: int) -> int:
    """Blocks a running request holds once it has sampled ``output_tokens`` tokens."""
    return -(-(prompt_tokens + output_tokens - 1) // BLOCK_SIZE)


def assert_consistent(gauges: EngineGauges) -> None:
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
        self.observations: list[dict[int, EngineGauges]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.observations.append(read_gauges(self._reader))
            time.sleep(self._interval)

    def __enter__(self) -> GaugePoller:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
