"""Admission and preemption records, carried from the engine core in ``request.trace_headers``:
their wire format (the span attributes they become: ``frontend.admission_attributes``).

vLLM echoes a request's ``trace_headers`` mapping back to the frontend on every output
of that request (it carries the caller's ``traceparent``). The engine core adds one key
holding the records not yet delivered; vLLM's trace propagators ignore unknown keys and
no API response includes the mapping. Records are numbered per request, so the frontend
applies each exactly once, in order.

An application that builds ``AsyncLLM`` requests with its own ``trace_headers`` can put the key
there itself: the engine replaces a key it did not write, and ``decode`` accepts only records
whose every field is in the range an engine writes, so a record's span attributes and event
time always fit the types an exporter encodes (int64, finite doubles).
"""

from __future__ import annotations

import struct
from operator import le as _at_most
from typing import Any, NamedTuple

TRACE_HEADER_KEY = "x-otel-vllm-kv"
#: The request's tenant, put in its ``trace_headers`` by the frontend from W3C baggage
#: (``frontend.tenants``), read by the engine for its holders (``engine.holders``).
TENANT_HEADER_KEY = "x-otel-vllm-kv-tenant"
#: Put in a request's ``trace_headers`` by a frontend that annotates its spans (``frontend.spans``): the engine
#: records the admissions, preemptions and finish of such a request only, and takes the key out at its first
#: admission (``engine.admission``). A request no frontend traces costs the engine no record.
TRACED_HEADER_KEY = "x-otel-vllm-kv-traced"


def with_header(headers: Any, key: str, value: str) -> dict[str, str]:
    """``headers`` (a request's ``trace_headers``, or None) with ``key`` set: always a new mapping, since a
    child request of ``n > 1`` shares its parent's, and outputs already built keep the one they reference."""
    return {**headers, key: value} if headers else {key: value}


ADMITTED = "admitted"
RESUMED = "resumed"
PREEMPTED = "preempted"
FINISHED = "finished"


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
    """Blocks the request held: at admission its own; when it finished, the most it held at once."""
    cached_tokens: int = 0
    queue_seconds: float = 0.0
    """Time in the waiting queue before this admission (since arrival, or since the preemption)."""
    waiting: int = 0
    block_seconds: float = 0.0
    """When it finished: its fair-share KV residency in block-seconds (``engine.residency``)."""
    recomputed_tokens: int = 0
    """When it finished: tokens computed again after its preemptions."""

    @property
    def time_ns(self) -> int:
        return int(self.time * 1e9)


# Encoding runs in the engine at every admission: each record is the fields of ``AdmissionRecord``
# packed by one ``struct`` call (the kind as its index in ``KINDS``, the times as the doubles
# ``time.time()`` gives, with no int conversion) and hex-encoded, so the text is ASCII, of fixed
# length, and needs no separator; cheaper than the same fields formatted as decimal text
# (docs/benchmarks.md).
#: The kinds, by their code in a record.
KINDS = (ADMITTED, RESUMED, PREEMPTED, FINISHED)
#: One record: kind code, sequence, time, engine_index, num_blocks, limit_tokens, free_blocks,
#: own_blocks, cached_tokens, queue_seconds, waiting, block_seconds, recomputed_tokens
#: (little-endian, no padding).
RECORD = struct.Struct("<BIdiiqiiididq")
RECORD_LENGTH = 2 * RECORD.size
"""Characters of one record's text."""


def encode(events: list[AdmissionRecord]) -> str:
    return "".join([RECORD.pack(KINDS.index(event.kind), *event[1:]).hex() for event in events])


#: The window a record's time (seconds since the epoch) must lie in. Not "near now": the engine's and
#: the frontend's clocks may differ across nodes. 1e9 is 2001-09-09, before any engine this runs on
#: (a clock that reads earlier was never set, and its times order nothing); 9.2e9 is 2261-07-06, the
#: last time whose nanoseconds (``AdmissionRecord.time_ns``, a span event's timestamp) fit in int64,
#: as OTLP's timestamps and most tracing backends store them.
EARLIEST_TIME, LATEST_TIME = 1e9, 9.2e9
#: The longest wait a record may report, in seconds: a year. No request waits longer than an engine
#: has been running; a larger value says the frontend's clock (which stamped the arrival) and the
#: engine's disagree by more than any attribute derived from them could be trusted.
MAX_QUEUE_SECONDS = 366 * 86_400.0
#: The largest pool capacity a record may report, in tokens: 2^53 - 1, the largest integer a double
#: holds exactly (backends that store attribute values as doubles keep it). No pool comes near it
#: (2^53 tokens at one byte each is 8 PiB), and every token count derived from a record is at most
#: its capacity, so each fits in int64.
MAX_LIMIT_TOKENS = 2**53 - 1
_ADMITTED_CODE, _RESUMED_CODE, _PREEMPTED_CODE, _FINISHED_CODE = (
    KINDS.index(kind) for kind in (ADMITTED, RESUMED, PREEMPTED, FINISHED)
)


