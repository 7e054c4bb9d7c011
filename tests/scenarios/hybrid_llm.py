"""Run by test_hybrid: an instrumented LLM on the Gemma2-style tiny model, engine core in this process.

The model alternates sliding-window and full-attention layers, so vLLM builds two KV-cache
groups over one block pool. Stepping the engine one step at a time, after every step the
gauges are compared with what vLLM itself publishes for that step (``vllm:kv_cache_usage_perc``
and ``vllm:cache_config_info`` from ``LLM.get_metrics()``) and with the real pool. Prints one
JSON line for the test to check.
"""

import json
import sys

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_vllm_kv import VLLMKVCacheInstrumentor
from otel_vllm_kv.demo.sampling import read_engines
from otel_vllm_kv.demo.tiny_model import engine_kwargs
from tests.support.schedulers import evictable_per_group

PREFIX = "The shared system prompt of every request in this scenario. " * 10  # 610 bytes: 4 full blocks


def published(llm) -> dict:
    """What vLLM's own metrics say now."""
    values = {}
    for metric in llm.get_metrics():
        if metric.name == "vllm:kv_cache_usage_perc":
            values["usage"] = metric.value
        elif metric.name == "vllm:cache_config_info":
            values["kv_cache_size_tokens"] = int(metric.labels["kv_cache_size_tokens"])
            values["num_gpu_blocks"] = int(metric.labels["num_gpu_blocks"])
        elif metric.name == "vllm:prefix_cache_hits":
            values["prefix_cache_hits"] = metric.value
    return values


def check_step(llm, reader, scheduler, mismatches: list, step: int) -> dict:
    gauges, vllm = read_engines(reader)[0], published(llm)
    free = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    expected = {
        "utilization": vllm["usage"],
        "limit": vllm["kv_cache_size_tokens"],
        "used + free": vllm["kv_cache_size_tokens"],
        "limit_blocks": vllm["num_gpu_blocks"] - 1,
        "used_blocks": vllm["num_gpu_blocks"] - 1 - free,
        "evictable per group": evictable_per_group(scheduler),
    }
    observed = {
        "utilization": gauges.utilization,
        "limit": gauges.limit,
        "used + free": gauges.used + gauges.free,
        "limit_blocks": gauges.limit_blocks,
        "used_blocks": gauges.used_blocks,
        "evictable per group": [group.evictable_blocks for group in gauges.groups.values()],
    }
    if observed != expected:
        mismatches.append([step, observed, expected])
    return {"used_blocks": gauges.used_blocks, "evictable": gauges.evictable, **vllm}


def run_until_done(engine, llm, reader, scheduler, mismatches: list, trace: list) -> None:
    while engine.has_unfinished_requests():
        engine.step()
        trace.append(check_step(llm, reader, scheduler, mismatches, len(trace)))


if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    reader = InMemoryMetricReader()
    VLLMKVCacheInstrumentor().instrument(meter_provider=MeterProvider(metric_readers=[reader]))
    llm = LLM(**engine_kwargs(sys.argv[1], disable_log_stats=False))
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    params = SamplingParams(max_tokens=250, temperature=0, ignore_eos=True)
    mismatches, trace = [], []
    for index in range(4):
        engine.add_request(f"first-{index}", f"{PREFIX}request {index}: " + "x" * 200, params)
    run_until_done(engine, llm, reader, scheduler, mismatches, trace)
    idle = read_engines(reader)[0]
    hits_before = published(llm)["prefix_cache_hits"]

    engine.add_request("reuser", f"{PREFIX}a new request", SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    trace.append(check_step(llm, reader, scheduler, mismatches, len(trace)))
    reusing = read_engines(reader)[0]
    hits = published(llm)["prefix_cache_hits"] - hits_before
    run_until_done(engine, llm, reader, scheduler, mismatches, trace)
    print(
        json.dumps(
            {
                "engine_core": type(engine.engine_core).__name__,
                "steps": len(trace),
                "mismatches": mismatches[:5],
                "groups": {index: [group.attention_type, group.block_size] for index, group in idle.groups.items()},
                "published": published(llm),
                "most_used_blocks": max(step["used_blocks"] for step in trace),
                "usages": sorted({step["usage"] for step in trace}),
                "idle": {
                    "used": idle.used,
                    "free": idle.free,
                    "limit": idle.limit,
                    "evictable": idle.evictable,
                    "evictable_blocks": [group.evictable_blocks for group in idle.groups.values()],
                },
                "reusing": {"evictable": reusing.evictable, "prefix_cache_hits": hits},
            }
        )
    )
