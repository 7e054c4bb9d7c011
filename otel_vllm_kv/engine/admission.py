"""Engine: record each request's admission and preemptions for its span.

Hooks, each called by vLLM once per event (never per running request per step):

* ``KVCacheManager.get_blocks``: the scheduler calls it for a request it admits, right
  after popping it from the waiting queue and allocating its blocks, while its status is
  still WAITING (first admission) or PREEMPTED (resumption). The pool then holds exactly
  the occupancy "right after its blocks were allocated".
* ``KVCacheManager.record_prefix_cache_stats``: called just before, at admission, with the
  prompt tokens found in the local prefix cache.
* ``Scheduler._preempt_request``: after the request's blocks went back to the pool.

Records travel in ``request.trace_headers`` (``admission_records``) and are delivered with the
request's next output; once delivered, the request gets its original mapping back. Every
table is keyed weakly by vLLM's ``Request``, so nothing outlives the request.
"""

from __future__ import annotations

import functools
import time
import weakref
from typing import Any

from otel_vllm_kv.admission_records import ADMITTED, PREEMPTED, RESUMED, TRACE_HEADER_KEY, AdmissionRecord, encode


@functools.cache
def _statuses() -> tuple[Any, Any]:
    """vLLM's WAITING and PREEMPTED statuses (imported late: importing this package imports no vLLM)."""
    from vllm.v1.request import RequestStatus

    return RequestStatus.WAITING, RequestStatus.PREEMPTED


class _RequestRecords:
    __slots__ = ("original_headers", "pending", "sequence", "outputs_at_record", "preempted_at",
                 "prefix_hits", "admitted_generation")

    def __init__(self, original_headers: Any) -> None:
        self.original_headers = original_headers
        self.pending: list[AdmissionRecord] = []
        self.sequence = 0
        self.outputs_at_record = 0
        self.preempted_at: float | None = None
        self.prefix_hits = 0
        self.admitted_generation = -1


_records: weakref.WeakKeyDictionary[Any, _RequestRecords] = weakref.WeakKeyDictionary()
_undelivered: weakref.WeakSet[Any] = weakref.WeakSet()


def _records_of(request: Any) -> _RequestRecords:
    records = _records.get(request)
    if records is None:
        records = _records[request] = _RequestRecords(request.trace_headers)
    return records


def _event(probe: Any, kind: str, records: _RequestRecords, **fields: Any) -> AdmissionRecord:
    layout = probe.layout
    records.sequence += 1
    return AdmissionRecord(
        kind, records.sequence, time.time_ns(), probe.engine_index,
        layout.num_blocks, probe.limit_tokens, probe.free_blocks(), **fields,
    )


def _append(request: Any, records: _RequestRecords, event: AdmissionRecord) -> None:
    records.pending.append(event)
    headers = dict(records.original_headers or {})
    headers[TRACE_HEADER_KEY] = encode(records.pending)
    # A new mapping, never a mutation: outputs already built keep the one they reference.
    request.trace_headers = headers
    records.outputs_at_record = request.num_output_tokens
    _undelivered.add(request)


def record_prefix_hits(probe: Any, result: Any, request: Any, num_hits: int, *args: Any, **kwargs: Any) -> None:
    _records_of(request).prefix_hits = num_hits


def record_admission(probe: Any, blocks: Any, request_id: str, *args: Any, **kwargs: Any) -> None:
    scheduler = probe.scheduler()
    request = scheduler.requests.get(request_id) if scheduler is not None else None
    waiting_status, preempted_status = _statuses()
    if request is None or (request.status != waiting_status and request.status != preempted_status):
        return
    records = _records_of(request)
    if records.admitted_generation == request.num_preemptions:
        return  # a KV connector asked first, for the same admission
    records.admitted_generation = request.num_preemptions
    resumed = request.status == preempted_status
    since = records.preempted_at if resumed and records.preempted_at is not None else request.arrival_time
    own_blocks = sum(1 for group in blocks.get_block_ids() for block_id in group if block_id)
    _, waiting = scheduler.get_request_counts()
    event = _event(
        probe, RESUMED if resumed else ADMITTED, records,
        own_blocks=own_blocks, cached_tokens=records.prefix_hits,
        queue_seconds=max(0.0, time.time() - since), waiting=waiting,
    )
    records.prefix_hits = 0
    _append(request, records, event)


def record_preemption(probe: Any, result: Any, request: Any, *args: Any, **kwargs: Any) -> None:
    scheduler = probe.scheduler()
    records = _records_of(request)
    records.preempted_at = time.time()
    waiting = scheduler.get_request_counts()[1] if scheduler is not None else 0
    _append(request, records, _event(probe, PREEMPTED, records, waiting=waiting))


def deliver_pending() -> None:
    """At the end of a step: requests that produced an output have had their records sent."""
    if not _undelivered:
        return
    for request in list(_undelivered):
        records = _records.get(request)
        if records is None or request.is_finished() or request.num_output_tokens > records.outputs_at_record:
            _undelivered.discard(request)
            if records is not None:
                records.pending = []
                request.trace_headers = records.original_headers


def clear() -> None:
    _records.clear()
    _undelivered.clear()


def tracked_requests() -> int:
    """Requests with per-request state in this process (for leak tests)."""
    return len(_records)
