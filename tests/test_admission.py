"""Admission and preemption records on real vLLM schedulers (engine-core side)."""

from __future__ import annotations

import gc
import weakref

import pytest
from opentelemetry.sdk.metrics import MeterProvider

from otel_vllm_kv import VLLMKVCacheInstrumentor
from otel_vllm_kv.admission_records import ADMITTED, PREEMPTED, RESUMED, TRACE_HEADER_KEY, TRACED_HEADER_KEY, decode
from otel_vllm_kv.engine import admission, probe
from otel_vllm_kv.frontend.admission_attributes import record_attributes
from tests.support.schedulers import (
    Stepper,
    build_scheduler,
    build_vllm_config,
    make_request,
    runner_output,
    scheduler_on,
)

#: Every test runs on vLLM's Scheduler and on its AsyncScheduler (``vllm_scheduler``).
pytestmark = pytest.mark.usefixtures("vllm_scheduler")


@pytest.fixture(autouse=True)
def instrumented():
    VLLMKVCacheInstrumentor().instrument(meter_provider=MeterProvider())
    yield
    VLLMKVCacheInstrumentor().uninstrument()


def events_of(request) -> list:
    headers = request.trace_headers or {}
    return decode(headers[TRACE_HEADER_KEY]) if TRACE_HEADER_KEY in headers else []


@pytest.mark.parametrize("policy", ["fcfs", "priority"])  # deques read in C; a heap through get_request_counts
def test_each_admission_sees_the_pool_right_after_its_own_allocation(tiny_model_dir, policy):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=11, block_size=16, policy=policy)
    first = make_request(scheduler, num_prompt_tokens=40, max_tokens=50, first_token=0)
    second = make_request(scheduler, num_prompt_tokens=20, max_tokens=50, first_token=500)
    third = make_request(scheduler, num_prompt_tokens=100, max_tokens=50, first_token=900)  # does not fit yet
    for request in (first, second, third):
        scheduler.add_request(request)
    scheduler.schedule()
    (a,) = events_of(first)
    (b,) = events_of(second)
    assert events_of(third) == []
    assert (a.kind, a.sequence, a.own_blocks, a.free_blocks) == (ADMITTED, 1, 3, 10 - 3)
    assert (b.kind, b.own_blocks, b.free_blocks) == (ADMITTED, 2, 10 - 3 - 2)
    assert (a.waiting, b.waiting) == (2, 1), "requests still queued once each was admitted"
    assert a.time_ns <= b.time_ns and 0.0 <= a.queue_seconds < 60
    attributes = record_attributes(a)
    assert attributes["vllm.admission.kv_cache.used_tokens"] == 48
    assert attributes["vllm.admission.kv_cache.free_tokens"] == 112
    assert attributes["vllm.admission.kv_cache.limit_tokens"] == 160
    assert attributes["vllm.request.kv_cache.tokens"] == 48


def test_a_kv_connector_changes_no_record(tiny_model_dir, tmp_path):
    """With a KV connector the admission is recorded at ``get_blocks`` (the connector asks first), not at
    ``record_prefix_cache_stats``: the same records, each once, including a prefix hit and a preemption."""

    def run(example_connector_dir):
        scheduler = scheduler_on(
            build_vllm_config(tiny_model_dir, num_blocks=6, block_size=16, example_connector_dir=example_connector_dir)
        )
        assert ("get_blocks" in vars(scheduler.kv_cache_manager)) == (example_connector_dir is not None)
        requests = crowd(scheduler, 2) + [make_request(scheduler, 30, max_tokens=3, first_token=0)]  # 0's prefix
        scheduler.add_request(requests[-1])
        history = records_until_idle(scheduler, requests)
        return [
            [record._replace(time=0.0, queue_seconds=0.0) for record in history[request.request_id]]
            for request in requests
        ]

    plain, with_connector = run(None), run(str(tmp_path))
    assert with_connector == plain
    kinds = [record.kind for records in plain for record in records]
    assert PREEMPTED in kinds and RESUMED in kinds, kinds
    assert [records[0].waiting for records in plain] == [2, 1, 0]
    assert plain[2][0].cached_tokens == 16, "one full block of request 0's prompt"


