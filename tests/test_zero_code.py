"""Zero code: a plain vLLM script under ``opentelemetry-instrument``, exporting OTLP over gRPC."""

from __future__ import annotations

import glob
import os
import re

import pytest

from otel_vllm_kv.names import KV_CACHE_LIMIT, KV_CACHE_STATE, KV_CACHE_USAGE
from tests.support.engine_load import LIMIT
from tests.support.instrumented_processes import (
    EXAMPLES,
    exporting_resources,
    otel_environment,
    otlp_attributes,
    run_instrumented,
)
from tests.support.otlp_grpc_receiver import OtlpGrpcReceiver

pytestmark = pytest.mark.engine


def _points(metrics, name: str) -> list:
    return [
        point for recorded in metrics if recorded.metric.name == name for point in recorded.metric.gauge.data_points
    ]


def test_offline_script_exports_the_gauges_over_grpc_from_one_process(tmp_path):
    with OtlpGrpcReceiver() as receiver:
        env = otel_environment(
            OTEL_SERVICE_NAME="offline-batch",
            OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_METRIC_EXPORT_INTERVAL="500",
            OTEL_PYTHON_VLLM_KV_RELAY_DIR=str(tmp_path),
        )
        script = [os.path.join(EXAMPLES, "offline_batch.py"), "--requests", "16", "--max-tokens", "400"]
        result = run_instrumented(script, env, ["--metrics_exporter", "otlp", "--traces_exporter", "otlp"])
        metrics = receiver.drain_metrics()
    assert result.returncode == 0, result.stderr[-4000:]
    assert re.search(r"^16 requests, 6400 tokens generated$", result.stdout, re.M), result.stdout
    for failure in ("Failed to auto initialize", "Traceback", "Address already in use"):
        assert failure not in result.stderr, result.stderr[-4000:]

    kv_metrics = [recorded for recorded in metrics if recorded.metric.name == KV_CACHE_LIMIT]
    assert len(exporting_resources(kv_metrics)) == 1, "the engine core (auto-instrumented too) exports no gauges"
    assert {point.as_int for point in _points(metrics, KV_CACHE_LIMIT)} == {LIMIT}
    used = [
        point.as_int
        for point in _points(metrics, KV_CACHE_USAGE)
        if otlp_attributes(point.attributes)[KV_CACHE_STATE] == "used"
    ]
    assert max(used) > 0, "an export happened while the batch held blocks"
    assert not glob.glob(os.path.join(str(tmp_path), "otel-vllm-kv-*")), "the relay is removed at exit"
