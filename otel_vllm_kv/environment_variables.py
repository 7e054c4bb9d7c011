"""Settings read from the environment when instrumentation starts (validated in ``settings``)."""

OTEL_PYTHON_VLLM_KV_RELAY_DIR = "OTEL_PYTHON_VLLM_KV_RELAY_DIR"
"""
.. envvar:: OTEL_PYTHON_VLLM_KV_RELAY_DIR

Existing, writable directory, given as an absolute path, in which the instrumented process
creates its private relay directory (mode 0700) for the engine cores' snapshot files. Default: ``/dev/shm``
where it exists (memory-backed), else the system temporary directory.
"""

OTEL_PYTHON_VLLM_KV_VLLM_METRICS = "OTEL_PYTHON_VLLM_KV_VLLM_METRICS"
"""
.. envvar:: OTEL_PYTHON_VLLM_KV_VLLM_METRICS

``true`` (default) or ``false``: also publish the token gauges on vLLM's own Prometheus
endpoint (``/metrics`` of the OpenAI server) as ``vllm:kv_cache_usage_tokens{state}`` and
``vllm:kv_cache_limit_tokens``, beside ``vllm:kv_cache_usage_perc``.
"""

OTEL_PYTHON_VLLM_KV_EXPORTER = "OTEL_PYTHON_VLLM_KV_EXPORTER"
"""
.. envvar:: OTEL_PYTHON_VLLM_KV_EXPORTER

Internal, set by the instrumented process as ``<pid>:<relay directory>`` and inherited
by the engine processes it starts, which therefore act as probes. Do not set it: a value the
package did not write logs one ERROR per process and leaves the package inactive there.
"""

OTEL_PYTHON_VLLM_KV_VERSION_REPORTED = "OTEL_PYTHON_VLLM_KV_VERSION_REPORTED"
"""
.. envvar:: OTEL_PYTHON_VLLM_KV_VERSION_REPORTED

Internal, set by the first process that checks the installed vLLM and logs the verdict (one
INFO or WARNING line); the processes it starts inherit it and do not repeat the line. Do not set it.
"""

OTEL_PYTHON_VLLM_KV_RESIDENCY = "OTEL_PYTHON_VLLM_KV_RESIDENCY"
"""
.. envvar:: OTEL_PYTHON_VLLM_KV_RESIDENCY

``true`` or ``false`` (default): also keep what each request holds of the KV cache over time,
its spans' ``vllm.request.kv_cache.token_seconds``, ``peak_tokens`` and ``recomputed_tokens``, and
the metrics of who holds the cache (``vllm.kv_cache.residency``, ``vllm.kv_cache.held``,
``vllm.kv_cache.written``). Off by default: it roughly doubles what the package adds to an
admitted request in the engine (docs/benchmarks.md).
"""

OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY = "OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY"
"""
.. envvar:: OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY

The W3C baggage key whose value, on the context a request is submitted in, is its tenant in
``vllm.kv_cache.residency`` and ``vllm.kv_cache.held`` (attribute ``vllm.tenant``); it needs
``OTEL_PYTHON_VLLM_KV_RESIDENCY=true``. Unset or empty (default): no tenant. A baggage value that is not printable text of at most 100
characters is left out, with one warning (its requests count without a tenant).
"""

OTEL_PYTHON_VLLM_KV_HOLDER_LIMIT = "OTEL_PYTHON_VLLM_KV_HOLDER_LIMIT"
"""
.. envvar:: OTEL_PYTHON_VLLM_KV_HOLDER_LIMIT

At most this many (LoRA adapter, tenant) pairs per engine in ``vllm.kv_cache.residency`` and
``vllm.kv_cache.held``, 1 to 64 (default 32): requests of further pairs count under one
point with ``otel.metric.overflow`` = true, as OpenTelemetry's SDK folds attribute sets past its
cardinality limit.
"""
