"""Frontend: tell the engine each request's tenant, from W3C baggage on the context it is submitted in.

With ``OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY`` set, ``OutputProcessor.add_request`` (which runs
in the caller's context, before vLLM sends the request to its engine core) puts the baggage
value under ``TENANT_HEADER_KEY`` in the request's ``trace_headers``: the one mapping vLLM
carries from a frontend to the engine core, where ``engine.holders`` reads it. Baggage reaches
that context from the client through the propagators (``OTEL_PROPAGATORS``, whose default
includes ``baggage``) and the HTTP server's instrumentation. A value that is not printable text
of at most ``MAX_NAME_LENGTH`` characters is left out, with one warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from opentelemetry import baggage

from otel_vllm_kv.admission_records import TENANT_HEADER_KEY, with_header
from otel_vllm_kv.diagnostics import WarnOnce
from otel_vllm_kv.holdings import MAX_NAME_LENGTH, valid_name
from otel_vllm_kv.patching import apply_patches, remove_patches

_logger = logging.getLogger(__name__)

OUTPUT_PROCESSOR_MODULE = "vllm.v1.engine.output_processor"

_baggage_key: str | None = None
_warn_invalid = WarnOnce(
    _logger,
    f"otel-vllm-kv: a tenant in baggage that is not printable text of at most {MAX_NAME_LENGTH} characters "
    "is left out: its requests count without a tenant",
)
_warn_failed = WarnOnce(_logger, "otel-vllm-kv: a request's tenant could not be given to its engine")


def _before_add_request(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    key = _baggage_key
    tenant = None if key is None else baggage.get_baggage(key)
    if tenant is not None:
        if isinstance(tenant, str) and valid_name(tenant):
            try:
                request = args[0] if args else kwargs["request"]
                request.trace_headers = with_header(request.trace_headers, TENANT_HEADER_KEY, tenant)
            except Exception:  # noqa: BLE001 - vLLM must never see our failure
                _warn_failed()
        else:
            _warn_invalid()
    return wrapped(*args, **kwargs)


PATCHES = ((OUTPUT_PROCESSOR_MODULE, "OutputProcessor.add_request", _before_add_request),)


def install(baggage_key: str | None) -> None:
    """Stamp tenants from the baggage entry ``baggage_key``; None: nothing is patched."""
    global _baggage_key
    _baggage_key = baggage_key
    _warn_invalid.warned = _warn_failed.warned = False  # once per instrumentation
    if baggage_key is not None:
        apply_patches(PATCHES)


def uninstall() -> None:
    global _baggage_key
    if _baggage_key is not None:
        remove_patches(PATCHES)
    _baggage_key = None
