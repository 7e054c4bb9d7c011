"""Engine: record each request's admission and preemptions for its span.

Hooks on one scheduler's own methods (``probe``), each called by vLLM once per event
(never per running request per step):

* ``KVCacheManager.record_prefix_cache_stats``: the scheduler calls it for a request it is
  admitting, with the prompt tokens found in the local prefix cache, after allocating the
  request's blocks and just before popping it from the waiting queue (status still WAITING,
  or PREEMPTED for a resumption). The pool then holds exactly the occupancy "right after its
  blocks were allocated". Without a KV connector nothing can stop the admission after that
  call, so it is the only admission hook.
* With a KV connector, an asynchronous load turns the request away after that call; it is
  admitted later without a lookup (its tokens are computed), and there it is recorded once,
  at that call, when it got its blocks. A request admitted without a lookup and not seen
  before is recorded at ``KVCacheManager.get_blocks``, which the connector calls right after
  the allocation (before the pop).
* ``Scheduler._preempt_request``: after the request's blocks went back to the pool.

Only a request a frontend traces gets records: one whose ``trace_headers`` arrived with
``TRACED_HEADER_KEY`` (``frontend.spans`` puts it there). Its first record takes the key out, and
from then on the type of its mapping says so (``TracedHeaders``, or ``CarriedHeaders`` while records
wait), so its outputs carry no key of ours once their records are delivered. Any other request costs
an admission one type test and a key lookup.

Records travel in ``request.trace_headers`` (``admission_records``) and are delivered with the
request's next output; once delivered, the request gets its original mapping back (without the
frontend's key). While a
request's mapping is a ``CarriedHeaders``, its records are not delivered yet, so the mapping is
the only per-request buffer. A request can arrive with that key already in its mapping (an application
building ``AsyncLLM`` requests sets ``trace_headers`` itself): the first record replaces it, and the
mapping given back at delivery leaves it out. Attributes on vLLM's ``Request`` (as OpenTelemetry's instrumentations keep
a span on the object they trace) go with the request and cost no weak reference: the time of
the last preemption and, with a KV connector, the ``num_preemptions`` of the last admission
recorded. The only table is the recorder's list of requests whose records are not delivered
yet, emptied at the end of the step that delivers them.

This runs at every admission, so it is written for the interpreter: a record is packed straight
into its text by one ``struct`` call (no record object, no int conversion of the clock), its
number is derived from vLLM's own ``num_preemptions``, the engine's fields are closure cells,
and an admission costs two frames of ours: the hook and ``_carry`` (``benchmarks/call_costs.py``).
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable
from time import time
from typing import Any

from otel_vllm_kv.admission_records import (
    ADMITTED,
    FINISHED,
    KINDS,
    PREEMPTED,
    RECORD,
    RESUMED,
    TRACE_HEADER_KEY,
    TRACED_HEADER_KEY,
)
from otel_vllm_kv.engine.pool_reading import request_blocks, waiting_queues
from otel_vllm_kv.internals import attribute

_queue_length = deque.__len__
_pack = RECORD.pack
_ADMITTED, _RESUMED, _PREEMPTED, _FINISHED = (KINDS.index(kind) for kind in (ADMITTED, RESUMED, PREEMPTED, FINISHED))

#: The parameters of the ``KVCacheManager`` methods hooked with vLLM's own signature.
HOOKED_PARAMETERS = {"record_prefix_cache_stats": ("request", "num_hits"), "get_blocks": ("request_id",)}

#: The attributes this package sets on a vLLM ``Request`` (literal names below, for speed).
ADMITTED_GENERATION_ATTRIBUTE = "_otel_vllm_kv_admitted"
"""``num_preemptions`` at the last admission recorded (with a KV connector, two hooks can see one)."""
PREEMPTED_TIME_ATTRIBUTE = "_otel_vllm_kv_preempted"
"""When the request was last preempted (``time.time()``), for the wait of its resumption."""

# A record's number comes from vLLM's own count (``Request.num_preemptions``, raised inside
# ``_preempt_request``): the admission is 1, the k-th preemption 2k, the resumption after it 2k + 1.


class AdmissionRecorder:
    """One engine's admission, preemption and delivery bookkeeping (its probe owns it)."""

    __slots__ = (
        "undelivered",
        "_scheduler",
        "_requests",
        "_queue",
        "_engine",
        "_group_blocks",
        "_without_connector",
        "_waiting",
        "_preempted",
        "_finished",
        "_waiting_queues",
        "_residency",
    )

    def __init__(
        self, scheduler: Any, engine_index: int, num_blocks: int, limit_tokens: int, residency: Any = None
    ) -> None:
        from vllm.v1.request import RequestStatus

        #: (request, its own ``trace_headers``, its output-token list and that list's length at its first
        #: undelivered record); emptied in place, so the admission hook keeps the same list.
        self.undelivered: list[tuple[Any, Any, list, int]] = []
        self._scheduler: Callable[[], Any] = weakref.ref(scheduler)  # alive: its own methods call us
        self._requests = scheduler.requests  # vLLM's id -> Request map, created once with the scheduler
        self._queue = scheduler.kv_cache_manager.block_pool.free_block_queue
        #: The fields every record of this engine carries unchanged.
        self._engine = (engine_index, num_blocks, limit_tokens)
        #: Each KV-cache group's request id -> blocks map.
        self._group_blocks = request_blocks(scheduler)
        self._without_connector = getattr(scheduler, "connector", None) is None
        self._waiting, self._preempted = RequestStatus.WAITING, RequestStatus.PREEMPTED
        #: vLLM's ``RequestStatus.is_finished``, as a set: a lookup in C instead of two calls per request.
        self._finished = frozenset(status for status in RequestStatus if RequestStatus.is_finished(status))
        #: What ``get_request_counts()[1]`` adds up, read in C; None: call it.
        self._waiting_queues = waiting_queues(scheduler)
        #: The ``residency.ResidencyLedger`` each admission reads, if residency is kept.
        self._residency = residency

    def hooks(self, give_up: Callable[[], None]) -> tuple[dict, dict]:
        """The hooks of the scheduler's and the manager's own methods (``patching.hook_methods``)."""
        recorder = self

        def preempt_request(original: Callable) -> Callable:
            def _preempt_request(*args: Any, **kwargs: Any) -> Any:  # rare: any signature
                result = original(*args, **kwargs)
                try:
                    recorder.preemption(args[0] if args else kwargs["request"])
                except Exception:  # noqa: BLE001 - the engine must never see our failure
                    give_up()
                return result

            return _preempt_request

        on_manager = {"record_prefix_cache_stats": lambda original: self._admitter(original, give_up)}
        if not self._without_connector:
            on_manager["get_blocks"] = self._unlooked_admissions(self._admitter(None, give_up), give_up)
        return {"_preempt_request": preempt_request}, on_manager

    def _unlooked_admissions(self, admit: Callable[[Any, int], None], give_up: Callable[[], None]) -> Callable:
        """With a KV connector: the ``get_blocks`` hook, for admissions without a prefix-cache lookup."""
        requests = self._requests
        waiting, preempted = self._waiting, self._preempted

        def get_blocks(original: Callable) -> Callable:
            def get_blocks(request_id: str) -> Any:
                blocks = original(request_id)
                try:
                    request = requests.get(request_id)
                    # No computed tokens yet: a lookup admission, which record_prefix_cache_stats records.
                    if request is not None and request.num_computed_tokens:
                        status = request.status
                        if status == waiting or status == preempted:
                            admit(request, 0)
                except Exception:  # noqa: BLE001
                    give_up()
                return blocks

            return get_blocks

        return get_blocks

    def _admitter(self, original: Callable | None, give_up: Callable[[], None]) -> Callable[[Any, int], Any]:
        """The admission recorder: ``admit(request, local prefix-cache hits)``, the request's blocks allocated
        and the request not popped from its queue yet.

        With vLLM's ``record_prefix_cache_stats`` as ``original`` it is that method's hook (calling it
        first), so an admission costs one frame of ours besides ``_carry``; with None, the recorder the
        ``get_blocks`` hook calls. The engine's fields are closure cells (cheaper than attribute reads)
        and the waiting count is inline.
        """
        queue = self._queue
        engine_index, num_blocks, limit_tokens = self._engine
        group_blocks = self._group_blocks
        single_group = group_blocks[0] if len(group_blocks) == 1 else None
        queues = self._waiting_queues
        # Each queue's ``deque.__len__`` bound to it once: a call of the bound method costs half the unbound one's.
        lengths = None if queues is None else tuple(_queue_length.__get__(queue) for queue in queues)
        scheduler = self._scheduler
        undelivered = self.undelivered
        once = not self._without_connector  # with a connector, two hooks can see one admission
        acquire = None if self._residency is None else self._residency.acquire
        traced_types = TRACED_TYPES

        def record_prefix_cache_stats(request: Any, num_hits: int) -> Any:
            result = None if original is None else original(request, num_hits)
            try:
                generation = request.num_preemptions  # 0: first admission; k: the resumption after the k-th preemption
                if once:
                    if getattr(request, "_otel_vllm_kv_admitted", -1) == generation:
                        return result  # recorded when its blocks were allocated, before an asynchronous load
                    request._otel_vllm_kv_admitted = generation  # ADMITTED_GENERATION_ATTRIBUTE
                if acquire is not None and (num_hits or generation):
                    acquire(request, num_hits)
                headers = request.trace_headers
                if headers is None or not (type(headers) in traced_types or TRACED_HEADER_KEY in headers):
                    return result  # no frontend traces it: no record (``traced``, inline)
                now = time()
                # Since the preemption, when we saw it; else since arrival (as for a first admission).
                queued = now - (
                    (generation and getattr(request, "_otel_vllm_kv_preempted", 0.0)) or request.arrival_time
                )
                if queued < 0.0:
                    queued = 0.0  # the wall clock stepped back
                if single_group is not None:
                    own_blocks = len(single_group[request.request_id])  # a full-attention group holds no null block
                else:
                    own_blocks = 0
                    request_id = request.request_id
                    for blocks in group_blocks:
                        own_blocks += sum(
                            1 for block in blocks.get(request_id, ()) if not block.is_null
                        )  # outside a window
                # Still queued: the request itself is not waiting any more.
                if lengths is None:
                    waiting = scheduler().get_request_counts()[1] - 1
                else:
                    waiting = lengths[0]() + lengths[1]() + lengths[2]() - 1
                record = _pack(
                    _RESUMED if generation else _ADMITTED,
                    2 * generation + 1,
                    now,
                    engine_index,
                    num_blocks,
                    limit_tokens,
                    queue.num_free_blocks,
                    own_blocks,
                    num_hits,
                    queued,
                    waiting,
                    0.0,
                    0,
                ).hex()
                _carry(undelivered, request, record)
            except Exception:  # noqa: BLE001 - the engine must never see our failure
                give_up()
            return result

        return record_prefix_cache_stats

    def preemption(self, request: Any) -> None:
        if not traced(request.trace_headers):
            return
        now = request._otel_vllm_kv_preempted = time()  # PREEMPTED_TIME_ATTRIBUTE
        record = _pack(
            _PREEMPTED,
            2 * request.num_preemptions,
            now,
            *self._engine,
            self._queue.num_free_blocks,
            0,
            0,
            0.0,
            self._waiting_requests(),
            0.0,
            0,
        ).hex()
        _carry(self.undelivered, request, record)

    def finisher(self) -> Callable[[Any, float, int, int], None]:
        """``residency.OnRelease``: a finished request a frontend traces (``traced``) gave its blocks
        back; its last record carries what it held, for the output vLLM builds right after
        (``Scheduler.update_from_output``). A closure over the engine's fields, as the admission hook is."""
        engine_index, num_blocks, limit_tokens = self._engine
        queue, undelivered = self._queue, self.undelivered

        def finished(request: Any, block_seconds: float, peak_blocks: int, recomputed_tokens: int) -> None:
            record = _pack(
                _FINISHED,
                2 * request.num_preemptions + 2,
                time(),
                engine_index,
                num_blocks,
                limit_tokens,
                queue.num_free_blocks,
                peak_blocks,
                0,
                0.0,
                0,
                block_seconds,
                recomputed_tokens,
            ).hex()
            _carry(undelivered, request, record)

        return finished

    def _waiting_requests(self) -> int:
        """vLLM's ``get_request_counts()[1]``."""
        queues = self._waiting_queues
        if queues is None:
            return self._scheduler().get_request_counts()[1]
        return sum(map(_queue_length, queues))

    def deliver(self) -> None:
        """At the end of a step: requests that produced an output (or finished) have had their records sent."""
        waiting = []
        finished = self._finished
        for entry in self.undelivered:
            request, headers, outputs, num_outputs = entry
            if len(outputs) > num_outputs or request.status in finished:
                request.trace_headers = headers
            else:
                waiting.append(entry)
        self.undelivered[:] = waiting

    def clear(self) -> None:
        """Give every request still holding records its own headers back (the probe is going)."""
        for request, original_headers, _, _ in self.undelivered:
            request.trace_headers = original_headers
        self.undelivered.clear()


