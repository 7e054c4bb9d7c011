"""Instrument vLLM in code: SDK providers exporting OTLP, a few requests under one span, flush.

    OTEL_SERVICE_NAME=vllm-batch OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 \\
        python examples/programmatic.py --model DIR

Exporters follow the standard OTEL_* variables: OTEL_EXPORTER_OTLP_PROTOCOL (or the
_METRICS_/_TRACES_ variants) chooses gRPC (default) or http/protobuf, and the endpoint,
headers and OTEL_METRIC_EXPORT_INTERVAL apply as usual. Without --model it builds the
package's tiny test model (random weights, no download) in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import tempfile


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory or name (default: build the tiny test model)")
    parser.add_argument("--requests", type=int, default=8, help="prompts in the batch (default 8)")
    parser.add_argument("--max-tokens", type=int, default=200, help="tokens generated per prompt (default 200)")
    return parser.parse_args()


def _protocol(signal: str) -> str:
    """The OTLP protocol for ``signal`` (METRICS or TRACES), per the OpenTelemetry variables."""
    return os.environ.get(
        f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    ).strip()


def make_providers():
    """A MeterProvider and a TracerProvider exporting OTLP; endpoints etc. come from OTEL_* variables."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if _protocol("METRICS") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    if _protocol("TRACES") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win over this default.
    resource = Resource.create({} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "vllm-programmatic"})
    # OTEL_METRIC_EXPORT_INTERVAL sets the reader's period (default 60 s); shutdown exports once more.
    reader = PeriodicExportingMetricReader(OTLPMetricExporter())
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return meter_provider, tracer_provider


def main() -> None:
    args = parse_args()
    meter_provider, tracer_provider = make_providers()

    # Before the engine starts: the engine processes vLLM spawns must find the instrumentation.
    from otel_vllm_kv import VLLMKVCacheInstrumentor

    VLLMKVCacheInstrumentor().instrument(meter_provider=meter_provider, tracer_provider=tracer_provider)

    from vllm import LLM, SamplingParams

    if args.model:
        llm = LLM(model=args.model)
    else:
        from otel_vllm_kv.demo.tiny_model import build_tiny_model, engine_kwargs

        model_dir = tempfile.mkdtemp(prefix="tiny-model-")
        build_tiny_model(model_dir)
        llm = LLM(**engine_kwargs(model_dir))  # served as "tiny", 8,064 KV-cache tokens

    prompts = [f"Request {i}: " + "a few words about caches. " * 12 for i in range(args.requests)]
    tracer = tracer_provider.get_tracer("otel-vllm-kv.examples.programmatic")
    # A span around the batch: it gets one vllm.request.admitted event per request, with the
    # KV cache's used/free/limit tokens at that request's admission.
    with tracer.start_as_current_span("batch-generate") as span:
        span.set_attribute("batch.requests", len(prompts))
        outputs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True), use_tqdm=False)
    generated = sum(len(output.outputs[0].token_ids) for output in outputs)
    print(f"{len(outputs)} requests, {generated} tokens generated")

    # Flush while the engine is still up: the final collection reports its gauges (idle: all free).
    meter_provider.shutdown()
    tracer_provider.shutdown()
    del llm


if __name__ == "__main__":  # vLLM on CPU starts its engine processes with spawn, which re-imports this file
    main()
