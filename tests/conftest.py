from __future__ import annotations

import os
import sys

import pytest
from hypothesis import HealthCheck, settings


# Keep every engine's CPU KV cache at 1 GiB; engines inherit this.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from otel_vllm_kv.demo.tiny_model import build_tiny_model  # noqa: E402

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
    import schedulers

    monkeypatch.setattr(schedulers, "SCHEDULER_CLASS", getattr(schedulers, request.param))
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def hybrid_model_dir(tmp_path_factory) -> str:
    """Gemma2-style: sliding-window and full-attention layers, two KV-cache groups in vLLM."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-gemma2"), hybrid=True))
