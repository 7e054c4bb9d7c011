"""Wall-clock step time in one process, instrumented and not in turn on one live scheduler, beside an A/A control.

Command (from the repository root; run times in benchmarks/README.md)::

    .venv/bin/python -m benchmarks.step_time
    .venv/bin/python -m benchmarks.step_time --smoke    # sanity only

A real ``Scheduler`` (tiny Llama, block size 128, 4,096 blocks, no model: a synthetic
``ModelRunnerOutput`` per step) with 16 running decode requests. Blocks of ``--steps``
steps run in the order A B B A A B B A ..., with ``instrument()`` before each B block and
``uninstrument()`` before each A block, two uncounted steps after each switch, the garbage
collector off. The **A/A control** runs the same sequence on a second scheduler with no
switch at all: the spread of its ratios is what this VM's noise alone gives, the floor
any instrumented ratio has to be read against. ``instructions.py`` gives the costs this
cannot resolve; this script shows what a user timing it in place would see.

Reported: median µs per step of A and B blocks, the ratio B/A over all blocks, and the
median and range of the per-quad ratios (B+B)/(A+A), for the instrumented sequence and the
control. Sanity checks: every block runs its steps with 16 requests running; the
instrumented blocks deliver gauges, the others none. Timings are never checked.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from benchmarks._common import check, command_line, exit_with, markdown_table, print_header, tiny_model_dir

MODULE = "benchmarks.step_time"

RUNNING = 16
BLOCK_SIZE = 128
NUM_BLOCKS = 4096
ORDER = "ABBA"


def run_sequence(model_dir: str, blocks: int, steps: int, switch: bool) -> dict[str, list[float]]:
    """µs per step of each A and B block, in order; with ``switch``, B blocks are instrumented."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from benchmarks._workloads import distinct_request
    from otel_vllm_kv import VLLMKVCacheInstrumentor
    from tests.support.schedulers import build_scheduler, runner_output

    scheduler = build_scheduler(
        model_dir,
        log_stats=False,
        num_blocks=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
        served_model_name="tiny",
        max_num_seqs=64,
        max_num_batched_tokens=8192,
    )
    for index in range(RUNNING):
        scheduler.add_request(distinct_request(scheduler, 16 + (index * 37) % 65, blocks * (steps + 2) + 8))
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instrumentor = VLLMKVCacheInstrumentor()
    perf = time.perf_counter_ns

    def step() -> None:
        output = scheduler.schedule()
        scheduler.update_from_output(output, runner_output(output))

    step()  # admit them all
    times: dict[str, list[float]] = {"A": [], "B": []}
    try:
        for index in range(blocks):
            variant = ORDER[index % len(ORDER)]
            if switch and variant == "B" and not instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.instrument(meter_provider=provider)
            elif switch and variant == "A" and instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.uninstrument()
            step()
            step()
            gc.collect()
            gc.disable()
            start = perf()
            for _ in range(steps):
                step()
            elapsed = perf() - start
            gc.enable()
            times[variant].append(elapsed / steps / 1000)
            check(len(scheduler.running) == RUNNING, f"block {index}: {len(scheduler.running)} running")
            points = _points(reader)
            instrumented = switch and variant == "B"
            check((points > 0) == instrumented, f"block {index} ({variant}): {points} gauge points")
    finally:
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
        scheduler.shutdown()
        provider.shutdown()
    return times


def _points(reader) -> int:
    data = reader.get_metrics_data()
    return sum(
        len(metric.data.data_points)
        for resource in (data.resource_metrics if data else ())
        for scope in resource.scope_metrics
        for metric in scope.metrics
    )


def summary(name: str, times: dict[str, list[float]]) -> list[str]:
    a, b = times["A"], times["B"]
    quads = [(b[i] + b[i + 1]) / (a[i] + a[i + 1]) for i in range(0, min(len(a), len(b)) - 1, 2)]
    return [
        name,
        f"{statistics.median(a):.1f}",
        f"{statistics.median(b):.1f}",
        f"{statistics.fmean(b) / statistics.fmean(a):.4f}",
        f"{statistics.median(quads):.4f}",
        f"{min(quads):.4f}..{max(quads):.4f}",
        str(len(quads)),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=40, help="blocks per sequence, a multiple of 4 (default 40)")
    parser.add_argument("--steps", type=int, default=40, help="counted steps per block (default 40)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: sanity checks only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.blocks, args.steps = 4, 3
    check(args.blocks % 4 == 0, "--blocks must be a multiple of 4 (A B B A quads)")
    print_header(
        "Step time in place: instrument / uninstrument between blocks, vs an A/A control",
        command_line(MODULE),
        {
            "running": RUNNING,
            "block size": BLOCK_SIZE,
            "blocks": NUM_BLOCKS,
            "sequence": f"{args.blocks} blocks of {args.steps} steps, {ORDER}...",
            "gc": "off while timing",
        },
    )
    model_dir = tiny_model_dir()
    rows = [
        summary("A/A control (no switch)", run_sequence(model_dir, args.blocks, args.steps, switch=False)),
        summary("A plain, B instrumented", run_sequence(model_dir, args.blocks, args.steps, switch=True)),
    ]
    print(
        markdown_table(
            [
                "sequence",
                "A µs/step (median)",
                "B µs/step (median)",
                "B/A (all blocks)",
                "B/A per quad (median)",
                "per-quad range",
                "quads",
            ],
            rows,
        )
    )
    print()
    print("All sanity checks passed.")
    return 0


if __name__ == "__main__":
    exit_with(main)
