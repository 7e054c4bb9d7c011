"""OpenTelemetry instrumentation of vLLM's KV cache in tokens.

Usage::

    from otel_vllm_kv import VLLMKVCacheInstrumentor
    from vllm import LLM

    VLLMKVCacheInstrumentor().instrument(meter_provider=meter_provider)
    llm = LLM(model=...)

Each engine then reports ``vllm.kv_cache.usage`` (``{token}``, ``vllm.kv_cache.state``
= ``used`` | ``free``), ``vllm.kv_cache.limit`` (``{token}``) and
``vllm.kv_cache.utilization`` (``1``), with ``vllm.engine.index`` and
``gen_ai.request.model`` on every point.

The package runs in three kinds of process, one subpackage each: the **engine**
(``engine``: vLLM's engine core, where the scheduler runs and the probe publishes into a
shared-memory relay), the **frontend** (``frontend``: ``LLM``, ``AsyncLLM``, each API
server; span annotation) and the **exporter** (``exporter``: the process that instruments
first, which exports the gauges from the relay). Engine processes the
exporter starts load this package through vLLM's ``vllm.general_plugins`` entry point
(and, under ``opentelemetry-instrument``, through auto-instrumentation); ``roles`` decides
which process is which. ``opentelemetry-instrument`` finds the instrumentor under the
entry-point name ``vllm_kv``.
"""

from __future__ import annotations

from collections.abc import Collection
from importlib.metadata import PackageNotFoundError, distribution
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]  # its module opens with "# type: ignore"
from opentelemetry.metrics import get_meter
from packaging.requirements import Requirement

from otel_vllm_kv import compat
from otel_vllm_kv.engine import probe
from otel_vllm_kv.exporter import gauges
from otel_vllm_kv.frontend import metrics_endpoint, spans, unprobed_engines
from otel_vllm_kv.logs import keep_warnings_visible
from otel_vllm_kv.package import _instruments_any
from otel_vllm_kv.patching import apply_patches, remove_patches
from otel_vllm_kv.relay import SnapshotReader
from otel_vllm_kv.roles import MalformedVariable, report_malformed, resolve_role
from otel_vllm_kv.settings import read_settings
from otel_vllm_kv.version import __version__

__all__ = ["VLLMKVCacheInstrumentor", "__version__"]

_SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"


class VLLMKVCacheInstrumentor(BaseInstrumentor):
    """Reports vLLM's KV cache in tokens as observable gauges."""

    def instrumentation_dependencies(self) -> Collection[str]:
        # Either distribution provides the ``vllm`` module; require the one installed.
        for requirement in _instruments_any:
            try:
                distribution(Requirement(requirement).name)
            except PackageNotFoundError:
                continue
            return (requirement,)
        return _instruments_any[:1]

    def _instrument(self, **kwargs: Any) -> None:
        keep_warnings_visible()
        settings = read_settings()  # a bad value raises here, naming the variable, before any change
        if not compat.supported():  # one INFO or WARNING line per process tree
            return
        try:
            role = resolve_role(settings.relay_parent_directory)
        except MalformedVariable as error:  # inherited, not configured: not the caller's fault
            report_malformed(error)
            return
        if role.is_exporter:
            meter = get_meter(__name__, __version__, kwargs.get("meter_provider"), schema_url=_SCHEMA_URL)
            gauges.create_instruments(meter)
            gauges.set_source(SnapshotReader(role.relay_directory))
            if settings.vllm_metrics:
                metrics_endpoint.register(SnapshotReader(role.relay_directory))
        # Every process may be a frontend (LLM, AsyncLLM, each of several API servers): the
        # spans of the requests it submits are annotated there, and an API server serving a
        # multiprocess /metrics adds the token gauges to it. Processes it starts keep their
        # own exporters: only the OpenTelemetry KV gauges are the exporter's alone.
        apply_patches(spans.PATCHES)
        # A frontend also reports, from vLLM's statistics, the engines it sees running no probe.
        unprobed_engines.directory.relay_directory = role.relay_directory
        apply_patches(unprobed_engines.PATCHES)
        if settings.vllm_metrics:
            metrics_endpoint.serve_from_api_servers(role.relay_directory)
        probe.install_probe(role.relay_directory)

    def _uninstrument(self, **kwargs: Any) -> None:
        metrics_endpoint.unregister()
        remove_patches(spans.PATCHES)
        spans.annotator.clear()
        remove_patches(unprobed_engines.PATCHES)
        unprobed_engines.directory.clear()
        probe.remove_probe()
        gauges.set_source(None)
