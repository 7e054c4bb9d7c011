"""Generation throughput of a real vLLM engine (the built-in tiny model) with and without the instrumentation.

Command (from the repository root)::

    .venv/bin/python benchmarks/engine_throughput.py            # 4 variants x 5 rounds, ~20 min on 2 cores (~50 s per run)
    .venv/bin/python benchmarks/engine_throughput.py --smoke    # plain + ours, tiny workload, ~1.5-3 min

Every run is a separate process with a fresh ``LLM`` (default: spawned engine core,
stats off) on the tiny Llama (2 layers, 64 KV blocks of 128 tokens, random weights).
It first generates a warm-up batch, then times one ``llm.generate`` of the fixed
workload: ``--requests`` requests (default 256) with prompt lengths 32..512 and output
lengths 16..256 tokens drawn from ``random.Random(--workload-seed)``, ``ignore_eos``,
greedy (temperature 0). Engine start-up and warm-up are excluded.

Variants (``--variants``), interleaved in rounds (``--pairs``, order rotated each round),
never two engines at once:

* ``plain``: vLLM alone;
* ``ours``: this package, gauges exported over OTLP/HTTP every second
  (``PeriodicExportingMetricReader``) and traces on (``BatchSpanProcessor``, OTLP/HTTP),
  a recording span around each batch (so every request's admission is put on it);
* ``vllm-tracing``: vLLM's native tracing alone (``otlp_traces_endpoint`` to the receiver,
  ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf``): one ``llm_request`` span per request;
  vLLM's tracing needs its statistics, so these runs have them on (``disable_log_stats=False``)
  and their cost is part of this variant's, unless ``--log-stats`` turns them on everywhere;
* ``vllm-tracing+ours``: both.

The OTLP receiver is ``opentelemetry-test-utils``' ``OtlpProtoTestServer`` in this (the
parent) process. Reported: output tokens/s per variant (median over rounds) and the
median over rounds of the per-round ratio against ``plain``.

Sanity checks (non-zero exit on failure, smoke mode too): every run generated exactly
the expected tokens; instrumented runs exported the gauges and put one admission on
their batch span per request; vLLM tracing runs exported one ``llm_request`` span per
request (annotated, and parented on the batch span, when combined with ours); plain
runs exported nothing. Timings are never checked.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    SanityError,
    add_child_arguments,
    check,
    command_line,
    exit_as_parent_or_child,
    markdown_table,
    median,
    print_header,
    run_child,
)

ALL_VARIANTS = ("plain", "ours", "vllm-tracing", "vllm-tracing+ours")
WARMUP_SPAN = "benchmark warm-up batch"
TIMED_SPAN = "benchmark timed batch"
VLLM_REQUEST_SPAN = "llm_request"
ADMITTED_EVENT = "vllm.request.admitted"
LIMIT_ATTRIBUTE = "vllm.admission.kv_cache.limit_tokens"
USAGE_METRIC = "vllm.kv_cache.usage"
PRINTABLE = range(32, 127)  # byte-level tokenizer: token id == byte value


def workload(requests: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
             seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) for each request, from a fixed pseudo-random generator."""
    rng = random.Random(seed)
    items = []
    for _ in range(requests):
        length = rng.randint(*prompt_range)
        prompt = [rng.choice(PRINTABLE) for _ in range(length)]
        items.append((prompt, rng.randint(*output_range)))
    return items


# -- the child: one engine, one variant -----------------------------------------------------


def child(args: argparse.Namespace) -> int:
    spec = json.loads(args.child)
    variant = spec["variant"]
    ours = variant.endswith("ours")
    tracing = variant.startswith("vllm-tracing")

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
        # Not the global provider: with vLLM tracing on, vLLM installs its own as the global one.
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=spec["traces_endpoint"])))
        tracer = tracer_provider.get_tracer("otel-vllm-kv.benchmark")

    from vllm import LLM, SamplingParams

    overrides = {"disable_log_stats": not spec["log_stats"]}
    if tracing:
        # vLLM's tracing needs its per-request statistics (OutputProcessor.do_tracing asserts them).
        overrides.update(otlp_traces_endpoint=spec["traces_endpoint"], disable_log_stats=False)
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

    warm = workload(spec["warmup_requests"], (32, 96), (16, 32), spec["seed"] + 1)
    batch(warm, WARMUP_SPAN)
    items = workload(spec["requests"], tuple(spec["prompt_range"]), tuple(spec["output_range"]), spec["seed"])
    outputs, seconds = batch(items, TIMED_SPAN)

    generated = [len(output.outputs[0].token_ids) for output in outputs]
    expected = [max_tokens for _, max_tokens in items]
    llm.llm_engine.engine_core.shutdown()
    problems = []
    if generated != expected:
        problems.append(f"generated {sum(generated)} tokens, expected {sum(expected)} "
                        f"({sum(g != e for g, e in zip(generated, expected))} requests differ)")
    if ours:
        from otel_vllm_kv.frontend import spans

        if spans.annotator.requests:
            problems.append(f"{len(spans.annotator.requests)} requests still tracked in the frontend")
        tracer_provider.shutdown()
        meter_provider.shutdown()
    print(json.dumps({
        "variant": variant, "seconds": seconds, "startup_seconds": startup,
        "output_tokens": sum(generated), "expected_output_tokens": sum(expected),
        "prompt_tokens": sum(len(prompt) for prompt, _ in items), "requests": len(items),
        "warmup_requests": len(warm), "problems": problems,
    }), flush=True)
    return 1 if problems else 0


