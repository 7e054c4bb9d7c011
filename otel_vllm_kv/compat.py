"""Check that the installed vLLM has the scheduler internals the probe relies on."""

from __future__ import annotations

import logging

_logger = logging.getLogger(__name__)

#: (module, class, attribute) the probe wraps or calls; each must be the class's own
#: (an abstract declaration inherited from ``SchedulerInterface`` does not count).
REQUIRED = (
    ("vllm.v1.core.sched.scheduler", "Scheduler", "make_stats"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "finish_requests"),
    ("vllm.v1.core.sched.scheduler", "Scheduler", "shutdown"),
    ("vllm.v1.core.block_pool", "BlockPool", "get_num_free_blocks"),
)


def vllm_version() -> str:
    try:
        from vllm import __version__
    except Exception:  # noqa: BLE001 - any failure means "unknown"
        return "unknown"
    return str(__version__)


def unsupported_reason() -> str | None:
    """Why this vLLM cannot be instrumented, or None if every required internal is there."""
    import importlib

    missing = []
    for module_name, class_name, attribute in REQUIRED:
        try:
            owner = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{class_name}")
            continue
        if not callable(vars(owner).get(attribute)):
            missing.append(f"{module_name}.{class_name}.{attribute}")
    if not missing:
        return None
    return f"vLLM {vllm_version()} lacks {', '.join(missing)}"


def warn_unsupported(reason: str) -> None:
    _logger.warning("otel-vllm-kv does not recognise this vLLM (%s); KV-cache instrumentation is off", reason)
