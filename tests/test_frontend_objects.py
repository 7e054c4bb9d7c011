"""The frontend hooks on real vLLM objects, with no engine process and no model.

``spans.PATCHES`` (on ``vllm.v1.engine.output_processor``) run on a real ``OutputProcessor``,
built as vLLM's own ``tests/v1/engine/test_output_processor.py`` builds one, with the tiny
model's byte-level tokenizer. Requests are the release's own ``EngineCoreRequest`` s, given to
the processor (``add_request``) and, as ``EngineCore.add_request`` does, to a real ``Scheduler``
as ``Request.from_engine_core_request``. The scheduler runs with the instrumentation active, so
the package's probe writes genuine admission records into each request's ``trace_headers``; the
``EngineCoreOutputs`` it produces are handed to ``process_outputs`` in the order
``LLMEngine.step`` hands them (with an ``IterationStats``, so vLLM's ``do_tracing`` runs when
tracing is on). Only the forward pass is replaced, by ``schedulers.runner_output``. Each
scenario runs twice in one test, without and with the instrumentation, and the request outputs
the processor returns (or queues) must be equal, every field but the timing ``metrics``.

``unprobed_engines.PATCHES`` (on ``vllm.v1.engine.core_client``):

* ``AsyncMPClient`` is built for real in its external-engine mode (``client_addresses``, how an
  API server talks to engines it did not start): vLLM's ``MPClient.__init__`` binds its sockets
  and waits for the engine's handshake, calling ``_apply_ready_response`` itself; its own output
  task decodes each message and ``get_output_async`` returns it. The engine's side of the wire
  is two ZMQ sockets in the test (``external_engine``) that send what ``EngineCoreProc`` sends:
  the real ``EngineCoreReadyResponse`` (msgpack) from the identity of engine 0, then the real
  ``EngineCoreOutputs`` (with ``SchedulerStats``) of a real scheduler, encoded by vLLM's
  ``MsgpackEncoder``.
* ``SyncMPClient`` cannot be built without starting engine processes: in 0.32, 0.33 and 0.34
  its ``__init__`` takes no ``client_addresses`` and always launches engine cores. Its
  ``get_output`` runs on a ``SyncMPClient`` made by ``__new__`` whose base constructor
  (``MPClient.__init__``, external-engine mode, the same real handshake) did run; what
  ``SyncMPClient.__init__`` adds, a ``queue.Queue`` fed by an output thread, is done by the
  test with that thread's own loop body (receive on the client's output socket, decode with the
  client's decoder). Not covered here: that thread and the launch of engine processes (they run,
  with no assertion on these hooks, under the full ``LLM`` of ``test_engines.py``).

Not covered here: the ``instrument_manual`` hook under a parent that arrived in an HTTP
``traceparent`` (``test_openai_server.py``, on a real server) and data-parallel engines
(``test_engines.py``); parallel sampling (``n > 1``) and pooling requests, in no test.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import zmq
from opentelemetry import baggage, context, trace
from vllm.utils.network_utils import get_open_zmq_ipc_path
from vllm.v1.engine.core_client import AsyncMPClient, MPClient, SyncMPClient
from vllm.v1.serial_utils import MsgpackEncoder

from otel_vllm_kv import names
from otel_vllm_kv.admission_records import ADMITTED, FINISHED, PREEMPTED, RESUMED
from otel_vllm_kv.engine import probe
from otel_vllm_kv.environment_variables import OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY
from otel_vllm_kv.frontend import spans
from otel_vllm_kv.frontend.admission_attributes import record_attributes
from otel_vllm_kv.frontend.unprobed_engines import reporter
from otel_vllm_kv.relay_reader import SnapshotReader
from tests.support.frontend import (
    BLOCK_SIZE,
    EVENT_NAMES,
    Frontend,
    busy_workload,
    crowd,
    expected_span,
    instrumented,
    ready_payload,
    span_events,
)
from tests.support.schedulers import build_scheduler, build_vllm_config


@pytest.mark.usefixtures("vllm_scheduler")
def test_one_request_gives_the_span_current_at_submission_its_admission(tokenizer, tiny_model_dir, tracer_provider):
    """The span current at ``add_request`` gets, as attributes, exactly what the engine's records say: the
    request's 3 blocks of 16 tokens in a 10-block pool, nothing cached, nobody waiting; at its finish, what it
    held (3 blocks at most, nothing recomputed); and no event."""
    provider, _ = tracer_provider

    def run():
        frontend = Frontend(tokenizer, tiny_model_dir)
        span = provider.get_tracer("test").start_span("request")
        with trace.use_span(span):
            frontend.submit("req-0", "x" * 40, max_tokens=5)
        frontend.run_until_idle()
        span.end()
        return frontend, span

    plain, _ = run()
    with instrumented(provider):
        frontend, span = run()
        assert spans.annotator.requests == {}, "the finished request is forgotten"
    record, finish = frontend.records()["req-0-int"]
    attributes = dict(span.attributes)
    assert attributes == {**record_attributes(record), names.REQUEST_PREEMPTIONS: 0, **record_attributes(finish)}
    assert (attributes[names.REQUEST_KV_BLOCKS], attributes[names.ADMISSION_FREE_BLOCKS]) == (3, 10 - 3)
    assert attributes[names.ADMISSION_USED_TOKENS] == attributes[names.REQUEST_KV_TOKENS] == 3 * BLOCK_SIZE
    assert attributes[names.ADMISSION_LIMIT_TOKENS] == 10 * BLOCK_SIZE
    assert (attributes[names.CACHE_READ_INPUT_TOKENS], attributes[names.ADMISSION_WAITING_REQUESTS]) == (0, 0)
    assert (attributes[names.REQUEST_KV_PEAK_TOKENS], attributes[names.REQUEST_KV_RECOMPUTED_TOKENS]) == (48, 0)
    assert attributes[names.REQUEST_KV_TOKEN_SECONDS] > 0.0
    assert not span.events
    assert frontend.outputs == plain.outputs and len(plain.outputs) == 5
    assert plain.outputs[-1]["finished"] and plain.outputs[-1]["outputs"][0].token_ids == [7] * 5


@pytest.mark.usefixtures("vllm_scheduler")
def test_a_batch_span_gets_one_event_per_record_of_each_request(tokenizer, tiny_model_dir, tracer_provider):
    """One span submitting several requests gets one event per admission, preemption and resumption,
    each the engine's record (its time, its attributes) plus the caller's request id, each exactly once."""
    provider, _ = tracer_provider
    tracer = provider.get_tracer("test")
    plain = Frontend(tokenizer, tiny_model_dir, num_blocks=6)
    crowd(plain, tracer, spans_per_request=False)
    with instrumented(provider):
        frontend = Frontend(tokenizer, tiny_model_dir, num_blocks=6)
        (span,) = crowd(frontend, tracer, spans_per_request=False)
        assert spans.annotator.requests == {}
    expected = sorted(
        (
            record.time_ns,
            EVENT_NAMES[record.kind],
            {**record_attributes(record), names.REQUEST_ID: request_id.removesuffix("-int")},
        )
        for request_id, records in frontend.records().items()
        for record in records
    )
    assert span_events(span) == expected
    kinds = [name for _, name, _ in expected]
    assert kinds.count(names.EVENT_ADMITTED) == 3
    assert kinds.count(names.EVENT_PREEMPTED) == kinds.count(names.EVENT_RESUMED) > 0, "vLLM preempted and resumed"
    assert not span.attributes, "several requests: events, no attributes"
    assert frontend.outputs == plain.outputs


@pytest.mark.usefixtures("vllm_scheduler")
def test_a_span_per_request_gets_its_admission_and_preemption_count(tokenizer, tiny_model_dir, tracer_provider):
    """One span per request (an API server): attributes of its admission, its preemptions counted in
    ``vllm.request.preemptions``, each preemption and resumption an event without a request id."""
    provider, _ = tracer_provider
    tracer = provider.get_tracer("test")
    plain = Frontend(tokenizer, tiny_model_dir, num_blocks=6)
    crowd(plain, tracer, spans_per_request=True)
    with instrumented(provider):
        frontend = Frontend(tokenizer, tiny_model_dir, num_blocks=6)
        opened = crowd(frontend, tracer, spans_per_request=True)
    records = frontend.records()
    preempted_total = 0
    for index, span in enumerate(opened):
        request_records = records[f"req-{index}-int"]
        preempted_total += sum(record.kind == PREEMPTED for record in request_records)
        assert request_records[0].kind == ADMITTED and request_records[-1].kind == FINISHED
        assert (dict(span.attributes), span_events(span)) == expected_span(request_records)
    assert preempted_total > 0, "vLLM preempted a request"
    assert frontend.outputs == plain.outputs


@pytest.mark.usefixtures("vllm_scheduler")
def test_vllms_request_span_gets_the_admission_and_the_submitting_span_as_parent(
    tokenizer, tiny_model_dir, vllm_tracing
):
    """With vLLM's tracing on, ``do_tracing`` -> ``instrument_manual`` makes one ``llm_request`` span per
    finished request: it keeps vLLM's attributes, gets its request's admission and preemption count, and is
    a child of the span current at submission. A request submitted with no span still gets its admission."""
    provider, exporter = vllm_tracing
    tracer = provider.get_tracer("test")

    def run():
        frontend = Frontend(tokenizer, tiny_model_dir, num_blocks=6, tracing_enabled=True)
        batch = tracer.start_span("batch")
        with trace.use_span(batch):
            for index in range(2):
                frontend.submit(f"req-{index}", chr(ord("a") + index) * 30, max_tokens=40)
        frontend.submit("req-2", "c" * 30, max_tokens=40)  # no span current
        frontend.run_until_idle()
        batch.end()
        return frontend, batch

    plain, _ = run()
    exporter.clear()
    with instrumented(provider):
        frontend, batch = run()
    requests = {s.attributes["gen_ai.request.id"]: s for s in exporter.get_finished_spans() if s.name == "llm_request"}
    assert sorted(requests) == ["req-0", "req-1", "req-2"]
    records = frontend.records()
    preempted_total = 0
    for external_id, span in requests.items():
        admission, *later = records[f"{external_id}-int"]
        preemptions = sum(record.kind == PREEMPTED for record in later)
        preempted_total += preemptions
        assert {name: span.attributes[name] for name in record_attributes(admission)} == record_attributes(admission)
        assert span.attributes[names.REQUEST_PREEMPTIONS] == preemptions
        waits = [record.queue_seconds for record in later if record.kind == RESUMED]
        assert span.attributes.get(names.REQUEST_PREEMPTED_DURATION) == (sum(waits) if preemptions else None)
        assert span.attributes["gen_ai.usage.completion_tokens"] == 40, "vLLM's own attributes are kept"
        if external_id == "req-2":
            assert span.parent is None
        else:
            assert (span.parent.span_id, span.context.trace_id) == (batch.context.span_id, batch.context.trace_id)
    assert preempted_total > 0
    assert frontend.outputs == plain.outputs


@pytest.mark.usefixtures("vllm_scheduler")
def test_aborted_requests_are_forgotten_and_abort_outputs_unchanged(tokenizer, tiny_model_dir, tracer_provider):
    """AsyncLLM's path (per-request queues): requests aborted after admission, one by the caller's id and one
    by vLLM's internal id, are forgotten at once; the others finish; the abort outputs are vLLM's own."""
    provider, _ = tracer_provider

    def run():
        frontend = Frontend(tokenizer, tiny_model_dir, num_blocks=41, queues=True)
        span = provider.get_tracer("test").start_span("client")
        with trace.use_span(span):
            ids = [frontend.submit(f"req-{index}", chr(ord("a") + index) * 30, max_tokens=20) for index in range(3)]
        for _ in range(3):
            frontend.step()
        assert frontend.abort(["req-0"], internal=False) == [ids[0]]
        assert frontend.abort([ids[1]], internal=True) == [ids[1]]
        tracked_after_abort = set(spans.annotator.requests)
        frontend.run_until_idle()
        span.end()
        return frontend, span, tracked_after_abort

    plain, _, _ = run()
    with instrumented(provider):
        frontend, span, tracked_after_abort = run()
        assert spans.annotator.requests == {}
    assert tracked_after_abort == {"req-2-int"}
    admitted = [event.attributes[names.REQUEST_ID] for event in span.events if event.name == names.EVENT_ADMITTED]
    assert sorted(admitted) == ["req-0", "req-1", "req-2"]
    finished = [output for output in frontend.outputs if output["finished"]]
    assert [output["outputs"][0].finish_reason for output in finished] == ["abort", "abort", "length"]
    assert frontend.outputs == plain.outputs


def test_nothing_is_tracked_without_a_recording_span_or_vllm_tracing(tokenizer, tiny_model_dir, tracer_provider):
    """No span current and vLLM's tracing off: no request is tracked, so none asks its engine for records
    (``TRACED_HEADER_KEY``): the engine writes none, and the outputs are vLLM's own."""
    provider, _ = tracer_provider
    plain = Frontend(tokenizer, tiny_model_dir)
    plain.submit("req-0", "x" * 40, max_tokens=5)
    plain.run_until_idle()
    with instrumented(provider):
        frontend = Frontend(tokenizer, tiny_model_dir)
        frontend.submit("req-0", "x" * 40, max_tokens=5)
        assert spans.annotator.requests == {}
        frontend.run_until_idle()
    assert frontend.records() == {}, "the engine wrote records no frontend asked for"
    assert all(output.trace_headers is None for output in frontend.engine_outputs)
    assert frontend.outputs == plain.outputs


