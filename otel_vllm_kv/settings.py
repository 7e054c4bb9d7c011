"""The package's own settings, validated once at start: a bad value names the variable."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

from otel_vllm_kv.environment_variables import (
    OTEL_PYTHON_VLLM_KV_HOLDER_LIMIT,
    OTEL_PYTHON_VLLM_KV_RELAY_DIR,
    OTEL_PYTHON_VLLM_KV_RESIDENCY,
    OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY,
    OTEL_PYTHON_VLLM_KV_VLLM_METRICS,
)

_SHARED_MEMORY = "/dev/shm"
_BOOLEANS = {"true": True, "false": False}
#: The keys' limit per engine, and its range: the relay's holders section fits 64 keys of the longest names.
DEFAULT_HOLDER_LIMIT = 32
MAX_HOLDER_LIMIT = 64
#: A W3C baggage key is an RFC 7230 token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass(frozen=True)
class Settings:
    relay_parent_directory: str
    vllm_metrics: bool
    residency: bool = False
    tenant_baggage_key: str | None = None
    holder_limit: int = DEFAULT_HOLDER_LIMIT


def read_settings(environ: Mapping[str, str] = os.environ) -> Settings:
    """All settings from ``environ``; raises ValueError naming the first invalid one."""
    settings = Settings(
        relay_parent_directory=_relay_parent_directory(environ.get(OTEL_PYTHON_VLLM_KV_RELAY_DIR, "")),
        vllm_metrics=_boolean(environ, OTEL_PYTHON_VLLM_KV_VLLM_METRICS, default=True),
        residency=_boolean(environ, OTEL_PYTHON_VLLM_KV_RESIDENCY, default=False),
        tenant_baggage_key=_baggage_key(environ.get(OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY, "")),
        holder_limit=_holder_limit(environ.get(OTEL_PYTHON_VLLM_KV_HOLDER_LIMIT, "")),
    )
    if settings.tenant_baggage_key is not None and not settings.residency:
        # A tenant is an attribute of the holder metrics only: without them it would be ignored silently.
        raise ValueError(
            f"{OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY}={settings.tenant_baggage_key!r} needs "
            f"{OTEL_PYTHON_VLLM_KV_RESIDENCY}=true: the tenant is reported only in the metrics of who holds the KV cache"
        )
    return settings


def _baggage_key(configured: str) -> str | None:
    configured = configured.strip()
    if not configured:
        return None
    if not _TOKEN.fullmatch(configured):
        raise ValueError(
            f"{OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY}={configured!r} is not a W3C baggage key; accepted values: "
            "letters, digits and !#$%&'*+-.^_`|~ (unset: no tenant)"
        )
    return configured


def _holder_limit(configured: str) -> int:
    configured = configured.strip()
    if not configured:
        return DEFAULT_HOLDER_LIMIT
    if not configured.isdigit() or not 1 <= int(configured) <= MAX_HOLDER_LIMIT:
        raise ValueError(
            f"{OTEL_PYTHON_VLLM_KV_HOLDER_LIMIT}={configured!r} is invalid; accepted values: an integer from 1 "
            f"to {MAX_HOLDER_LIMIT} (default {DEFAULT_HOLDER_LIMIT})"
        )
    return int(configured)


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
