"""The OpenAI-compatible server under ``opentelemetry-instrument``, exporting OTLP to a receiver started here."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.test._otlp_test_server import OtlpProtoTestServer, RecordedMetric, RecordedSpan

from otel_vllm_kv import names
from otel_vllm_kv.names import KV_CACHE_LIMIT
from tests.support.engine_load import BLOCK_SIZE, LIMIT, distinct_prompts
from tests.support.instrumented_processes import (
    exporting_resources,
    instrumented_server,
    otel_environment,
    otlp_attributes,
)

pytestmark = pytest.mark.engine
CONCURRENT_REQUESTS = 6
PROMPTS = distinct_prompts(CONCURRENT_REQUESTS, 200, first=300)


def serve_and_load(model_dir: str, receiver: OtlpProtoTestServer, vllm_tracing: bool):
    """Start the server instrumented, send concurrent requests, stop it; return the responses and the OTLP data."""
    env = otel_environment(
        OTEL_SERVICE_NAME="vllm-under-test",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
    )
    vllm_args = ["--otlp-traces-endpoint", receiver.traces_endpoint] if vllm_tracing else []
    receiver.clear()
    with instrumented_server(
        model_dir, env, ["--traces_exporter", "otlp", "--metrics_exporter", "otlp"], vllm_args
    ) as server:
        results = server.complete_concurrently(PROMPTS, max_tokens=40)
        time.sleep(2.5)  # a metric export or two
    recorded = [*receiver.drain_spans(), *receiver.drain_metrics()]
    assert_no_request_content(recorded, results)
    return ServerRun(
        results=results,
        spans=[item.span for item in recorded if isinstance(item, RecordedSpan)],
        metrics=[item for item in recorded if isinstance(item, RecordedMetric)],
        stderr=server.stderr,
        kv_exporters=exporting_resources(
            [item for item in recorded if isinstance(item, RecordedMetric) and item.metric.name == KV_CACHE_LIMIT]
        ),
    )


def assert_no_request_content(recorded: list, results: list) -> None:
    """Privacy audit of everything exported: no prompt or completion text, no token ids, no request ids in metrics."""
    texts = [prompt[:12] for prompt in PROMPTS] + [body["choices"][0]["text"][:12] for _, body in results]
    request_ids = [body["id"] for _, body in results]
    for item in recorded:
        wire = (item.span if isinstance(item, RecordedSpan) else item.metric).SerializeToString()
        for text in texts:
            assert text.encode() not in wire, f"{text!r} exported"
        if isinstance(item, RecordedMetric):
            assert not any(request_id.encode() in wire for request_id in request_ids)
        for attributes in _attribute_lists(item):
            for key, value in otlp_attributes(attributes).items():
                assert not hasattr(value, "values"), f"{key}: no array attributes (token ids) are exported"


def _attribute_lists(item) -> list:
    if isinstance(item, RecordedSpan):
        return [item.span.attributes, *(event.attributes for event in item.span.events)]
    metric = item.metric
    points = getattr(metric, metric.WhichOneof("data")).data_points
    return [point.attributes for point in points]


@dataclass
class ServerRun:
    results: list
    spans: list
    metrics: list
    stderr: str
    kv_exporters: set[tuple]


@pytest.fixture(scope="module")
def receiver():
    with OtlpProtoTestServer() as server:
        yield server


def completion_server_spans(spans: list) -> list:
    return [s for s in spans if s.kind == Span.SPAN_KIND_SERVER and s.name.startswith("POST /v1/completions")]


def assert_admission_attributes(attributes: dict) -> None:
    used = attributes[names.ADMISSION_USED_TOKENS]
    assert attributes[names.ADMISSION_LIMIT_TOKENS] == LIMIT
    assert used + attributes[names.ADMISSION_FREE_TOKENS] == LIMIT
    assert 2 * BLOCK_SIZE == attributes[names.REQUEST_KV_TOKENS] <= used <= LIMIT  # a 200-token prompt
    assert 0 <= attributes[names.ADMISSION_WAITING_REQUESTS] < CONCURRENT_REQUESTS
    assert attributes[names.ADMISSION_QUEUE_DURATION] >= 0


def test_server_spans_carry_the_admission_attributes(tiny_model_dir, receiver):
    run = serve_and_load(tiny_model_dir, receiver, vllm_tracing=False)
    results, spans, metrics, stderr = run.results, run.spans, run.metrics, run.stderr
    assert len(run.kv_exporters) == 1, "one process exports the gauges"
    assert [status for status, _ in results] == [200] * CONCURRENT_REQUESTS
    for _, body in results:
        assert "x-otel-vllm-kv" not in json.dumps(body), "nothing of the relay reaches a response"
    server_spans = completion_server_spans(spans)
    assert len(server_spans) == CONCURRENT_REQUESTS, stderr[-3000:]
    for span in server_spans:
        assert_admission_attributes(otlp_attributes(span.attributes))
    assert not [s for s in spans if s.name == "llm_request"], "vLLM tracing is off"
    limits = [m for m in metrics if m.metric.name == KV_CACHE_LIMIT]
    assert limits, "the gauges reach the OTLP receiver"
    assert limits[-1].metric.gauge.data_points[0].as_int == LIMIT


def test_vllm_request_spans_are_annotated_children_of_the_server_spans(tiny_model_dir, receiver):
    run = serve_and_load(tiny_model_dir, receiver, vllm_tracing=True)
    results, spans, stderr = run.results, run.spans, run.stderr
    assert len(run.kv_exporters) == 1, "one process exports the gauges"
    assert [status for status, _ in results] == [200] * CONCURRENT_REQUESTS
    server_spans = {span.span_id: span for span in completion_server_spans(spans)}
    vllm_spans = [s for s in spans if s.name == "llm_request"]
    assert len(vllm_spans) == len(server_spans) == CONCURRENT_REQUESTS, stderr[-3000:]
    for span in vllm_spans:
        attributes = otlp_attributes(span.attributes)
        assert_admission_attributes(attributes)
        assert attributes[names.REQUEST_PREEMPTIONS] == 0
        parent = server_spans[span.parent_span_id]
        assert parent.trace_id == span.trace_id
        assert otlp_attributes(parent.attributes)[names.REQUEST_KV_TOKENS] == attributes[names.REQUEST_KV_TOKENS]
