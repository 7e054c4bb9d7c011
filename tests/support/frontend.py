"""vLLM's frontend objects fed by real schedulers in the test process, with no engine process and no model.

``Frontend`` is vLLM's ``OutputProcessor`` fed by a real ``Scheduler`` (the package's probe on it
when instrumented), as ``LLMEngine`` feeds it; ``ready_payload`` is the handshake an engine core
sends its frontends, and ``busy_workload`` requests that move the pool at almost every step.
Shared by ``test_frontend_objects``, ``test_unprobed_engines`` and ``test_hostile_records``.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.engine import EngineCoreReadyResponse, EngineCoreRequest
from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector
from vllm.v1.metrics.stats import IterationStats
from vllm.v1.request import Request, RequestStatus

from otel_vllm_kv import VLLMKVCacheInstrumentor, names
from otel_vllm_kv.admission_records import (
    ADMITTED,
    FINISHED,
    PREEMPTED,
    RESUMED,
    TRACE_HEADER_KEY,
    AdmissionRecord,
    decode,
)
from otel_vllm_kv.frontend.admission_attributes import record_attributes
from tests.support.schedulers import Stepper, build_scheduler, make_request
from tests.support.telemetry import new_reader

#: Tokens per block of ``Frontend``'s scheduler.
BLOCK_SIZE = 16
#: The span event of each kind of admission record.
EVENT_NAMES = {
    ADMITTED: names.EVENT_ADMITTED,
    PREEMPTED: names.EVENT_PREEMPTED,
    RESUMED: names.EVENT_RESUMED,
    FINISHED: names.EVENT_FINISHED,
}


@contextmanager
def instrumented(provider: TracerProvider):
    VLLMKVCacheInstrumentor().instrument(tracer_provider=provider, meter_provider=new_reader()[1])
    try:
        yield
    finally:
        VLLMKVCacheInstrumentor().uninstrument()


def engine_core_request(request_id: str, external_id: str, prompt_token_ids: list[int], max_tokens: int):
    """The release's own ``EngineCoreRequest``, as ``InputProcessor.process_inputs`` makes one for a text prompt.

    Read from the release's struct, so a release that adds a field without a default still works: each
    one not named here is None
    (no multimodal data, LoRA, cache salt, data-parallel rank or pooling parameters)."""
    fields = EngineCoreRequest.__struct_fields__
    required = fields[: len(fields) - len(EngineCoreRequest.__struct_defaults__)]
    given = dict(
        request_id=request_id,
        external_req_id=external_id,
        prompt_token_ids=prompt_token_ids,
        sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        arrival_time=time.time(),
    )
    return EngineCoreRequest(**{**dict.fromkeys(required), **given})


def comparable(request_output) -> dict:
    """Everything a ``RequestOutput`` says, but its timing ``metrics`` (copied: vLLM may extend it later)."""
    return copy.deepcopy({name: value for name, value in vars(request_output).items() if name != "metrics"})


@dataclass
class Frontend:
    """vLLM's ``OutputProcessor`` fed by a real ``Scheduler`` in this process, as ``LLMEngine`` feeds it."""

    tokenizer: object
    model_dir: str
    num_blocks: int = 11
    tracing_enabled: bool = False
    queues: bool = False
    """AsyncLLM's way: each request's outputs go to its ``RequestOutputCollector``; else returned (LLM's way)."""
    outputs: list = field(default_factory=list)
    """Every request output the processor returned or queued, as ``comparable``."""
    engine_outputs: list = field(default_factory=list)
    """Every ``EngineCoreOutput`` handed to the processor."""

    def __post_init__(self) -> None:
        init_none_hash(sha256)
        self.scheduler = build_scheduler(self.model_dir, num_blocks=self.num_blocks, block_size=BLOCK_SIZE)
        self.stepper = Stepper(self.scheduler)
        self.processor = OutputProcessor(self.tokenizer, log_stats=True, tracing_enabled=self.tracing_enabled)
        self.block_hasher = get_request_block_hasher(self.scheduler.block_size, sha256)
        self.collectors: dict[str, RequestOutputCollector] = {}

    def submit(self, external_id: str, prompt: str, max_tokens: int) -> str:
        """``LLM.generate`` / ``AsyncLLM.generate`` for one prompt: the processor first, then the engine core."""
        request = engine_core_request(f"{external_id}-int", external_id, self.tokenizer.encode(prompt), max_tokens)
        collector = None
        if self.queues:
            collector = self.collectors[request.request_id] = RequestOutputCollector(
                request.sampling_params.output_kind, request.request_id
            )
        self.processor.add_request(request, prompt, queue=collector)
        self.scheduler.add_request(Request.from_engine_core_request(request, self.block_hasher))
        return request.request_id

    def step(self) -> None:
        """One ``LLMEngine.step``: the engine core's outputs of one step through ``process_outputs``."""
        self.stepper.step()
        for engine_outputs in self.stepper.outputs:
            stats = IterationStats() if engine_outputs.outputs else None
            processed = self.processor.process_outputs(
                engine_outputs.outputs, engine_core_timestamp=engine_outputs.timestamp, iteration_stats=stats
            )
            assert processed.reqs_to_abort == [], "no stop strings here"
            self.outputs += map(comparable, processed.request_outputs)
            self.engine_outputs += engine_outputs.outputs
        self.stepper.outputs.clear()
        self.drain_collectors()

    def drain_collectors(self) -> None:
        for collector in self.collectors.values():
            if (output := collector.get_nowait()) is not None:
                self.outputs.append(comparable(output))

    def run_until_idle(self) -> None:
        for _ in range(1000):
            if not self.scheduler.has_requests() and not self.stepper.in_flight:
                assert not self.processor.has_unfinished_requests()
                return
            self.step()
        raise AssertionError("did not drain")

    def abort(self, request_ids: list[str], internal: bool) -> list[str]:
        """``AsyncLLM.abort``: the processor aborts, then the engine core frees what it returned."""
        aborted = self.processor.abort_requests(request_ids, internal=internal)
        self.scheduler.finish_requests(aborted, RequestStatus.FINISHED_ABORTED)
        self.drain_collectors()
        return aborted

    def records(self) -> dict[str, list]:
        """Each request's admission records, as its outputs carried them from the engine: each once, in order."""
        records: dict[str, dict] = {}
        for output in self.engine_outputs:
            if output.trace_headers and TRACE_HEADER_KEY in output.trace_headers:
                seen = records.setdefault(output.request_id, {})
                for record in decode(output.trace_headers[TRACE_HEADER_KEY]):
                    seen.setdefault(record.sequence, record)
        return {request_id: [seen[n] for n in sorted(seen)] for request_id, seen in records.items()}