# --- The engine-core clients ---------------------------------------------------------------------------


@dataclass
class EngineStep:
    outputs: object
    """The ``EngineCoreOutputs`` of one step that carries ``SchedulerStats``, as the engine core sends it."""
    free_blocks: int
    """The scheduler's free blocks after that step."""


def engine_steps(scheduler) -> list[EngineStep]:
    """Run ``busy_workload`` to the end on ``scheduler``."""
    stepper = busy_workload(scheduler)
    steps = []
    while scheduler.has_requests():
        stepper.step()
        for outputs in stepper.outputs:
            assert outputs.scheduler_stats is not None
            outputs.engine_index = 0  # as the engine core's output thread sets it
            steps.append(EngineStep(outputs, scheduler.kv_cache_manager.block_pool.get_num_free_blocks()))
        stepper.outputs.clear()
    return steps


@contextmanager
def external_engine(ready: bytes):
    """Engine 0's end of the wire to a frontend it did not start, as ``EngineCoreProc`` opens it: a DEALER
    with the engine's identity that sends its ready response, and a PUSH for its encoded outputs.
    Yields the frontend's ``client_addresses`` and a function that sends one ``EngineCoreOutputs``."""
    addresses = {"input_address": get_open_zmq_ipc_path(), "output_address": get_open_zmq_ipc_path()}
    context = zmq.Context()
    handshake = context.socket(zmq.DEALER)
    handshake.setsockopt(zmq.IDENTITY, (0).to_bytes(2, "little"))
    handshake.connect(addresses["input_address"])
    handshake.send(ready)  # queued until the client binds
    pushed = context.socket(zmq.PUSH)
    pushed.connect(addresses["output_address"])
    encoder = MsgpackEncoder()
    try:
        yield addresses, lambda outputs: pushed.send_multipart(encoder.encode(outputs), copy=False)
    finally:
        handshake.close(linger=0)
        pushed.close(linger=0)
        context.term()


