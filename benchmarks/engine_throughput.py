"""Generation throughput of a real vLLM engine (the built-in tiny model) with and without the instrumentation.

Command (from the repository root; run times in benchmarks/README.md)::

    .venv/bin/python -m benchmarks.engine_throughput            # plain and ours, 3 rounds
    .venv/bin/python -m benchmarks.engine_throughput --smoke    # tiny workload, 1 round

Every run is a separate process with a fresh ``LLM`` (default: spawned engine core,
stats off; ``--log-stats`` turns them on, as ``vllm serve`` runs) on the tiny Llama (random
weights). It first generates a warm-up batch, then times one ``llm.generate`` of the fixed
workload (``WORKLOADS``): requests with prompt and output lengths drawn from
``random.Random(SEED)``, ``ignore_eos``, greedy (temperature 0). Engine start-up and warm-up
are excluded.

Variants, interleaved in rounds (``--pairs``, order rotated each round), never two engines at once:

* ``plain``: vLLM alone;
* ``ours``: this package, gauges exported over OTLP/HTTP every second
  (``PeriodicExportingMetricReader``) and traces on (``BatchSpanProcessor``, OTLP/HTTP),
  a recording span around each batch (so every request's admission is put on it).

The OTLP receiver is ``opentelemetry-test-utils``' ``OtlpProtoTestServer`` in this (the
parent) process. Reported: output tokens/s per variant (median over rounds) and the
median over rounds of the per-round ratio against ``plain``.

Sanity checks (non-zero exit on failure, smoke mode too): every run generated exactly
the expected tokens; instrumented runs exported the gauges and put one admission on
their batch span per request; plain runs exported nothing. Timings are never checked.
"""

from __future__ import annotations

import argparse
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
    check,
    command_line,
    exit_as_parent_or_child,
    markdown_table,
    median,
    print_header,
    run_child,
    tiny_model_dir,
)

MODULE = "benchmarks.engine_throughput"
VARIANTS = ("plain", "ours")
WARMUP_SPAN = "benchmark warm-up batch"
TIMED_SPAN = "benchmark timed batch"
ADMITTED_EVENT = "vllm.request.admitted"
USAGE_METRIC = "vllm.kv_cache.usage"
PRINTABLE = range(32, 127)  # byte-level tokenizer: token id == byte value
SEED = 20240601
#: The timed batch: requests, prompt tokens (low, high), output tokens (low, high); and warm-up requests.
WORKLOADS = {"full": (256, (32, 512), (16, 256), 16), "smoke": (16, (32, 96), (8, 24), 4)}


def workload(requests: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int) -> list:
    """(prompt token ids, max_tokens) for each request, from a fixed pseudo-random generator."""
    rng = random.Random(seed)
    return [
        ([rng.choice(PRINTABLE) for _ in range(rng.randint(*prompt_range))], rng.randint(*output_range))
        for _ in range(requests)
    ]


# -- the child: one engine, one variant -----------------------------------------------------


