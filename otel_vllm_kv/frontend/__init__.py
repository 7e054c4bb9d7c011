"""Code that runs in vLLM's **frontend** processes: ``LLM``, ``AsyncLLM``, each API server.

A frontend submits requests and processes their outputs: it annotates the spans of the
requests it submitted with their admission records (``spans``), reports engines that run no
probe from vLLM's scheduler statistics (``unprobed_engines``), tells the engine each request's
tenant from baggage (``tenants``), and adds the token gauges to
the ``/metrics`` each of several API servers serves (``multiprocess_metrics``). Every process
may be a frontend, the exporter too. The three roles: docs/architecture.md.
"""

from __future__ import annotations

from otel_vllm_kv.frontend import multiprocess_metrics, spans, tenants, unprobed_engines


def install(relay_directory: str, vllm_metrics: bool, tenant_baggage_key: str | None = None) -> None:
    spans.install()
    tenants.install(tenant_baggage_key)
    unprobed_engines.install(relay_directory)
    if vllm_metrics:
        multiprocess_metrics.install(relay_directory)


def uninstall() -> None:
    multiprocess_metrics.uninstall()
    unprobed_engines.uninstall()
    tenants.uninstall()
    spans.uninstall()
