"""The demo's meter and tracer providers: in-memory for its own view, plus the exporters ``OTEL_*`` asks for."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, overload

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    InMemoryMetricReader,
    MetricExporter,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import Tracer

from otel_vllm_kv.demo.otel_env import ExportSettings, SignalExport

DEFAULT_SERVICE_NAME = "otel-vllm-kv-demo"
SPAN_EVENT_COUNT_LIMIT = "OTEL_SPAN_EVENT_COUNT_LIMIT"
_CONSOLE_EXPORTERS = {"metrics": ConsoleMetricExporter, "traces": ConsoleSpanExporter}
_OTLP_EXPORTERS = {
    ("metrics", "grpc"): ("opentelemetry.exporter.otlp.proto.grpc.metric_exporter", "OTLPMetricExporter"),
    ("metrics", "http/protobuf"): ("opentelemetry.exporter.otlp.proto.http.metric_exporter", "OTLPMetricExporter"),
    ("traces", "grpc"): ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "OTLPSpanExporter"),
    ("traces", "http/protobuf"): ("opentelemetry.exporter.otlp.proto.http.trace_exporter", "OTLPSpanExporter"),
}


@dataclass
class Telemetry:
    meter_provider: MeterProvider
    tracer_provider: TracerProvider
    metric_reader: InMemoryMetricReader
    span_exporter: InMemorySpanExporter

    @property
    def tracer(self) -> Tracer:
        return self.tracer_provider.get_tracer("otel_vllm_kv.demo")

    def finished_span(self, name: str) -> ReadableSpan:
        """The span called ``name`` that ended last."""
        return [span for span in self.span_exporter.get_finished_spans() if span.name == name][-1]

    def flush(self) -> None:
        """Export now (the exporters' last points while the engine is still reported)."""
        self.meter_provider.force_flush()
        self.tracer_provider.force_flush()

    def shutdown(self) -> None:
        """Flush and stop every exporter."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def start_telemetry(settings: ExportSettings) -> Telemetry:
    resource = _resource()
    metric_reader = InMemoryMetricReader()
    exporting_readers = [PeriodicExportingMetricReader(e) for e in _exporters("metrics", settings.metrics)]
    meter_provider = MeterProvider(metric_readers=[metric_reader, *exporting_readers], resource=resource)

    span_exporter = InMemorySpanExporter()
    # The load span gets an event per admission, preemption and resumption: keep them all unless
    # the standard limit is set. Always sampled: the demo's chart needs the span.
    limits = SpanLimits() if SPAN_EVENT_COUNT_LIMIT in os.environ else SpanLimits(max_events=SpanLimits.UNSET)
    tracer_provider = TracerProvider(resource=resource, sampler=ALWAYS_ON, span_limits=limits)
    tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    for exporter in _exporters("traces", settings.traces):
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    return Telemetry(meter_provider, tracer_provider, metric_reader, span_exporter)


def _resource() -> Resource:
    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


@overload
def _exporters(signal: Literal["metrics"], export: SignalExport) -> Iterator[MetricExporter]: ...
@overload
def _exporters(signal: Literal["traces"], export: SignalExport) -> Iterator[SpanExporter]: ...
def _exporters(signal: str, export: SignalExport) -> Iterator[MetricExporter | SpanExporter]:
    for name in export.exporters:
        if name == "console":
            yield _CONSOLE_EXPORTERS[signal](out=sys.stderr)
        else:  # imported only when asked for: the gRPC exporter pulls in grpcio
            module, class_name = _OTLP_EXPORTERS[signal, export.protocol]
            yield getattr(importlib.import_module(module), class_name)()