class TracedHeaders(dict):
    """The ``trace_headers`` of a request a frontend traces, from its first record on, without the
    frontend's key: its type says the request is traced (one identity test at each later record), and
    its outputs carry no key of ours. vLLM's msgpack encoder sends it as a plain mapping."""

    __slots__ = ()


class CarriedHeaders(dict):
    """A traced request's ``trace_headers`` while it carries undelivered records: its type says so, which
    costs one identity test where a scan of the undelivered requests cost a generator (a second
    record before the request's next output: a preemption, or a finish, in the step of its admission).
    vLLM's msgpack encoder sends it as a plain mapping, which is what the frontend decodes."""

    __slots__ = ()


#: The types of a traced request's ``trace_headers`` once it was admitted.
TRACED_TYPES = (TracedHeaders, CarriedHeaders)
#: What a traced request submitted with no headers of its own gets back: one mapping shared by all of them,
#: never changed (vLLM reads ``trace_headers``, and every mapping this package gives a request is new).
_NO_HEADERS = TracedHeaders()


def traced(headers: Any) -> bool:
    """Whether a request with these ``trace_headers`` is one a frontend traces: asked for records, or
    admitted after it was (the admission hook and the release hook have this inline)."""
    return headers is not None and (type(headers) in TRACED_TYPES or TRACED_HEADER_KEY in headers)


