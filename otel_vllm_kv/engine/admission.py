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
request's next output; once delivered, the request gets its original mapping back. While a
request's mapping holds our key, its records are not delivered yet, so the mapping is the only
per-request buffer. Two attributes on vLLM's ``Request`` (as OpenTelemetry's instrumentations
keep a span on the object they trace) go with the request and cost no weak reference: the
``num_preemptions`` of the last admission recorded, and the time of the last preemption. The
only table is the recorder's list of requests whose records are not delivered yet, emptied at
the end of the step that delivers them.

This runs at every admission, so it is written for the interpreter: records are formatted
straight into their text (no record object), the record's number is derived from vLLM's own
``num_preemptions``, and each hook is one closure frame (``benchmarks/call_costs.py``).
"""

from __future__ import annotations

import weakref
from collections import deque
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
from otel_vllm_kv.engine.pool_reading import waiting_queues

_queue_length = deque.__len__

#: The parameters of the ``KVCacheManager`` methods hooked with vLLM's own signature.
HOOKED_PARAMETERS = {"record_prefix_cache_stats": ("request", "num_hits"), "get_blocks": ("request_id",)}

#: The attributes this package sets on a vLLM ``Request`` (literal names below, for speed).
ADMITTED_GENERATION_ATTRIBUTE = "_otel_vllm_kv_admitted"
"""``num_preemptions`` at the last admission recorded: a KV connector asks for the blocks first."""
PREEMPTED_NS_ATTRIBUTE = "_otel_vllm_kv_preempted_ns"
"""When the request was last preempted, for the wait of its resumption."""

# A record's number comes from vLLM's own count (``Request.num_preemptions``, raised inside
# ``_preempt_request``): the admission is 1, the k-th preemption 2k, the resumption after it 2k + 1.


class AdmissionRecorder:
    """One engine's admission, preemption and delivery bookkeeping (its probe owns it)."""

    __slots__ = ("undelivered", "_scheduler", "_requests", "_queue", "_engine_fields", "_single_group",
                 "_waiting", "_preempted", "_finished", "_hits_request", "_hits", "_waiting_queues")

    def __init__(self, scheduler: Any, engine_index: int, num_blocks: int, limit_tokens: int) -> None:
        from vllm.v1.request import RequestStatus

        #: (request, its own ``trace_headers``, its output tokens at its first undelivered record).
        self.undelivered: list[tuple[Any, Any, int]] = []
        self._scheduler: Callable[[], Any] = weakref.ref(scheduler)  # alive: its own methods call us
        self._requests = scheduler.requests  # vLLM's id -> Request map, created once with the scheduler
        self._queue = scheduler.kv_cache_manager.block_pool.free_block_queue
        #: The fields every record of this engine carries unchanged, formatted once.
        self._engine_fields = ENGINE_FIELDS_FORMAT % (engine_index, num_blocks, limit_tokens)
        self._single_group = len(scheduler.kv_cache_manager.kv_cache_config.kv_cache_groups) == 1
        self._waiting, self._preempted = RequestStatus.WAITING, RequestStatus.PREEMPTED
        #: vLLM's ``RequestStatus.is_finished``, as a set: a lookup in C instead of two calls per request.
        self._finished = frozenset(status for status in RequestStatus if RequestStatus.is_finished(status))
        #: The local prefix-cache hits vLLM recorded for the request it is admitting (just before ``get_blocks``).
        self._hits_request: Any = None
        self._hits = 0
        #: What ``get_request_counts()[1]`` adds up, read in C; None: call it.
        self._waiting_queues = waiting_queues(scheduler)

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
                if num_hits:
                    recorder._hits_request = request
                    recorder._hits = num_hits
                return original(request, num_hits)

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
        if self._hits_request is request:
            hits = self._hits
            self._hits_request = None
        else:
            hits = 0
        generation = request.num_preemptions
        if getattr(request, "_otel_vllm_kv_admitted", -1) == generation:
            return  # a KV connector asked first, for the same admission
        request._otel_vllm_kv_admitted = generation  # ADMITTED_GENERATION_ATTRIBUTE
        now_ns = time_ns()
        # Since the preemption, when we saw it; else since arrival (as for a first admission).
        since_ns = getattr(request, "_otel_vllm_kv_preempted_ns", 0) if resumed else 0
        if not since_ns:
            since_ns = int(request.arrival_time * 1e9)
        if self._single_group:
            own_blocks = len(blocks.blocks[0])  # a full-attention group holds no null block
        else:
            own_blocks = 0
            for group in blocks.get_block_ids():
                own_blocks += len(group) - group.count(0)  # block 0 is vLLM's null block (outside a window)
        record = ENGINE_RECORD_FORMAT % (
            RESUMED if resumed else ADMITTED, 2 * generation + 1, now_ns, self._engine_fields,
            self._queue.num_free_blocks, own_blocks, hits, max(0, now_ns - since_ns), self._waiting_requests(),
        )
        self._append(request, record)

    def preemption(self, request: Any) -> None:
        now_ns = request._otel_vllm_kv_preempted_ns = time_ns()  # PREEMPTED_NS_ATTRIBUTE
        record = ENGINE_RECORD_FORMAT % (
            PREEMPTED, 2 * request.num_preemptions, now_ns, self._engine_fields,
            self._queue.num_free_blocks, 0, 0, 0, self._waiting_requests(),
        )
        self._append(request, record)

    def _waiting_requests(self) -> int:
        """vLLM's ``get_request_counts()[1]``."""
        queues = self._waiting_queues
        if queues is None:
            return self._scheduler().get_request_counts()[1]
        return sum(map(_queue_length, queues))

    def _append(self, request: Any, record: str) -> None:
        headers = request.trace_headers
        # A new mapping, never a mutation: outputs already built keep the one they reference.
        if headers and TRACE_HEADER_KEY in headers:
            # Its earlier records are not delivered yet, so it has produced no output since them.
            request.trace_headers = {**headers, TRACE_HEADER_KEY: headers[TRACE_HEADER_KEY] + RECORD_SEPARATOR + record}
        else:
            self.undelivered.append((request, headers, request.num_output_tokens))
            request.trace_headers = {**headers, TRACE_HEADER_KEY: record} if headers else {TRACE_HEADER_KEY: record}

    def deliver(self) -> None:
        """At the end of a step: requests that produced an output (or finished) have had their records sent."""
        waiting = []
        finished = self._finished
        for entry in self.undelivered:
            request = entry[0]
            if request.num_output_tokens > entry[2] or request.status in finished:
                request.trace_headers = entry[1]
            else:
                waiting.append(entry)
        self.undelivered = waiting

    def clear(self) -> None:
        """Give every request still holding records its own headers back (the probe is going)."""
        for request, original_headers, _ in self.undelivered:
            request.trace_headers = original_headers
        self.undelivered = []
