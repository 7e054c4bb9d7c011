"""Frontend: the token gauges on vLLM's own Prometheus endpoint, beside ``vllm:kv_cache_usage_perc``.

Operators who already scrape vLLM get tokens without an OpenTelemetry exporter. Names and
labels follow vLLM's: ``model_name`` and ``engine``. vLLM serves ``/metrics`` in two ways:

* one API server (or ``LLM``): ``prometheus_client``'s default registry, in the exporter
  process. A collector registered there reads the relay at scrape time (``register``).
* several API servers (``--api-server-count`` > 1, data parallel): vLLM sets
  ``PROMETHEUS_MULTIPROC_DIR``, and each API server's ``/metrics`` handler
  (``prometheus_fastapi_instrumentator``'s ``expose``) builds a fresh registry holding only a
  ``MultiProcessCollector`` that reads the directory's files: no collector of ours can be
  added to it. So each API server keeps multiprocess gauges of its own (mode
  ``livemostrecent``, as vLLM's own gauges are ``mostrecent``) and sets them from the relay
  just before ``MultiProcessCollector.collect`` reads the files (``serve_from_api_servers``).
  Any server a scrape reaches then reports every engine of its process tree, once each.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from opentelemetry.instrumentation.utils import unwrap
from wrapt import ObjectProxy, register_post_import_hook, wrap_function_wrapper

from otel_vllm_kv.exporter.gauges import (
    GAUGES,
    KV_CACHE_ADMISSION_HEADROOM,
    KV_CACHE_EVICTABLE,
    KV_CACHE_LIMIT,
    KV_CACHE_USAGE,
)
from otel_vllm_kv.logs import WarnOnce
from otel_vllm_kv.relay import SnapshotReader

USAGE_TOKENS = "vllm:kv_cache_usage_tokens"
LIMIT_TOKENS = "vllm:kv_cache_limit_tokens"
EVICTABLE_TOKENS = "vllm:kv_cache_evictable_tokens"
HEADROOM_TOKENS = "vllm:kv_cache_admission_headroom_tokens"
_LABELS = ("model_name", "engine")
#: name: (help, extra label, the occupancy field(s) per label value). The help is the OpenTelemetry
#: gauge's description: each definition is written once, in ``exporter.gauges.GAUGES``.
FAMILIES: dict[str, tuple[str, str | None, dict[str | None, str]]] = {
    USAGE_TOKENS: (GAUGES[KV_CACHE_USAGE][1], "state", {"used": "used_tokens", "free": "free_tokens"}),
    LIMIT_TOKENS: (GAUGES[KV_CACHE_LIMIT][1], None, {None: "limit_tokens"}),
    EVICTABLE_TOKENS: (GAUGES[KV_CACHE_EVICTABLE][1], None, {None: "evictable_tokens"}),
    HEADROOM_TOKENS: (GAUGES[KV_CACHE_ADMISSION_HEADROOM][1], None, {None: "headroom_tokens"}),
}
#: Reads prometheus_client's multiprocess files for a scrape (imported by vLLM in multiprocess mode).
MULTIPROCESS_MODULE = "prometheus_client.multiprocess"
_logger = logging.getLogger(__name__)


def read_samples(reader: SnapshotReader) -> Iterator[tuple[str, tuple[str, ...], float]]:
    """(family, label values, value) of every live engine; values unknown for an engine are left out."""
    for snapshot in reader.read():
        occupancy = snapshot.occupancy()
        if occupancy.limit_tokens is None:
            continue
        labels = (snapshot.model_name, str(snapshot.engine_index))
        for name, (_, _, fields) in FAMILIES.items():
            for extra, field in fields.items():
                value = getattr(occupancy, field)
                if value is not None:  # unknown for an engine reported from vLLM's statistics
                    yield name, labels if extra is None else (*labels, extra), value


def _label_names(name: str) -> list[str]:
    extra = FAMILIES[name][1]
    return [*_LABELS, extra] if extra else list(_LABELS)


def _warn_once() -> WarnOnce:
    # A failure here must not turn vLLM's whole /metrics into an error.
    return WarnOnce(_logger, "otel-vllm-kv: cannot read the KV-cache relay for /metrics")


class RelayCollector:
    """A ``prometheus_client`` collector of every live engine's tokens, read from the relay."""

    def __init__(self, reader: SnapshotReader) -> None:
        self._reader = reader
        self._registering_pid = os.getpid()
        self._warn = _warn_once()

    def describe(self) -> list:
        # Nothing to check against other collectors' names at registration; collect() is cheap anyway.
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        families = {name: GaugeMetricFamily(name, help_text, labels=_label_names(name))
                    for name, (help_text, _, _) in FAMILIES.items()}
        # A forked child inherits the registry; only the process that registered it reports.
        if os.getpid() == self._registering_pid:
            try:
                for name, labels, value in read_samples(self._reader):
                    families[name].add_metric(list(labels), value)
            except Exception:  # noqa: BLE001
                self._warn()
                return
        yield from families.values()


