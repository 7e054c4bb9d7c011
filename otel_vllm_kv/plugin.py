"""vLLM ``vllm.general_plugins`` entry point, called in every vLLM process (possibly twice)."""

from __future__ import annotations

import os


def load_vllm_plugin() -> None:
    """Probe in processes started by an instrumented exporter; change nothing anywhere else."""
    from otel_vllm_kv.roles import inherited_role

    role = inherited_role()
    if role is None or role.exporter_pid == os.getpid():
        return
    from otel_vllm_kv import VLLMKVCacheInstrumentor

    instrumentor = VLLMKVCacheInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()
