"""Traces and gauges where people read them: Arize Phoenix's trace UI and Prometheus's graph, in headless Chromium.

One ``vllm serve`` on the tiny model, under ``opentelemetry-instrument``, exports its traces by
OTLP/HTTP to a real Phoenix (the HTTP server spans, and vLLM's own ``llm_request`` spans through
``--otlp-traces-endpoint``), while a real Prometheus scrapes vLLM's ``/metrics`` (where the package
publishes ``vllm:kv_cache_*_tokens``). A load of 16 requests needs more than twice the cache, so
vLLM queues and preempts. Then:

- Phoenix's REST API: every server span carries the admission attributes, preempted requests
  carry their preemption and resumption events, each ``llm_request`` sits under its server span;
- Phoenix's UI on the slowest request's trace: a screenshot (artifacts/trace-ui.png) whose
  rendered page shows the admission attributes, keys and values;
- Prometheus's graph of the token gauges over the run: a screenshot (artifacts/prometheus-ui.png)
  whose rendered page shows both series.

``UPDATE_DOCS_SCREENSHOTS=1`` writes them into docs/ instead (docs/debugging.md shows them).

Phoenix starts while the engine does (each takes 15-30 s): one engine start for the module.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import urllib.parse
from dataclasses import dataclass
from datetime import datetime

import pytest

from otel_vllm_kv import names
from otel_vllm_kv.demo.tiny_model import server_arguments
from tests.support.browser import capture, require_chromium
from tests.support.engine_load import BLOCK_SIZE, LIMIT, blocks_for, distinct_prompts
from tests.support.instrumented_processes import (
    OPENTELEMETRY_INSTRUMENT,
    ROOT,
    VLLM,
    free_port,
    otel_environment,
    vllm_process,
)
from tests.support.phoenix import (
    PROJECT_RESOURCE_ATTRIBUTE,
    Phoenix,
    PhoenixSpan,
    require_phoenix,
    running_phoenix,
    wait_healthy,
)
from tests.support.prometheus_server import SCRAPE_INTERVAL_SECONDS, Prometheus, require_binary, running_prometheus

pytestmark = [pytest.mark.engine, pytest.mark.trace_ui]

PROJECT = "vllm-kv-trace-ui"
#: 16 requests of 11 blocks each at their end: 176 blocks wanted, 63 in the cache; vLLM queues and preempts.
REQUESTS, PROMPT_TOKENS, OUTPUT_TOKENS = 16, 300, 1000
PROMPTS = distinct_prompts(REQUESTS, PROMPT_TOKENS, first=900)
SERVER_SPAN = "POST /v1/completions"
VLLM_REQUEST_SPAN = "llm_request"
#: What the server span of every request carries once it was admitted, with the default settings too.
ADMISSION_ATTRIBUTES = (
    names.ENGINE_INDEX,
    names.ADMISSION_USED_TOKENS,
    names.ADMISSION_FREE_TOKENS,
    names.ADMISSION_LIMIT_TOKENS,
    names.ADMISSION_UTILIZATION,
    names.ADMISSION_USED_BLOCKS,
    names.ADMISSION_FREE_BLOCKS,
    names.REQUEST_KV_BLOCKS,
    names.REQUEST_KV_TOKENS,
    names.CACHE_READ_INPUT_TOKENS,
    names.ADMISSION_QUEUE_DURATION,
    names.ADMISSION_WAITING_REQUESTS,
)
#: The rest of a slow request's story: its preemptions, and what it held and recomputed (residency on).
STORY_ATTRIBUTES = (
    names.REQUEST_PREEMPTIONS,
    names.REQUEST_KV_TOKEN_SECONDS,
    names.REQUEST_KV_PEAK_TOKENS,
    names.REQUEST_KV_RECOMPUTED_TOKENS,
)
#: The token gauges on vLLM's /metrics (state used and free), as Prometheus graphs them.
GAUGE_EXPRESSION = names.PROMETHEUS_USAGE_TOKENS
#: Where the screenshots go: artifacts/ (ignored by git); docs/ with ``UPDATE_DOCS_SCREENSHOTS=1``, for
#: docs/debugging.md, whose text must then be checked against them.
SCREENSHOTS = os.path.join(ROOT, "docs" if os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1" else "artifacts")
TRACE_SCREENSHOT = os.path.join(SCREENSHOTS, "trace-ui.png")
PROMETHEUS_SCREENSHOT = os.path.join(SCREENSHOTS, "prometheus-ui.png")
#: Tall enough for the server span's whole attribute table (HTTP attributes and the package's).
TRACE_WINDOW = (1600, 1800)
PROMETHEUS_WINDOW = (1400, 900)
#: Seconds of the Prometheus graph before the load (the idle cache).
GRAPH_MARGIN_SECONDS = 3


@dataclass
class TraceRun:
    phoenix: Phoenix
    prometheus: Prometheus
    statuses: list[int]
    spans: list[PhoenixSpan]
    load_start: float
    prometheus_page: str
    """The text of Prometheus's graph of the token gauges over the run (docs/prometheus-ui.png)."""
    stderr: str

    def named(self, name: str) -> list[PhoenixSpan]:
        return [span for span in self.spans if span.name == name]

    @property
    def server_spans(self) -> list[PhoenixSpan]:
        return self.named(SERVER_SPAN)

    def slowest(self) -> PhoenixSpan:
        return max(self.server_spans, key=duration)

    def fastest(self) -> PhoenixSpan:
        return min(self.server_spans, key=duration)


