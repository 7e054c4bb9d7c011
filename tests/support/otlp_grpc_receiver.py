"""A real OTLP/gRPC receiver for tests: grpcio serving opentelemetry-proto's collector services.

Records the same ``RecordedSpan`` / ``RecordedMetric`` items as opentelemetry-test-utils'
OTLP/HTTP ``OtlpProtoTestServer``, so tests read both transports alike.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.test._otlp_test_server import RecordedMetric, RecordedSpan


class OtlpGrpcReceiver(metrics_service_pb2_grpc.MetricsServiceServicer, trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: list[RecordedMetric] = []
        self._spans: list[RecordedSpan] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self._server)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request, context):  # noqa: N802 (the gRPC method name)
        with self._lock:
            if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
                for resource_metrics in request.resource_metrics:
                    for scope_metrics in resource_metrics.scope_metrics:
                        self._metrics.extend(
                            RecordedMetric(metric, resource_metrics.resource, scope_metrics.scope)
                            for metric in scope_metrics.metrics
                        )
                return metrics_service_pb2.ExportMetricsServiceResponse()
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    self._spans.extend(
                        RecordedSpan(span, resource_spans.resource, scope_spans.scope) for span in scope_spans.spans
                    )
            return trace_service_pb2.ExportTraceServiceResponse()

    def drain_metrics(self) -> list[RecordedMetric]:
        with self._lock:
            metrics, self._metrics = self._metrics, []
        return metrics

    def drain_spans(self) -> list[RecordedSpan]:
        with self._lock:
            spans, self._spans = self._spans, []
        return spans

    def __enter__(self) -> OtlpGrpcReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.stop(grace=None)
