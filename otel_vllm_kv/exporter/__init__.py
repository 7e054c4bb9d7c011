"""Code that runs in the **exporter**: the one process per process tree that exports the KV gauges.

It is the process ``opentelemetry-instrument`` started, or the one that called
``instrument()`` first (``roles``); its observable gauges, and with one API server its
collector on vLLM's ``/metrics``, read the relay at collection time. The three roles:
docs/architecture.md.
"""

from __future__ import annotations

from opentelemetry.metrics import MeterProvider, get_meter

from otel_vllm_kv.exporter import collection, gauges, holder_metrics, prometheus_collector
from otel_vllm_kv.names import INSTRUMENTATION_SCOPE, SCHEMA_URL
from otel_vllm_kv.relay_reader import SnapshotReader
from otel_vllm_kv.version import __version__


def install(relay_directory: str, meter_provider: MeterProvider | None, vllm_metrics: bool) -> None:
    meter = get_meter(INSTRUMENTATION_SCOPE, __version__, meter_provider, schema_url=SCHEMA_URL)
    if collection.first_registration(meter):
        gauges.create_instruments(meter)
        holder_metrics.create_instruments(meter)
    collection.set_source(SnapshotReader(relay_directory))
    if vllm_metrics:
        prometheus_collector.register(SnapshotReader(relay_directory))


def uninstall() -> None:
    prometheus_collector.unregister()
    collection.set_source(None)
