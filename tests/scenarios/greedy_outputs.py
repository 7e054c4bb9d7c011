"""Run by test_reliability: the same greedy batch on a plain engine, then on an instrumented one with tracing on.

Each engine is a default ``LLM`` (spawned engine core) on the tiny model; the second runs
with this package instrumented, a recording span around the batch and vLLM's own tracing
exporting OTLP/HTTP to the endpoint given. Prints one JSON line: the token ids of both runs
and the dtype each engine resolved.
"""

import json
import os
import sys

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_vllm_kv import VLLMKVCacheInstrumentor, names
from otel_vllm_kv.demo.tiny_model import engine_kwargs

PROMPTS = 50


def prompts() -> list[str]:
    """50 prompts from 1 to 981 tokens (one token per byte), each different from the first byte."""
    return [(f"{index:02d}:" + "the quick brown fox jumps; " * 40)[: 1 + index * 20] for index in range(PROMPTS)]


def generate(llm) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=24, temperature=0)  # greedy; no per-request seed (vLLM CPU bug)
    return [list(output.outputs[0].token_ids) for output in llm.generate(prompts(), params, use_tqdm=False)]


if __name__ == "__main__":
    from vllm import LLM

    model_dir, traces_endpoint = sys.argv[1], sys.argv[2]
    llm = LLM(**engine_kwargs(model_dir))
    dtypes = [str(llm.llm_engine.model_config.dtype)]
    plain = generate(llm)
    llm.llm_engine.engine_core.shutdown()
    del llm

    reader = InMemoryMetricReader()
    VLLMKVCacheInstrumentor().instrument(meter_provider=MeterProvider(metric_readers=[reader]))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    os.environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
    # vLLM's request tracing needs its request stats (do_tracing asserts them): stats on.
    llm = LLM(**engine_kwargs(model_dir, otlp_traces_endpoint=traces_endpoint, disable_log_stats=False))
    dtypes.append(str(llm.llm_engine.model_config.dtype))
    with provider.get_tracer("test").start_as_current_span("greedy batch"):
        instrumented = generate(llm)
    llm.llm_engine.engine_core.shutdown()
    (span,) = exporter.get_finished_spans()
    admitted = [event for event in span.events if event.name == names.EVENT_ADMITTED]
    print(json.dumps({"plain": plain, "instrumented": instrumented, "admitted": len(admitted), "dtypes": dtypes}))
