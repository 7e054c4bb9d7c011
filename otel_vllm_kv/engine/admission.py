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
formatted straight into their text (no record object), and each hook is one closure frame.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from time import time_ns
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

#: The parameters of the ``KVCacheManager`` methods hooked with vLLM's own signature.
HOOKED_PARAMETERS = {"record_prefix_cache_stats": ("request", "num_hits"), "get_blocks": ("request_id",)}

#: The attribute holding our state on a vLLM ``Request``.
STATE_ATTRIBUTE = "_otel_vllm_kv_records"


class RequestRecords:
    """What the engine keeps about one request, between its events.

    ``original_headers``: the request's own ``trace_headers``; ``pending``: encoded records not
    delivered yet; ``sequence``: the last record's number; ``outputs_at_record``: output tokens
    when the last record was added; ``preempted_ns``: when last preempted; ``prefix_hits``: local
    prefix-cache hits of the coming admission; ``admitted_generation``: ``num_preemptions`` at
    the last admission recorded. The defaults are class attributes and there is no ``__init__``:
    building one runs no Python frame (a ``SimpleNamespace`` of these seven costs 3,622
    instructions, at every admission: ``benchmarks/call_costs.py``).
    """

    original_headers: Any
    pending: list[str]
    sequence = 0
    outputs_at_record = 0
    preempted_ns = 0
    prefix_hits = 0
    admitted_generation = -1


def new_records(request: Any) -> RequestRecords:
    records = RequestRecords()
    setattr(request, STATE_ATTRIBUTE, records)
    records.original_headers = request.trace_headers
    records.pending = []
    return records


def records_of(request: Any) -> RequestRecords:
    return getattr(request, STATE_ATTRIBUTE, None) or new_records(request)


class AdmissionRecorder:
    """One engine's admission, preemption and delivery bookkeeping (its probe owns it)."""

    __slots__ = ("undelivered", "_scheduler", "_requests", "_queue", "_engine_fields", "_single_group",
                 "_waiting", "_preempted", "_finished")

    def __init__(self, scheduler: Any, engine_index: int, num_blocks: int, limit_tokens: int) -> None:
        from vllm.v1.request import RequestStatus

        #: Requests that carry records not yet delivered.
        self.undelivered: list[Any] = []
        self._scheduler: Callable[[], Any] = weakref.ref(scheduler)  # alive: its own methods call us
        self._requests = scheduler.requests  # vLLM's id -> Request map, created once with the scheduler
        self._queue = scheduler.kv_cache_manager.block_pool.free_block_queue
        #: The fields every record of this engine carries unchanged, formatted once.
        self._engine_fields = ENGINE_FIELDS_FORMAT % (engine_index, num_blocks, limit_tokens)
        self._single_group = len(scheduler.kv_cache_manager.kv_cache_config.kv_cache_groups) == 1
        self._waiting, self._preempted = RequestStatus.WAITING, RequestStatus.PREEMPTED
        #: vLLM's ``RequestStatus.is_finished``, as a set: a lookup in C instead of two calls per request.
        self._finished = frozenset(status for status in RequestStatus if RequestStatus.is_finished(status))

    def hooks(self, give_up: Callable[[], None]) -> tuple[dict, dict]:
        """The hooks of the scheduler's and the manager's own methods (``patching.hook_methods``)."""
        recorder = self
        requests = self._requests
        waiting, preempted = self._waiting, self._preempted

        def preempt_request(original: Callable) -> Callable:
            def _preempt_request(*args: Any, **kwargs: Any) -> Any:  # rare: any signature
                result = original(*args, **kwargs)
                try:
                    recorder.preemption(args[0] if args else kwargs["request"])
                except Exception:  # noqa: BLE001 - the engine must never see our failure
                    give_up()
                return result

            return _preempt_request

        def record_prefix_cache_stats(original: Callable) -> Callable:
            def record_prefix_cache_stats(request: Any, num_hits: int) -> Any:
                result = original(request, num_hits)
                if num_hits:
                    try:
                        records_of(request).prefix_hits = num_hits
                    except Exception:  # noqa: BLE001
                        give_up()
                return result

            return record_prefix_cache_stats

        def get_blocks(original: Callable) -> Callable:
            def get_blocks(request_id: str) -> Any:
                blocks = original(request_id)
                try:
                    request = requests.get(request_id)
                    if request is not None:
                        status = request.status
                        if status == waiting or status == preempted:
                            recorder.admission(request, blocks, status == preempted)
                except Exception:  # noqa: BLE001
                    give_up()
                return blocks

            return get_blocks

        return {"_preempt_request": preempt_request}, {
            "record_prefix_cache_stats": record_prefix_cache_stats, "get_blocks": get_blocks,
        }

    def admission(self, request: Any, blocks: Any, resumed: bool) -> None:
        records = getattr(request, STATE_ATTRIBUTE, None) or new_records(request)  # records_of, inlined
        generation = request.num_preemptions
        if records.admitted_generation == generation:
            return  # a KV connector asked first, for the same admission
        records.admitted_generation = generation
        now_ns = time_ns()
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
        now_ns = records.preempted_ns = time_ns()
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
        finished = self._finished
        for request in self.undelivered:
            records = getattr(request, STATE_ATTRIBUTE)
            if request.num_output_tokens > records.outputs_at_record or request.status in finished:
                records.pending = []
                request.trace_headers = records.original_headers
            else:
                waiting.append(request)
        self.undelivered = waiting

    def clear(self) -> None:
        """Give every request still holding records its own headers back (the probe is going)."""
        for request in self.undelivered:
            records = getattr(request, STATE_ATTRIBUTE)
            records.pending = []
            request.trace_headers = records.original_headers
        self.undelivered = []
