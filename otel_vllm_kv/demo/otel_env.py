"""The standard ``OTEL_*`` variables the demo honours, validated at start: a bad value names the variable.

Unlike ``opentelemetry-instrument``, a signal whose ``OTEL_<SIGNAL>_EXPORTER`` is unset exports
nothing unless an OTLP endpoint is set for it, so a plain run stays off the network. Endpoints,
headers, timeouts and ``OTEL_BSP_*`` are read by the SDK's own exporters and processors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("grpc", "http/protobuf")
#: As under ``opentelemetry-instrument`` (``opentelemetry-distro``).
DEFAULT_PROTOCOL = "grpc"
SIGNALS = ("METRICS", "TRACES")
METRIC_EXPORT_INTERVAL = "OTEL_METRIC_EXPORT_INTERVAL"
GENERAL_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
GENERAL_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"

HELP = f"""\
OpenTelemetry: the demo reads the gauges through an in-memory reader and
records the burst as one span, "kv-cache-demo load", which the package gives a
vllm.request.admitted event per request and preempted / resumed events. By
default nothing leaves the process; these standard variables add exporters:

  OTEL_METRICS_EXPORTER, OTEL_TRACES_EXPORTER
      {" | ".join(EXPORTERS)}, or a comma-separated list (console prints to
      stderr). Unset: otlp if {GENERAL_ENDPOINT} or the signal's
      own endpoint variable is set, else none.
  {GENERAL_PROTOCOL},
  OTEL_EXPORTER_OTLP_METRICS_PROTOCOL, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL
      {" | ".join(PROTOCOLS)} (default {DEFAULT_PROTOCOL}); the signal's own variable wins.
  {GENERAL_ENDPOINT}, OTEL_EXPORTER_OTLP_METRICS_ENDPOINT,
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_*_HEADERS, ..._TIMEOUT
      read by the OTLP exporters themselves (default endpoint: localhost:4317
      for grpc, localhost:4318 for http/protobuf).
  {METRIC_EXPORT_INTERVAL}
      milliseconds between metric exports (default 60000); the demo also
      exports once when the burst has drained, before the engine stops.
  OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
      the resource (default service.name: otel-vllm-kv-demo).
  OTEL_SPAN_EVENT_COUNT_LIMIT
      honoured if set; otherwise the load span keeps all its events.

An invalid value of the exporter, protocol or interval variables stops the
demo with a message naming the variable, before the engine starts.
"""


@dataclass(frozen=True)
class SignalExport:
    """Where one signal goes besides the demo's in-memory reader or exporter."""

    exporters: tuple[str, ...]  # "otlp" and/or "console"
    protocol: str  # of the otlp exporter


@dataclass(frozen=True)
class ExportSettings:
    metrics: SignalExport
    traces: SignalExport


def read_export_settings(environ: Mapping[str, str] = os.environ) -> ExportSettings:
    """The exporters the variables ask for; raises ValueError naming the first invalid variable."""
    _check_metric_export_interval(environ)
    metrics, traces = (_signal_export(environ, signal) for signal in SIGNALS)
    return ExportSettings(metrics=metrics, traces=traces)


def _value(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def _signal_export(environ: Mapping[str, str], signal: str) -> SignalExport:
    variable = f"OTEL_{signal}_EXPORTER"
    value = _value(environ, variable)
    if value:
        exporters = _exporters(variable, value)
    elif _value(environ, GENERAL_ENDPOINT) or _value(environ, f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"):
        exporters = ("otlp",)
    else:
        exporters = ()
    return SignalExport(exporters, _protocol(environ, signal))


def _exporters(variable: str, value: str) -> tuple[str, ...]:
    names = [name.strip().lower() for name in value.split(",")]
    for name in names:
        if name not in EXPORTERS:
            raise ValueError(_invalid(variable, value, EXPORTERS))
    return tuple(dict.fromkeys(name for name in names if name != "none"))


def _protocol(environ: Mapping[str, str], signal: str) -> str:
    chosen = DEFAULT_PROTOCOL
    for variable in (GENERAL_PROTOCOL, f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"):  # the signal's own wins
        value = _value(environ, variable)
        if value:
            if value not in PROTOCOLS:
                raise ValueError(_invalid(variable, value, PROTOCOLS))
            chosen = value
    return chosen


def _check_metric_export_interval(environ: Mapping[str, str]) -> None:
    value = _value(environ, METRIC_EXPORT_INTERVAL)
    if value and not (value.isdigit() and int(value) > 0):
        raise ValueError(
            f"{METRIC_EXPORT_INTERVAL}={value!r} is invalid; accepted values: a positive integer (milliseconds)"
        )


def _invalid(variable: str, value: str, accepted: tuple[str, ...]) -> str:
    return f"{variable}={value!r} is invalid; accepted values: {', '.join(accepted)}"
