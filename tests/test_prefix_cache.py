"""The evictable prefix-cache count on real vLLM schedulers, against a full scan of vLLM's free queue."""

from __future__ import annotations

import random

import pytest
from vllm.v1.request import RequestStatus

from otel_vllm_kv import compat
from otel_vllm_kv.engine import prefix_cache
from otel_vllm_kv.engine.pool_reading import read_layout
from otel_vllm_kv.kv_cache import occupancy
from tests.support.schedulers import Stepper, build_scheduler, cached_free_blocks, evictable_per_group, make_request

#: Every test runs on vLLM's Scheduler and on its AsyncScheduler (``vllm_scheduler``).
pytestmark = pytest.mark.usefixtures("vllm_scheduler")


@pytest.fixture
def hooks():
    yield
    prefix_cache.clear()


def watched(scheduler) -> prefix_cache.EvictableBlocks:
    return prefix_cache.watch(scheduler.kv_cache_manager.block_pool, len(read_layout(scheduler).groups))


def evictable_tokens(scheduler, counter) -> int:
    free_blocks = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    return occupancy(read_layout(scheduler), free_blocks, counter.total).evictable_tokens


PREFIX = 160  # 10 blocks of 16


def test_a_finished_shared_prefix_is_evictable_until_a_new_request_reuses_it(hooks, tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=41, block_size=16)
    counter, stepper = watched(scheduler), Stepper(scheduler)
    # Three requests: the same 160-token prefix, 5 tokens of their own, 4 generated: 10 full blocks each.
    for suffix in range(3):
        scheduler.add_request(
            make_request(scheduler, PREFIX + 5, max_tokens=4, first_token=0)
            if suffix == 0
            else _with_prefix(scheduler, suffix)
        )
    stepper.run_until_idle()
    assert evictable_per_group(scheduler) == [10]
    assert counter.per_group == [10] and evictable_tokens(scheduler, counter) == PREFIX

    scheduler.add_request(_with_prefix(scheduler, 7, max_tokens=50))
    stepper.step()
    assert stepper.stats[-1].prefix_cache_stats.hits == PREFIX, "the new request hits the whole prefix"
    assert counter.per_group == evictable_per_group(scheduler) == [0]
    stepper.run_until_idle()
    assert counter.per_group == evictable_per_group(scheduler) and counter.total > 10  # its own full blocks joined

    # A long unrelated prompt takes all free blocks: vLLM evicts the cached ones for it.
    scheduler.add_request(make_request(scheduler, 40 * 16 - 10, max_tokens=2, first_token=50_000))
    stepper.step()
    assert counter.per_group == evictable_per_group(scheduler) == [0]


def test_allocating_from_a_free_queue_of_only_cached_blocks_evicts_each_one(hooks, tiny_model_dir):
    """The shortcut when every free block is evictable (a long-running engine's steady state)."""
    scheduler = build_scheduler(tiny_model_dir, num_blocks=11, block_size=16)
    counter, stepper = watched(scheduler), Stepper(scheduler)
    # A 160-token prompt fills the 10 blocks; its one output token needs no slot before it finishes.
    scheduler.add_request(make_request(scheduler, 160, max_tokens=1, first_token=0))
    stepper.run_until_idle()
    pool = scheduler.kv_cache_manager.block_pool
    assert counter.total == pool.get_num_free_blocks() == evictable_per_group(scheduler)[0] == 10
    for take in (3, 1, 6):
        pool.get_new_blocks(take)
        assert counter.per_group == evictable_per_group(scheduler), take
    assert counter.total == 0


def _with_prefix(scheduler, suffix: int, max_tokens: int = 4):
    prompt = [*range(PREFIX), *(10_000 + 10 * suffix + i for i in range(5))]
    return make_request(scheduler, len(prompt), max_tokens=max_tokens, prompt_token_ids=prompt)


