"""A frontend reports an engine without a probe from vLLM's own scheduler statistics.

Real schedulers produce the ``EngineCoreOutputs`` an engine core would send; the frontend's
unprobed-engine reporter receives them with the engine's real ``EngineCoreReadyResponse`` (msgpack,
as on the wire). The scheduler stands in for the engine-core client only as the holder of
``vllm_config``, which is all the reporter reads from it.
"""

from __future__ import annotations

import logging

import msgspec
import pytest
from vllm.v1.engine import EngineCoreReadyResponse

from otel_vllm_kv import VLLMKVCacheInstrumentor
from otel_vllm_kv.admission_records import TRACE_HEADER_KEY
from otel_vllm_kv.frontend.unprobed_engines import layout_from_ready_response, reporter
from otel_vllm_kv.relay_reader import SnapshotReader
from tests.support.frontend import Frontend, busy_workload, ready_payload
from tests.support.schedulers import Stepper, build_scheduler
from tests.support.telemetry import new_reader


@pytest.fixture
def frontend(tmp_path):
    reporter.relay_directory = str(tmp_path)
    yield SnapshotReader(str(tmp_path))
    reporter.clear()
    reporter.relay_directory = None


def test_free_blocks_follow_the_pool_at_every_step(frontend, tiny_model_dir, caplog):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=41, block_size=16, served_model_name="tiny")
    reporter.add_engine(scheduler, ready_payload(scheduler, engine_index=3))
    stepper = busy_workload(scheduler)
    seen = set()
    with caplog.at_level(logging.WARNING, logger="otel_vllm_kv"):
        while scheduler.has_requests():
            stepper.step()
            for outputs in stepper.outputs:
                outputs.engine_index = 3  # as the engine core sets it before sending
                reporter.observe(scheduler, outputs)
            stepper.outputs.clear()
            snapshots = frontend.read()
            if snapshots:
                (snapshot,) = snapshots
                free = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
                assert (snapshot.engine_index, snapshot.model_name, snapshot.free_blocks) == (3, "tiny", free)
                assert snapshot.occupancy().utilization == scheduler.kv_cache_manager.usage, "bit-equal"
                seen.add(free)
    assert len(seen) > 5, "the pool moved and the relay followed it"
    (snapshot,) = frontend.read()
    occupancy = snapshot.occupancy()
    assert (occupancy.limit_tokens, occupancy.used_tokens, occupancy.free_tokens) == (40 * 16, 0, 640)
    assert (occupancy.evictable_tokens, occupancy.headroom_tokens) == (None, None), "not in vLLM's statistics"
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("otel_vllm_kv")]
    assert len(warnings) == 1 and "engine 3 (data-parallel rank 3) runs no probe" in warnings[0]


def test_a_probed_engine_is_never_reported_from_statistics(frontend, tiny_model_dir, tmp_path_factory):
    VLLMKVCacheInstrumentor().instrument(meter_provider=new_reader()[1])
    try:
        scheduler = build_scheduler(tiny_model_dir, num_blocks=41, block_size=16)
        reporter.relay_directory = frontend.directory  # the instrumentor pointed it at its own relay
        reporter.add_engine(scheduler, ready_payload(scheduler, engine_index=0))
        stepper = busy_workload(scheduler)
        stepper.run_until_idle()
        for outputs in stepper.outputs:
            reporter.observe(scheduler, outputs)
        assert frontend.read() == []
        assert reporter.clients[scheduler][0].probed is True, "its first prefill carried an admission record"
    finally:
        VLLMKVCacheInstrumentor().uninstrument()


def test_one_group_limit_matches_a_probe_and_hybrid_takes_vllms_capacity(tiny_model_dir, hybrid_model_dir):
    from otel_vllm_kv.engine.pool_reading import read_layout

    one = build_scheduler(tiny_model_dir, num_blocks=41, block_size=16)
    response = msgspec.msgpack.decode(ready_payload(one, 0), type=EngineCoreReadyResponse)
    layout = layout_from_ready_response(response, one.vllm_config.model_config)
    assert layout.limit_tokens == read_layout(one).limit_tokens == 40 * 16

    hybrid = build_scheduler(hybrid_model_dir, num_blocks=41, block_size=16, sliding_window=32)
    response = msgspec.msgpack.decode(ready_payload(hybrid, 0), type=EngineCoreReadyResponse)
    response.kv_cache_size_tokens = read_layout(hybrid).limit_tokens  # as the engine core computed it
    assert layout_from_ready_response(response, hybrid.vllm_config.model_config).limit_tokens == 326


def test_untraced_requests_ask_for_records_only_until_each_engine_was_seen(frontend, tokenizer, tiny_model_dir):
    """Nothing records spans, so no request is tracked and none needs records, but a probe shows itself by
    one: while an engine is undecided, every request asks for records (``TRACED_HEADER_KEY``), so a probed
    engine is seen as probed; after that an untraced request asks for none, and its engine writes none."""
    VLLMKVCacheInstrumentor().instrument(meter_provider=new_reader()[1])
    try:
        submitter = Frontend(tokenizer, tiny_model_dir)
        scheduler = submitter.scheduler
        reporter.relay_directory = frontend.directory
        reporter.add_engine(scheduler, ready_payload(scheduler, engine_index=0))
        assert reporter.undecided == 1
        for name in ("first", "second"):
            submitter.submit(name, "x" * 40, max_tokens=3)
            stepper = Stepper(scheduler)
            stepper.run_until_idle()
            for outputs in stepper.outputs:
                reporter.observe(scheduler, outputs)
            carried = [
                output
                for outputs in stepper.outputs
                for output in outputs.outputs
                if TRACE_HEADER_KEY in (output.trace_headers or {})
            ]
            if name == "first":
                assert carried, "asked while undecided: the engine wrote its records"
                assert reporter.clients[scheduler][0].probed is True and reporter.undecided == 0
            else:
                assert carried == [], "untraced, once decided: no record"
        assert frontend.read() == [], "never reported from statistics"
    finally:
        VLLMKVCacheInstrumentor().uninstrument()
