"""Frontend: the token gauges on the ``/metrics`` of each of several API servers.

With ``--api-server-count`` > 1 (or data parallel), vLLM sets ``PROMETHEUS_MULTIPROC_DIR``,
and each API server's ``/metrics`` handler (``prometheus_fastapi_instrumentator``'s
``expose``) builds a fresh registry holding only a ``MultiProcessCollector`` that reads the
directory's files: no collector of ours can be added to it (with one API server, the
exporter's ``prometheus_collector`` serves instead). So each API server keeps multiprocess
gauges of its own (mode ``livemostrecent``, as vLLM's own gauges are ``mostrecent``) and sets
them from the relay just before ``MultiProcessCollector.collect`` reads the files. Any server
a scrape reaches then reports every engine of its process tree, once each.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from opentelemetry.instrumentation.utils import unwrap
from wrapt import ObjectProxy, register_post_import_hook, wrap_function_wrapper

from otel_vllm_kv.names import PROMETHEUS_FAMILIES
from otel_vllm_kv.prometheus_samples import label_names, read_samples, warn_once
from otel_vllm_kv.relay_reader import SnapshotReader

#: Reads prometheus_client's multiprocess files for a scrape (imported by vLLM in multiprocess mode).
MULTIPROCESS_MODULE = "prometheus_client.multiprocess"
_logger = logging.getLogger(__name__)


class _MultiprocessGauges:
    """This API server's multiprocess gauges, set from the relay before each scrape reads the files."""

    def __init__(self, relay_directory: str) -> None:
        from prometheus_client import Gauge

        self._reader = SnapshotReader(relay_directory)
        self._gauges = {
            name: Gauge(
                name, family.help, labelnames=label_names(name), registry=None, multiprocess_mode="livemostrecent"
            )
            for name, family in PROMETHEUS_FAMILIES.items()
        }
        self._warn = warn_once()

    def refresh(self) -> None:
        try:
            for name, labels, value in read_samples(self._reader):
                self._gauges[name].labels(*labels).set(value)
        except Exception:  # noqa: BLE001
            self._warn()


_api_server_relay: str | None = None
_multiprocess_gauges: _MultiprocessGauges | None = None
_import_hook_registered = False


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


def install(relay_directory: str) -> None:
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


def uninstall() -> None:
    global _api_server_relay
    _api_server_relay = None
    if MULTIPROCESS_MODULE in sys.modules:
        unwrap(sys.modules[MULTIPROCESS_MODULE].MultiProcessCollector, "collect")
