"""Demo: the tiny model on a real vLLM engine, instrumented, under a burst of requests.

Prints the KV-cache gauges of every engine each time they change, as the exporting
process reads them, then the totals once the burst has drained.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

from otel_vllm_kv.demo.tiny_model import MAX_MODEL_LEN, build_tiny_model, engine_kwargs


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m otel_vllm_kv.demo",
        description="Start the built-in tiny model with KV-cache instrumentation, send a burst of "
        "requests and print vllm.kv_cache.usage / limit / utilization per engine as they change.",
    )
    parser.add_argument("--requests", type=_positive, default=24, help="requests in the burst (default 24)")
    parser.add_argument("--prompt-tokens", type=_positive, default=400, help="prompt length in tokens (default 400)")
    parser.add_argument("--max-tokens", type=_positive, default=600, help="tokens generated per request (default 600)")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between reads of the gauges (default 0.25)")
    parser.add_argument("--model-dir", help="where to write the tiny model (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.prompt_tokens + args.max_tokens > MAX_MODEL_LEN:
        parser.error(f"--prompt-tokens + --max-tokens must not exceed the model's {MAX_MODEL_LEN} tokens")
    return args


def _format(engine_index: int, view: dict) -> str:
    used, free, limit = view.get("used"), view.get("free"), view.get("limit")
    bar_width = 30
    filled = round(bar_width * view["utilization"])
    bar = "#" * filled + "." * (bar_width - filled)
    tokens = f"used {used:>6,} free {free:>6,} limit {limit:>6,}" if used is not None else "tokens n/a (hybrid)"
    return f"engine {engine_index} [{bar}] {view['utilization']:6.1%}  {tokens}"


def _read(reader) -> dict[int, dict]:
    from otel_vllm_kv.instruments import ENGINE_INDEX, KV_CACHE_LIMIT, KV_CACHE_STATE, KV_CACHE_USAGE

    engines: dict[int, dict] = {}
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    view = engines.setdefault(point.attributes[ENGINE_INDEX], {})
                    if metric.name == KV_CACHE_USAGE:
                        view[point.attributes[KV_CACHE_STATE]] = point.value
                    elif metric.name == KV_CACHE_LIMIT:
                        view["limit"] = point.value
                    else:
                        view["utilization"] = point.value
    return engines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from otel_vllm_kv import VLLMKVCacheInstrumentor

    reader = InMemoryMetricReader()
    VLLMKVCacheInstrumentor().instrument(meter_provider=MeterProvider(metric_readers=[reader]))

    from vllm import LLM, SamplingParams

    model_dir = args.model_dir or tempfile.mkdtemp(prefix="otel-vllm-kv-tiny-")
    build_tiny_model(model_dir)
    print(f"starting the tiny model from {model_dir} (15-40 s on 2 cores) ...", flush=True)
    llm = LLM(**engine_kwargs(model_dir))
    start = time.monotonic()
    last: dict = {}
    done = threading.Event()

    def watch() -> None:
        nonlocal last
        while True:
            engines = _read(reader)
            if engines != last:
                for index, view in sorted(engines.items()):
                    print(f"{time.monotonic() - start:7.2f}s  {_format(index, view)}", flush=True)
                last = engines
            if done.is_set():
                return
            time.sleep(args.interval)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    prompts = [(f"request {i:03d}: " * args.prompt_tokens)[: args.prompt_tokens] for i in range(args.requests)]
    # No per-request seed: vLLM 0.32 on CPU fails seeded sampling ("CPU Generator does not use offset").
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.8, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    time.sleep(args.interval * 2)
    done.set()
    watcher.join()
    generated = sum(len(output.outputs[0].token_ids) for output in outputs)
    print(f"{len(outputs)} requests, {generated:,} tokens generated in {time.monotonic() - start:.1f} s")
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
