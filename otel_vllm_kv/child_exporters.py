"""Keep the processes vLLM starts from exporting a second time under ``opentelemetry-instrument``.

``opentelemetry-instrument`` puts its ``sitecustomize`` on ``PYTHONPATH``, so every Python
process the server starts (engine cores, workers, the data-parallel coordinator)
configures the SDK again from the same ``OTEL_*`` variables: a second Prometheus exporter
that cannot bind its port (and then skips instrumentation altogether), a second resource
pushing OTLP. The owner exports everything the engines observe, through the relay, so
the environment its children inherit asks for no exporters; they still auto-instrument,
and this package's instrumentor there only probes.
"""

from __future__ import annotations

import os
import sys

from opentelemetry.environment_variables import (
    OTEL_LOGS_EXPORTER,
    OTEL_METRICS_EXPORTER,
    OTEL_TRACES_EXPORTER,
)

_EXPORTER_VARIABLES = (OTEL_TRACES_EXPORTER, OTEL_METRICS_EXPORTER, OTEL_LOGS_EXPORTER)
_saved: dict[str, str | None] | None = None


def running_under_auto_instrumentation() -> bool:
    """Whether this interpreter started through ``opentelemetry-instrument``'s sitecustomize."""
    sitecustomize = sys.modules.get("sitecustomize")
    origin = getattr(sitecustomize, "__file__", None) or ""
    return os.path.join("instrumentation", "auto_instrumentation") in origin


def silence_child_exporters() -> None:
    """Under auto-instrumentation, let processes started from now on export nothing themselves."""
    global _saved
    if _saved is not None or not running_under_auto_instrumentation():
        return
    _saved = {name: os.environ.get(name) for name in _EXPORTER_VARIABLES}
    for name in _EXPORTER_VARIABLES:
        os.environ[name] = "none"


def restore_child_exporters() -> None:
    global _saved
    if _saved is None:
        return
    for name, value in _saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _saved = None
