"""Token accounting on real vLLM schedulers, against hand-computed block counts."""

from __future__ import annotations

from otel_vllm_kv.kv_cache import read_engine_identity, read_layout, to_tokens
from schedulers import Stepper, build_scheduler, make_request


def tokens_of(scheduler):
    return to_tokens(read_layout(scheduler), scheduler.kv_cache_manager.block_pool.get_num_free_blocks())


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


def test_utilization_equals_vllms_kv_cache_usage_bit_for_bit(tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=11, block_size=16)
    stepper = Stepper(scheduler)
    for prompt, first in ((40, 0), (17, 1000), (33, 2000)):
        scheduler.add_request(make_request(scheduler, prompt, max_tokens=30, first_token=first))
    seen = set()
    while scheduler.has_requests():
        stepper.step()
        tokens = tokens_of(scheduler)
        assert tokens.utilization == stepper.stats[-1].kv_cache_usage
        assert tokens.used_tokens + tokens.free_tokens == tokens.limit_tokens
        seen.add(tokens.used_tokens)
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
    assert read_layout(scheduler).block_size == manager_block_size == 32
    assert tokens_of(scheduler).limit_tokens == 8 * 32


def test_hybrid_layout_reports_no_tokens():
    from otel_vllm_kv.kv_cache import PoolLayout

    tokens = to_tokens(PoolLayout(num_blocks=11, block_size=0, num_groups=2), free_blocks=4)
    assert tokens.used_tokens is tokens.free_tokens is tokens.limit_tokens is None
    assert tokens.utilization == 1.0 - 4 / 10
    assert tokens.used_blocks == 6


def test_engine_identity(tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir, data_parallel_index=3, served_model_name="tiny")
    assert read_engine_identity(scheduler) == (3, "tiny")


def test_running_request_holds_blocks_for_its_prompt_and_all_but_the_last_sampled_token(tiny_model_dir):
    """The expectation the engine tests compute: ceil((prompt + outputs - 1) / block_size) blocks."""
    scheduler = build_scheduler(tiny_model_dir, num_blocks=11, block_size=16)
    request = make_request(scheduler, num_prompt_tokens=30, max_tokens=100)
    scheduler.add_request(request)
    stepper = Stepper(scheduler)
    for _ in range(40):
        stepper.step()
        expected_blocks = -(-(request.num_prompt_tokens + request.num_output_tokens - 1) // 16)
        assert tokens_of(scheduler).used_tokens == expected_blocks * 16