def client_config(model_dir: str):
    """The frontend's own configuration (``_apply_ready_response`` updates it from the handshake)."""
    config = build_vllm_config(model_dir, served_model_name="tiny")
    config.cache_config.num_gpu_blocks = None  # the frontend learns it from its engines
    return config


def through_async_client(model_dir: str, ready: bytes, steps: list[EngineStep], relay: SnapshotReader) -> tuple:
    """A real ``AsyncMPClient`` receives every step; after each ``get_output_async`` the relay is read.
    Returns the client, what it returned, and each read's free blocks (None: nothing in the relay)."""

    async def run():
        with external_engine(ready) as (addresses, send):
            # No executor class: the engines are external.
            client = AsyncMPClient(
                client_config(model_dir), executor_class=None, log_stats=True, client_addresses=addresses
            )
            received, relayed = [], []
            try:
                for step in steps:
                    send(step.outputs)
                    received.append(await asyncio.wait_for(client.get_output_async(), timeout=60))
                    relayed.append(free_blocks_in(relay))
            finally:
                client.shutdown()
            return client, received, relayed

    return asyncio.run(run())


def through_sync_client(model_dir: str, ready: bytes, steps: list[EngineStep], relay: SnapshotReader) -> tuple:
    """``SyncMPClient.get_output`` on a client whose base constructor ran (see the module docstring)."""
    with external_engine(ready) as (addresses, send):
        client = SyncMPClient.__new__(SyncMPClient)
        MPClient.__init__(
            client,
            asyncio_mode=False,
            vllm_config=client_config(model_dir),
            executor_class=None,
            log_stats=True,
            client_addresses=addresses,
        )
        client.outputs_queue = queue.Queue()
        received, relayed = [], []
        try:
            for step in steps:
                send(step.outputs)
                # SyncMPClient's output thread, one message: receive, decode, queue.
                assert client.resources.output_socket.poll(60_000), "the engine's output arrives"
                frames = client.resources.output_socket.recv_multipart(copy=False)
                client.outputs_queue.put_nowait(client.decoder.decode(frames))
                received.append(client.get_output())
                relayed.append(free_blocks_in(relay))
        finally:
            client.shutdown()
    return client, received, relayed