class _MultiprocessGauges:
    """This API server's multiprocess gauges, set from the relay before each scrape reads the files."""

    def __init__(self, relay_directory: str) -> None:
        from prometheus_client import Gauge

        self._reader = SnapshotReader(relay_directory)
        self._gauges = {
            name: Gauge(name, help_text, labelnames=_label_names(name), registry=None,
                        multiprocess_mode="livemostrecent")
            for name, (help_text, _, _) in FAMILIES.items()
        }
        self._warn = _warn_once()

    def refresh(self) -> None:
        try:
            for name, labels, value in read_samples(self._reader):
                self._gauges[name].labels(*labels).set(value)
        except Exception:  # noqa: BLE001
            self._warn()


_registered: RelayCollector | None = None
_api_server_relay: str | None = None
_multiprocess_gauges: _MultiprocessGauges | None = None
_import_hook_registered = False


def register(reader: SnapshotReader) -> None:
    """Add the collector to ``prometheus_client``'s default registry, if it is installed."""
    global _registered
    if _registered is not None:
        return
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return
    _registered = RelayCollector(reader)
    REGISTRY.register(_registered)


def _refresh_before_collect(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    global _multiprocess_gauges
    if _api_server_relay is not None and "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        try:
            if _multiprocess_gauges is None:
                _multiprocess_gauges = _MultiprocessGauges(_api_server_relay)
            _multiprocess_gauges.refresh()
        except Exception:  # noqa: BLE001 - vLLM's /metrics must be served whatever happens here
            _logger.warning("otel-vllm-kv: cannot add the token gauges to vLLM's /metrics", exc_info=True)
    return wrapped(*args, **kwargs)


def _wrap_multiprocess_collector(module: Any) -> None:
    # Runs inside the import of prometheus_client.multiprocess: it must never fail that import.
    try:
        if _api_server_relay is not None and not isinstance(module.MultiProcessCollector.collect, ObjectProxy):
            wrap_function_wrapper(module, "MultiProcessCollector.collect", _refresh_before_collect)
    except Exception:  # noqa: BLE001
        _logger.warning("otel-vllm-kv: cannot add the token gauges to vLLM's /metrics", exc_info=True)


def serve_from_api_servers(relay_directory: str) -> None:
    """Where vLLM serves ``/metrics`` from a multiprocess directory, put the gauges there.

    The module is wrapped when something imports it (vLLM's API servers do, to serve
    ``/metrics``); engine processes import nothing on our account.
    """
    global _api_server_relay, _import_hook_registered
    _api_server_relay = relay_directory
    if not _import_hook_registered:
        _import_hook_registered = True
        register_post_import_hook(_wrap_multiprocess_collector, MULTIPROCESS_MODULE)
    elif MULTIPROCESS_MODULE in sys.modules:
        _wrap_multiprocess_collector(sys.modules[MULTIPROCESS_MODULE])


def unregister() -> None:
    global _registered, _api_server_relay
    _api_server_relay = None
    if MULTIPROCESS_MODULE in sys.modules:
        unwrap(sys.modules[MULTIPROCESS_MODULE].MultiProcessCollector, "collect")
    if _registered is None:
        return
    from prometheus_client import REGISTRY

    REGISTRY.unregister(_registered)
    _registered = None
