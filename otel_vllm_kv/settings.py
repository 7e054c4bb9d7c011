"""The package's own settings, validated once at start: a bad value names the variable."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

from otel_vllm_kv.environment_variables import (
    OTEL_PYTHON_VLLM_KV_RELAY_DIR,
    OTEL_PYTHON_VLLM_KV_VLLM_METRICS,
)

_SHARED_MEMORY = "/dev/shm"
_BOOLEANS = {"true": True, "false": False}


@dataclass(frozen=True)
class Settings:
    relay_parent_directory: str
    vllm_metrics: bool


def read_settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """All settings from ``environ``; raises ValueError naming the first invalid one."""
    return Settings(
        relay_parent_directory=_relay_parent_directory(environ.get(OTEL_PYTHON_VLLM_KV_RELAY_DIR, "")),
        vllm_metrics=_boolean(environ, OTEL_PYTHON_VLLM_KV_VLLM_METRICS, default=True),
    )


def _boolean(environ: Mapping[str, str], name: str, default: bool) -> bool:
    value = environ.get(name, "").strip()
    if not value:
        return default
    try:
        return _BOOLEANS[value.lower()]
    except KeyError:
        raise ValueError(f"{name}={value!r} is invalid; accepted values: true, false") from None


def _relay_parent_directory(configured: str) -> str:
    configured = configured.strip()
    if not configured:
        if os.path.isdir(_SHARED_MEMORY) and os.access(_SHARED_MEMORY, os.W_OK | os.X_OK):
            return _SHARED_MEMORY
        return tempfile.gettempdir()
    if not os.path.isabs(configured):
        # Processes the exporter starts may run elsewhere; a relative path would name another directory there.
        raise ValueError(
            f"{OTEL_PYTHON_VLLM_KV_RELAY_DIR}={configured!r} is a relative path; accepted values: an existing, "
            "writable directory given as an absolute path (default /dev/shm)"
        )
    if not os.path.isdir(configured):
        raise ValueError(
            f"{OTEL_PYTHON_VLLM_KV_RELAY_DIR}={configured!r} is not an existing directory; accepted values: "
            "an existing, writable directory (default /dev/shm)"
        )
    if not os.access(configured, os.W_OK | os.X_OK):
        raise ValueError(
            f"{OTEL_PYTHON_VLLM_KV_RELAY_DIR}={configured!r} is not writable; accepted values: "
            "an existing, writable directory (default /dev/shm)"
        )
    return configured