def duration(span: PhoenixSpan) -> float:
    return (datetime.fromisoformat(span.end_time) - datetime.fromisoformat(span.start_time)).total_seconds()


def _complete(spans: list[PhoenixSpan]) -> bool:
    """Every request's server span and its ``llm_request``."""
    return (
        len([s for s in spans if s.name == SERVER_SPAN]) >= REQUESTS
        and len([s for s in spans if s.name == VLLM_REQUEST_SPAN]) >= REQUESTS
    )


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    require_phoenix()
    require_chromium()
    require_binary("prometheus")
    os.makedirs(SCREENSHOTS, exist_ok=True)
    with contextlib.ExitStack() as services:
        # Phoenix and the engine take 15-30 s each to start: they start together. Prometheus, which
        # takes up new targets every 5 s, starts first, on the server's port to come.
        phoenix = services.enter_context(running_phoenix(str(tmp_path_factory.mktemp("phoenix")), wait=False))
        port = free_port()
        prometheus = services.enter_context(
            running_prometheus(str(tmp_path_factory.mktemp("prometheus")), {"vllm": f"127.0.0.1:{port}"})
        )
        env = otel_environment(
            OTEL_SERVICE_NAME="vllm-trace-ui",
            OTEL_RESOURCE_ATTRIBUTES=f"{PROJECT_RESOURCE_ATTRIBUTE}={PROJECT}",
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="http/protobuf",
            OTEL_EXPORTER_OTLP_ENDPOINT=phoenix.url(""),
            OTEL_PYTHON_VLLM_KV_RESIDENCY="true",  # what each request held, and recomputed: the story's last word
        )
        # ``instrumented_server``'s command, on a port chosen here.
        command = [
            OPENTELEMETRY_INSTRUMENT,
            *("--traces_exporter", "otlp", "--metrics_exporter", "none"),
            *(VLLM, "serve", *server_arguments(tiny_model_dir), "--port", str(port)),
            *("--otlp-traces-endpoint", phoenix.traces_endpoint),
        ]
        with vllm_process(command, env, port) as server:
            wait_healthy(phoenix)
            deadline = time.monotonic() + 30
            while prometheus.targets_up() != {"vllm": 1.0}:
                assert time.monotonic() < deadline, prometheus.targets_up()
                time.sleep(SCRAPE_INTERVAL_SECONDS / 4)
            time.sleep(2 * SCRAPE_INTERVAL_SECONDS)  # the graph starts on the idle cache
            load_start = time.time()
            results = server.complete_concurrently(PROMPTS, OUTPUT_TOKENS)
            spans = phoenix.wait_for_spans(PROJECT, _complete)
            time.sleep(SCRAPE_INTERVAL_SECONDS)  # a scrape of the drained cache
            prometheus_page = capture_prometheus_graph(prometheus, load_start)
        statuses = [status for status, _ in results]
        yield TraceRun(phoenix, prometheus, statuses, spans, load_start, prometheus_page, server.stderr)