# -- the parent: rounds of children, the receiver, the table ---------------------------------


def _attributes(key_values) -> dict:
    return {item.key: getattr(item.value, item.value.WhichOneof("value")) for item in key_values}


def check_telemetry(variant: str, result: dict, spans: list, metrics: list) -> None:
    ours = variant.endswith("ours")
    tracing = variant.startswith("vllm-tracing")
    names = [recorded.span.name for recorded in spans]
    metric_names = {recorded.metric.name for recorded in metrics}
    vllm_spans = [recorded.span for recorded in spans if recorded.span.name == VLLM_REQUEST_SPAN]
    if ours:
        check(USAGE_METRIC in metric_names, f"{variant}: the receiver got no {USAGE_METRIC} (got {sorted(metric_names)})")
        timed = [recorded.span for recorded in spans if recorded.span.name == TIMED_SPAN]
        check(len(timed) == 1, f"{variant}: expected one '{TIMED_SPAN}' span, got {len(timed)}")
        # The SDK keeps 128 events per span by default (OTEL_SPAN_EVENT_COUNT_LIMIT) and counts the rest as dropped.
        events, dropped = timed[0].events, timed[0].dropped_events_count
        admitted = sum(event.name == ADMITTED_EVENT for event in events)
        check(admitted > 0 and len(events) + dropped >= result["requests"] and (dropped or admitted == result["requests"]),
              f"{variant}: the batch span has {admitted} admissions ({len(events)} events, {dropped} dropped) "
              f"for {result['requests']} requests")
    else:
        check(not metric_names and WARMUP_SPAN not in names and TIMED_SPAN not in names,
              f"{variant}: exported telemetry of ours without the instrumentation: {sorted(metric_names)} {names[:5]}")
    if tracing:
        expected = result["requests"] + result["warmup_requests"]
        check(len(vllm_spans) == expected, f"{variant}: {len(vllm_spans)} llm_request spans, expected {expected}")
        if ours:
            check(all(LIMIT_ATTRIBUTE in _attributes(span.attributes) for span in vllm_spans),
                  f"{variant}: llm_request spans without the admission attributes")
            timed_id = timed[0].span_id
            children = sum(span.parent_span_id == timed_id for span in vllm_spans)
            check(children == result["requests"],
                  f"{variant}: {children} llm_request spans parented on the batch span, expected {result['requests']}")
    else:
        check(not vllm_spans, f"{variant}: vLLM exported llm_request spans without tracing on")


