"""Frontend workloads: vLLM's ``OutputProcessor`` (what an API server runs per engine output) on outputs
a real scheduler produced, counted apart from the scheduler.

The engine side runs first, uncounted: a ``Scheduler`` (probed in the instrumented variant, so its
outputs carry admission and finished records) steps through every unit's requests, and each step's
``EngineCoreOutputs`` are kept. The counted units then replay them through the processor, as an API
server's output handler does: each request submitted (``add_request``) under a recording span of its
own, as an HTTP server span is, and its outputs processed with iteration statistics (``vllm serve``
logs them). Both variants create and end the same spans; the difference is the package's hooks and
the attributes it sets.

* ``frontend decode 16``: 16 requests decoding, one step's 16 outputs per unit (no records);
* ``frontend request``: 4 requests per unit, each submitted, admitted and finished in one step (one
  output token), their outputs carrying the admission and the finished records;
* ``frontend request untraced``: the same, submitted with no span recording (nothing to annotate);
* ``frontend request 128``: 16 requests per unit, submitted together and decoded to 128 output tokens
  each (the output length of ``vllm bench serve``'s random dataset): a request's whole life in the
  frontend, its per-output work included.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from benchmarks._workloads import (
    ADMISSIONS_PER_STEP,
    BLOCK_SIZE,
    DECODE_RUNNING,
    LONG_OUTPUT_TOKENS,
    PROMPT_TOKENS,
    Tally,
)
from otel_vllm_kv.admission_records import TRACED_HEADER_KEY, with_header
from otel_vllm_kv.names import REQUEST_KV_TOKENS


class FrontendWorkload:
    """A scheduler's outputs recorded first (``record``), then replayed through an ``OutputProcessor``."""

    name = ""
    #: Each request submitted under a recording span of its own (else none: nothing records, nothing is tracked).
    traced = True

    def __init__(self, model_dir: str, max_units: int) -> None:
        from vllm.tokenizers import get_tokenizer
        from vllm.v1.engine.output_processor import OutputProcessor

        from tests.support.schedulers import build_scheduler

        self.tally = Tally()
        self.tracer = TracerProvider().get_tracer("benchmark")  # recording spans, exported nowhere
        self.processor = OutputProcessor(get_tokenizer(model_dir), log_stats=True)
        self.scheduler = build_scheduler(
            model_dir, log_stats=True, num_blocks=2048, block_size=BLOCK_SIZE, served_model_name="tiny"
        )
        self.serial = 0
        self.units = [self.record_unit() for _ in range(max_units + 2)]  # the engine side, uncounted
        self.next = 0
        self.spans: dict[str, object] = {}
        #: Spans of finished requests, and those of them the package annotated (0 without it).
        self.finished = self.points = 0

    def new_request(self, max_tokens: int):
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.request import Request

        from tests.support.frontend import engine_core_request

        self.serial += 1
        prompt = [self.serial, *range(1, PROMPT_TOKENS)]
        request = engine_core_request(f"req-{self.serial}-int", f"req-{self.serial}", prompt, max_tokens)
        if self.traced:  # submitted to the engine first here: asked for records as ``add_request`` asks later
            request.trace_headers = with_header(request.trace_headers, TRACED_HEADER_KEY, "1")
        init_none_hash(sha256)
        hasher = get_request_block_hasher(BLOCK_SIZE, sha256)
        self.scheduler.add_request(Request.from_engine_core_request(request, hasher))
        return request

    def engine_step(self) -> list:
        from otel_vllm_kv.admission_records import TRACE_HEADER_KEY
        from tests.support.schedulers import runner_output

        scheduler_output = self.scheduler.schedule()
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output(scheduler_output))
        self.tally.scheduled_tokens += scheduler_output.total_num_scheduled_tokens
        self.tally.admitted += len(scheduler_output.scheduled_new_reqs)
        batches = [engine_outputs for engine_outputs in outputs.values() if engine_outputs.outputs]
        for engine_outputs in batches:
            for output in engine_outputs.outputs:
                if output.trace_headers and TRACE_HEADER_KEY in output.trace_headers:
                    self.tally.records += 1
        return batches

    def record_unit(self) -> tuple[list, list]:
        """(requests submitted in this unit, the engine outputs its step produced)."""
        raise NotImplementedError

    def submit(self, request) -> None:
        if not self.traced:
            self.processor.add_request(request, None)
            return
        span = self.tracer.start_span("POST /v1/completions")
        with trace.use_span(span):
            self.processor.add_request(request, None)
        self.spans[request.external_req_id] = span  # what the processor's outputs name

    def process(self, batches: list) -> None:
        from vllm.v1.metrics.stats import IterationStats

        for engine_outputs in batches:
            processed = self.processor.process_outputs(
                engine_outputs.outputs, engine_core_timestamp=engine_outputs.timestamp, iteration_stats=IterationStats()
            )
            for output in processed.request_outputs:
                if output.finished and self.traced:
                    span = self.spans.pop(output.request_id)
                    span.end()
                    self.finished += 1
                    self.points += REQUEST_KV_TOKENS in span.attributes  # its admission, annotated

    def unit(self) -> None:
        requests, batches = self.units[self.next]
        self.next += 1
        for request in requests:
            self.submit(request)
        self.process(batches)

    def close(self) -> None:
        self.scheduler.shutdown()
        if self.tally.records and self.points != self.finished:
            self.tally.problems.append(f"{self.name}: {self.points} of {self.finished} finished spans annotated")


class FrontendDecode(FrontendWorkload):
    def __init__(self, model_dir: str, max_units: int) -> None:
        self.name = f"frontend decode {DECODE_RUNNING}"
        super().__init__(model_dir, max_units + 1)
        first_requests, first_batches = self.units.pop(0)  # submit them all, admitted: the steady state
        for request in first_requests:
            self.submit(request)
        self.process(first_batches)

    def record_unit(self) -> tuple[list, list]:
        requests = [] if self.serial else [self.new_request(max_tokens=10_000) for _ in range(DECODE_RUNNING)]
        return requests, self.engine_step()


class FrontendRequest(FrontendWorkload):
    def __init__(self, model_dir: str, max_units: int, traced: bool = True) -> None:
        self.traced = traced
        self.name = "frontend request" + ("" if traced else " untraced")
        super().__init__(model_dir, max_units)

    def record_unit(self) -> tuple[list, list]:
        requests = [self.new_request(max_tokens=1) for _ in range(ADMISSIONS_PER_STEP)]
        return requests, self.engine_step()


class FrontendLongRequest(FrontendWorkload):
    def __init__(self, model_dir: str, max_units: int) -> None:
        self.name = f"frontend request {LONG_OUTPUT_TOKENS}"
        super().__init__(model_dir, max_units)

    def record_unit(self) -> tuple[list, list]:
        requests = [self.new_request(max_tokens=LONG_OUTPUT_TOKENS) for _ in range(DECODE_RUNNING)]
        batches: list = []
        while self.scheduler.has_unfinished_requests():
            batches += self.engine_step()
        return requests, batches
