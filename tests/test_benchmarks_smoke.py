"""Each benchmark's smoke mode runs, passes its own sanity checks and prints its table (timings are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks import _callgrind
from benchmarks._common import ROOT, module_command


def run_smoke(module: str, timeout: float) -> str:
    # A benchmark must own its telemetry: no exporter inherited from this (possibly instrumented) test process.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        module_command(f"benchmarks.{module}", "--smoke"),
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    assert "All sanity checks passed" in result.stdout, result.stdout[-4000:]
    return result.stdout


@pytest.mark.engine
def test_instruction_benchmark_smoke():
    """Every workload, plain, instrumented, toggled and end to end (two LLM engines), passes its checks.

    Without valgrind: the counts themselves are checked by the callgrind test below.
    """
    stdout = run_smoke("instructions", timeout=400)
    assert stdout.startswith("# Instructions per unit of work")


def test_step_time_smoke():
    stdout = run_smoke("step_time", timeout=300)
    assert "| A/A control (no switch) " in stdout and "| A plain, B instrumented " in stdout


def test_call_costs_smoke():
    """Every construct is counted under callgrind and gets a figure (what the figures are is not checked)."""
    from benchmarks.call_costs import _cases

    stdout = run_smoke("call_costs", timeout=300)
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [row.split("|")[1].strip() for row in rows]
    figures = [row.rstrip(" |").split("|")[-1].strip().replace(",", "").lstrip("-") for row in rows]
    assert names == [name for name in _cases() if name != "empty"], stdout
    assert all(figure.isdigit() for figure in figures), stdout


def test_instruction_report_reads_counts():
    """The tables of instructions.py from counts made up for the purpose: marginals, budgets, layouts."""
    from benchmarks._instruction_report import report

    units = {"decode 16": (1, 3), "harness 16": (1, 3), "admission": (1, 3), "request 128": (1, 3), "engine": (1, 3)}

    def result(variant: str, ballast: int, step: int, admission: int, whole: int) -> dict:
        counts = {
            "decode 16|small": step,
            "decode 16|large": 3 * step,
            "harness 16|small": 100,
            "harness 16|large": 300,
        }
        counts |= {"admission|small": admission, "admission|large": 3 * admission}
        counts |= {"request 128|small": whole, "request 128|large": 3 * whole}
        return {"variant": variant, "ballast": ballast, "counts": counts}

    results = [
        result("plain", 0, 10_100, 48_000, 812_800),
        result("ours", 0, 10_150, 50_400, 822_400),
        result("plain", 30_000, 10_110, 48_000, 812_800),
        result("ours", 30_000, 10_170, 50_400, 822_400),
        {"variant": "plain", "counts": {"engine|small": 1000, "engine|large": 3000}, "tokens": [[[1]]]},
        {"variant": "ours", "counts": {"engine|small": 1005, "engine|large": 3015}, "tokens": [[[1]]]},
    ]
    text = report(results, units)
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in text.splitlines()
        if line.startswith("| ") and "---" not in line
    }
    # A step: 10,150 - 10,100 added on vLLM's own 10,000 (the harness's 100 taken out); over the two
    # layouts, 55 added on 10,105 plain. An admitted request: a quarter of a unit, 600 on 12,000.
    assert rows["decode step, 16 running"] == ["10,000", "50", "+0.500%", "+0.544% ± 0.111%", "at most +1%: met"]
    admission = rows["admitted request (4 per step, 1 output token), traced"]
    assert admission == ["12,000", "600", "+5.000%", "+5.000% ± 0.000%", "worst case: over +3%"]
    # A whole request: a unit is 16 requests over 128 steps, so 128 harness steps (12,800) come out of
    # vLLM's 812,800 before it is divided: 50,000 each, 600 added.
    whole = rows["a request of 128 output tokens, whole (16 at a time), traced"]
    assert whole == ["50,000", "600", "+1.200%", "+1.181% ± 0.000%", "at most +3%: met"]
    assert rows["instructions"] == ["1,000", "1,005", "5", "1.00500", "at most 1.01: met"]
    assert "| over 2 memory layouts: added / plain |" in text, text


def test_callgrind_counts_each_marked_interval_deterministically(tmp_path):
    """The benchmarks' counting machinery on this machine's valgrind: one dump per mark, exact and repeatable."""
    # The script's directory is searched on import: the dumps go elsewhere, so both runs see the same listing.
    (tmp_path / "script").mkdir()
    script = tmp_path / "script" / "loops.py"
    script.write_text(
        "from benchmarks import _callgrind\n"
        "def loop(n):\n"
        "    total = 0\n"
        "    for i in range(n):\n"
        "        total += i * i\n"
        "for size in (1000, 3000):\n"
        "    _callgrind.mark(f'loop|{size}')\n"
        "    loop(size)\n"
        "_callgrind.mark('exit')\n"
    )
    marks = ["loop|1000", "loop|3000", "exit"]
    counts = []
    for run in range(2):
        out_file = str(tmp_path / f"callgrind.{run}")
        subprocess.run(
            [*_callgrind.valgrind_command(out_file), sys.executable, str(script)],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": ROOT},
            timeout=120,
        )
        counts.append(_callgrind.read_intervals(out_file, marks))
    small, large = counts[0]["loop|1000"], counts[0]["loop|3000"]
    assert 2.5 < large / small < 3.5, counts  # the loop, not the marks, fills each interval
    assert counts[0] == counts[1], "the same run counts the same instructions"


@pytest.mark.engine
def test_engine_throughput_smoke():
    stdout = run_smoke("engine_throughput", timeout=540)
    assert "| variant" in stdout and "| plain " in stdout and "| ours " in stdout


@pytest.mark.engine
def test_memory_smoke():
    stdout = run_smoke("memory", timeout=400)
    assert "| variant" in stdout and "| ours    | instrumented process" in stdout and "engine core" in stdout


def test_a_part_of_the_workloads_brings_the_baselines_its_figures_subtract():
    from benchmarks.instructions import with_baselines

    assert with_baselines(["admission"]) == ["admission"]
    assert with_baselines(["decode 64"]) == ["decode 64", "harness 64"]
    assert with_baselines(["preemption + resumption"]) == ["preemption + resumption", "decode 16", "harness 16"]
    assert with_baselines(["holders pass 256"]) == ["holders pass 256", "decode 256", "harness 256"]
