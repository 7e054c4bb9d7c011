"""300 concurrent streams against the instrumented OpenAI server, a fifth aborted by the client mid-stream.

Rounds repeat the load on one server: no server error, every completed request's server
span annotated, no request left in the package's frontend table, memory flat across rounds.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import aiohttp
import psutil
import pytest
from opentelemetry.test._otlp_test_server import OtlpProtoTestServer

from otel_vllm_kv import names
from tests.support.instrumented_processes import (
    instrumented_server,
    otel_environment,
    otlp_attributes,
    package_complaints,
)

pytestmark = pytest.mark.engine

STREAMS, ABORT_EVERY, ROUNDS = 300, 5, 3
MAX_TOKENS = 24
COMPLETED = STREAMS - STREAMS // ABORT_EVERY
INSPECTABLE_SERVER = os.path.join(os.path.dirname(__file__), "scenarios", "inspectable_api_server.py")


async def one_stream(session: aiohttp.ClientSession, url: str, index: int) -> str:
    """'completed' (all tokens and [DONE]) or 'aborted' (the client hung up after the first chunk)."""
    abort = index % ABORT_EVERY == 0
    # Aborted streams ask for many tokens, so they are still running when the client hangs up.
    max_tokens = 20 * MAX_TOKENS if abort else MAX_TOKENS
    body = {
        "model": "tiny",
        "prompt": f"{index:05d} " * 6,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    generated = None
    async with session.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                assert generated == MAX_TOKENS, f"stream {index}: {generated} tokens"
                return "completed"
            chunk = json.loads(line[6:])
            assert "error" not in chunk, line
            if chunk.get("usage"):
                generated = chunk["usage"]["completion_tokens"]
            if abort:
                response.close()  # the client disconnects mid-stream
                return "aborted"
    raise AssertionError(f"stream {index} ended without [DONE]")


async def one_round(port: int) -> list[str]:
    url = f"http://127.0.0.1:{port}/v1/completions"
    connector = aiohttp.TCPConnector(limit=STREAMS)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        return await asyncio.gather(*(one_stream(session, url, index) for index in range(STREAMS)))


def engine_core_rss(server_pid: int) -> int:
    children = psutil.Process(server_pid).children(recursive=True)
    (engine_core,) = [child for child in children if "EngineCore" in child.name()]
    return engine_core.memory_info().rss


def server_state(server) -> dict:
    import urllib.request

    with urllib.request.urlopen(server.url("/test/otel-vllm-kv"), timeout=30) as response:
        return json.loads(response.read())


def test_300_streams_with_aborts_leave_no_state_and_no_errors(tiny_model_dir):
    rounds = []
    with OtlpProtoTestServer() as receiver:
        env = otel_environment(
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
            OTEL_BSP_MAX_QUEUE_SIZE="100000",  # ASGI adds a span per streamed chunk: keep them all
            OTEL_BSP_MAX_EXPORT_BATCH_SIZE="4096",
        )
        exporters = ["--traces_exporter", "otlp", "--metrics_exporter", "otlp"]
        with instrumented_server(
            tiny_model_dir, env, exporters, program=(sys.executable, INSPECTABLE_SERVER)
        ) as server:
            for _ in range(ROUNDS):
                started = time.monotonic()
                outcomes = asyncio.run(one_round(server.port))
                time.sleep(2)  # let the aborts and the last outputs settle
                state = server_state(server)
                rounds.append(
                    {
                        "seconds": time.monotonic() - started,
                        "completed": outcomes.count("completed"),
                        "aborted": outcomes.count("aborted"),
                        "tracked": state["tracked_requests"],
                        "server_rss": state["rss_bytes"],
                        "engine_rss": engine_core_rss(server.process.pid),
                    }
                )
            time.sleep(3)
            recorded = receiver.drain_spans()
        stderr = server.stderr
    print(json.dumps(rounds, indent=1))  # figures for the README's Reliability section (pytest -s)

    for measured in rounds:
        assert (measured["completed"], measured["aborted"]) == (COMPLETED, STREAMS - COMPLETED)
        assert measured["tracked"] == 0, "no request left in the frontend table"
    server_spans = [r.span for r in recorded if r.span.name == "POST /v1/completions"]
    assert len(server_spans) == ROUNDS * STREAMS
    annotated = [s for s in server_spans if names.ADMISSION_LIMIT_TOKENS in otlp_attributes(s.attributes)]
    assert len(annotated) >= ROUNDS * COMPLETED, "every completed request's span"
    errors = [s for s in server_spans if s.status.code == s.status.STATUS_CODE_ERROR]
    assert errors == [], "no server errors"
    for process in ("server_rss", "engine_rss"):
        growth = rounds[-1][process] - rounds[1][process]
        assert growth < 0.05 * rounds[1][process], f"{process} grew {growth / 2**20:.1f} MiB from round 2 to 3"
    assert "Traceback" not in stderr and package_complaints(stderr) == [], stderr[-3000:]
