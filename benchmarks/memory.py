"""Resident memory of the instrumented process and of its engine core as requests accumulate.

Command (from the repository root; run times in benchmarks/README.md)::

    .venv/bin/python -m benchmarks.memory            # ours + plain, up to 10,000 requests each
    .venv/bin/python -m benchmarks.memory --smoke    # ours only, 50/100 requests

Each variant runs in its own process with a fresh ``LLM`` on the tiny model (default:
spawned engine core). After an untimed warm-up, it sends short requests (prompts of
8..16 tokens, 4 output tokens, ``ignore_eos``) in batches of ``--batch-size`` and, at
each checkpoint (default after 1,000, 2,500, 5,000 and 10,000 requests), runs the
garbage collector, waits a second (the periodic exporters run) and reads ``VmRSS``
from ``/proc/<pid>/status`` for itself and for its engine core (found among its
children with psutil: the process titled ``VLLM::EngineCore``).

* ``ours``: instrumented, a ``PeriodicExportingMetricReader`` (1 s) and a
  ``BatchSpanProcessor`` whose exporters count and drop what they receive (nothing
  accumulates in the exporters), a recording span around each batch;
* ``plain``: vLLM alone, for reference (vLLM's own growth, if any).

Reported: RSS at each checkpoint, and growth per 1,000 requests between the first and
the last checkpoint. Target: no growth with request count; the verdict uses
``--threshold-mib`` (default 0.5 MiB per 1,000 requests, i.e. 512 bytes per request,
less than any per-request record the instrumentation keeps) on ours' growth in excess
of plain's (on ours' own growth when plain was not run).

Sanity checks (non-zero exit on failure, smoke mode too): every request generated its
tokens, the engine core was found, the instrumented run exported gauges and spans with
admissions, and no request is left tracked in the frontend. The memory target itself
is reported, not enforced by the exit code.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time

from benchmarks._common import (
    SanityError,
    add_child_arguments,
    command_line,
    exit_as_parent_or_child,
    markdown_table,
    print_header,
    run_child,
    tiny_model_dir,
)

MODULE = "benchmarks.memory"

VARIANTS = ("ours", "plain")
MIB = 1024 * 1024
OUTPUT_TOKENS = 4


def vm_rss(pid: int) -> int:
    """Resident set size in bytes, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise SanityError(f"no VmRSS in /proc/{pid}/status")


def engine_core_pid() -> int:
    import psutil

    children = psutil.Process().children(recursive=True)
    for process in children:
        try:
            title = " ".join(process.cmdline()) + " " + process.name()
        except psutil.Error:
            continue
        if "EngineCore" in title:
            return process.pid
    raise SanityError(f"no EngineCore among the children {[p.pid for p in children]}")


# -- the child: one engine, one variant -----------------------------------------------------


