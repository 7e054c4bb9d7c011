"""``python -m otel_vllm_kv.demo``: the tiny model, instrumented, under a burst that fills and drains its KV cache.

Options first (``--help`` and mistakes answer at once), then telemetry, the engine, the load
under the live view, and once the burst has drained: the chart and the summary.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from otel_vllm_kv.demo.options import PROG, DemoOptions, parse_options
from otel_vllm_kv.environment_variables import OTEL_PYTHON_VLLM_KV_RESIDENCY, OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY

#: The baggage key of the burst's tenants, unless ``OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY`` names another.
DEMO_TENANT_KEY = "tenant.id"


def chart_title(options: DemoOptions) -> str:
    return (
        f"vLLM KV cache of the tiny model: {options.requests} requests of {options.prompt_tokens} prompt + "
        f"{options.output_tokens} output tokens, submitted at once by three tenants"
    )


def wait_for_idle_holders(reader: Any, timeout: float = 5.0) -> None:
    """Until the engine's pass after the burst (an idle engine's comes within two seconds) says nothing
    is held: the last sample then has every request's token-seconds."""
    import time

    from otel_vllm_kv.demo.sampling import read_holders

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holders = read_holders(reader).values()
        if holders and not any(holder.held_tokens for holder in holders):
            return
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)

    from otel_vllm_kv import VLLMKVCacheInstrumentor
    from otel_vllm_kv.demo import engine
    from otel_vllm_kv.demo.cache_events import cache_events
    from otel_vllm_kv.demo.chart import write_chart
    from otel_vllm_kv.demo.live_view import open_view
    from otel_vllm_kv.demo.load import LOAD_SPAN, run_load
    from otel_vllm_kv.demo.sampling import Sampler
    from otel_vllm_kv.demo.summary import summarize
    from otel_vllm_kv.demo.telemetry import start_telemetry

    telemetry = start_telemetry(options.export)
    try:
        engine.apply_vllm_defaults()
        # The demo shows who holds the cache (unless you turn residency off): residency on, and the
        # burst's tenants in baggage under this key (yours if you set one).
        residency = os.environ.setdefault(OTEL_PYTHON_VLLM_KV_RESIDENCY, "true").strip().lower() == "true"
        tenant_key = DEMO_TENANT_KEY
        if residency:
            tenant_key = os.environ.setdefault(OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY, DEMO_TENANT_KEY)
        try:
            VLLMKVCacheInstrumentor().instrument(meter_provider=telemetry.meter_provider)
        except ValueError as error:  # a bad OTEL_PYTHON_VLLM_KV_* setting, named in the message
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return 2
        print("starting the tiny model on vLLM (30-60 s on 2 cores) ...", flush=True)
        with engine.tiny_engine(options.model_dir) as llm:
            view = open_view(options.requests, options.plain)
            with view, Sampler(telemetry.metric_reader, options.interval, view.show_sample) as sampler:
                result = run_load(
                    llm,
                    telemetry.tracer,
                    options.requests,
                    options.prompt_tokens,
                    options.output_tokens,
                    view.show_progress,
                    tenant_key,
                )
                if residency:
                    wait_for_idle_holders(telemetry.metric_reader)
            telemetry.flush()  # while the engine is still reported
        span = telemetry.finished_span(LOAD_SPAN)
        events = cache_events(span)
        chart = write_chart(options.chart, sampler.samples, events, result.started_at, chart_title(options))
        print(summarize(result, sampler.samples, events))
        if span.dropped_events:
            print(f"({span.dropped_events} span events dropped: OTEL_SPAN_EVENT_COUNT_LIMIT is set)")
        print(f"chart: {chart}")
    except KeyboardInterrupt:  # the engine, the view and the exporters were stopped on the way out
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        telemetry.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