def test_hybrid_admissions_carry_tokens_of_vllms_group_aware_capacity(tiny_model_dir):
    from otel_vllm_kv.engine.pool_reading import read_layout

    scheduler = build_scheduler(tiny_model_dir, num_blocks=41, block_size=16, sliding_window=32)
    limit = read_layout(scheduler).limit_tokens
    request = make_request(scheduler, num_prompt_tokens=100, max_tokens=5)
    scheduler.add_request(request)
    scheduler.schedule()
    (event,) = events_of(request)
    attributes = record_attributes(event)
    # 7 full-attention blocks and 7 window blocks (all of a 100-token prefill is computed at once).
    assert (event.own_blocks, attributes["vllm.admission.kv_cache.used_blocks"]) == (14, 14)
    assert attributes["vllm.admission.kv_cache.limit_tokens"] == limit
    assert attributes["vllm.admission.kv_cache.used_tokens"] == 14 * limit // 40
    assert attributes["vllm.admission.kv_cache.free_tokens"] == limit - 14 * limit // 40
    assert attributes["vllm.request.kv_cache.tokens"] == 14 * limit // 40


def test_records_leave_the_request_once_delivered(tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir)
    request = make_request(scheduler, num_prompt_tokens=20, max_tokens=5)
    scheduler.add_request(request)
    stepper = Stepper(scheduler)
    output = scheduler.schedule()
    headers_in_flight = request.trace_headers
    assert TRACE_HEADER_KEY in headers_in_flight
    outputs = scheduler.update_from_output(output, runner_output(output))
    (emitted,) = outputs[0].outputs
    assert emitted.trace_headers is headers_in_flight and TRACE_HEADER_KEY in emitted.trace_headers
    assert request.trace_headers == {}, "the caller's mapping is back, without the frontend's key (here: empty)"
    stepper.run_until_idle()


def test_a_request_no_frontend_traces_gets_no_record(tiny_model_dir):
    """The engine writes records only for requests a frontend asked them for (``TRACED_HEADER_KEY``): any
    other request's outputs carry its own headers, untouched, and the frontend's key never comes back."""
    scheduler = build_scheduler(tiny_model_dir, num_blocks=6, block_size=16)
    own = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    untraced = make_request(scheduler, 30, max_tokens=40, traced=False, trace_headers=own)
    bare = make_request(scheduler, 30, max_tokens=40, first_token=1000, traced=False)
    traced = make_request(scheduler, 30, max_tokens=40, first_token=2000, trace_headers=own)
    stepper = Stepper(scheduler)
    for request in (untraced, bare, traced):
        scheduler.add_request(request)
    stepper.run_until_idle()
    assert untraced.num_preemptions + bare.num_preemptions > 0, "an untraced request's preemption is covered"
    by_request: dict = {}
    for engine_outputs in stepper.outputs:
        for output in engine_outputs.outputs:
            by_request.setdefault(output.request_id, []).append(output.trace_headers)
    assert all(headers is own for headers in by_request[untraced.request_id])
    assert all(headers is None for headers in by_request[bare.request_id])
    carried = [headers for headers in by_request[traced.request_id] if TRACE_HEADER_KEY in headers]
    assert [record.kind for headers in carried for record in decode(headers[TRACE_HEADER_KEY])][:1] == ["admitted"]
    assert all(TRACED_HEADER_KEY not in headers for headers in by_request[traced.request_id])
    assert all(headers == own for headers in by_request[traced.request_id] if TRACE_HEADER_KEY not in headers)


def test_prefix_cache_hits_are_reported(tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=20, block_size=16)
    stepper = Stepper(scheduler)
    scheduler.add_request(make_request(scheduler, num_prompt_tokens=40, max_tokens=2))
    stepper.run_until_idle()
    again = make_request(scheduler, num_prompt_tokens=40, max_tokens=2)  # same 40 prompt tokens
    scheduler.add_request(again)
    scheduler.schedule()
    (event,) = events_of(again)
    assert event.cached_tokens == 32, "two full 16-token blocks come from the prefix cache"
    assert record_attributes(event)["gen_ai.usage.cache_read.input_tokens"] == 32


def crowd(scheduler, count: int) -> list:
    """Requests that outgrow a 5-block pool together: 30 prompt + 40 output tokens each."""
    requests = [make_request(scheduler, 30, max_tokens=40, first_token=1000 * i) for i in range(count)]
    for request in requests:
        scheduler.add_request(request)
    return requests


