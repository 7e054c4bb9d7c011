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

The package runs in three kinds of process, one subpackage each, installed and uninstalled
as pairs: the **engine** (the probe), the **frontend** (span annotation) and the
**exporter** (the gauges); ``roles`` decides which process is which (docs/architecture.md).
``opentelemetry-instrument`` finds the instrumentor under the entry-point name ``vllm_kv``.
"""

from __future__ import annotations

from collections.abc import Collection
from importlib.metadata import PackageNotFoundError, distribution
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]  # its module opens with "# type: ignore"
from packaging.requirements import Requirement

from otel_vllm_kv import compat, engine, exporter, frontend
from otel_vllm_kv.diagnostics import keep_warnings_visible
from otel_vllm_kv.package import _instruments_any
from otel_vllm_kv.roles import MalformedVariable, report_malformed, resolve_role
from otel_vllm_kv.settings import read_settings
from otel_vllm_kv.version import __version__

__all__ = ["VLLMKVCacheInstrumentor", "__version__"]


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
        # Every process may be a frontend (LLM, AsyncLLM, each of several API servers) and an
        # engine; only the exporter exports the gauges. Processes it starts keep their own exporters.
        if role.is_exporter:
            exporter.install(role.relay_directory, kwargs.get("meter_provider"), settings.vllm_metrics)
        frontend.install(role.relay_directory, settings.vllm_metrics, settings.tenant_baggage_key)
        engine.install(role.relay_directory, settings.residency, settings.holder_limit)

    def _uninstrument(self, **kwargs: Any) -> None:
        engine.uninstall()
        frontend.uninstall()
        exporter.uninstall()
