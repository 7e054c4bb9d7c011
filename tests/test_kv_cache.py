"""Token accounting on real vLLM schedulers, against hand-computed block counts and vLLM's own figures."""

from __future__ import annotations

import pytest

from otel_vllm_kv.engine.pool_reading import read_engine_identity, read_layout
from otel_vllm_kv.kv_cache import GroupLayout, PoolLayout, occupancy
from tests.support.schedulers import Stepper, build_scheduler, make_request

#: Every test runs on vLLM's Scheduler and on its AsyncScheduler (``vllm_scheduler``).
pytestmark = pytest.mark.usefixtures("vllm_scheduler")


def tokens_of(scheduler):
    return occupancy(read_layout(scheduler), scheduler.kv_cache_manager.block_pool.get_num_free_blocks())


def test_empty_pool_excludes_the_null_block(tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=11, block_size=16)
    tokens = tokens_of(scheduler)
    assert read_layout(scheduler).num_blocks == 11
    assert (tokens.limit_tokens, tokens.used_tokens, tokens.free_tokens) == (160, 0, 160)
    assert tokens.utilization == 0.0


def test_admitted_prompt_occupies_whole_blocks(tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=11, block_size=16)
    scheduler.add_request(make_request(scheduler, num_prompt_tokens=40, max_tokens=100))
    Stepper(scheduler).step()
    tokens = tokens_of(scheduler)
    # 40 prompt tokens need ceil(40 / 16) = 3 blocks; the sampled 41st token still fits in block 3.
    assert (tokens.used_tokens, tokens.free_tokens, tokens.limit_tokens) == (48, 112, 160)
    assert tokens.used_blocks == 3


@pytest.mark.parametrize("sliding_window", [None, 32], ids=["one group", "hybrid with sliding window"])
def test_utilization_equals_vllms_kv_cache_usage_bit_for_bit(tiny_model_dir, sliding_window):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=41, block_size=16, sliding_window=sliding_window)
    stepper = Stepper(scheduler)
    for prompt, first in ((100, 0), (17, 1000), (233, 2000)):
        scheduler.add_request(make_request(scheduler, prompt, max_tokens=60, first_token=first))
    seen = set()
    while scheduler.has_requests():
        stepper.step()
        tokens = tokens_of(scheduler)
        assert tokens.utilization == stepper.stats[-1].kv_cache_usage
        assert tokens.used_tokens + tokens.free_tokens == tokens.limit_tokens
        assert tokens.used_tokens == tokens.used_blocks * tokens.limit_tokens // 40
        seen.add(tokens.used_blocks)
    assert len(seen) > 3, "the run should pass through several occupancies"


def test_finished_requests_leave_prefix_cached_blocks_free(tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=11, block_size=16)
    scheduler.add_request(make_request(scheduler, num_prompt_tokens=64, max_tokens=4))
    Stepper(scheduler).run_until_idle()
    # The 4 full prompt blocks stay in the prefix cache, unreferenced: evictable, so free.
    assert scheduler.kv_cache_manager.block_pool.cached_block_hash_to_block
    tokens = tokens_of(scheduler)
    assert (tokens.used_tokens, tokens.free_tokens) == (0, 160)


def test_block_size_is_the_managers_not_the_cache_configs(tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=9, block_size=32)
    manager_block_size = scheduler.kv_cache_manager.coordinator.single_type_managers[0].block_size
    assert read_layout(scheduler).groups[0].block_size == manager_block_size == 32
    assert tokens_of(scheduler).limit_tokens == 8 * 32


def test_without_a_known_capacity_only_blocks_are_reported():
    tokens = occupancy(PoolLayout(num_blocks=11, limit_tokens=None), free_blocks=4)
    assert tokens.used_tokens is tokens.free_tokens is tokens.limit_tokens is tokens.headroom_tokens is None
    assert tokens.utilization == 1.0 - 4 / 10
    assert (tokens.used_blocks, tokens.free_blocks, tokens.limit_blocks) == (6, 4, 10)