def child(args: argparse.Namespace) -> int:
    spec = json.loads(args.child)
    variant = spec["variant"]
    ours = variant == "ours"

    from otel_vllm_kv.demo.tiny_model import engine_kwargs

    tracer = meter_provider = tracer_provider = None
    if ours:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from otel_vllm_kv import VLLMKVCacheInstrumentor

        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=spec["metrics_endpoint"]), export_interval_millis=1000
        )
        meter_provider = MeterProvider(metric_readers=[reader])
        VLLMKVCacheInstrumentor().instrument(meter_provider=meter_provider)
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=spec["traces_endpoint"])))
        tracer = tracer_provider.get_tracer("otel-vllm-kv.benchmark")

    from vllm import LLM, SamplingParams

    overrides = {"disable_log_stats": not spec["log_stats"]}
    started = time.perf_counter()
    llm = LLM(**engine_kwargs(spec["model_dir"], **overrides))
    startup = time.perf_counter() - started

    def batch(items, span_name):
        prompts = [{"prompt_token_ids": prompt} for prompt, _ in items]
        params = [SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True) for _, max_tokens in items]
        begin = time.perf_counter()
        if tracer is not None:
            with tracer.start_as_current_span(span_name):
                outputs = llm.generate(prompts, params, use_tqdm=False)
        else:
            outputs = llm.generate(prompts, params, use_tqdm=False)
        return outputs, time.perf_counter() - begin

    warm = workload(spec["warmup_requests"], (32, 96), (16, 32), SEED + 1)
    batch(warm, WARMUP_SPAN)
    items = workload(spec["requests"], tuple(spec["prompt_range"]), tuple(spec["output_range"]), SEED)
    outputs, seconds = batch(items, TIMED_SPAN)

    generated = [len(output.outputs[0].token_ids) for output in outputs]
    expected = [max_tokens for _, max_tokens in items]
    llm.llm_engine.engine_core.shutdown()
    problems = []
    if generated != expected:
        problems.append(
            f"generated {sum(generated)} tokens, expected {sum(expected)} "
            f"({sum(g != e for g, e in zip(generated, expected))} requests differ)"
        )
    if ours:
        from otel_vllm_kv.frontend import spans

        if spans.annotator.requests:
            problems.append(f"{len(spans.annotator.requests)} requests still tracked in the frontend")
        tracer_provider.shutdown()
        meter_provider.shutdown()
    print(
        json.dumps(
            {
                "variant": variant,
                "seconds": seconds,
                "startup_seconds": startup,
                "output_tokens": sum(generated),
                "expected_output_tokens": sum(expected),
                "prompt_tokens": sum(len(prompt) for prompt, _ in items),
                "requests": len(items),
                "warmup_requests": len(warm),
                "problems": problems,
            }
        ),
        flush=True,
    )
    return 1 if problems else 0


# -- the parent: rounds of children, the receiver, the table ---------------------------------


def check_telemetry(variant: str, result: dict, spans: list, metrics: list) -> None:
    names = [recorded.span.name for recorded in spans]
    metric_names = {recorded.metric.name for recorded in metrics}
    if variant == "ours":
        check(
            USAGE_METRIC in metric_names, f"{variant}: the receiver got no {USAGE_METRIC} (got {sorted(metric_names)})"
        )
        timed = [recorded.span for recorded in spans if recorded.span.name == TIMED_SPAN]
        check(len(timed) == 1, f"{variant}: expected one '{TIMED_SPAN}' span, got {len(timed)}")
        # The SDK keeps 128 events per span by default (OTEL_SPAN_EVENT_COUNT_LIMIT) and counts the rest as dropped.
        events, dropped = timed[0].events, timed[0].dropped_events_count
        admitted = sum(event.name == ADMITTED_EVENT for event in events)
        check(
            admitted > 0
            and len(events) + dropped >= result["requests"]
            and (dropped or admitted == result["requests"]),
            f"{variant}: the batch span has {admitted} admissions ({len(events)} events, {dropped} dropped) "
            f"for {result['requests']} requests",
        )
    else:
        check(
            not metric_names and not names,
            f"{variant}: exported telemetry without the instrumentation: {sorted(metric_names)} {names[:5]}",
        )