def free_blocks_in(relay: SnapshotReader) -> int | None:
    snapshots = relay.read()
    assert len(snapshots) <= 1
    return snapshots[0].free_blocks if snapshots else None


CLIENTS = {"AsyncMPClient": through_async_client, "SyncMPClient": through_sync_client}


@pytest.fixture
def relay(tmp_path, monkeypatch):
    """A relay of the test's own for what the frontend derives from vLLM's statistics (the tests point the
    frontend's unprobed-engine reporter at it once instrumented; the relay it had is restored afterwards)."""
    monkeypatch.setattr(reporter, "relay_directory", reporter.relay_directory)
    return SnapshotReader(str(tmp_path))


@pytest.mark.parametrize("client_kind", sorted(CLIENTS))
def test_an_engine_without_a_probe_is_reported_from_each_steps_statistics(
    client_kind, tiny_model_dir, tracer_provider, relay, caplog
):
    """An engine that ran without instrumentation: the client learns it from the handshake (and vLLM still
    applies the handshake), sees no admission record on its first prefill, warns once, and from then on puts
    the free blocks of every step's ``SchedulerStats`` into the relay: the scheduler's own count, step by step."""
    scheduler = build_scheduler(tiny_model_dir, num_blocks=41, block_size=BLOCK_SIZE)
    steps = engine_steps(scheduler)  # before instrument(): no probe on this engine
    with instrumented(tracer_provider[0]), caplog.at_level(logging.WARNING, logger="otel_vllm_kv"):
        reporter.relay_directory = relay.directory
        client, received, relayed = CLIENTS[client_kind](tiny_model_dir, ready_payload(scheduler, 0), steps, relay)
        engine = reporter.clients[client][0]
        assert (engine.probed, engine.model_name, engine.layout.limit_tokens) == (False, "tiny", 40 * BLOCK_SIZE)
        assert client.vllm_config.cache_config.num_gpu_blocks == 41, "vLLM's own handshake ran"
        assert [step.free_blocks for step in steps] == relayed, "every step, as the engine counted it"
        assert [outputs.scheduler_stats.kv_cache_usage for outputs in received] == [
            step.outputs.scheduler_stats.kv_cache_usage for step in steps
        ], "the client returned what the engine sent"
    assert len({step.free_blocks for step in steps}) > 5, "the pool moved"
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("otel_vllm_kv")]
    assert len(warnings) == 1 and "engine 0 (data-parallel rank 0) runs no probe" in warnings[0]


