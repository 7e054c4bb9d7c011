"""Admission and preemption records, carried from the engine core in ``request.trace_headers``.

vLLM echoes a request's ``trace_headers`` mapping back to the frontend on every output
of that request (it carries the caller's ``traceparent``). The engine core adds one key
holding the records not yet delivered; vLLM's trace propagators ignore unknown keys and
no API response includes the mapping. Records are numbered per request, so the frontend
applies each exactly once.
"""

from __future__ import annotations

from typing import NamedTuple

from opentelemetry.util.types import AttributeValue

from otel_vllm_kv import span_attributes as names
from otel_vllm_kv.kv_cache import tokens_in, utilization

TRACE_HEADER_KEY = "x-otel-vllm-kv"

ADMITTED = "admitted"
RESUMED = "resumed"
PREEMPTED = "preempted"


class AdmissionRecord(NamedTuple):
    """One record; a tuple, so it is cheap to build in the engine and encodes as a JSON array."""

    kind: str
    sequence: int
    time_ns: int
    engine_index: int
    num_blocks: int
    limit_tokens: int
    """The pool's token capacity; -1 where it is unknown."""
    free_blocks: int
    own_blocks: int = 0
    cached_tokens: int = 0
    queue_ns: int = 0
    """Time in the waiting queue before this admission (since arrival, or since the preemption)."""
    waiting: int = 0

    @property
    def queue_seconds(self) -> float:
        return self.queue_ns / 1e9

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


# Encoding runs in the engine at every admission: one %-format per record, integers only
# (about 4x cheaper than json, and no float repr); records are separated by ";", fields by
# ",", the kind is a fixed word.
#: One record: ``RECORD_FORMAT % (kind, sequence, ...)``, the fields in ``AdmissionRecord``'s order.
RECORD_FORMAT = "%s" + ",%d" * (len(AdmissionRecord._fields) - 1)
RECORD_SEPARATOR = ";"
#: The same text, as the engine formats it: engine_index, num_blocks and limit_tokens, fixed
#: for an engine, formatted once by ``ENGINE_FIELDS_FORMAT`` and passed as one string.
_ENGINE_FIELDS = ("engine_index", "num_blocks", "limit_tokens")
ENGINE_FIELDS_FORMAT = ",".join(["%d"] * len(_ENGINE_FIELDS))
ENGINE_RECORD_FORMAT = "%s,%d,%d,%s" + ",%d" * (len(AdmissionRecord._fields) - 3 - len(_ENGINE_FIELDS))
_NUMBERS = len(AdmissionRecord._fields) - 1  # every field but the kind is an integer


def encode(events: list[AdmissionRecord]) -> str:
    return RECORD_SEPARATOR.join([RECORD_FORMAT % event for event in events])


def decode(text: str) -> list[AdmissionRecord]:
    """The records of ``encode``; raises ValueError on anything else."""
    events = []
    for record in text.split(RECORD_SEPARATOR):
        kind, *numbers = record.split(",")
        if len(numbers) != _NUMBERS:
            raise ValueError(f"not a KV-cache record: {record!r}")
        events.append(AdmissionRecord(kind, *map(int, numbers)))
    return events