def test_the_load_needed_more_than_the_cache(run):
    assert run.statuses == [200] * REQUESTS, run.stderr[-3000:]
    assert REQUESTS * blocks_for(PROMPT_TOKENS, OUTPUT_TOKENS) > 2 * LIMIT // BLOCK_SIZE


def test_every_server_span_in_phoenix_carries_the_admission_attributes(run):
    server_spans = run.server_spans
    assert len(server_spans) == REQUESTS, (sorted({s.name for s in run.spans}), run.stderr[-3000:])
    for span in server_spans:
        attributes = span.attributes
        missing = [key for key in ADMISSION_ATTRIBUTES if key not in attributes]
        assert not missing, f"{span.span_id}: {missing} not in {sorted(attributes)}"
        # Phoenix keeps the attribute types: counts are integers, fractions and seconds floats.
        used, free = attributes[names.ADMISSION_USED_TOKENS], attributes[names.ADMISSION_FREE_TOKENS]
        assert all(type(attributes[key]) is int for key in (names.ADMISSION_USED_TOKENS, names.REQUEST_KV_TOKENS))
        assert attributes[names.ADMISSION_LIMIT_TOKENS] == LIMIT and used + free == LIMIT
        # Its blocks at admission: the prompt's, or its first chunk's when the step's token budget ran out.
        own = attributes[names.REQUEST_KV_TOKENS]
        assert 0 < own <= blocks_for(PROMPT_TOKENS, 1) * BLOCK_SIZE and own % BLOCK_SIZE == 0 and own <= used
        assert attributes[names.REQUEST_KV_BLOCKS] * BLOCK_SIZE == own
        assert attributes[names.ADMISSION_UTILIZATION] == pytest.approx(used / LIMIT)
        assert 0 <= attributes[names.ADMISSION_WAITING_REQUESTS] < REQUESTS
        assert isinstance(attributes[names.ADMISSION_QUEUE_DURATION], float)
        assert 0 <= attributes[names.ADMISSION_QUEUE_DURATION] < duration(span)


def test_preempted_requests_carry_their_preemption_and_resumption_events(run):
    preempted = [s for s in run.server_spans if names.EVENT_PREEMPTED in s.event_names()]
    assert preempted, "the load made vLLM preempt"
    # A resumption finds some of its blocks still cached, never all: its partial last block is recomputed
    # (unless its tokens filled whole blocks at the preemption, so not asserted per request).
    assert any(span.attributes[names.REQUEST_KV_RECOMPUTED_TOKENS] > 0 for span in preempted)
    for span in run.server_spans:
        events = span.event_names()
        count = events.count(names.EVENT_PREEMPTED)
        assert events.count(names.EVENT_RESUMED) == count, events
        assert span.attributes[names.REQUEST_PREEMPTIONS] == count, "0 too: a row in the trace view"
        waits = [
            event["attributes"][names.ADMISSION_QUEUE_DURATION]
            for event in span.events
            if event["name"] == names.EVENT_RESUMED
        ]
        assert span.attributes.get(names.REQUEST_PREEMPTED_DURATION) == (pytest.approx(sum(waits)) if count else None)
        if not count:
            assert span.attributes[names.REQUEST_KV_RECOMPUTED_TOKENS] == 0
        for event in span.events:
            if event["name"] == names.EVENT_RESUMED:
                assert event["attributes"][names.ADMISSION_QUEUE_DURATION] >= 0
                assert event["attributes"][names.ADMISSION_LIMIT_TOKENS] == LIMIT
            elif event["name"] == names.EVENT_PREEMPTED:
                assert event["attributes"][names.ADMISSION_LIMIT_TOKENS] == LIMIT