def records_until_idle(scheduler, requests) -> dict[str, list]:
    """Step until idle; each request's records in the order first seen (a record seen again is unchanged)."""
    stepper = Stepper(scheduler)
    seen: dict[str, dict[int, tuple]] = {request.request_id: {} for request in requests}
    for _ in range(400):
        if not scheduler.has_requests():
            break
        output = scheduler.schedule()
        for request in requests:
            for record in events_of(request):
                assert seen[request.request_id].setdefault(record.sequence, record) == record
        stepper.finish(output)
    return {request_id: list(records.values()) for request_id, records in seen.items()}


def test_preemption_and_resumption_are_recorded_in_order(tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=6, block_size=16)
    requests = crowd(scheduler, 2)
    history = records_until_idle(scheduler, requests)
    kinds = [[event.kind for event in history[r.request_id]] for r in requests]
    preempted = [k for k in kinds if PREEMPTED in k]
    assert preempted, f"no preemption happened: {kinds}"
    assert [admission.PREEMPTED_TIME_ATTRIBUTE in vars(r) for r in requests] == [PREEMPTED in k for k in kinds]
    for sequence in preempted:
        assert sequence[0] == ADMITTED
        assert sequence[1:] == [PREEMPTED, RESUMED] * ((len(sequence) - 1) // 2)
    for request in requests:
        events = history[request.request_id]
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        for event in events:
            if event.kind == PREEMPTED:
                assert event.own_blocks == 0
            if event.kind == RESUMED:
                assert event.queue_seconds >= 0 and event.own_blocks > 0


def test_no_per_request_state_outlives_the_requests(tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=6, block_size=16)
    stepper = Stepper(scheduler)
    requests = crowd(scheduler, 6)
    stepper.step()
    from vllm.v1.request import RequestStatus

    scheduler.finish_requests([requests[0].request_id, requests[5].request_id], RequestStatus.FINISHED_ABORTED)
    stepper.run_until_idle()
    assert any(admission.PREEMPTED_TIME_ATTRIBUTE in vars(request) for request in requests), "requests had state"
    assert probe.registry.attach(scheduler).recorder.undelivered == [], "every record was delivered"
    alive = [weakref.ref(request) for request in requests]
    del requests
    stepper.outputs.clear()
    gc.collect()
    assert [ref for ref in alive if ref() is not None] == [], "the state went with the requests"


def test_records_round_trip_exactly_and_garbage_is_rejected():
    from otel_vllm_kv.admission_records import AdmissionRecord, encode

    events = [
        AdmissionRecord(
            ADMITTED,
            1,
            1_795_000_000.123_456_7,
            3,
            64,
            63 * 128,
            17,
            own_blocks=2,
            cached_tokens=256,
            queue_seconds=0.012_345_678,
            waiting=9,
        ),
        AdmissionRecord(PREEMPTED, 2, 1_795_000_000.223_456_7, 3, 64, -1, 40, waiting=10),
    ]
    assert decode(encode(events)) == events
    for garbage in ("", "admitted,1,2", '[["admitted",1]]'):
        with pytest.raises(ValueError):
            decode(garbage)


def test_the_waiting_count_reads_every_queue_vllm_counts(tiny_model_dir):
    """``vllm.admission.waiting_requests`` is vLLM's ``get_request_counts()[1]``: from 0.34 that adds
    ``async_kv_waiting`` (requests that may load their KV asynchronously, queued apart) to ``waiting``
    and ``kv_holding_waiting``. A request queued there is counted by the admissions before it."""
    scheduler = build_scheduler(tiny_model_dir, num_blocks=11, block_size=16)
    if getattr(scheduler, "async_kv_waiting", None) is None:
        pytest.skip("this vLLM has no async_kv_waiting queue")
    first = make_request(scheduler, num_prompt_tokens=20, max_tokens=5, first_token=0)
    later = make_request(scheduler, num_prompt_tokens=20, max_tokens=5, first_token=500)
    scheduler.add_request(first)
    scheduler.async_kv_waiting.add_request(later)  # where vLLM queues it with --max-num-inflight-kv-loads
    scheduler.requests[later.request_id] = later
    assert scheduler.get_request_counts()[1] == 2
    scheduler.schedule()
    (a,), (b,) = events_of(first), events_of(later)
    assert (a.waiting, b.waiting) == (1, 0), "the request in async_kv_waiting was still queued"
    recorder = probe.registry.attach(scheduler).recorder
    assert recorder._waiting_requests() == scheduler.get_request_counts()[1] == 0
