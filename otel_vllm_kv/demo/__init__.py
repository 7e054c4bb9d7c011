"""Demo: the tiny model on a real vLLM engine, instrumented, under a burst that fills and drains its KV cache.

Run ``python -m otel_vllm_kv.demo --help``. Modules, one concern each:

- ``options``: the command line; ``otel_env``: the standard ``OTEL_*`` variables it honours;
- ``telemetry``: meter and tracer providers (in-memory, plus the exporters asked for);
- ``engine``: the tiny model (``tiny_model``) started and shut down; ``load``: the burst, under one span;
- ``sampling``: the gauges read per engine every interval; ``live_view``: what the terminal shows;
- ``cache_events``: the admissions and preemptions recorded on the span; ``chart``: the PNG;
  ``summary``: the closing figures; ``__main__``: the wiring.
"""
