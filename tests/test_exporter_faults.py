"""The OTLP endpoint refuses, hangs, dies and comes back while the instrumented server serves requests.

One OpenAI server under ``opentelemetry-instrument`` exports OTLP/HTTP to a fixed port;
the test changes what answers on that port. Requests must all complete, never wait for an
export, and the gauges and annotated spans must resume once a receiver is back.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from opentelemetry.test._otlp_test_server import OtlpProtoTestServer

from otel_vllm_kv import names
from otel_vllm_kv.names import KV_CACHE_LIMIT
from tests.support.engine_load import LIMIT, distinct_prompts
from tests.support.instrumented_processes import (
    free_port,
    instrumented_server,
    otel_environment,
    otlp_attributes,
    package_complaints,
)

pytestmark = pytest.mark.engine

EXPORT_TIMEOUT_SECONDS = 30
REQUESTS_PER_PHASE = 6


def timed_requests(server, first: int) -> list[tuple[int, float]]:
    """Concurrent completions; (status, seconds) of each."""
    results: list = []

    def one(prompt: str) -> None:
        start = time.monotonic()
        status, _ = server.complete(prompt, max_tokens=48)
        results.append((status, time.monotonic() - start))

    threads = [threading.Thread(target=one, args=(p,)) for p in distinct_prompts(REQUESTS_PER_PHASE, 150, first)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def wait_for_gauges(receiver: OtlpProtoTestServer, seconds: float = 20) -> list:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        limits = [m for m in receiver.drain_metrics() if m.metric.name == KV_CACHE_LIMIT]
        if limits:
            return limits
        time.sleep(0.5)
    return []


def test_requests_never_wait_for_a_failing_exporter_and_telemetry_resumes(tiny_model_dir):
    port = free_port()
    env = otel_environment(
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_EXPORTER_OTLP_TIMEOUT=str(EXPORT_TIMEOUT_SECONDS * 1000),  # milliseconds (SDK >= 1.32)
    )
    exporters = ["--traces_exporter", "otlp", "--metrics_exporter", "otlp"]
    phases: dict[str, list[tuple[int, float]]] = {}
    with instrumented_server(tiny_model_dir, env, exporters) as server:
        phases["refused"] = timed_requests(server, first=0)  # nothing listens on the port

        hanging = socket.socket()  # accepts connections in the kernel, never answers
        hanging.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hanging.bind(("127.0.0.1", port))
        hanging.listen(64)
        time.sleep(2)  # let an export start and hang
        phases["hanging"] = timed_requests(server, first=100)
        hanging.close()

        with OtlpProtoTestServer(port=port) as receiver:
            assert wait_for_gauges(receiver), "metrics resume once a receiver answers"
            phases["restored"] = timed_requests(server, first=200)
            killer = threading.Timer(1.0, receiver.stop)  # the receiver dies mid-phase
            killer.start()
            phases["killed mid-run"] = timed_requests(server, first=300)
            killer.join()
        time.sleep(2)
        with OtlpProtoTestServer(port=port) as receiver:
            limits = wait_for_gauges(receiver)
            assert limits and limits[-1].metric.gauge.data_points[0].as_int == LIMIT, "and after a second restart"
            phases["after restart"] = timed_requests(server, first=400)
            # An exporter still backing off from the failures sends them once its retry ends.
            annotated: list = []
            deadline = time.monotonic() + EXPORT_TIMEOUT_SECONDS + 15
            while len(annotated) < REQUESTS_PER_PHASE and time.monotonic() < deadline:
                time.sleep(1)
                annotated += [
                    r.span
                    for r in receiver.drain_spans()
                    if names.ADMISSION_LIMIT_TOKENS in otlp_attributes(r.span.attributes)
                ]

    for phase, results in phases.items():
        assert [status for status, _ in results] == [200] * REQUESTS_PER_PHASE, phase
        slowest = max(seconds for _, seconds in results)
        assert slowest < EXPORT_TIMEOUT_SECONDS / 2, f"{phase}: a request waited {slowest:.1f} s"
    assert len(annotated) >= REQUESTS_PER_PHASE, "spans of the last phase arrive annotated"
    stderr = server.stderr
    assert package_complaints(stderr) == [], stderr[-3000:]
