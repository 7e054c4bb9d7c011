"""The token gauges on vLLM's own Prometheus registry, on a real Scheduler in this process."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from schedulers import Stepper, build_scheduler, make_request
from telemetry import new_reader

from otel_vllm_kv import VLLMKVCacheInstrumentor, vllm_metrics
from otel_vllm_kv.relay import SnapshotReader


FAMILIES = (
    vllm_metrics.USAGE_TOKENS, vllm_metrics.LIMIT_TOKENS, vllm_metrics.EVICTABLE_TOKENS, vllm_metrics.HEADROOM_TOKENS,
)


def scrape() -> dict[tuple, float]:
    """What vLLM's /metrics would serve now, for the package's families: {(name, labels...): value}."""
    samples = {}
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
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
        (vllm_metrics.USAGE_TOKENS, *labels, ("state", "used")): 48.0,
        (vllm_metrics.USAGE_TOKENS, *labels, ("state", "free")): 112.0,
        (vllm_metrics.LIMIT_TOKENS, *labels): 160.0,
        (vllm_metrics.EVICTABLE_TOKENS, *labels): 32.0,
        (vllm_metrics.HEADROOM_TOKENS, *labels): (7 - 2) * 16.0,  # watermark: int(0.2 x 11) = 2 blocks
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
