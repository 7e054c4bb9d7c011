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

The scheduler runs in vLLM's engine-core process. The process that instruments first
(the *owner*) exports; engine processes it starts load this package through vLLM's
``vllm.general_plugins`` entry point (and, under ``opentelemetry-instrument``, through
auto-instrumentation), wrap the scheduler and publish into a shared-memory relay the
owner reads at collection time. ``opentelemetry-instrument`` finds the instrumentor
under the entry-point name ``vllm_kv``.
"""

from __future__ import annotations

from collections.abc import Collection
from importlib.metadata import PackageNotFoundError, distribution
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.metrics import get_meter
from packaging.requirements import Requirement

from otel_vllm_kv import child_exporters, compat, instruments, probe, spans, vllm_metrics
from otel_vllm_kv.ownership import resolve_role
from otel_vllm_kv.package import _instruments_any
from otel_vllm_kv.patching import apply_patches, remove_patches
from otel_vllm_kv.relay import SnapshotReader
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
        settings = read_settings()  # a bad value raises here, naming the variable, before any change
        reason = compat.unsupported_reason()
        if reason is not None:
            compat.warn_unsupported(reason)
            return
        role = resolve_role(settings.relay_parent_directory)
        if role.is_owner:
            meter = get_meter(__name__, __version__, kwargs.get("meter_provider"), schema_url=_SCHEMA_URL)
            instruments.create_instruments(meter)
            instruments.set_source(SnapshotReader(role.relay_directory))
            if settings.vllm_metrics:
                vllm_metrics.register(SnapshotReader(role.relay_directory))
            child_exporters.silence_child_exporters()
            # Requests are submitted, and their outputs processed, in the owner.
            apply_patches(spans.PATCHES)
        probe.install_probe(role.relay_directory)

    def _uninstrument(self, **kwargs: Any) -> None:
        child_exporters.restore_child_exporters()
        vllm_metrics.unregister()
        remove_patches(spans.PATCHES)
        spans.annotator.clear()
        probe.remove_probe()
        instruments.set_source(None)