def test_each_llm_request_span_sits_under_its_server_span(run):
    """vLLM parents ``llm_request`` on the request's ``traceparent`` header; these requests send none, and
    vLLM alone makes each a root span (its output handler runs outside the request's context). The package
    parents it on the span current when the request was submitted: the HTTP server span."""
    server_spans = {span.span_id: span for span in run.server_spans}
    vllm_spans = run.named(VLLM_REQUEST_SPAN)
    assert len(vllm_spans) == REQUESTS
    parents = [span.parent_id for span in vllm_spans]
    assert set(parents) <= set(server_spans), "every llm_request has a server span as its parent"
    assert len(set(parents)) == REQUESTS, "one llm_request under each server span"
    for span in vllm_spans:
        parent = server_spans[span.parent_id]
        assert parent.trace_id == span.trace_id
        for key in (names.ADMISSION_USED_TOKENS, names.REQUEST_KV_TOKENS, names.ADMISSION_QUEUE_DURATION):
            assert span.attributes[key] == parent.attributes[key], key
        assert span.attributes[names.REQUEST_PREEMPTIONS] == parent.attributes.get(names.REQUEST_PREEMPTIONS, 0)


def displayed_values(text: str, keys: tuple[str, ...]) -> dict[str, str]:
    """The value shown after each key in a rendered attribute table (one text node per line)."""
    lines = text.splitlines()
    return {key: lines[lines.index(key) + 1] for key in keys if key in lines}


def test_phoenix_shows_the_slowest_requests_admission_attributes(run):
    slowest = run.slowest()
    page = run.phoenix.span_page(slowest.span_id)
    text = capture(page, TRACE_SCREENSHOT, TRACE_WINDOW)
    assert slowest.trace_id in text and SERVER_SPAN in text and VLLM_REQUEST_SPAN in text, text[:2000]
    # What the story of a slow request needs: the pool at admission, the wait, and how often it was preempted.
    keys = (*ADMISSION_ATTRIBUTES, *STORY_ATTRIBUTES)
    keys += (names.REQUEST_PREEMPTED_DURATION,) * (names.REQUEST_PREEMPTED_DURATION in slowest.attributes)
    shown = displayed_values(text, keys)
    assert set(shown) == set(keys), f"not shown: {set(keys) - set(shown)}"
    for key, value in shown.items():
        expected = slowest.attributes[key]
        assert float(value) == pytest.approx(expected, rel=1e-9), f"{key}: shows {value!r}, the span has {expected!r}"
    assert f"Events\n{len(slowest.events)}" in text, "the Events tab counts the preemptions and resumptions"


def capture_prometheus_graph(prometheus: Prometheus, load_start: float) -> str:
    """Prometheus's graph of the token gauges from just before the load to now, while the server still
    runs (the graph ends now: its end time input keeps whole minutes only). The rendered page's text."""
    seconds = math.ceil(time.time() - load_start) + GRAPH_MARGIN_SECONDS
    query = urllib.parse.urlencode({"g0.expr": GAUGE_EXPRESSION, "g0.tab": "0", "g0.range_input": f"{seconds}s"})
    return capture(f"http://127.0.0.1:{prometheus.port}/graph?{query}", PROMETHEUS_SCREENSHOT, PROMETHEUS_WINDOW)


def test_prometheus_graphs_the_token_gauges_over_the_run(run):
    seconds = math.ceil(time.time() - run.load_start) + GRAPH_MARGIN_SECONDS
    used = f'{GAUGE_EXPRESSION}{{state="used"}}'
    assert run.prometheus.value(f"max_over_time({used}[{seconds}s])") >= LIMIT // 2, "the graph shows the load"
    assert run.prometheus.value(f"last_over_time({used}[{seconds}s])") == 0, "and drained"
    lines = run.prometheus_page.splitlines()
    legend = [line for line in lines if line.startswith(GAUGE_EXPRESSION + "{")]
    assert len(legend) == 2, run.prometheus_page[-2000:]
    for state in (names.KV_CACHE_STATE_USED, names.KV_CACHE_STATE_FREE):
        assert any(f'state="{state}"' in line and 'model_name="tiny"' in line for line in legend), legend
    assert "Total time series: 2" in lines, run.prometheus_page[-2000:]
    assert not [line for line in lines if line.startswith(("No datapoints", "Error"))], run.prometheus_page[-2000:]
