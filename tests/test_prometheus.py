"""A real Prometheus scrapes a real OpenAI server under load: the token series, checked with PromQL.

The server runs under ``opentelemetry-instrument --metrics_exporter prometheus`` (the
OpenTelemetry Prometheus exporter on its own port, job ``otel``); Prometheus also scrapes
vLLM's own ``/metrics`` (job ``vllm``), where the package adds ``vllm:kv_cache_*_tokens``.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass

import pytest

from tests.support.engine_load import LIMIT, blocks_for, distinct_prompts
from tests.support.instrumented_processes import (
    EXAMPLES,
    ServerProcess,
    free_port,
    instrumented_server,
    otel_environment,
)
from tests.support.prometheus_server import SCRAPE_INTERVAL_SECONDS, Prometheus, require_binary, running_prometheus

pytestmark = pytest.mark.engine

# Long enough that the cache stays full across several 1 s scrapes on a fast CPU: in float32 the
# tiny model served 16 x (300 + 500) tokens in 1.7 s, and a scrape could miss the peak.
REQUESTS, PROMPT_TOKENS, OUTPUT_TOKENS = 16, 300, 1500
ALERT_RULES = os.path.join(EXAMPLES, "prometheus", "alert-rules.yml")
# The OpenTelemetry Prometheus exporter registers in prometheus_client's default registry,
# which vLLM's /metrics also serves: its series appear under both jobs; read the exporter's.
USED = 'vllm_kv_cache_usage{job="otel", vllm_kv_cache_state="used"}'
FREE = 'vllm_kv_cache_usage{job="otel", vllm_kv_cache_state="free"}'
FULL = 0.9 * LIMIT
LIMIT_SERIES = 'vllm_kv_cache_limit{job="otel"}'
UTILIZATION = 'vllm_kv_cache_utilization{job="otel"}'


@dataclass
class ScrapedRun:
    prometheus: Prometheus
    server: ServerProcess
    relay_parent: str
    load_start: float
    load_end: float
    statuses: list[int]

    def window(self) -> str:
        """A PromQL range covering the whole run up to now."""
        return f"[{int(time.time() - self.load_start) + 30}s]"


@pytest.fixture(scope="module")
def scraped_run(tiny_model_dir, tmp_path_factory):
    require_binary("prometheus")
    exporter_port = free_port()
    relay_parent = str(tmp_path_factory.mktemp("relay"))
    env = otel_environment(
        OTEL_PYTHON_VLLM_KV_RELAY_DIR=relay_parent,
        OTEL_SERVICE_NAME="vllm-prometheus",
        OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
        OTEL_EXPORTER_PROMETHEUS_PORT=str(exporter_port),
        OTEL_PYTHON_VLLM_KV_RESIDENCY="true",  # as examples/zero_code.sh: the dashboard's holder row reads it
    )
    exporters = ["--metrics_exporter", "prometheus", "--traces_exporter", "none"]
    with instrumented_server(tiny_model_dir, env, exporters) as server:
        targets = {"otel": f"127.0.0.1:{exporter_port}", "vllm": f"127.0.0.1:{server.port}"}
        with running_prometheus(str(tmp_path_factory.mktemp("prometheus")), targets, [ALERT_RULES]) as prometheus:
            deadline = time.monotonic() + 30
            while prometheus.targets_up() != {"otel": 1.0, "vllm": 1.0}:
                assert time.monotonic() < deadline, prometheus.targets_up()
                time.sleep(SCRAPE_INTERVAL_SECONDS)
            load_start = time.time()
            results = server.complete_concurrently(distinct_prompts(REQUESTS, PROMPT_TOKENS), OUTPUT_TOKENS)
            load_end = time.time()
            time.sleep(4 * SCRAPE_INTERVAL_SECONDS)  # scrapes of the drained cache
            yield ScrapedRun(prometheus, server, relay_parent, load_start, load_end, [s for s, _ in results])


def test_the_load_completed_and_needed_more_than_the_cache(scraped_run):
    assert scraped_run.statuses == [200] * REQUESTS
    assert REQUESTS * blocks_for(PROMPT_TOKENS, OUTPUT_TOKENS) > LIMIT // 128, "the load oversubscribes the cache"


def test_opentelemetry_exporter_series_have_the_right_values(scraped_run):
    prometheus, window = scraped_run.prometheus, scraped_run.window()
    (limit,) = prometheus.query(LIMIT_SERIES)
    assert limit["metric"]["vllm_engine_index"] == "0" and limit["metric"]["gen_ai_request_model"] == "tiny"
    assert float(limit["value"][1]) == LIMIT
    # Scrapes are 1 s apart and blocks come and go: "full" is at least 90 % at some scrape.
    assert FULL <= prometheus.value(f"max_over_time({USED}{window})") <= LIMIT, "the load filled the cache"
    assert FULL / LIMIT <= prometheus.value(f"max_over_time({UTILIZATION}{window})") <= 1
    assert prometheus.value(USED) == 0 and prometheus.value(FREE) == LIMIT, "drained"
    scraped = prometheus.value(f"count_over_time({LIMIT_SERIES}{window})")
    assert scraped >= (scraped_run.load_end - scraped_run.load_start) / (SCRAPE_INTERVAL_SECONDS * 2)
    inconsistent = (
        f"(({USED} + ignoring(vllm_kv_cache_state) {FREE}) != ignoring(vllm_kv_cache_state) {LIMIT_SERIES})"
        f" or (abs({UTILIZATION} - ignoring(vllm_kv_cache_state) {USED} / {LIMIT_SERIES}) > 1e-12)"
    )
    assert prometheus.query(f"count_over_time(({inconsistent}){window[:-1]}:1s])") == [], (
        "used + free = limit and utilization = used / limit at every scrape"
    )


def test_block_evictable_and_headroom_series_agree_with_the_token_series(scraped_run):
    prometheus, window = scraped_run.prometheus, scraped_run.window()
    assert prometheus.value('vllm_kv_cache_block_limit{job="otel"}') == LIMIT // 128
    assert prometheus.value('vllm_kv_cache_block_usage{job="otel", vllm_kv_cache_state="free"}') == LIMIT // 128
    # No watermark: headroom is the free tokens, at every scrape.
    assert (
        prometheus.query(
            f'count_over_time((vllm_kv_cache_admission_headroom{{job="otel"}} != ignoring(vllm_kv_cache_state) {FREE})'
            f"{window[:-1]}:1s])"
        )
        == []
    )
    # The distinct prompts left their full blocks in the prefix cache: free, still evictable.
    evictable = prometheus.value('vllm_kv_cache_evictable{job="otel"}')
    assert 0 < evictable <= LIMIT and evictable % 128 == 0
    (group,) = prometheus.query('vllm_kv_cache_block_evictable{job="otel"}')
    assert group["metric"]["vllm_kv_cache_group_type"] == "full_attention"
    assert float(group["value"][1]) * 128 == evictable
    assert prometheus.value('vllm:kv_cache_evictable_tokens{job="vllm"}') == evictable


def test_vllm_metrics_endpoint_carries_the_token_gauges(scraped_run):
    prometheus, window = scraped_run.prometheus, scraped_run.window()
    (limit,) = prometheus.query('vllm:kv_cache_limit_tokens{job="vllm"}')
    assert limit["metric"]["engine"] == "0" and limit["metric"]["model_name"] == "tiny"
    assert float(limit["value"][1]) == LIMIT
    assert FULL <= prometheus.value(f'max_over_time(vllm:kv_cache_usage_tokens{{state="used"}}{window})') <= LIMIT
    assert prometheus.value('vllm:kv_cache_usage_tokens{state="used"}') == 0
    assert prometheus.value('vllm:kv_cache_usage_tokens{state="free"}') == LIMIT
    # Beside vLLM's own fraction, on the same endpoint and with the same labels.
    assert FULL / LIMIT <= prometheus.value(f"max_over_time(vllm:kv_cache_usage_perc{window})") <= 1
    assert prometheus.query(
        'vllm:kv_cache_usage_tokens{state="used"} / ignoring(state) vllm:kv_cache_limit_tokens'
        " == on(engine, model_name) vllm:kv_cache_usage_perc"
    ), "drained: both 0, and the labels match vLLM's"


def test_one_process_serves_the_exporter_port(scraped_run):
    # Engine processes under opentelemetry-instrument try the same port and fail, as they do
    # without this package (compared in test_topologies.py); the series come from one process.
    assert len(scraped_run.prometheus.query('target_info{job="otel"}')) == 1, "one exporting process"


def test_every_example_expression_returns_data(scraped_run):
    from tests.support.example_queries import promql_expressions

    prometheus = scraped_run.prometheus
    expressions = promql_expressions()
    assert expressions
    for where, expression in expressions:
        if expression.lstrip().startswith("absent("):
            # Returns data only once the series are gone: check that what it watches exists.
            inner = expression.strip()[len("absent(") : -1]
            assert prometheus.query_range(inner, scraped_run.load_start, time.time()), (where, inner)
            continue
        assert prometheus.query_range(expression, scraped_run.load_start, time.time()), (where, expression)


def test_a_killed_engine_core_leaves_nothing_behind(scraped_run):
    """Last in this module: SIGKILL the engine core; the server goes down, and its relay with it."""
    import psutil

    process = scraped_run.server.process
    (relay,) = os.listdir(scraped_run.relay_parent)
    assert os.listdir(os.path.join(scraped_run.relay_parent, relay)), "the engine's relay file"
    children = psutil.Process(process.pid).children(recursive=True)
    (engine_core,) = [child for child in children if "EngineCore" in child.name()]
    engine_core.kill()
    try:
        process.wait(60)  # vLLM's server shuts down when its engine dies
    except subprocess.TimeoutExpired:
        pytest.fail("the server kept running without its engine")
    assert os.listdir(scraped_run.relay_parent) == [], "the relay is removed when the server exits"
