"""The token gauges as ``prometheus_client`` samples, with vLLM's labels, read from the relay.

Read by the exporter (its collector on the default registry) and by each API server of a
multiprocess ``/metrics`` (``frontend.multiprocess_metrics``); names and help texts: ``names``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from otel_vllm_kv.diagnostics import WarnOnce
from otel_vllm_kv.names import (
    PROMETHEUS_EVICTABLE_TOKENS,
    PROMETHEUS_FAMILIES,
    PROMETHEUS_HEADROOM_TOKENS,
    PROMETHEUS_LABELS,
    PROMETHEUS_LIMIT_TOKENS,
    PROMETHEUS_USAGE_TOKENS,
)
from otel_vllm_kv.relay_reader import SnapshotReader

_logger = logging.getLogger(__name__)

#: The occupancy field of each family, by the value of its extra label (None: no extra label).
_FIELDS: dict[str, dict[str | None, str]] = {
    PROMETHEUS_USAGE_TOKENS: {"used": "used_tokens", "free": "free_tokens"},
    PROMETHEUS_LIMIT_TOKENS: {None: "limit_tokens"},
    PROMETHEUS_EVICTABLE_TOKENS: {None: "evictable_tokens"},
    PROMETHEUS_HEADROOM_TOKENS: {None: "headroom_tokens"},
}


def read_samples(reader: SnapshotReader) -> Iterator[tuple[str, tuple[str, ...], float]]:
    """(family, label values, value) of every live engine; values unknown for an engine are left out."""
    for snapshot in reader.read():
        occupancy = snapshot.occupancy()
        if occupancy.limit_tokens is None:
            continue
        labels = (snapshot.model_name, str(snapshot.engine_index))
        for name, fields in _FIELDS.items():
            for extra, field in fields.items():
                value = getattr(occupancy, field)
                if value is not None:  # unknown for an engine reported from vLLM's statistics
                    yield name, labels if extra is None else (*labels, extra), value


def label_names(name: str) -> list[str]:
    extra = PROMETHEUS_FAMILIES[name].extra_label
    return [*PROMETHEUS_LABELS, extra] if extra else list(PROMETHEUS_LABELS)


def warn_once() -> WarnOnce:
    # A failure here must not turn vLLM's whole /metrics into an error.
    return WarnOnce(_logger, "otel-vllm-kv: cannot read the KV-cache relay for /metrics")
