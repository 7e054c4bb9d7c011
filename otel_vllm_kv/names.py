"""Every public name the package emits, each defined here only: metrics with their units and
descriptions, their attributes, vLLM ``/metrics`` families, span attributes and span events.

Semantic-convention names where one exists (``gen_ai.request.model``,
``gen_ai.usage.cache_read.input_tokens``), ``vllm.*`` otherwise. docs/metrics.md defines each.
"""

from __future__ import annotations

from typing import NamedTuple

#: The instrumentation scope of every metric (``otel_scope_name`` in Prometheus).
INSTRUMENTATION_SCOPE = "otel_vllm_kv"
#: The semantic-conventions release the names follow where one applies.
SCHEMA_URL = "https://opentelemetry.io/schemas/1.37.0"

# Metric attributes.
ENGINE_INDEX = "vllm.engine.index"
#: The engine's served model name: what clients send as ``model``.
MODEL_NAME = "gen_ai.request.model"
KV_CACHE_STATE = "vllm.kv_cache.state"
KV_CACHE_STATE_USED = "used"
KV_CACHE_STATE_FREE = "free"
#: A KV-cache group's index in vLLM's ``kv_cache_config.kv_cache_groups``.
KV_CACHE_GROUP_INDEX = "vllm.kv_cache.group.index"
#: vLLM's name of the group's attention type: ``full_attention``, ``sliding_window``, ``mamba``, ...
KV_CACHE_GROUP_TYPE = "vllm.kv_cache.group.type"

# Gauges (observable, per engine; the exporter's callbacks give their points).
KV_CACHE_USAGE = "vllm.kv_cache.usage"
KV_CACHE_LIMIT = "vllm.kv_cache.limit"
KV_CACHE_UTILIZATION = "vllm.kv_cache.utilization"
KV_CACHE_EVICTABLE = "vllm.kv_cache.evictable"
KV_CACHE_ADMISSION_HEADROOM = "vllm.kv_cache.admission.headroom"
KV_CACHE_BLOCK_USAGE = "vllm.kv_cache.block.usage"
KV_CACHE_BLOCK_LIMIT = "vllm.kv_cache.block.limit"
KV_CACHE_BLOCK_EVICTABLE = "vllm.kv_cache.block.evictable"
KV_CACHE_BLOCK_SIZE = "vllm.kv_cache.block.size"


class Gauge(NamedTuple):
    unit: str
    description: str


GAUGES: dict[str, Gauge] = {
    KV_CACHE_USAGE: Gauge(
        "{token}",
        "KV-cache tokens by state (used or free); used + free = limit. Evictable prefix-cached blocks count as free.",
    ),
    KV_CACHE_LIMIT: Gauge(
        "{token}",
        "KV-cache token capacity: (blocks - 1 reserved null block) x block size; "
        "vLLM's group-aware kv_cache_size_tokens for hybrid models.",
    ),
    KV_CACHE_UTILIZATION: Gauge("1", "Fraction of allocatable KV-cache blocks in use; equals vLLM's kv_cache_usage."),
    KV_CACHE_EVICTABLE: Gauge(
        "{token}",
        "Free KV-cache tokens that still hold a cached prefix no request references: "
        "reusable by a prefix hit until vLLM evicts them for new blocks.",
    ),
    KV_CACHE_ADMISSION_HEADROOM: Gauge(
        "{token}",
        "Free KV-cache tokens beyond vLLM's admission watermark: what a waiting request may take while others run.",
    ),
    KV_CACHE_BLOCK_USAGE: Gauge("{block}", "KV-cache blocks by state (used or free); used + free = block.limit."),
    KV_CACHE_BLOCK_LIMIT: Gauge("{block}", "Allocatable KV-cache blocks: all blocks but vLLM's reserved null block."),
    KV_CACHE_BLOCK_EVICTABLE: Gauge(
        "{block}", "Evictable prefix-cache blocks (free, cached, unreferenced) per KV-cache group."
    ),
    KV_CACHE_BLOCK_SIZE: Gauge(
        "{token}", "Tokens per block of each KV-cache group (decode-context parallelism included)."
    ),
}

# Who holds the KV cache (per engine, by LoRA adapter and tenant, never by request: ``engine.holders``).
LORA_NAME = "vllm.lora.name"
"""The LoRA adapter's name (vLLM's ``lora_name``); absent for the base model."""
TENANT = "vllm.tenant"
"""The W3C baggage value named by ``OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY``; absent without one."""
OVERFLOW = "otel.metric.overflow"
"""True on the one point of every (adapter, tenant) past the engine's limit, as OpenTelemetry's SDK marks it."""
KV_CACHE_RESIDENCY = "vllm.kv_cache.residency"
KV_CACHE_HELD = "vllm.kv_cache.held"
KV_CACHE_WRITTEN = "vllm.kv_cache.written"

