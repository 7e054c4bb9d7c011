"""Each benchmark's smoke mode runs, passes its own sanity checks and prints its table (timings are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def run_smoke(script: str, timeout: float) -> str:
    # A benchmark must own its telemetry: no owner inherited from this (possibly instrumented) test process.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, script), "--smoke"],
        check=False, capture_output=True, text=True, timeout=timeout, env=env,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    assert "All sanity checks passed" in result.stdout, result.stdout[-4000:]
    return result.stdout


def test_scheduler_step_smoke():
    stdout = run_smoke("scheduler_step.py", timeout=300)
    assert "| config" in stdout and "| decode 16 " in stdout and "| admission " in stdout
    assert "vLLM stats total" in stdout and "Prometheus record" in stdout


@pytest.mark.engine
def test_engine_throughput_smoke():
    stdout = run_smoke("engine_throughput.py", timeout=540)
    assert "| variant" in stdout and "| plain " in stdout and "| ours " in stdout


@pytest.mark.engine
def test_memory_smoke():
    stdout = run_smoke("memory.py", timeout=400)
    assert "| variant" in stdout and "| ours    | instrumented process" in stdout and "engine core" in stdout
