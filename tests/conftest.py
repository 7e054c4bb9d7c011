from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from otel_vllm_kv.demo.tiny_model import build_tiny_model

# Keep every engine's CPU KV cache at 1 GiB; engines inherit this.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# In-process tests run with residency on (off is the package's default; ``test_instrumentor`` covers
# it): it adds to every path the default runs. Processes started with ``otel_environment`` get no
# OTEL_* variable but those they set: the default, unless they turn residency on.
os.environ.setdefault("OTEL_PYTHON_VLLM_KV_RESIDENCY", "true")

# Fuzz tests run a fixed budget of examples, the same ones on every run (CI time stays fixed;
# a failure reproduces). ``HYPOTHESIS_PROFILE=deep`` explores further, with fresh examples.
settings.register_profile(
    "ci", max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("deep", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=["Scheduler", "AsyncScheduler"])
def vllm_scheduler(request, monkeypatch) -> str:
    """Run the test on vLLM's ``Scheduler`` and on its ``AsyncScheduler`` (a GPU's default):
    ``schedulers.scheduler_on`` builds that class. Scheduler-level modules use it for every test."""
    from tests.support import schedulers

    monkeypatch.setattr(schedulers, "SCHEDULER_CLASS", getattr(schedulers, request.param))
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def hybrid_model_dir(tmp_path_factory) -> str:
    """Gemma2-style: sliding-window and full-attention layers, two KV-cache groups in vLLM."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-gemma2"), hybrid=True))


# Fixtures of the tests that drive vLLM's real OutputProcessor (test_frontend_objects, test_hostile_records).


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    """The tiny model's byte-level tokenizer, loaded as vLLM's renderer loads one."""
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(tiny_model_dir)


@pytest.fixture
def tracer_provider():
    """A local SDK provider for the caller's spans; ``(provider, exporter)``."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def vllm_tracing(tracer_provider, monkeypatch):
    """vLLM's ``instrument_manual`` takes the global tracer provider, which can be set once per process:
    it is this test's provider for this test only (``opentelemetry-test-utils`` resets the same global)."""
    from opentelemetry import trace

    monkeypatch.setattr(trace, "_TRACER_PROVIDER", tracer_provider[0])
    return tracer_provider
