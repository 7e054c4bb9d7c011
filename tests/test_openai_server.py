"""The OpenAI-compatible server under ``opentelemetry-instrument``, exporting OTLP to a receiver started here."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.test._otlp_test_server import OtlpProtoTestServer

from engine_load import BLOCK_SIZE, LIMIT, distinct_prompts
from otel_vllm_kv import span_attributes as names
from otel_vllm_kv.instruments import KV_CACHE_LIMIT

pytestmark = pytest.mark.engine
CONCURRENT_REQUESTS = 6


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _attributes(key_values) -> dict:
    result = {}
    for item in key_values:
        value = item.value
        result[item.key] = getattr(value, value.WhichOneof("value"))
    return result


def _post(port: int, prompt: str, results: list) -> None:
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 40, "ignore_eos": True}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        results.append((response.status, json.loads(response.read())))


def serve_and_load(model_dir: str, receiver: OtlpProtoTestServer, vllm_tracing: bool):
    """Start the server instrumented, send concurrent requests, stop it; return the responses and the OTLP data."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        OTEL_SERVICE_NAME="vllm-under-test",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
        OTEL_BSP_SCHEDULE_DELAY="200",
        OTEL_METRIC_EXPORT_INTERVAL="1000",
        OTEL_LOGS_EXPORTER="none",
    )
    command = [
        os.path.join(os.path.dirname(sys.executable), "opentelemetry-instrument"),
        "--traces_exporter", "otlp", "--metrics_exporter", "otlp",
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
        "--served-model-name", "tiny", "--load-format", "dummy", "--max-model-len", "2048",
        "--num-gpu-blocks-override", "64", "--enforce-eager", "--port", str(port),
    ]
    if vllm_tracing:
        command += ["--otlp-traces-endpoint", receiver.traces_endpoint]
    receiver.clear()
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr_lines: list[str] = []
    threading.Thread(target=lambda: stderr_lines.extend(server.stderr), daemon=True).start()
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, "server exited:\n" + "".join(stderr_lines[-60:])
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(1)
        results: list = []
        threads = [
            threading.Thread(target=_post, args=(port, prompt, results))
            for prompt in distinct_prompts(CONCURRENT_REQUESTS, 200, first=300)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        time.sleep(2.5)  # a metric export or two
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(90)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    spans = [recorded.span for recorded in receiver.drain_spans()]
    metrics = receiver.drain_metrics()
    return results, spans, metrics, "".join(stderr_lines)


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
    results, spans, metrics, stderr = serve_and_load(tiny_model_dir, receiver, vllm_tracing=False)
    assert [status for status, _ in results] == [200] * CONCURRENT_REQUESTS
    for _, body in results:
        assert "x-otel-vllm-kv" not in json.dumps(body), "nothing of the relay reaches a response"
    server_spans = completion_server_spans(spans)
    assert len(server_spans) == CONCURRENT_REQUESTS, stderr[-3000:]
    for span in server_spans:
        assert_admission_attributes(_attributes(span.attributes))
    assert not [s for s in spans if s.name == "llm_request"], "vLLM tracing is off"
    limits = [m for m in metrics if m.metric.name == KV_CACHE_LIMIT]
    assert limits, "the gauges reach the OTLP receiver"
    exporters = {tuple(sorted(_attributes(m.resource.attributes).items())) for m in limits}
    assert len(exporters) == 1, "only the instrumented server process exports the gauges"
    assert limits[-1].metric.gauge.data_points[0].as_int == LIMIT


def test_vllm_request_spans_are_annotated_children_of_the_server_spans(tiny_model_dir, receiver):
    results, spans, _, stderr = serve_and_load(tiny_model_dir, receiver, vllm_tracing=True)
    assert [status for status, _ in results] == [200] * CONCURRENT_REQUESTS
    server_spans = {span.span_id: span for span in completion_server_spans(spans)}
    vllm_spans = [s for s in spans if s.name == "llm_request"]
    assert len(vllm_spans) == len(server_spans) == CONCURRENT_REQUESTS, stderr[-3000:]
    for span in vllm_spans:
        attributes = _attributes(span.attributes)
        assert_admission_attributes(attributes)
        assert attributes[names.REQUEST_PREEMPTIONS] == 0
        parent = server_spans[span.parent_span_id]
        assert parent.trace_id == span.trace_id
        assert _attributes(parent.attributes)[names.REQUEST_KV_TOKENS] == attributes[names.REQUEST_KV_TOKENS]