def child(args: argparse.Namespace) -> int:
    spec = json.loads(args.child)
    ours = spec["variant"] == "ours"
    from otel_vllm_kv.demo.tiny_model import engine_kwargs

    tracer = span_exporter = metric_exporter = meter_provider = tracer_provider = None
    if ours:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, PeriodicExportingMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        from otel_vllm_kv import VLLMKVCacheInstrumentor

        class CountingSpanExporter(SpanExporter):
            def __init__(self) -> None:
                self.spans = self.admitted = 0

            def export(self, spans):
                self.spans += len(spans)
                self.admitted += sum(event.name == "vllm.request.admitted" for span in spans for event in span.events)
                return SpanExportResult.SUCCESS

        class CountingMetricExporter(MetricExporter):
            def __init__(self) -> None:
                super().__init__()
                self.usage_points = 0

            def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs):
                for resource_metrics in metrics_data.resource_metrics:
                    for scope_metrics in resource_metrics.scope_metrics:
                        for metric in scope_metrics.metrics:
                            if metric.name == "vllm.kv_cache.usage":
                                self.usage_points += len(metric.data.data_points)
                return MetricExportResult.SUCCESS

            def force_flush(self, timeout_millis: float = 10_000) -> bool:
                return True

            def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
                pass

        metric_exporter = CountingMetricExporter()
        meter_provider = MeterProvider(
            metric_readers=[PeriodicExportingMetricReader(metric_exporter, export_interval_millis=1000)]
        )
        VLLMKVCacheInstrumentor().instrument(meter_provider=meter_provider)
        span_exporter = CountingSpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        tracer = tracer_provider.get_tracer("otel-vllm-kv.benchmark")

    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(spec["model_dir"]))
    engine_pid = engine_core_pid()
    rng = random.Random(spec["seed"])
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0, ignore_eos=True)
    problems: list[str] = []

    def run(count: int) -> None:
        prompts = [
            {"prompt_token_ids": [rng.randrange(32, 127) for _ in range(rng.randint(8, 16))]} for _ in range(count)
        ]
        if tracer is not None:
            with tracer.start_as_current_span("benchmark batch"):
                outputs = llm.generate(prompts, params, use_tqdm=False)
        else:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        short = sum(len(output.outputs[0].token_ids) != OUTPUT_TOKENS for output in outputs)
        if short or len(outputs) != count:
            problems.append(f"{short} of {count} requests did not generate {OUTPUT_TOKENS} tokens")

    def measure(done: int) -> dict:
        gc.collect()
        time.sleep(1.0)
        return {"requests": done, "self_rss": vm_rss(os.getpid()), "engine_rss": vm_rss(engine_pid)}

    run(spec["warmup"])
    checkpoints = [measure(0)]
    done = 0
    for target in spec["checkpoints"]:
        while done < target:
            count = min(spec["batch_size"], target - done)
            run(count)
            done += count
        checkpoints.append(measure(done))

    summary = {"variant": spec["variant"], "pid": os.getpid(), "engine_pid": engine_pid, "checkpoints": checkpoints}
    if ours:
        from otel_vllm_kv.frontend import spans

        summary["tracked_requests"] = len(spans.annotator.requests)
        if spans.annotator.requests:
            problems.append(f"{len(spans.annotator.requests)} requests still tracked in the frontend")
    llm.llm_engine.engine_core.shutdown()
    if ours:
        tracer_provider.shutdown()
        meter_provider.shutdown()
        summary.update(
            spans_exported=span_exporter.spans,
            admitted_events=span_exporter.admitted,
            usage_points=metric_exporter.usage_points,
        )
        if not span_exporter.spans or not span_exporter.admitted:
            problems.append(f"spans exported {span_exporter.spans}, admission events {span_exporter.admitted}")
        if not metric_exporter.usage_points:
            problems.append("no vllm.kv_cache.usage point was exported")
    summary["problems"] = problems
    print(json.dumps(summary), flush=True)
    return 1 if problems else 0


# -- the parent ------------------------------------------------------------------------------


def growth_per_thousand(result: dict, key: str) -> float:
    first, last = result["checkpoints"][1], result["checkpoints"][-1]
    return (last[key] - first[key]) / MIB / ((last["requests"] - first["requests"]) / 1000)