def parent(args: argparse.Namespace) -> int:
    from _common import tiny_model_dir
    from opentelemetry.test._otlp_test_server import OtlpProtoTestServer

    print_header(
        "otel-vllm-kv: engine throughput on the tiny model" + (" (SMOKE: sizes too small for timing)" if args.smoke else ""),
        command_line(),
        {"variants": ",".join(args.variants), "pairs": args.pairs, "requests": args.requests,
         "prompt tokens": f"{args.prompt_range[0]}..{args.prompt_range[1]}",
         "output tokens": f"{args.output_range[0]}..{args.output_range[1]}", "workload seed": args.workload_seed,
         "warm-up requests": args.warmup_requests, "metric export interval": "1 s",
         "vLLM stats": "on for all" if args.log_stats else "off (LLM default), on for vllm-tracing*"},
    )
    print("The tiny model makes every engine step short (a few ms of model time), so any fixed per-step "
          "or per-request cost weighs more here than on a real model: the harshest setting for relative overhead.")
    print()
    started = time.monotonic()
    model_dir = tiny_model_dir(args.model_dir)
    logs = tempfile.mkdtemp(prefix="otel-vllm-kv-bench-logs-")
    results: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    try:
        with OtlpProtoTestServer() as receiver:
            for round_index in range(args.pairs):
                shift = round_index % len(args.variants)
                for variant in args.variants[shift:] + args.variants[:shift]:
                    receiver.drain_spans()
                    _drain_metrics(receiver)
                    spec = {
                        "variant": variant, "model_dir": model_dir, "requests": args.requests,
                        "prompt_range": args.prompt_range, "output_range": args.output_range,
                        "seed": args.workload_seed, "warmup_requests": args.warmup_requests,
                        "log_stats": args.log_stats,
                        "traces_endpoint": receiver.traces_endpoint, "metrics_endpoint": receiver.metrics_endpoint,
                    }
                    log_path = os.path.join(logs, f"round{round_index + 1}-{variant}.log")
                    result = run_child(__file__, spec, log_path, args.timeout,
                                       OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf")
                    time.sleep(0.5)  # the last exports were answered before the child exited; let the queue settle
                    check_telemetry(variant, result, receiver.drain_spans(), _drain_metrics(receiver))
                    results[variant].append(result)
                    print(f"round {round_index + 1}/{args.pairs} {variant}: "
                          f"{result['output_tokens'] / result['seconds']:.0f} output tokens/s "
                          f"({result['seconds']:.1f} s, start-up {result['startup_seconds']:.0f} s)",
                          file=sys.stderr, flush=True)
    except SanityError as error:
        print(f"SANITY CHECK FAILED: {error}")
        print(f"(engine logs in {logs})")
        return 1

    rows = []
    baseline = results.get("plain")
    for variant in args.variants:
        runs = results[variant]
        rates = [run["output_tokens"] / run["seconds"] for run in runs]
        if baseline and variant != "plain":
            ratios = [run["output_tokens"] / run["seconds"] / (base["output_tokens"] / base["seconds"])
                      for run, base in zip(runs, baseline)]
            ratio, spread = f"{median(ratios):.4f}", f"{min(ratios):.4f}..{max(ratios):.4f}"
        else:
            ratio, spread = ("1" if variant == "plain" else "n/a"), "-"
        rows.append([
            variant, len(runs), f"{median(rates):,.0f}", f"{min(rates):,.0f}..{max(rates):,.0f}", ratio, spread,
            f"{median(run['seconds'] for run in runs):.2f}", f"{median(run['startup_seconds'] for run in runs):.0f}",
        ])
    print("## Output tokens per second (timed batch only)")
    print()
    print(markdown_table(
        ["variant", "runs", "output tok/s (median)", "range", "ratio vs plain (median)", "ratio range",
         "generate s", "engine start s"],
        rows,
    ))
    print()
    first = next(iter(results.values()))[0]
    print(f"Each run: {first['requests']} requests, {first['prompt_tokens']:,} prompt and "
          f"{first['expected_output_tokens']:,} output tokens; ratio: median over rounds of the per-round "
          "tokens/s ratio against the plain run of the same round. Tiny model: short steps, the harshest "
          "setting for relative overhead.")
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


def _range(text: str) -> list[int]:
    low, _, high = text.partition("..")
    values = [int(low), int(high)]
    if not 1 <= values[0] <= values[1]:
        raise argparse.ArgumentTypeError(f"expected LOW..HIGH with 1 <= LOW <= HIGH, got {text}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Output tokens/s of a real vLLM engine on the tiny model: plain vs otel-vllm-kv vs vLLM's "
        "native tracing vs both, each run a fresh engine in its own process, interleaved in rounds.",
        epilog="Exact command: .venv/bin/python benchmarks/engine_throughput.py [--smoke]",
    )
    parser.add_argument("--pairs", type=int, default=5, help="rounds (one run of every variant each; default 5)")
    parser.add_argument("--variants", type=lambda text: text.split(","), default=list(ALL_VARIANTS),
                        help=f"comma-separated, from {','.join(ALL_VARIANTS)} (default: all)")
    parser.add_argument("--requests", type=int, default=256, help="requests in the timed batch (default 256)")
    parser.add_argument("--prompt-range", type=_range, default=[32, 512], help="prompt tokens LOW..HIGH (default 32..512)")
    parser.add_argument("--output-range", type=_range, default=[16, 256], help="output tokens LOW..HIGH (default 16..256)")
    parser.add_argument("--warmup-requests", type=int, default=16, help="requests in the untimed warm-up batch")
    parser.add_argument("--workload-seed", type=int, default=20240601, help="seed of the workload generator")
    parser.add_argument("--log-stats", action="store_true",
                        help="run every variant with vLLM's statistics on (as `vllm serve` does); by default only "
                        "the vllm-tracing variants have them, because vLLM's tracing requires them")
    add_child_arguments(parser, timeout=900, per="engine run")
    parser.add_argument("--smoke", action="store_true",
                        help="plain + ours, 16 short requests, 1 round: checks that everything works "
                        "(exit 1 if a check fails); timings are meaningless")
    args = parser.parse_args(argv)
    if args.child:
        return args
    if args.smoke:
        args.pairs, args.requests, args.warmup_requests = 1, 16, 4
        args.prompt_range, args.output_range = [32, 96], [8, 24]
        if args.variants == list(ALL_VARIANTS):
            args.variants = ["plain", "ours"]
    unknown = [variant for variant in args.variants if variant not in ALL_VARIANTS]
    if unknown or not args.variants:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(ALL_VARIANTS)}")
    if args.pairs < 1 or args.requests < 1:
        parser.error("--pairs and --requests must be positive")
    if args.prompt_range[1] + args.output_range[1] > 2048:
        parser.error("prompt + output must fit the tiny model's 2048 tokens")
    return args


if __name__ == "__main__":  # vLLM on CPU spawns its engine core, which re-imports this module
    exit_as_parent_or_child(parse_args, parent, child)
