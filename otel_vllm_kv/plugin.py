"""vLLM ``vllm.general_plugins`` entry point, called in every vLLM process (possibly twice).

vLLM does not catch what a plugin raises: the process would die. So nothing escapes here.
"""

from __future__ import annotations

import logging
import os

_logger = logging.getLogger(__name__)


def load_vllm_plugin() -> None:
    """Probe in processes started by an instrumented exporter; change nothing anywhere else."""
    try:
        _load()
    except Exception:  # noqa: BLE001 - vLLM must never see our failure
        _logger.error("otel-vllm-kv could not start in this vLLM process; vLLM is unaffected", exc_info=True)


def _load() -> None:
    from otel_vllm_kv.roles import MalformedVariable, inherited_role, report_malformed

    try:
        role = inherited_role()
    except MalformedVariable as error:
        report_malformed(error)
        return
    if role is None or role.exporter_pid == os.getpid():
        return
    from otel_vllm_kv import VLLMKVCacheInstrumentor

    instrumentor = VLLMKVCacheInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()
