"""Engine: the holders pass of an engine that went idle, from a thread of its own.

The pass runs after a step (``probe``). An engine whose last requests finished runs no further
step, so neither their releases nor its empty pool would reach the exporter until the next
request. Once a second a daemon thread runs the pass of every probe whose pool changed since
its last pass and that published nothing for a second. It reads the scheduler's tables from
outside the engine's thread, so it acts only on an engine that stopped stepping; a pass that
meets the engine starting again and fails is dropped (the engine's own pass follows within a
second). The engine's steps pay nothing for it: one clock value they store anyway.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from otel_vllm_kv.engine import holders

#: The longest wait between two looks, whatever the interval (``Event.wait`` takes no infinity).
_LONGEST_WAIT_SECONDS = 3600.0


class IdlePasses:
    """The thread, started in the process that attaches a probe (a forked child starts its own)."""

    def __init__(self, probes: Callable[[], Iterable[Any]]) -> None:
        self._probes = probes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def ensure_running(self) -> None:
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="otel-vllm-kv-idle", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread = None

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(min(holders.PASS_INTERVAL_SECONDS, _LONGEST_WAIT_SECONDS)):
            try:
                probes = list(self._probes())
            except RuntimeError:  # the engine's thread attached a probe meanwhile: next time
                continue
            now = time.monotonic()
            for probe in probes:
                probe.idle_pass(now)