def test_hybrid_limit_is_vllms_group_aware_capacity(tiny_model_dir):
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity

    scheduler = build_scheduler(tiny_model_dir, num_blocks=41, block_size=16, sliding_window=32)
    layout = read_layout(scheduler)
    manager = scheduler.kv_cache_manager
    expected, _ = get_kv_cache_capacity(scheduler.vllm_config, manager.kv_cache_config)
    assert type(manager.coordinator).__name__ == "HybridKVCacheCoordinator"
    assert layout.groups == (GroupLayout("full_attention", 16), GroupLayout("sliding_window", 16))
    # 40 blocks x 16 would say 640 tokens. A 2,048-token request needs 128 full-attention blocks and
    # 129 window blocks (the window plus a whole 2,048-token prefill chunk): 41 / 257 such requests fit.
    assert layout.limit_tokens == expected == 41 * 2048 // (128 + 129) < 40 * 16


def test_admission_headroom_is_free_blocks_beyond_vllms_watermark(tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=21, block_size=16, watermark=0.2)
    assert read_layout(scheduler).watermark_blocks == scheduler.kv_cache_manager.watermark_blocks == 4
    stepper = Stepper(scheduler)
    scheduler.add_request(make_request(scheduler, 200, max_tokens=100))  # 13 blocks: 7 free, headroom 3
    stepper.step()
    tokens = tokens_of(scheduler)
    assert (tokens.free_blocks, tokens.headroom_blocks, tokens.headroom_tokens) == (7, 3, 48)
    # vLLM agrees: a 4-block request waits (7 - 4 < 4), a 3-block one is admitted.
    scheduler.add_request(make_request(scheduler, 60, max_tokens=100, first_token=5000))
    stepper.step()
    assert len(scheduler.running) == 1
    scheduler.finish_requests(list(scheduler.requests)[1:], _finished_aborted())
    scheduler.add_request(make_request(scheduler, 40, max_tokens=100, first_token=6000))
    stepper.step()
    assert len(scheduler.running) == 2


def _finished_aborted():
    from vllm.v1.request import RequestStatus

    return RequestStatus.FINISHED_ABORTED


def test_headroom_is_never_negative():
    tokens = occupancy(PoolLayout(num_blocks=11, limit_tokens=160, watermark_blocks=3), free_blocks=2)
    assert (tokens.headroom_blocks, tokens.headroom_tokens) == (0, 0)


def test_decode_context_parallel_multiplies_the_block_size(tiny_model_dir):
    """DCP spreads each block over its ranks: the manager's block size is spec block size x DCP size."""
    scheduler = build_scheduler(tiny_model_dir, num_blocks=11, block_size=16, decode_context_parallel_size=2)
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    assert (manager.dcp_world_size, manager.block_size) == (2, 32)
    layout = read_layout(scheduler)
    assert layout.groups == (GroupLayout("full_attention", 32),) and layout.limit_tokens == 10 * 32
    scheduler.add_request(make_request(scheduler, num_prompt_tokens=40, max_tokens=100))
    Stepper(scheduler).step()
    tokens = tokens_of(scheduler)
    # 40 tokens fill 2 blocks of 32 (with the cache config's 16 it would be 3 blocks, 48 tokens).
    assert (tokens.used_blocks, tokens.used_tokens, tokens.free_tokens) == (2, 64, 256)


def test_engine_identity(tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir, data_parallel_index=3, served_model_name="tiny")
    assert read_engine_identity(scheduler) == (3, "tiny")


def test_running_request_holds_blocks_for_its_prompt_and_all_but_the_last_sampled_token(tiny_model_dir):
    """The expectation the engine tests compute: ceil((prompt + outputs - 1) / block_size) blocks;
    with ``AsyncScheduler`` also the token of the step still in flight (its placeholder)."""
    scheduler = build_scheduler(tiny_model_dir, num_blocks=11, block_size=16)
    request = make_request(scheduler, num_prompt_tokens=30, max_tokens=100)
    scheduler.add_request(request)
    stepper = Stepper(scheduler)
    for _ in range(40):
        stepper.step()
        in_flight = len(stepper.in_flight)
        expected_blocks = -(-(request.num_prompt_tokens + request.num_output_tokens - 1 + in_flight) // 16)
        assert tokens_of(scheduler).used_tokens == expected_blocks * 16