def parent(args: argparse.Namespace) -> int:
    print_header(
        "otel-vllm-kv: memory as requests accumulate"
        + (" (SMOKE: sizes too small to judge growth)" if args.smoke else ""),
        command_line(MODULE),
        {
            "variants": ",".join(args.variants),
            "checkpoints": args.checkpoints,
            "batch size": args.batch_size,
            "warm-up requests": args.warmup,
            "prompt tokens": "8..16",
            "output tokens": OUTPUT_TOKENS,
            "threshold": f"{args.threshold_mib} MiB per 1,000 requests",
        },
    )
    started = time.monotonic()
    model_dir = tiny_model_dir(args.model_dir)
    logs = tempfile.mkdtemp(prefix="otel-vllm-kv-bench-logs-")
    results = {}
    try:
        for variant in args.variants:
            spec = {
                "variant": variant,
                "model_dir": model_dir,
                "checkpoints": args.checkpoints,
                "batch_size": args.batch_size,
                "warmup": args.warmup,
                "seed": 7,
            }
            results[variant] = run_child(MODULE, spec, os.path.join(logs, f"{variant}.log"), args.timeout)
            print(f"{variant} done", file=sys.stderr, flush=True)
    except SanityError as error:
        print(f"SANITY CHECK FAILED: {error}")
        print(f"(logs in {logs})")
        return 1

    headers = [
        "variant",
        "process",
        "after warm-up MiB",
        *(f"after {c:,} MiB" for c in args.checkpoints),
        f"growth/1,000 ({args.checkpoints[0]:,}→{args.checkpoints[-1]:,}) MiB",
    ]
    rows = []
    for variant, result in results.items():
        for key, process in (
            ("self_rss", "instrumented process" if variant == "ours" else "LLM process"),
            ("engine_rss", "engine core"),
        ):
            rows.append(
                [
                    variant,
                    process,
                    *(f"{point[key] / MIB:.1f}" for point in result["checkpoints"]),
                    f"{growth_per_thousand(result, key):+.3f}",
                ]
            )
    print("## Resident set size (VmRSS)")
    print()
    print(markdown_table(headers, rows))
    print()
    if "ours" in results:
        verdicts = []
        for key, process in (("self_rss", "instrumented process"), ("engine_rss", "engine core")):
            growth = growth_per_thousand(results["ours"], key)
            reference = growth_per_thousand(results["plain"], key) if "plain" in results else 0.0
            excess = growth - reference
            status = "not judged (smoke)" if args.smoke else "ok" if excess <= args.threshold_mib else "OVER THRESHOLD"
            against = " in excess of plain" if "plain" in results else ""
            verdicts.append(
                f"- {process}: {excess:+.3f} MiB per 1,000 requests{against} (threshold {args.threshold_mib}): {status}"
            )
        print("Target: no growth with request count.")
        print("\n".join(verdicts))
        extra = results["ours"]
        print(
            f"- instrumented run exported {extra['spans_exported']} spans ({extra['admitted_events']} admission events "
            f"kept, the SDK keeps 128 events per span) and {extra['usage_points']} usage points; "
            f"{extra['tracked_requests']} requests left tracked in the frontend."
        )
        print()
    shutil.rmtree(logs, ignore_errors=True)  # kept only when a check failed
    print(f"All sanity checks passed. Wall time {time.monotonic() - started:.0f} s.")
    if args.smoke:
        print("SMOKE RUN: too few requests to judge growth.")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="VmRSS of the instrumented process and of its engine core after many short requests "
        "(ours and plain, each a fresh engine in its own process). Prints a markdown table.",
        epilog="Exact command: .venv/bin/python -m benchmarks.memory [--smoke]",
    )
    parser.add_argument(
        "--variants",
        type=lambda text: text.split(","),
        default=list(VARIANTS),
        help="comma-separated, from ours,plain (default: both)",
    )
    parser.add_argument(
        "--checkpoints",
        type=lambda text: sorted(int(x) for x in text.split(",")),
        default=[1000, 2500, 5000, 10000],
        help="request counts at which RSS is read (default 1000,2500,5000,10000)",
    )
    parser.add_argument("--batch-size", type=int, default=250, help="requests per llm.generate (default 250)")
    parser.add_argument(
        "--warmup", type=int, default=200, help="untimed requests before the first reading (default 200)"
    )
    parser.add_argument(
        "--threshold-mib", type=float, default=0.5, help="allowed growth per 1,000 requests, MiB (default 0.5)"
    )
    add_child_arguments(parser, timeout=1800, per="variant")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="ours only, checkpoints 50,100: checks that everything works (exit 1 if a check "
        "fails); too small to judge growth",
    )
    args = parser.parse_args(argv)
    if args.child:
        return args
    if args.smoke:
        args.checkpoints, args.batch_size, args.warmup = [50, 100], 25, 10
        if args.variants == list(VARIANTS):
            args.variants = ["ours"]
    if any(variant not in VARIANTS for variant in args.variants):
        parser.error(f"variants must be among {', '.join(VARIANTS)}")
    if len(args.checkpoints) < 2 or args.checkpoints[0] < 1 or args.batch_size < 1:
        parser.error("give at least two positive checkpoints and a positive batch size")
    return args


if __name__ == "__main__":  # vLLM on CPU spawns its engine core, which re-imports this module
    exit_as_parent_or_child(parse_args, parent, child)
