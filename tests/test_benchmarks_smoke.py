"""Each benchmark's smoke mode runs, passes its own sanity checks and prints its table (timings are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def run_smoke(script: str, timeout: float) -> str:
    # A benchmark must own its telemetry: no exporter inherited from this (possibly instrumented) test process.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, script), "--smoke"],
        check=False, capture_output=True, text=True, timeout=timeout, env=env,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    assert "All sanity checks passed" in result.stdout, result.stdout[-4000:]
    return result.stdout


@pytest.mark.engine
def test_instruction_benchmark_smoke():
    """Every workload, plain, instrumented, toggled and end to end (two LLM engines), passes its checks.

    Without valgrind: the counts themselves are checked by the callgrind test below.
    """
    stdout = run_smoke("instructions.py", timeout=400)
    assert stdout.startswith("# Instructions per unit of work")


def test_step_time_smoke():
    stdout = run_smoke("step_time.py", timeout=300)
    assert "| A/A control (no switch) " in stdout and "| A plain, B instrumented " in stdout


def test_call_costs_smoke():
    """Every construct is counted under callgrind and gets a figure (what the figures are is not checked)."""
    stdout = run_smoke("call_costs.py", timeout=300)
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    sys.path.insert(0, BENCHMARKS)
    try:
        from call_costs import _cases
    finally:
        sys.path.remove(BENCHMARKS)
    names = [row.split("|")[1].strip() for row in rows]
    assert names == [name for name in _cases() if name != "empty"] and all(row.rstrip(" |").split("|")[-1].strip().replace(",", "").lstrip("-").isdigit()
                                   for row in rows), stdout


def test_callgrind_counts_each_marked_interval_deterministically(tmp_path):
    """The benchmark's counting machinery on this machine's valgrind: one dump per mark, exact and repeatable."""
    script = tmp_path / "loops.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {BENCHMARKS!r})\n"
        "import _callgrind\n"
        "def loop(n):\n"
        "    total = 0\n"
        "    for i in range(n):\n"
        "        total += i * i\n"
        "for size in (1000, 3000):\n"
        "    _callgrind.mark(f'loop|{size}')\n"
        "    loop(size)\n"
        "_callgrind.mark('exit')\n"
    )
    sys.path.insert(0, BENCHMARKS)
    import _callgrind

    marks = ["loop|1000", "loop|3000", "exit"]
    counts = []
    for run in range(2):
        out_file = str(tmp_path / f"callgrind.{run}")
        subprocess.run([*_callgrind.valgrind_command(out_file), sys.executable, str(script)], check=True,
                       capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"}, timeout=120)
        counts.append(_callgrind.read_intervals(out_file, marks))
    small, large = counts[0]["loop|1000"], counts[0]["loop|3000"]
    assert 2.5 < large / small < 3.5, counts  # the loop, not the marks, fills each interval
    assert counts[0] == counts[1], "the same run counts the same instructions"
    assert sum(_callgrind.self_cost_by_function(f"{tmp_path}/callgrind.0.3").values()) == large


@pytest.mark.engine
def test_engine_throughput_smoke():
    stdout = run_smoke("engine_throughput.py", timeout=540)
    assert "| variant" in stdout and "| plain " in stdout and "| ours " in stdout


@pytest.mark.engine
def test_memory_smoke():
    stdout = run_smoke("memory.py", timeout=400)
    assert "| variant" in stdout and "| ours    | instrumented process" in stdout and "engine core" in stdout
