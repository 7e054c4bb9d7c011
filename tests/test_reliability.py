"""The instrumentation never changes what vLLM computes, and keeps its telemetry private."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from opentelemetry.test._otlp_test_server import OtlpProtoTestServer

from otel_vllm_kv import names
from tests.support.instrumented_processes import otel_environment, otlp_attributes, support_pythonpath

HERE = os.path.dirname(__file__)


@pytest.mark.engine
def test_greedy_outputs_are_identical_with_instrumentation_and_tracing(tiny_model_dir):
    with OtlpProtoTestServer() as receiver:
        result = subprocess.run(
            [
                sys.executable,
                os.path.join(HERE, "scenarios", "greedy_outputs.py"),
                tiny_model_dir,
                receiver.traces_endpoint,
            ],
            capture_output=True,
            text=True,
            timeout=480,
            env=otel_environment(PYTHONPATH=support_pythonpath()),
        )
        assert result.returncode == 0, result.stderr[-4000:]
        vllm_spans = [recorded.span for recorded in receiver.drain_spans() if recorded.span.name == "llm_request"]
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    assert runs["dtypes"] == ["torch.float32"] * 2, "the CPU path every machine can run (docs/cpu-paths.md)"
    assert len(runs["plain"]) == len(runs["instrumented"]) == 50
    assert all(len(tokens) == 24 for tokens in runs["plain"])
    assert runs["instrumented"] == runs["plain"], "not one generated token differs"
    assert runs["admitted"] >= 50, "the instrumented run was observed"
    assert len(vllm_spans) == 50
    assert all(names.ADMISSION_LIMIT_TOKENS in otlp_attributes(span.attributes) for span in vllm_spans)