def decode(text: str) -> list[AdmissionRecord]:
    """The records of ``encode``; raises ValueError (and nothing else) on anything else, and on a record
    holding a value no engine writes (``_out_of_range``): what the frontend receives may be forged."""
    if not isinstance(text, str) or not text or len(text) % RECORD_LENGTH:
        raise ValueError(f"not KV-cache records: {text!r:.80}")
    data = bytes.fromhex(text)  # ValueError on a non-hex character
    if 2 * len(data) != len(text):  # fromhex skips whitespace
        raise ValueError(f"not KV-cache records: {text!r:.80}")
    events = []
    for fields in RECORD.iter_unpack(data):
        if not _plainly_in_range(fields):
            fault = _out_of_range(*fields)
            if fault is not None:
                raise ValueError(f"not a KV-cache record: {fault}")
        events.append(AdmissionRecord(KINDS[fields[0]], *fields[1:]))
    return events


# Each field's bounds whatever the record's kind, checked in C (``_plainly_in_range``); NaN fails them.
_LOWEST = (0, 1, EARLIEST_TIME, 0, 2, -1, 0, 0, 0, 0.0, 0, 0.0, 0)
_HIGHEST = (
    len(KINDS) - 1,
    2**32 - 1,
    LATEST_TIME,
    2**31 - 1,
    2**31 - 1,
    MAX_LIMIT_TOKENS,
    2**31 - 1,
    2**31 - 1,
    2**31 - 1,
    MAX_QUEUE_SECONDS,
    2**31 - 1,
    (2**31 - 2) * MAX_QUEUE_SECONDS,
    MAX_LIMIT_TOKENS,
)


def _plainly_in_range(fields: tuple) -> bool:
    """Whether ``_out_of_range`` finds nothing, for the records an engine writes, in a fraction of its time
    (this runs for every record a frontend receives); False leaves the verdict to it."""
    kind, sequence, num_blocks = fields[0], fields[1], fields[4]
    if not (all(map(_at_most, _LOWEST, fields)) and all(map(_at_most, fields, _HIGHEST))):
        return False
    if fields[6] >= num_blocks or fields[7] >= num_blocks:  # free_blocks, own_blocks
        return False
    if kind == _FINISHED_CODE:
        return not sequence & 1 and sequence >= 2 and fields[11] <= (num_blocks - 1) * MAX_QUEUE_SECONDS
    if fields[11] or fields[12]:  # a residency on a record other than a finish
        return False
    return kind == (_ADMITTED_CODE if sequence == 1 else _RESUMED_CODE if sequence & 1 else _PREEMPTED_CODE)


def _out_of_range(
    kind: int,
    sequence: int,
    time: float,
    engine_index: int,
    num_blocks: int,
    limit_tokens: int,
    free_blocks: int,
    own_blocks: int,
    cached_tokens: int,
    queue_seconds: float,
    waiting: int,
    block_seconds: float,
    recomputed_tokens: int,
) -> str | None:
    """The first field no engine writes, as ``name = value``; None if there is none.

    Besides each field's range, a record's kind follows from its number (the engine's numbering:
    admission 1, k-th preemption 2k, the resumption after it 2k + 1, the finish after k preemptions
    2k + 2). Only a finish carries a residency. The comparisons are written so that NaN fails them.
    """
    if sequence == 1:
        numbered = kind == _ADMITTED_CODE
    elif sequence & 1:
        numbered = kind == _RESUMED_CODE
    else:
        numbered = kind == _PREEMPTED_CODE or kind == _FINISHED_CODE
    if sequence < 1 or not numbered:
        return f"kind = {kind}, sequence = {sequence}"
    if not EARLIEST_TIME <= time <= LATEST_TIME:
        return f"time = {time!r}"
    if engine_index < 0:
        return f"engine_index = {engine_index}"
    if num_blocks < 2:  # the null block and at least one allocatable block
        return f"num_blocks = {num_blocks}"
    if not -1 <= limit_tokens <= MAX_LIMIT_TOKENS:
        return f"limit_tokens = {limit_tokens}"
    if not 0 <= free_blocks < num_blocks:
        return f"free_blocks = {free_blocks}"
    if not 0 <= own_blocks < num_blocks:
        return f"own_blocks = {own_blocks}"
    if cached_tokens < 0:
        return f"cached_tokens = {cached_tokens}"
    if not 0.0 <= queue_seconds <= MAX_QUEUE_SECONDS:
        return f"queue_seconds = {queue_seconds!r}"
    if waiting < 0:
        return f"waiting = {waiting}"
    # At most the whole pool for a year; zero on every record but a finish.
    most_block_seconds = (num_blocks - 1) * MAX_QUEUE_SECONDS if kind == _FINISHED_CODE else 0.0
    if not 0.0 <= block_seconds <= most_block_seconds:
        return f"block_seconds = {block_seconds!r}"
    if not 0 <= recomputed_tokens <= (MAX_LIMIT_TOKENS if kind == _FINISHED_CODE else 0):
        return f"recomputed_tokens = {recomputed_tokens}"
    return None