@pytest.mark.parametrize("sliding_window", [None, 48], ids=["one group", "hybrid with sliding window"])
def test_the_count_stays_exact_under_random_load(hooks, tiny_model_dir, sliding_window):
    """Shared prefixes, preemptions (a small pool), aborts and a prefix-cache reset, checked every step."""
    scheduler = build_scheduler(tiny_model_dir, num_blocks=48, block_size=16, sliding_window=sliding_window)
    counter, stepper, rng = watched(scheduler), Stepper(scheduler), random.Random(7)
    prefixes = [[rng.randrange(30_000) for _ in range(96)] for _ in range(3)]
    requests = []
    for step in range(300):
        if step < 240 and rng.random() < 0.4:
            own = [rng.randrange(30_000) for _ in range(rng.randrange(1, 40))]
            prompt = rng.choice(prefixes)[: rng.randrange(16, 96)] + own
            requests.append(make_request(scheduler, len(prompt), rng.randrange(1, 60), prompt_token_ids=prompt))
            scheduler.add_request(requests[-1])
        if scheduler.running and rng.random() < 0.05:
            scheduler.finish_requests([rng.choice(scheduler.running).request_id], RequestStatus.FINISHED_ABORTED)
        if scheduler.has_requests():
            stepper.step()
        assert counter.per_group == evictable_per_group(scheduler), f"step {step}"
    assert sum(request.num_preemptions for request in requests) > 0, "the pool should be small enough to preempt"
    assert sum(stats.prefix_cache_stats.hits for stats in stepper.stats) > 0
    stepper.run_until_idle()
    assert counter.per_group == evictable_per_group(scheduler) and counter.total > 0
    assert scheduler.reset_prefix_cache()
    assert counter.per_group == evictable_per_group(scheduler) == [0] * len(counter.per_group)


def test_attaching_to_a_pool_in_use_starts_from_one_scan(hooks, tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=41, block_size=16)
    scheduler.add_request(make_request(scheduler, 100, max_tokens=4))
    Stepper(scheduler).run_until_idle()
    assert watched(scheduler).per_group == evictable_per_group(scheduler) == [6]


def after_one_finished_request(tiny_model_dir: str):
    """A watched pool once a 100-token request finished: 6 full blocks stay cached (and free)."""
    scheduler = build_scheduler(tiny_model_dir, num_blocks=41, block_size=16)
    counter = watched(scheduler)
    scheduler.add_request(make_request(scheduler, 100, max_tokens=4))
    Stepper(scheduler).run_until_idle()
    return scheduler, counter, scheduler.kv_cache_manager.block_pool, cached_free_blocks(scheduler)


def test_connector_evictions_and_unpinned_blocks_are_counted(hooks, tiny_model_dir):
    """Paths KV connectors and offloading take: ``evict_blocks`` drops hashes, ``unpin_blocks`` releases."""
    scheduler, counter, pool, cached = after_one_finished_request(tiny_model_dir)
    assert counter.per_group == evictable_per_group(scheduler) == [6]

    pool.evict_blocks({cached[0].block_id, cached[1].block_id, 40})  # block 40 was never cached
    assert counter.per_group == evictable_per_group(scheduler) == [4]

    pool.touch(cached[2:4])  # a reader pins two cached blocks ...
    assert counter.per_group == evictable_per_group(scheduler) == [2]
    pool.unpin_blocks(cached[2:4], on_reuse=lambda block: None)  # ... and lets them go
    assert counter.per_group == evictable_per_group(scheduler) == [4]

    # Unpinned blocks join the free queue's tail with or without a hash: only the hashed one counts.
    fresh = pool.get_new_blocks(2)
    assert [block.block_hash for block in fresh] == [None, None]
    pool.touch(cached[4:5])
    assert counter.per_group == evictable_per_group(scheduler) == [3]
    pool.unpin_blocks([*fresh, cached[4]], on_reuse=lambda block: None)
    assert counter.per_group == evictable_per_group(scheduler) == [4]


def test_a_collected_pool_leaves_no_counter_behind(hooks, tiny_model_dir):
    import gc
    import weakref

    scheduler = build_scheduler(tiny_model_dir, num_blocks=41, block_size=16)
    watched(scheduler)
    pool = weakref.ref(scheduler.kv_cache_manager.block_pool)
    assert len(prefix_cache._watched) == 1
    del scheduler
    gc.collect()
    assert pool() is None, "the count must not keep vLLM's pool alive"
    assert len(prefix_cache._watched) == 0