@pytest.mark.parametrize("client_kind", sorted(CLIENTS))
def test_a_probed_engine_is_recognised_and_not_reported_from_statistics(
    client_kind, tiny_model_dir, tracer_provider, relay, caplog
):
    """An instrumented engine: its first prefill's output carries the probe's admission record, so the client
    marks it probed and writes nothing from vLLM's statistics (its probe reports it)."""
    with instrumented(tracer_provider[0]), caplog.at_level(logging.WARNING, logger="otel_vllm_kv"):
        reporter.relay_directory = relay.directory
        scheduler = build_scheduler(tiny_model_dir, num_blocks=41, block_size=BLOCK_SIZE)
        steps = engine_steps(scheduler)
        client, _, relayed = CLIENTS[client_kind](tiny_model_dir, ready_payload(scheduler, 0), steps, relay)
        assert reporter.clients[client][0].probed is True
        assert set(relayed) == {None}
    assert not [r for r in caplog.records if r.name.startswith("otel_vllm_kv")]


@pytest.mark.usefixtures("vllm_scheduler")
def test_the_tenant_in_baggage_reaches_the_engines_holders(
    tokenizer, tiny_model_dir, tracer_provider, monkeypatch, caplog
):
    """With the baggage key set, each request's tenant travels in its ``trace_headers`` to the engine, which
    counts what it held under it; a value that is not short printable text is left out with one warning;
    the outputs are vLLM's own."""
    provider, _ = tracer_provider
    monkeypatch.setenv(OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY, "tenant.id")
    tenants = {"req-a": "alpha", "req-b": "beta", "req-none": None, "req-bad": "x" * 101, "req-ctl": "a\nb"}

    def run():
        frontend = Frontend(tokenizer, tiny_model_dir, num_blocks=41)
        for external_id, tenant in tenants.items():
            token = context.attach(baggage.set_baggage("tenant.id", tenant)) if tenant else None
            try:
                frontend.submit(external_id, "y" * 20, max_tokens=3)
            finally:
                if token is not None:
                    context.detach(token)
        frontend.run_until_idle()
        return frontend

    plain = run()
    with instrumented(provider):
        frontend = run()
        ledger = probe.registry.attach(frontend.scheduler).holders.block_seconds
    assert set(ledger) == {(None, "alpha"), (None, "beta"), (None, None)}
    assert all(seconds > 0 for seconds in ledger.values())
    assert frontend.outputs == plain.outputs
    warnings = [record for record in caplog.records if "tenant in baggage" in record.getMessage()]
    assert len(warnings) == 1, "one warning for both bad values"
