"""A whole in-process ``LLM`` run, counted: the end-to-end figure of ``instructions.py``.

``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core in the measured process, so
callgrind counts the frontend (span annotation), the engine (scheduler, probe, model
forward on CPU) and the exporter (gauge collection) together. A recording
``TracerProvider`` (``SimpleSpanProcessor`` into memory: no thread) and a metric
collection after every batch run in both variants, so ``plain`` differs from ``ours``
only by the package. Two batch sizes give the marginal cost per request.
"""

from __future__ import annotations

import gc
import os

from benchmarks import _callgrind

PROMPT_TOKENS = 48
OUTPUT_TOKENS = 32


def run(spec: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from otel_vllm_kv import VLLMKVCacheInstrumentor
    from otel_vllm_kv.demo.tiny_model import engine_kwargs

    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    if spec["variant"] == "ours":
        VLLMKVCacheInstrumentor().instrument(meter_provider=meter_provider, tracer_provider=tracer_provider)
    tracer = tracer_provider.get_tracer("benchmark")
    llm = LLM(**engine_kwargs(spec["model_dir"]))
    sampling = SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True, temperature=0.0)
    serial = iter(range(1, 1_000_000))

    def batch(count: int) -> list[list[int]]:
        prompts = [
            TokensPrompt(prompt_token_ids=[next(serial) % 200 + 1, *range(3, PROMPT_TOKENS + 2)]) for _ in range(count)
        ]
        with tracer.start_as_current_span("generate"):
            outputs = llm.generate(prompts, sampling, use_tqdm=False)
        reader.get_metrics_data()
        return [list(output.outputs[0].token_ids) for output in outputs]

    batch(4)  # warm-up: first-call paths of vLLM and of the SDK
    tokens = []
    small, large = spec["units"]["engine"]
    gc.collect()
    gc.disable()
    for size, count in (("small", small), ("large", large)):
        _callgrind.mark(f"engine|{size}")
        tokens.append(batch(count))
    _callgrind.mark("engine|after")
    gc.enable()
    annotated = sum(
        1
        for span in spans.get_finished_spans()
        for attributes in (span.attributes, *(event.attributes for event in span.events))
        if any(key.startswith("vllm.admission.") for key in attributes or {})
    )
    _callgrind.mark("exit")
    return {
        "variant": spec["variant"],
        "marks": _callgrind.labels(),
        "tokens": tokens,
        "spans": len(spans.get_finished_spans()),
        "annotated_spans": annotated,
    }