#: The observable counter among ``HOLDER_METRICS``; the others are gauges.
HOLDER_COUNTERS = (KV_CACHE_RESIDENCY,)
HOLDER_METRICS: dict[str, Gauge] = {
    KV_CACHE_RESIDENCY: Gauge(
        "{token}.s",
        "KV-cache residency in token-seconds, by LoRA adapter and tenant: a block held by k requests counts 1/k "
        "to each; added when a request releases its blocks (finish, abort, preemption).",
    ),
    KV_CACHE_HELD: Gauge(
        "{token}",
        "KV-cache tokens held now, by LoRA adapter and tenant, each block shared 1/k by its k requests: "
        "the points add up to usage{state=used}. Counted at most once a second.",
    ),
    KV_CACHE_WRITTEN: Gauge(
        "{token}",
        "Tokens written into the used KV-cache blocks: used tokens less the empty tail of each request's last "
        "block and slots allocated ahead (one full-attention group only). Counted with vllm.kv_cache.held.",
    ),
}

# Families on vLLM's own Prometheus ``/metrics``, with vLLM's labels; the help is the gauge's description.
PROMETHEUS_USAGE_TOKENS = "vllm:kv_cache_usage_tokens"
PROMETHEUS_LIMIT_TOKENS = "vllm:kv_cache_limit_tokens"
PROMETHEUS_EVICTABLE_TOKENS = "vllm:kv_cache_evictable_tokens"
PROMETHEUS_HEADROOM_TOKENS = "vllm:kv_cache_admission_headroom_tokens"
PROMETHEUS_LABELS = ("model_name", "engine")


class PrometheusFamily(NamedTuple):
    help: str
    #: A label beside ``PROMETHEUS_LABELS``, if any.
    extra_label: str | None


PROMETHEUS_FAMILIES: dict[str, PrometheusFamily] = {
    PROMETHEUS_USAGE_TOKENS: PrometheusFamily(GAUGES[KV_CACHE_USAGE].description, "state"),
    PROMETHEUS_LIMIT_TOKENS: PrometheusFamily(GAUGES[KV_CACHE_LIMIT].description, None),
    PROMETHEUS_EVICTABLE_TOKENS: PrometheusFamily(GAUGES[KV_CACHE_EVICTABLE].description, None),
    PROMETHEUS_HEADROOM_TOKENS: PrometheusFamily(GAUGES[KV_CACHE_ADMISSION_HEADROOM].description, None),
}

# Span attributes. "At admission" means right after the scheduler allocated the request's
# blocks, when it moved the request from waiting to running.

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

# What the request held over its life, on its spans when it finished (``engine.residency``).
REQUEST_KV_TOKEN_SECONDS = "vllm.request.kv_cache.token_seconds"
"""Its fair-share KV residency: a block shared by k requests counts 1/k to each."""
REQUEST_KV_PEAK_TOKENS = "vllm.request.kv_cache.peak_tokens"
REQUEST_KV_RECOMPUTED_TOKENS = "vllm.request.kv_cache.recomputed_tokens"

# The queue.
ADMISSION_QUEUE_DURATION = "vllm.admission.queue_duration"
"""Seconds from arrival (or from the preemption, for a resumption) to admission."""
ADMISSION_WAITING_REQUESTS = "vllm.admission.waiting_requests"
"""Requests still waiting in the engine's queue once this one was admitted."""

REQUEST_PREEMPTIONS = "vllm.request.preemptions"
"""Preemptions so far: 0 from its admission on, so a trace view shows a request never preempted as such."""
REQUEST_PREEMPTED_DURATION = "vllm.request.preempted_duration"
"""Seconds the request spent preempted so far: from each preemption to its resumption, summed."""
REQUEST_ID = "vllm.request.id"
"""The request id the caller gave (vLLM's external id); only on per-request events."""

# Events.
EVENT_ADMITTED = "vllm.request.admitted"
"""On a span that submitted several requests: one per request, instead of attributes."""
EVENT_PREEMPTED = "vllm.request.preempted"
EVENT_RESUMED = "vllm.request.resumed"
EVENT_FINISHED = "vllm.request.finished"
"""On a span that submitted several requests: one per request, with what it held."""
