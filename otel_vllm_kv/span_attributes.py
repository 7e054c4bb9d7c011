"""Names of the span attributes and events this package adds; each is defined here only.

Semantic-convention names where one exists (``gen_ai.usage.cache_read.input_tokens``),
``vllm.*`` otherwise. "At admission" means right after the scheduler allocated the
request's blocks, when it moved the request from waiting to running.
"""

# Pool occupancy at admission (same definitions as the gauges; tokens absent for hybrid models).
ADMISSION_USED_TOKENS = "vllm.admission.kv_cache.used_tokens"
ADMISSION_FREE_TOKENS = "vllm.admission.kv_cache.free_tokens"
ADMISSION_LIMIT_TOKENS = "vllm.admission.kv_cache.limit_tokens"
ADMISSION_UTILIZATION = "vllm.admission.kv_cache.utilization"
ADMISSION_USED_BLOCKS = "vllm.admission.kv_cache.used_blocks"
ADMISSION_FREE_BLOCKS = "vllm.admission.kv_cache.free_blocks"

# The request's own share at admission.
REQUEST_KV_BLOCKS = "vllm.request.kv_cache.blocks"
REQUEST_KV_TOKENS = "vllm.request.kv_cache.tokens"
CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"

# The queue.
ADMISSION_QUEUE_DURATION = "vllm.admission.queue_duration"
"""Seconds from arrival (or from the preemption, for a resumption) to admission."""
ADMISSION_WAITING_REQUESTS = "vllm.admission.waiting_requests"
"""Requests still waiting in the engine's queue once this one was admitted."""

ENGINE_INDEX = "vllm.engine.index"
REQUEST_PREEMPTIONS = "vllm.request.preemptions"
REQUEST_ID = "vllm.request.id"
"""The request id the caller gave (vLLM's external id); only on per-request events."""

# Events.
EVENT_ADMITTED = "vllm.request.admitted"
"""On a span that submitted several requests: one per request, instead of attributes."""
EVENT_PREEMPTED = "vllm.request.preempted"
EVENT_RESUMED = "vllm.request.resumed"
