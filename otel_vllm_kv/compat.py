"""Check that the installed vLLM has the internals the probe and the span annotation rely on."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from otel_vllm_kv.patching import takes

_logger = logging.getLogger(__name__)

#: Called, not wrapped.
_CALLED = (("vllm.v1.core.block_pool", "BlockPool.get_num_free_blocks", None),)


def required() -> list[tuple[str, str, tuple[str, ...] | None]]:
    """(module, "Class.method" or "function", parameters) that must exist in this vLLM.

    ``parameters`` names what a hook with vLLM's own signature takes (None: any signature).
    """
    from otel_vllm_kv.engine import prefix_cache, probe
    from otel_vllm_kv.frontend import spans, unprobed_engines

    patches = (*probe.PATCHES, *spans.PATCHES, *unprobed_engines.PATCHES)
    wrapped = [(module, name, None) for module, name, _ in patches]
    return wrapped + list(probe.REQUIRED) + list(prefix_cache.REQUIRED) + list(_CALLED)


def vllm_version() -> str:
    try:
        from vllm import __version__
    except Exception:  # noqa: BLE001 - any failure means "unknown"
        return "unknown"
    return str(__version__)


def _exists(module_name: str, name: str, parameters: tuple[str, ...] | None) -> bool:
    owner: Any
    try:
        owner = importlib.import_module(module_name)
    except ImportError:
        return False
    *classes, attribute = name.split(".")
    for class_name in classes:
        owner = getattr(owner, class_name, None)
        if owner is None:
            return False
    # A class's own function: an abstract declaration inherited from an interface does not count.
    function = vars(owner).get(attribute)
    return callable(function) and (parameters is None or takes(function, parameters))


def unsupported_reason() -> str | None:
    """Why this vLLM cannot be instrumented, or None if every required internal is there."""
    missing = [
        f"{module}.{name}" + ("" if parameters is None else f"({', '.join(parameters)})")
        for module, name, parameters in required() if not _exists(module, name, parameters)
    ]
    if not missing:
        return None
    return f"vLLM {vllm_version()} lacks {', '.join(missing)}"


def warn_unsupported(reason: str) -> None:
    _logger.warning("otel-vllm-kv does not recognise this vLLM (%s); KV-cache instrumentation is off", reason)