def crowd(frontend: Frontend, tracer, spans_per_request: bool) -> list:
    """Three requests that outgrow a 5-block pool together (30 prompt + 40 output tokens each): vLLM
    preempts and resumes. Submitted under one span (``LLM.generate`` of a batch) or one span each (an API
    server); the spans stay open until the run ends, and the steps run outside them (an output handler)."""
    opened = []
    for index in range(3):
        if spans_per_request or not opened:
            opened.append(tracer.start_span(f"submit {index}" if spans_per_request else "batch"))
        with trace.use_span(opened[-1]):
            frontend.submit(f"req-{index}", chr(ord("a") + index) * 30, max_tokens=40)
    frontend.run_until_idle()
    for span in opened:
        span.end()
    return opened


def expected_span(records: list[AdmissionRecord]) -> tuple[dict, list]:
    """The attributes and events of the span of one request with these records (one span per request)."""
    admission, *later = records
    attributes = record_attributes(admission)
    attributes[names.REQUEST_PREEMPTIONS] = sum(record.kind == PREEMPTED for record in later)
    resumptions = [record for record in later if record.kind == RESUMED]
    if resumptions:
        attributes[names.REQUEST_PREEMPTED_DURATION] = sum(record.queue_seconds for record in resumptions)
    for record in later:
        if record.kind == FINISHED:  # what it held: attributes of its span, as its admission
            attributes.update(record_attributes(record))
    events = [record for record in later if record.kind != FINISHED]
    return attributes, sorted((r.time_ns, EVENT_NAMES[r.kind], record_attributes(r)) for r in events)


def span_events(span) -> list[tuple]:
    return sorted((event.timestamp, event.name, dict(event.attributes)) for event in span.events)


def ready_payload(scheduler, engine_index: int) -> bytes:
    """The handshake message an engine core sends its frontends (``EngineCore._make_ready_response``)."""
    config = scheduler.vllm_config
    return msgspec.msgpack.encode(
        EngineCoreReadyResponse(
            max_model_len=config.model_config.max_model_len,
            num_gpu_blocks=scheduler.kv_cache_manager.block_pool.num_gpu_blocks,
            block_size=config.cache_config.block_size,
            dp_stats_address=None,
            dtype="float32",
            vllm_version="",
            world_size=1,
            data_parallel_size=2,
            tensor_parallel_size=1,
            pipeline_parallel_size=1,
            decode_context_parallel_size=config.parallel_config.decode_context_parallel_size,
            data_parallel_rank=engine_index,
            max_num_seqs=16,
            max_num_batched_tokens=2048,
            instance_id="",
            supports_lora=False,
            max_loras=0,
        )
    )


def busy_workload(scheduler) -> Stepper:
    """Requests that fill, share a prefix, and drain: free blocks move at almost every step."""
    stepper = Stepper(scheduler)
    for i in range(6):
        scheduler.add_request(make_request(scheduler, num_prompt_tokens=20 + 13 * i, max_tokens=4 + 5 * i))
    return stepper