def parent(args: argparse.Namespace) -> int:
    from opentelemetry.test._otlp_test_server import OtlpProtoTestServer

    print_header(
        "otel-vllm-kv: engine throughput on the tiny model"
        + (" (SMOKE: sizes too small for timing)" if args.smoke else ""),
        command_line(MODULE),
        {
            "pairs": args.pairs,
            "requests, prompt tokens, output tokens, warm-up requests": WORKLOADS["smoke" if args.smoke else "full"],
            "workload seed": SEED,
            "metric export interval": "1 s",
            "vLLM stats": "on" if args.log_stats else "off (LLM default)",
        },
    )
    print(
        "The tiny model makes every engine step short (a few ms of model time), so any fixed per-step "
        "or per-request cost weighs more here than on a real model: the harshest setting for relative overhead."
    )
    print()
    started = time.monotonic()
    model_dir = tiny_model_dir(args.model_dir)
    logs = tempfile.mkdtemp(prefix="otel-vllm-kv-bench-logs-")
    requests, prompt_range, output_range, warmup_requests = WORKLOADS["smoke" if args.smoke else "full"]
    results: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    try:
        with OtlpProtoTestServer() as receiver:
            for round_index in range(args.pairs):
                for variant in VARIANTS[round_index % 2 :] + VARIANTS[: round_index % 2]:
                    receiver.drain_spans()
                    _drain_metrics(receiver)
                    spec = {
                        "variant": variant,
                        "model_dir": model_dir,
                        "requests": requests,
                        "prompt_range": prompt_range,
                        "output_range": output_range,
                        "warmup_requests": warmup_requests,
                        "log_stats": args.log_stats,
                        "traces_endpoint": receiver.traces_endpoint,
                        "metrics_endpoint": receiver.metrics_endpoint,
                    }
                    log_path = os.path.join(logs, f"round{round_index + 1}-{variant}.log")
                    result = run_child(MODULE, spec, log_path, args.timeout)
                    time.sleep(0.5)  # the last exports were answered before the child exited; let the queue settle
                    check_telemetry(variant, result, receiver.drain_spans(), _drain_metrics(receiver))
                    results[variant].append(result)
                    print(
                        f"round {round_index + 1}/{args.pairs} {variant}: "
                        f"{result['output_tokens'] / result['seconds']:.0f} output tokens/s "
                        f"({result['seconds']:.1f} s, start-up {result['startup_seconds']:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
    except SanityError as error:
        print(f"SANITY CHECK FAILED: {error}")
        print(f"(engine logs in {logs})")
        return 1

    rows = []
    for variant, runs in results.items():
        rates = [run["output_tokens"] / run["seconds"] for run in runs]
        if variant == "ours":
            ratios = [
                run["output_tokens"] / run["seconds"] / (base["output_tokens"] / base["seconds"])
                for run, base in zip(runs, results["plain"])
            ]
            ratio, spread = f"{median(ratios):.4f}", f"{min(ratios):.4f}..{max(ratios):.4f}"
        else:
            ratio, spread = "1", "-"
        rows.append(
            [
                variant,
                len(runs),
                f"{median(rates):,.0f}",
                f"{min(rates):,.0f}..{max(rates):,.0f}",
                ratio,
                spread,
                f"{median(run['seconds'] for run in runs):.2f}",
                f"{median(run['startup_seconds'] for run in runs):.0f}",
            ]
        )
    print("## Output tokens per second (timed batch only)")
    print()
    print(
        markdown_table(
            [
                "variant",
                "runs",
                "output tok/s (median)",
                "range",
                "ratio vs plain (median)",
                "ratio range",
                "generate s",
                "engine start s",
            ],
            rows,
        )
    )
    print()
    first = results["plain"][0]
    print(
        f"Each run: {first['requests']} requests, {first['prompt_tokens']:,} prompt and "
        f"{first['expected_output_tokens']:,} output tokens; ratio: median over rounds of the per-round "
        "tokens/s ratio against the plain run of the same round. Tiny model: short steps, the harshest "
        "setting for relative overhead."
    )
    print()
    shutil.rmtree(logs, ignore_errors=True)  # kept only when a check failed
    print(f"All sanity checks passed. Wall time {time.monotonic() - started:.0f} s.")
    if args.smoke:
        print("SMOKE RUN: sizes are too small for the timings to mean anything.")
    return 0


def _drain_metrics(receiver) -> list:
    from queue import Empty

    drained = []
    while True:
        try:
            drained.append(receiver._metrics_queue.get_nowait())
        except Empty:
            return drained


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="Output tokens/s of a real vLLM engine on the tiny model: plain vs otel-vllm-kv, each run a "
        "fresh engine in its own process, interleaved in rounds.",
        epilog="Exact command: .venv/bin/python -m benchmarks.engine_throughput [--smoke]",
    )
    parser.add_argument("--pairs", type=int, default=3, help="rounds (one run of every variant each; default 3)")
    parser.add_argument(
        "--log-stats",
        action="store_true",
        help="run every variant with vLLM's statistics on (as `vllm serve` does; default off, as LLM)",
    )
    add_child_arguments(parser, timeout=900, per="engine run")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="16 short requests, 1 round: checks that everything works "
        "(exit 1 if a check fails); timings are meaningless",
    )
    args = parser.parse_args(argv)
    if args.child:
        return args
    if args.smoke:
        args.pairs = 1
    if args.pairs < 1:
        parser.error("--pairs must be positive")
    return args


if __name__ == "__main__":  # vLLM on CPU spawns its engine core, which re-imports this module
    exit_as_parent_or_child(parse_args, parent, child)