def _carry(undelivered: list, request: Any, record: str) -> None:
    """Put ``record`` in the request's ``trace_headers``, after its undelivered ones."""
    headers = request.trace_headers
    # A new mapping, never a mutation: outputs already built keep the one they reference.
    if type(headers) is CarriedHeaders:  # its earlier records are not delivered: no output since them
        carried = CarriedHeaders(headers)
        carried[TRACE_HEADER_KEY] += record
        request.trace_headers = carried
        return
    if type(headers) is not TracedHeaders:
        # Its first record: the frontend's key goes, and any records it arrived with (an application
        # that builds its own ``trace_headers``, ``AsyncLLM``, could forge them). The request gets these
        # headers back at delivery: from its admission on, its outputs carry the engine's records only.
        if len(headers) == 1:  # the frontend's key alone (the request is traced): the one empty mapping
            headers = _NO_HEADERS
        else:
            headers = TracedHeaders(headers)
            headers.pop(TRACED_HEADER_KEY, None)
            headers.pop(TRACE_HEADER_KEY, None)
    # vLLM's ``num_output_tokens`` is a property (a Python frame) returning len(_output_token_ids).
    outputs = request._output_token_ids
    undelivered.append((request, headers, outputs, len(outputs)))
    # A dict subclass built from a mapping, even an empty one, costs twice one built empty.
    carried = CarriedHeaders(headers) if headers else CarriedHeaders()
    carried[TRACE_HEADER_KEY] = record
    request.trace_headers = carried


#: What the recorder reads of the scheduler and of each vLLM ``Request`` (``internals``).
REQUIRED = (
    attribute("vllm.v1.core.sched.scheduler", "Scheduler.requests"),
    *(
        attribute("vllm.v1.request", f"Request.{name}")
        for name in (
            "trace_headers",
            "num_preemptions",
            "_output_token_ids",
            "arrival_time",
            "status",
            "request_id",
            "num_computed_tokens",
        )
    ),
)
