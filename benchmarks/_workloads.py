"""Fixed, seeded workloads on a real vLLM ``Scheduler`` (no model), in units the instruction count divides by.

Each workload builds its scheduler, warms it up to a steady state, then runs ``unit()``
as often as asked. A unit is what a figure is quoted per: one decode step, one step
admitting ``ADMISSIONS_PER_STEP`` requests, one preemption with its resumption, one
metric collection. Everything is deterministic: no randomness, no wall-clock branch,
the same requests in the same order in every process.

A step is ``schedule()``, a synthetic ``ModelRunnerOutput`` (``tests.support.schedulers.runner_output``)
and ``update_from_output()``, which calls ``make_stats``, as ``EngineCore.step`` does. The
``harness`` workloads count the synthetic output alone, so it can be taken out of vLLM's figure.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from benchmarks._common import check

BLOCK_SIZE = 16
ADMISSIONS_PER_STEP = 4
#: A request's prompt in the admission, whole-request and frontend workloads.
PROMPT_TOKENS = 64
#: Requests decoding together in the decode workloads and in a whole-request unit.
DECODE_RUNNING = 16
#: ``vllm bench serve --dataset-name random``'s default output length: a whole request's.
LONG_OUTPUT_TOKENS = 128
#: Prompt tokens shared by every request of the prefix-hit workload: three full blocks.
SHARED_PREFIX = tuple(range(1000, 1000 + 3 * BLOCK_SIZE))
PROMPT_MIN, PROMPT_MAX = 16, 80


_serials = itertools.count(1)


def distinct_request(
    scheduler: object, num_prompt_tokens: int, max_tokens: int, prefix: tuple[int, ...] = (), traced: bool = True
) -> object:
    """A request of ``prefix`` then a serial number: no two requests share a block past ``prefix``; ``traced``:
    submitted by a frontend that annotates its span, so the engine records it."""
    from tests.support.schedulers import make_request

    prompt = [*prefix, next(_serials), *range(1, num_prompt_tokens - len(prefix))]
    return make_request(scheduler, len(prompt), max_tokens, prompt_token_ids=prompt, traced=traced)


@dataclass
class Tally:
    """What the units did, so runs with and without the package can be checked to do the same."""

    scheduled_tokens: int = 0
    admitted: int = 0
    cached_tokens: int = 0
    preempted: int = 0
    records: int = 0
    problems: list[str] = field(default_factory=list)


class Workload:
    """A scheduler in a steady state; ``unit()`` advances it by one unit."""

    name = ""
    warmup_units = 20
    #: Whether its requests come from a frontend that traces them (the engine records those only).
    traced = True

    def __init__(self, model_dir: str, log_stats: bool = False) -> None:
        from tests.support.schedulers import build_scheduler

        self.tally = Tally()
        self.log_stats = log_stats
        self.scheduler = build_scheduler(
            model_dir,
            log_stats=log_stats,
            num_blocks=self.num_blocks(),
            block_size=BLOCK_SIZE,
            served_model_name="tiny",
            max_num_seqs=512,
            max_num_batched_tokens=8192,
        )
        self.start()
        for _ in range(self.warmup_units):
            self.unit()
        self.tally = Tally()  # the steady state only: what the counted units did

    def num_blocks(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        """Add the requests the workload starts with."""

    def unit(self) -> None:
        raise NotImplementedError

    def add(self, num_prompt_tokens: int, max_tokens: int, prefix: tuple[int, ...] = ()) -> None:
        self.scheduler.add_request(
            distinct_request(self.scheduler, num_prompt_tokens, max_tokens, prefix, traced=self.traced)
        )

    def step(self) -> None:
        from otel_vllm_kv.admission_records import TRACE_HEADER_KEY
        from tests.support.schedulers import runner_output

        scheduler_output = self.scheduler.schedule()
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output(scheduler_output))
        tally = self.tally
        tally.scheduled_tokens += scheduler_output.total_num_scheduled_tokens
        tally.admitted += len(scheduler_output.scheduled_new_reqs)
        tally.cached_tokens += sum(request.num_computed_tokens for request in scheduler_output.scheduled_new_reqs)
        for engine_outputs in outputs.values():
            for output in engine_outputs.outputs:
                if output.trace_headers and TRACE_HEADER_KEY in output.trace_headers:
                    tally.records += 1
        self.last_output = scheduler_output

    def close(self) -> None:
        self.scheduler.shutdown()


class Decode(Workload):
    """``running`` requests decoding one token per step; none arrives, none finishes."""

    def __init__(self, model_dir: str, running: int, max_units: int, log_stats: bool = False) -> None:
        self.running = running
        self.max_tokens = self.warmup_units + max_units + 8
        self.name = f"decode {running}" + (" (stats on)" if log_stats else "")
        super().__init__(model_dir, log_stats)

    def prompt_length(self, index: int) -> int:
        # Spread over 16..80 tokens, so some request crosses into a new block at most steps.
        return PROMPT_MIN + (index * 37) % (PROMPT_MAX - PROMPT_MIN + 1)

    def num_blocks(self) -> int:
        return self.running * -(-(PROMPT_MAX + self.max_tokens) // BLOCK_SIZE) + 32

    def start(self) -> None:
        for index in range(self.running):
            self.add(self.prompt_length(index), self.max_tokens)
        self.step()  # admit them all

    def unit(self) -> None:
        self.step()
        if len(self.scheduler.running) != self.running:
            self.tally.problems.append(f"{self.name}: {len(self.scheduler.running)} running")


class Admission(Workload):
    """Each unit: ``ADMISSIONS_PER_STEP`` new requests (``PROMPT_TOKENS`` prompt tokens unless ``prompt_tokens`` says
    otherwise), admitted and finished in one step.

    With ``prefix_hits`` every prompt starts with ``SHARED_PREFIX``, found in the prefix
    cache. The pool is small enough that the warm-up wraps its free queue: from then on
    every allocation evicts a cached block, as in a long-running engine.
    """

    warmup_units = 40

    def __init__(
        self, model_dir: str, prefix_hits: bool, traced: bool = True, prompt_tokens: int = PROMPT_TOKENS
    ) -> None:
        self.prefix = SHARED_PREFIX if prefix_hits else ()
        self.traced = traced
        self.prompt_tokens = prompt_tokens
        self.name = (
            ("admission with prefix hits" if prefix_hits else "admission")
            + ("" if prompt_tokens == PROMPT_TOKENS else f" {prompt_tokens}")
            + ("" if traced else " untraced")
        )
        super().__init__(model_dir)

    def num_blocks(self) -> int:
        return 256

    def unit(self) -> None:
        for _ in range(ADMISSIONS_PER_STEP):
            self.add(self.prompt_tokens, 1, self.prefix)
        self.step()
        if self.scheduler.running or self.scheduler.waiting:
            self.tally.problems.append(f"{self.name}: requests left after the step")


class WholeRequest(Workload):
    """Each unit: ``DECODE_RUNNING`` requests of ``PROMPT_TOKENS`` prompt tokens, admitted together and decoded to
    ``LONG_OUTPUT_TOKENS`` output tokens each (``LONG_OUTPUT_TOKENS`` steps): a request's whole life in the
    engine, its admission, every decode step it runs in, and its finish.

    With ``prefix_hits`` every prompt starts with ``SHARED_PREFIX``, shared by the 16 running at once.
    """

    warmup_units = 2

    def __init__(self, model_dir: str, prefix_hits: bool) -> None:
        self.prefix = SHARED_PREFIX if prefix_hits else ()
        self.name = f"request {LONG_OUTPUT_TOKENS}" + (" with prefix hits" if prefix_hits else "")
        super().__init__(model_dir)

    def num_blocks(self) -> int:
        return DECODE_RUNNING * -(-(PROMPT_TOKENS + LONG_OUTPUT_TOKENS) // BLOCK_SIZE) + 32

    def unit(self) -> None:
        for _ in range(DECODE_RUNNING):
            self.add(PROMPT_TOKENS, LONG_OUTPUT_TOKENS, self.prefix)
        for _ in range(LONG_OUTPUT_TOKENS):
            self.step()
        if self.scheduler.running or self.scheduler.waiting:
            self.tally.problems.append(f"{self.name}: requests left after {LONG_OUTPUT_TOKENS} steps")


class Preemption(Decode):
    """16 running; each unit preempts the oldest running request, then a step resumes it.

    vLLM preempts from ``schedule()`` when a running request cannot grow; calling its own
    ``_preempt_request`` directly makes one preemption per unit, independent of pool size.
    """

    def __init__(self, model_dir: str, max_units: int) -> None:
        super().__init__(model_dir, 16, max_units)
        self.name = "preemption + resumption"

    def unit(self) -> None:
        scheduler = self.scheduler
        request = scheduler.running.pop(0)
        scheduler._preempt_request(request, time.monotonic())
        self.tally.preempted += 1
        self.step()


class Collection(Decode):
    """One metric collection (``InMemoryMetricReader.get_metrics_data``) of the process's meter provider.

    In the exporter process this is what every export interval runs; the scheduler beside
    it (16 running) only gives the relay an engine to report.
    """

    def __init__(self, model_dir: str, reader: object) -> None:
        self.reader = reader
        super().__init__(model_dir, 16, 0)
        self.name = "collection"
        self.points = 0

    def unit(self) -> None:
        data = self.reader.get_metrics_data()
        self.points = sum(
            len(metric.data.data_points)
            for resource in (data.resource_metrics if data else ())
            for scope in resource.scope_metrics
            for metric in scope.metrics
        )


class HoldersPass(Decode):
    """One holders pass (``engine.holders``: what each LoRA adapter and tenant holds, written into the
    relay) on ``running`` decoding requests; an engine runs it after a step at most once a second.
    Plain vLLM has no pass: its unit does nothing."""

    def __init__(self, model_dir: str, running: int) -> None:
        from otel_vllm_kv.engine.probe import registry

        self.probe = None  # the warm-up steps run no pass
        super().__init__(model_dir, running, 0)
        self.name = f"holders pass {running}"
        self.probe = registry.attach(self.scheduler)

    def unit(self) -> None:
        if self.probe is not None and self.probe.holders is not None:  # residency on
            self.probe.publish_holders()


class Harness(Decode):
    """The synthetic ``ModelRunnerOutput`` of one decode step of ``running`` requests, alone."""

    def __init__(self, model_dir: str, running: int) -> None:
        super().__init__(model_dir, running, 0)
        self.name = f"harness {running}"

    def unit(self) -> None:
        from tests.support.schedulers import runner_output

        runner_output(self.last_output)


def build(name: str, model_dir: str, max_units: int, reader: object) -> Workload:
    from benchmarks._frontend_workloads import FrontendDecode, FrontendLongRequest, FrontendRequest

    factories: dict[str, Callable[[], Workload]] = {
        "decode 16": lambda: Decode(model_dir, 16, max_units),
        "decode 64": lambda: Decode(model_dir, 64, max_units),
        "decode 256": lambda: Decode(model_dir, 256, max_units),
        "decode 16 (stats on)": lambda: Decode(model_dir, 16, max_units, log_stats=True),
        "admission": lambda: Admission(model_dir, prefix_hits=False),
        "admission with prefix hits": lambda: Admission(model_dir, prefix_hits=True),
        "admission untraced": lambda: Admission(model_dir, prefix_hits=False, traced=False),
        "admission with prefix hits untraced": lambda: Admission(model_dir, prefix_hits=True, traced=False),
        "admission 512 untraced": lambda: Admission(model_dir, prefix_hits=False, traced=False, prompt_tokens=512),
        f"request {LONG_OUTPUT_TOKENS}": lambda: WholeRequest(model_dir, prefix_hits=False),
        f"request {LONG_OUTPUT_TOKENS} with prefix hits": lambda: WholeRequest(model_dir, prefix_hits=True),
        "preemption + resumption": lambda: Preemption(model_dir, max_units),
        "collection": lambda: Collection(model_dir, reader),
        "holders pass 16": lambda: HoldersPass(model_dir, 16),
        "holders pass 256": lambda: HoldersPass(model_dir, 256),
        "frontend decode 16": lambda: FrontendDecode(model_dir, max_units),
        "frontend request": lambda: FrontendRequest(model_dir, max_units),
        "frontend request untraced": lambda: FrontendRequest(model_dir, max_units, traced=False),
        "frontend request 128": lambda: FrontendLongRequest(model_dir, max_units),
        "harness 16": lambda: Harness(model_dir, 16),
        "harness 64": lambda: Harness(model_dir, 64),
        "harness 256": lambda: Harness(model_dir, 256),
    }
    check(name in factories, f"unknown workload {name!r}")
    return factories[name]()
