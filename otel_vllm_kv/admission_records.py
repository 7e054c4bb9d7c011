"""Admission and preemption records, carried from the engine core in ``request.trace_headers``.

vLLM echoes a request's ``trace_headers`` mapping back to the frontend on every output
of that request (it carries the caller's ``traceparent``). The engine core adds one key
holding the records not yet delivered; vLLM's trace propagators ignore unknown keys and
no API response includes the mapping. Records are numbered per request, so the frontend
applies each exactly once.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from opentelemetry.util.types import AttributeValue

from otel_vllm_kv import span_attributes as names
from otel_vllm_kv.kv_cache import tokens_in, utilization

TRACE_HEADER_KEY = "x-otel-vllm-kv"

ADMITTED = "admitted"
RESUMED = "resumed"
PREEMPTED = "preempted"


class AdmissionRecord(NamedTuple):
    """One record, as the frontend decodes it."""

    kind: str
    sequence: int
    time: float
    """When it happened, in seconds since the epoch (``time.time()``, as vLLM's arrival times)."""
    engine_index: int
    num_blocks: int
    limit_tokens: int
    """The pool's token capacity; -1 where it is unknown."""
    free_blocks: int
    own_blocks: int = 0
    cached_tokens: int = 0
    queue_seconds: float = 0.0
    """Time in the waiting queue before this admission (since arrival, or since the preemption)."""
    waiting: int = 0

    @property
    def time_ns(self) -> int:
        return int(self.time * 1e9)

    def pool_attributes(self) -> dict[str, AttributeValue]:
        """Occupancy of the engine's pool at the event, as span attributes (what ``kv_cache.occupancy``
        gives, computed from the record's integers without building a layout: this runs per record)."""
        allocatable = self.num_blocks - 1
        free = self.free_blocks
        used = allocatable - free
        attributes: dict[str, AttributeValue] = {
            names.ENGINE_INDEX: self.engine_index,
            names.ADMISSION_UTILIZATION: utilization(free, allocatable),
            names.ADMISSION_USED_BLOCKS: used,
            names.ADMISSION_FREE_BLOCKS: free,
        }
        limit = self.limit_tokens
        used_tokens = tokens_in(used, limit, allocatable) if limit >= 0 else None  # -1: capacity unknown
        if used_tokens is not None:
            attributes[names.ADMISSION_USED_TOKENS] = used_tokens
            attributes[names.ADMISSION_FREE_TOKENS] = limit - used_tokens
            attributes[names.ADMISSION_LIMIT_TOKENS] = limit
        return attributes

    def attributes(self) -> dict[str, AttributeValue]:
        """Everything the event says about the request, as span attributes."""
        attributes = self.pool_attributes()
        if self.kind == PREEMPTED:
            return attributes
        attributes[names.REQUEST_KV_BLOCKS] = self.own_blocks
        own_tokens = tokens_in(self.own_blocks, self.limit_tokens, self.num_blocks - 1) if self.limit_tokens >= 0 else None
        if own_tokens is not None:
            attributes[names.REQUEST_KV_TOKENS] = own_tokens
        attributes[names.CACHE_READ_INPUT_TOKENS] = self.cached_tokens
        attributes[names.ADMISSION_QUEUE_DURATION] = self.queue_seconds
        attributes[names.ADMISSION_WAITING_REQUESTS] = self.waiting
        return attributes


# Encoding runs in the engine at every admission: each record is the fields of ``AdmissionRecord``
# packed by one ``struct`` call (the kind as its index in ``KINDS``, the times as the doubles
# ``time.time()`` gives, with no int conversion) and hex-encoded, so the text is ASCII, of fixed
# length, and needs no separator: 2,980 instructions against 6,244 for the same fields
# %-formatted as decimal text (``benchmarks/call_costs.py``).
#: The kinds, by their code in a record.
KINDS = (ADMITTED, RESUMED, PREEMPTED)
#: One record: kind code, sequence, time, engine_index, num_blocks, limit_tokens, free_blocks,
#: own_blocks, cached_tokens, queue_seconds, waiting (little-endian, no padding).
RECORD = struct.Struct("<BIdiiqiiidi")
RECORD_LENGTH = 2 * RECORD.size
"""Characters of one record's text."""


def encode(events: list[AdmissionRecord]) -> str:
    return "".join([RECORD.pack(KINDS.index(event.kind), *event[1:]).hex() for event in events])


def decode(text: str) -> list[AdmissionRecord]:
    """The records of ``encode``; raises ValueError on anything else."""
    if not text or len(text) % RECORD_LENGTH:
        raise ValueError(f"not KV-cache records: {text[:80]!r}")
    events = []
    for kind, *numbers in RECORD.iter_unpack(bytes.fromhex(text)):
        if kind >= len(KINDS):
            raise ValueError(f"not a KV-cache record kind: {kind}")
        events.append(AdmissionRecord(KINDS[kind], *numbers))
    return events
