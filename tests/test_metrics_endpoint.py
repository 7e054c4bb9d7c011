"""The token gauges on vLLM's own Prometheus registry, on a real Scheduler in this process."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from otel_vllm_kv import VLLMKVCacheInstrumentor, names
from otel_vllm_kv.relay_reader import SnapshotReader
from tests.support.instrumented_processes import support_pythonpath
from tests.support.schedulers import Stepper, build_scheduler, make_request
from tests.support.telemetry import new_reader

FAMILIES = tuple(names.PROMETHEUS_FAMILIES)


def scrape(registry=REGISTRY) -> dict[tuple, float]:
    """What vLLM's /metrics would serve now, for the package's families: {(name, labels...): value}."""
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.name in FAMILIES:
                samples[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return samples


@pytest.fixture
def instrumented(monkeypatch):
    def instrument(**settings: str) -> None:
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        VLLMKVCacheInstrumentor().instrument(meter_provider=new_reader()[1])

    yield instrument
    VLLMKVCacheInstrumentor().uninstrument()


def test_registry_serves_tokens_per_engine_with_vllms_labels(instrumented, tiny_model_dir):
    instrumented()
    scheduler = build_scheduler(tiny_model_dir, num_blocks=11, block_size=16, served_model_name="tiny", watermark=0.2)
    stepper = Stepper(scheduler)
    scheduler.add_request(make_request(scheduler, num_prompt_tokens=40, max_tokens=5))
    stepper.run_until_idle()  # 2 full blocks stay cached
    scheduler.add_request(make_request(scheduler, num_prompt_tokens=40, max_tokens=100, first_token=500))
    stepper.step()
    labels = (("engine", "0"), ("model_name", "tiny"))
    assert scrape() == {
        (names.PROMETHEUS_USAGE_TOKENS, *labels, ("state", "used")): 48.0,
        (names.PROMETHEUS_USAGE_TOKENS, *labels, ("state", "free")): 112.0,
        (names.PROMETHEUS_LIMIT_TOKENS, *labels): 160.0,
        (names.PROMETHEUS_EVICTABLE_TOKENS, *labels): 32.0,
        (names.PROMETHEUS_HEADROOM_TOKENS, *labels): (7 - 2) * 16.0,  # watermark: int(0.2 x 11) = 2 blocks
    }


def test_setting_false_keeps_the_registry_unchanged(instrumented, tiny_model_dir):
    instrumented(OTEL_PYTHON_VLLM_KV_VLLM_METRICS="false")
    build_scheduler(tiny_model_dir)
    assert scrape() == {}


def test_uninstrument_removes_the_collector(tiny_model_dir):
    VLLMKVCacheInstrumentor().instrument(meter_provider=new_reader()[1])
    scheduler = build_scheduler(tiny_model_dir)
    assert scrape()
    VLLMKVCacheInstrumentor().uninstrument()
    assert scrape() == {}
    del scheduler


def test_a_failing_relay_never_breaks_the_endpoint(instrumented, tiny_model_dir, monkeypatch, caplog):
    instrumented()
    build_scheduler(tiny_model_dir)

    def broken_read(self):
        raise OSError("relay gone")

    monkeypatch.setattr(SnapshotReader, "read", broken_read)
    with caplog.at_level(logging.WARNING, logger="otel_vllm_kv"):
        for _ in range(3):
            assert scrape() == {}  # and generate_latest did not raise: the rest of /metrics is served
    warnings = [r for r in caplog.records if r.name.startswith("otel_vllm_kv")]
    assert len(warnings) == 1 and "/metrics" in warnings[0].getMessage()


API_SERVER_SCRAPE = """
import json, sys
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from tests.support.schedulers import build_scheduler
from vllm.entrypoints.serve.instrumentator.metrics import attach_router
from otel_vllm_kv import VLLMKVCacheInstrumentor

VLLMKVCacheInstrumentor().instrument()
schedulers = [build_scheduler(sys.argv[1], num_blocks=11, block_size=16, served_model_name="tiny",
                              data_parallel_index=index) for index in (0, 1)]
app = FastAPI()
attach_router(app)  # what each API server does; in multiprocess mode /metrics reads the directory
client = TestClient(app)
def scrape():
    text = client.get("/metrics").text
    return sorted([sample.name, sorted(sample.labels.items()), sample.value]
                  for family in text_string_to_metric_families(text) for sample in family.samples
                  if sample.name.startswith("vllm:kv_cache_") and sample.name.endswith("_tokens"))
first = scrape()
VLLMKVCacheInstrumentor().uninstrument()
VLLMKVCacheInstrumentor().instrument()
print(json.dumps([first, scrape()]))
"""


def test_several_api_servers_serve_every_engine_from_the_multiprocess_directory(tiny_model_dir, tmp_path):
    """With several API servers vLLM sets ``PROMETHEUS_MULTIPROC_DIR`` (before any import of
    prometheus_client, hence a process of its own here) and serves only the directory's files."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": support_pythonpath()}
    env.pop("OTEL_PYTHON_VLLM_KV_EXPORTER", None)
    result = subprocess.run(
        [sys.executable, "-c", API_SERVER_SCRAPE, tiny_model_dir], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, after_reinstrument = json.loads(result.stdout.splitlines()[-1])
    limits = {dict(sample[1])["engine"]: sample[2] for sample in first if sample[0] == names.PROMETHEUS_LIMIT_TOKENS}
    assert limits == {"0": 160.0, "1": 160.0}
    assert len(first) == 2 * 5, "per engine: used, free, limit, evictable, headroom"
    assert after_reinstrument == first, "instrumented twice: each engine still once"
