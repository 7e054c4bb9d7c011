"""Frontend: what an admission record says, as span attributes (names: ``names``).

Computed from the record's integers without building a pool layout: this runs per record.
The occupancy follows the gauges' definitions (``kv_cache``); a capacity of -1 (unknown, an
engine reported from statistics or a hybrid model without one) leaves the token counts out.
"""

from __future__ import annotations

from opentelemetry.util.types import AttributeValue

from otel_vllm_kv import names
from otel_vllm_kv.admission_records import FINISHED, PREEMPTED, AdmissionRecord
from otel_vllm_kv.kv_cache import tokens_in, utilization


def pool_attributes(record: AdmissionRecord) -> dict[str, AttributeValue]:
    """Occupancy of the engine's pool at the event."""
    allocatable = record.num_blocks - 1
    free = record.free_blocks
    used = allocatable - free
    attributes: dict[str, AttributeValue] = {
        names.ENGINE_INDEX: record.engine_index,
        names.ADMISSION_UTILIZATION: utilization(free, allocatable),
        names.ADMISSION_USED_BLOCKS: used,
        names.ADMISSION_FREE_BLOCKS: free,
    }
    limit = record.limit_tokens
    used_tokens = tokens_in(used, limit, allocatable) if limit >= 0 else None
    if used_tokens is not None:
        attributes[names.ADMISSION_USED_TOKENS] = used_tokens
        attributes[names.ADMISSION_FREE_TOKENS] = limit - used_tokens
        attributes[names.ADMISSION_LIMIT_TOKENS] = limit
    return attributes


def residency_attributes(record: AdmissionRecord) -> dict[str, AttributeValue]:
    """What a finished request held over its life; tokens only where the pool's capacity is known."""
    attributes: dict[str, AttributeValue] = {names.REQUEST_KV_RECOMPUTED_TOKENS: record.recomputed_tokens}
    limit, allocatable = record.limit_tokens, record.num_blocks - 1
    if limit >= 0:
        attributes[names.REQUEST_KV_TOKEN_SECONDS] = record.block_seconds * limit / allocatable
        peak_tokens = tokens_in(record.own_blocks, limit, allocatable)
        if peak_tokens is not None:
            attributes[names.REQUEST_KV_PEAK_TOKENS] = peak_tokens
    return attributes


def record_attributes(record: AdmissionRecord) -> dict[str, AttributeValue]:
    """Everything the record says about its request: the pool, and for an admission or a
    resumption the request's own blocks, its prefix hit and its wait; for a finish, what it held."""
    if record.kind == FINISHED:
        return residency_attributes(record)
    attributes = pool_attributes(record)
    if record.kind == PREEMPTED:
        return attributes
    attributes[names.REQUEST_KV_BLOCKS] = record.own_blocks
    own_tokens = (
        tokens_in(record.own_blocks, record.limit_tokens, record.num_blocks - 1) if record.limit_tokens >= 0 else None
    )
    if own_tokens is not None:
        attributes[names.REQUEST_KV_TOKENS] = own_tokens
    attributes[names.CACHE_READ_INPUT_TOKENS] = record.cached_tokens
    attributes[names.ADMISSION_QUEUE_DURATION] = record.queue_seconds
    attributes[names.ADMISSION_WAITING_REQUESTS] = record.waiting
    return attributes
