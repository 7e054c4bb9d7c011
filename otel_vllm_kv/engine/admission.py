"""Engine: record each request's admission and preemptions for its span.

Hooks on one scheduler's own methods (``probe``), each called by vLLM once per event
(never per running request per step):

* ``KVCacheManager.get_blocks``: the scheduler calls it for a request it admits, right
  after popping it from the waiting queue and allocating its blocks, while its status is
  still WAITING (first admission) or PREEMPTED (resumption). The pool then holds exactly
  the occupancy "right after its blocks were allocated". vLLM calls it for other reasons
  too; those return after one lookup and one comparison.
* ``KVCacheManager.record_prefix_cache_stats``: called just before, at admission, with the
  prompt tokens found in the local prefix cache.
* ``Scheduler._preempt_request``: after the request's blocks went back to the pool.

Records travel in ``request.trace_headers`` (``admission_records``) and are delivered with the
request's next output; once delivered, the request gets its original mapping back. The
per-request state lives on vLLM's ``Request`` itself (one attribute, as OpenTelemetry's
instrumentations keep a span on the object they trace), so it goes with the request and
costs no weak reference; the only table is the recorder's list of requests whose records
are not delivered yet, emptied at the end of the step that delivers them.

This runs at every admission, so it is written for the interpreter: records are
formatted straight into their text (no record object), and each hook is one frame.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from otel_vllm_kv.admission_records import (
    ADMITTED,
    ENGINE_FIELDS_FORMAT,
    ENGINE_RECORD_FORMAT,
    PREEMPTED,
    RECORD_SEPARATOR,
    RESUMED,
    TRACE_HEADER_KEY,
)

#: The attribute holding our state on a vLLM ``Request``.
STATE_ATTRIBUTE = "_otel_vllm_kv_records"


class RequestRecords(SimpleNamespace):
    """What the engine keeps about one request, between its events (built in C: no ``__init__`` frame).

    ``original_headers``: the request's own ``trace_headers``; ``pending``: encoded records not
    delivered yet; ``sequence``: the last record's number; ``outputs_at_record``: output tokens
    when the last record was added; ``preempted_ns``: when last preempted; ``prefix_hits``: local
    prefix-cache hits of the coming admission; ``admitted_generation``: ``num_preemptions`` at
    the last admission recorded.
    """

    original_headers: Any
    pending: list[str]
    sequence: int
    outputs_at_record: int
    preempted_ns: int
    prefix_hits: int
    admitted_generation: int


def new_records(request: Any) -> RequestRecords:
    records = vars(request)[STATE_ATTRIBUTE] = RequestRecords(
        original_headers=request.trace_headers, pending=[], sequence=0, outputs_at_record=0, preempted_ns=0,
        prefix_hits=0, admitted_generation=-1,
    )
    return records


def records_of(request: Any) -> RequestRecords:
    return vars(request).get(STATE_ATTRIBUTE) or new_records(request)


class AdmissionRecorder:
    """One engine's admission, preemption and delivery bookkeeping (its probe owns it)."""

    __slots__ = ("undelivered", "_scheduler", "_requests", "_queue", "_engine_fields", "_single_group",
                 "_waiting", "_preempted")

    def __init__(self, scheduler: Any, engine_index: int, num_blocks: int, limit_tokens: int) -> None:
        from vllm.v1.request import RequestStatus

        #: Requests that carry records not yet delivered.
        self.undelivered: list[Any] = []
        self._scheduler = weakref.ref(scheduler)
        self._requests = scheduler.requests  # vLLM's id -> Request map, created once with the scheduler
        self._queue = scheduler.kv_cache_manager.block_pool.free_block_queue
        #: The fields every record of this engine carries unchanged, formatted once.
        self._engine_fields = ENGINE_FIELDS_FORMAT % (engine_index, num_blocks, limit_tokens)
        self._single_group = len(scheduler.kv_cache_manager.kv_cache_config.kv_cache_groups) == 1
        self._waiting, self._preempted = RequestStatus.WAITING, RequestStatus.PREEMPTED

    def wrappers(self, give_up: Callable[[], None]) -> tuple[dict, dict]:
        """The wrappers of the scheduler's and the manager's own methods, one frame each."""
        recorder = self

        def preempt_request(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
            result = wrapped(*args, **kwargs)
            try:
                recorder.preemption(args[0] if args else kwargs["request"])
            except Exception:  # noqa: BLE001 - the engine must never see our failure
                give_up()
            return result

        def record_prefix_cache_stats(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
            result = wrapped(*args, **kwargs)
            try:
                request, num_hits = args if len(args) == 2 else (kwargs["request"], kwargs["num_hits"])
                if num_hits:
                    records_of(request).prefix_hits = num_hits
            except Exception:  # noqa: BLE001
                give_up()
            return result

        def get_blocks(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
            blocks = wrapped(*args, **kwargs)
            try:
                request = recorder._requests.get(args[0] if args else kwargs["request_id"])
                if request is not None:
                    status = request.status
                    if status == recorder._waiting or status == recorder._preempted:
                        recorder.admission(request, blocks, status == recorder._preempted)
            except Exception:  # noqa: BLE001
                give_up()
            return blocks

        return {"_preempt_request": preempt_request}, {
            "record_prefix_cache_stats": record_prefix_cache_stats, "get_blocks": get_blocks,
        }

    def admission(self, request: Any, blocks: Any, resumed: bool) -> None:
        records = vars(request).get(STATE_ATTRIBUTE) or new_records(request)  # records_of, inlined
        generation = request.num_preemptions
        if records.admitted_generation == generation:
            return  # a KV connector asked first, for the same admission
        records.admitted_generation = generation
        now_ns = time.time_ns()
        # Since the preemption, when we saw it; else since arrival (as for a first admission).
        since_ns = records.preempted_ns if resumed and records.preempted_ns else int(request.arrival_time * 1e9)
        if self._single_group:
            own_blocks = len(blocks.blocks[0])  # a full-attention group holds no null block
        else:
            own_blocks = 0
            for group in blocks.get_block_ids():
                own_blocks += len(group) - group.count(0)  # block 0 is vLLM's null block (outside a window)
        records.sequence += 1
        self._append(request, records, ENGINE_RECORD_FORMAT % (
            RESUMED if resumed else ADMITTED, records.sequence, now_ns, self._engine_fields,
            self._queue.num_free_blocks, own_blocks, records.prefix_hits, max(0, now_ns - since_ns),
            self._scheduler().get_request_counts()[1],
        ))
        records.prefix_hits = 0

    def preemption(self, request: Any) -> None:
        records = records_of(request)
        now_ns = records.preempted_ns = time.time_ns()
        records.sequence += 1
        self._append(request, records, ENGINE_RECORD_FORMAT % (
            PREEMPTED, records.sequence, now_ns, self._engine_fields, self._queue.num_free_blocks, 0, 0, 0,
            self._scheduler().get_request_counts()[1],
        ))

    def _append(self, request: Any, records: RequestRecords, record: str) -> None:
        pending = records.pending
        pending.append(record)
        headers = dict(records.original_headers or ())
        headers[TRACE_HEADER_KEY] = record if len(pending) == 1 else RECORD_SEPARATOR.join(pending)
        # A new mapping, never a mutation: outputs already built keep the one they reference.
        request.trace_headers = headers
        records.outputs_at_record = request.num_output_tokens
        if len(pending) == 1:
            self.undelivered.append(request)

    def deliver(self) -> None:
        """At the end of a step: requests that produced an output (or finished) have had their records sent."""
        waiting = []
        for request in self.undelivered:
            records = vars(request)[STATE_ATTRIBUTE]
            if request.num_output_tokens > records.outputs_at_record or request.is_finished():
                records.pending = []
                request.trace_headers = records.original_headers
            else:
                waiting.append(request)
        self.undelivered = waiting

    def clear(self) -> None:
        """Give every request still holding records its own headers back (the probe is going)."""
        for request in self.undelivered:
            records = vars(request)[STATE_ATTRIBUTE]
            records.pending = []
            request.trace_headers = records.original_headers
        self.undelivered = []
