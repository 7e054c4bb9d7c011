"""Run by test_hostile_environment: an instrumented exporter with a live ``LLM`` on the tiny
model, driven from stdin.

Usage: gauges_on_command.py MODEL_DIR. Instruments with an SDK in-memory reader, starts the
engine (spawned engine core), generates a little, prints ``READY``; then, for each line read:
``gauges`` prints ``GAUGES <json>``, every point of the package's limit and usage gauges as
``[metric name, attributes, value]``; ``exit`` shuts the engine down and exits.
"""

import json
import sys

if __name__ == "__main__":
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from vllm import LLM, SamplingParams

    from otel_vllm_kv import VLLMKVCacheInstrumentor
    from otel_vllm_kv.demo.tiny_model import engine_kwargs
    from otel_vllm_kv.names import KV_CACHE_LIMIT, KV_CACHE_USAGE
    from tests.support.engine_load import distinct_prompts

    reader = InMemoryMetricReader()
    VLLMKVCacheInstrumentor().instrument(meter_provider=MeterProvider(metric_readers=[reader]))
    # vLLM's CPU worker refuses to start unless this fraction of the host's memory is free (0.92
    # by default): a second engine on the host would never start. The cache stays 1 GiB
    # (VLLM_CPU_KVCACHE_SPACE) with 64 blocks.
    llm = LLM(**engine_kwargs(sys.argv[1], gpu_memory_utilization=0.3))
    llm.generate(distinct_prompts(2, 50), SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    print("READY", flush=True)
    for command in sys.stdin:
        if command.strip() == "gauges":
            data = reader.get_metrics_data()
            points = [
                [metric.name, dict(point.attributes), point.value]
                for resource_metrics in (data.resource_metrics if data else [])
                for scope_metrics in resource_metrics.scope_metrics
                for metric in scope_metrics.metrics
                if metric.name in (KV_CACHE_LIMIT, KV_CACHE_USAGE)
                for point in metric.data.data_points
            ]
            print("GAUGES " + json.dumps(points), flush=True)
        elif command.strip() == "exit":
            break
    llm.llm_engine.engine_core.shutdown()