def test_only_watched_pools_are_wrapped_and_forgetting_restores_them(hooks, tiny_model_dir):
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue

    watched_scheduler, other = (build_scheduler(tiny_model_dir, num_blocks=41, block_size=16) for _ in range(2))
    pool, other_pool = watched_scheduler.kv_cache_manager.block_pool, other.kv_cache_manager.block_pool
    watched(watched_scheduler)
    hooked = (
        (pool, other_pool, BlockPool, prefix_cache.POOL_METHODS),
        (pool.free_block_queue, other_pool.free_block_queue, FreeKVCacheBlockQueue, prefix_cache.QUEUE_METHODS),
    )
    for target, other_target, cls, names in hooked:
        for name in names:
            assert hasattr(vars(target)[name], "__wrapped__"), name
            assert name not in vars(other_target) and getattr(cls, name) is vars(cls)[name]
    prefix_cache.forget(pool)
    for target, _, _, names in hooked:
        assert not any(name in vars(target) for name in names)


def test_one_shot_iterators_still_reach_vllm_whole(hooks, tiny_model_dir):
    """The count looks at the blocks before vLLM does; a generator must not arrive empty."""
    scheduler, counter, pool, cached = after_one_finished_request(tiny_model_dir)
    pool.touch(block for block in cached[:2])
    assert [block.ref_cnt for block in cached[:2]] == [1, 1]
    assert counter.per_group == evictable_per_group(scheduler) == [4]
    pool.evict_blocks(block.block_id for block in cached[2:4])
    assert counter.per_group == evictable_per_group(scheduler) == [2]


def test_blocks_freed_to_be_evicted_first_are_counted_at_every_step(hooks, tiny_model_dir):
    """vLLM 0.34's ``free_blocks(evict_first=True)`` puts hashed blocks at the front of the free queue.

    The pattern of vLLM's SimpleCPUOffload connector in its lazy mode: it holds blocks it is copying
    out (``touch``) and frees them later with ``evict_first=True``. Here it holds cached and running
    requests' blocks under the random load of a real scheduler; the walk of the free queue agrees
    with the count after every step and every such free.
    """
    scheduler = build_scheduler(tiny_model_dir, num_blocks=48, block_size=16)
    pool = scheduler.kv_cache_manager.block_pool
    if not prefix_cache.takes_evict_first(pool):
        pytest.skip(f"vLLM {compat.vllm_version()}'s free_blocks has no evict_first")
    counter, stepper, rng = watched(scheduler), Stepper(scheduler), random.Random(11)
    prefixes = [[rng.randrange(30_000) for _ in range(96)] for _ in range(3)]
    held: list[list] = []
    freed_first_with_hash = 0
    for step in range(300):
        if step < 240 and rng.random() < 0.4:
            prompt = rng.choice(prefixes)[: rng.randrange(16, 96)] + [rng.randrange(30_000) for _ in range(8)]
            scheduler.add_request(make_request(scheduler, len(prompt), rng.randrange(1, 40), prompt_token_ids=prompt))
        if rng.random() < 0.3:  # the connector holds some hashed blocks, free or in use, while it copies them
            hashed = [block for block in pool.blocks[1:] if block.block_hash is not None]
            if hashed:
                blocks = rng.sample(hashed, min(len(hashed), rng.randrange(1, 4)))
                pool.touch(blocks)
                held.append(blocks)
        if held and rng.random() < 0.4:  # ... and frees them, to be evicted first
            blocks = held.pop(0)
            freed_first_with_hash += sum(1 for block in blocks if block.ref_cnt == 1 and block.block_hash is not None)
            pool.free_blocks(iter(blocks), evict_first=True)
            assert counter.per_group == evictable_per_group(scheduler), f"free at step {step}"
        if scheduler.has_requests():
            stepper.step()
        assert counter.per_group == evictable_per_group(scheduler), f"step {step}"
    assert freed_first_with_hash > 10, "hashed blocks should have been freed to the front"
    for blocks in held:
        pool.free_blocks(blocks, evict_first=True)
    stepper.run_until_idle()
    assert not counter.failed and counter.per_group == evictable_per_group(scheduler)
