"""Fair-share KV residency is exact: on real schedulers, through random workloads with shared
prefixes, preemptions, aborts and a prefix-cache reset, the requests' token-seconds add up to
the integral of the pool's used tokens over the same steps."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
from vllm.lora.request import LoRARequest
from vllm.v1.request import RequestStatus

from otel_vllm_kv.admission_records import TENANT_HEADER_KEY
from otel_vllm_kv.engine.holders import Holders
from otel_vllm_kv.engine.residency import ResidencyLedger
from otel_vllm_kv.holdings import OVERFLOW
from otel_vllm_kv.patching import hook_methods
from tests.support.schedulers import Stepper, build_scheduler, make_request

BLOCK_SIZE = 16
#: A workload's steps, the last step a request arrives at, and the step of the prefix-cache reset.
STEPS, ARRIVALS_UNTIL, RESET_AT = 400, 300, 150
#: The LoRA adapters and tenants of a tagged workload's requests (None: none).
ADAPTERS = (None, "adapter-a", "adapter-b")
TENANTS = (None, "tenant-1", "tenant-2")


class StepClock:
    """The time of the step being run: one second per step, so integrals are sums."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def attached_ledger(scheduler, clock) -> tuple[list[int], dict, dict]:
    """Keep the residency of the scheduler's requests; returns the prefix hits of each admission, and
    the block-seconds and the peak blocks of each finished request by request id (filled as they finish)."""
    ledger = ResidencyLedger(scheduler, clock=clock)
    released, peaks = {}, {}

    def on_release(request, block_seconds, peak_blocks, recomputed_tokens):
        released[request.request_id] = block_seconds
        peaks[request.request_id] = peak_blocks

    ledger.on_release = on_release
    on_pool, on_manager = ledger.hooks(give_up=failed)
    hits = []

    def record_prefix_cache_stats(original):
        def hook(request, num_hits):
            result = original(request, num_hits)
            if num_hits or request.num_preemptions:
                ledger.acquire(request, num_hits)
            hits.append(num_hits)
            return result

        return hook

    hook_methods(scheduler.kv_cache_manager.block_pool, on_pool)
    hook_methods(scheduler.kv_cache_manager, {**on_manager, "record_prefix_cache_stats": record_prefix_cache_stats})
    return hits, released, peaks


def failed() -> None:
    raise AssertionError("a residency hook failed")


def fair_shares_now(scheduler) -> dict[str, float]:
    """Each request's fair share of the pool now, by brute force: every block it holds, in tokens,
    divided by the requests holding it (the oracle the ledger must match without this work)."""
    shares: dict[str, float] = {}
    null_block = scheduler.kv_cache_manager.block_pool.null_block
    for group in scheduler.kv_cache_manager.coordinator.single_type_managers:
        for request_id, blocks in group.req_to_blocks.items():
            held = sum(BLOCK_SIZE / block.ref_cnt for block in blocks if block is not null_block)
            shares[request_id] = shares.get(request_id, 0.0) + held
    return shares


def blocks_now(scheduler) -> dict[str, int]:
    """The blocks each request holds now (its own count, shared or not)."""
    counts: dict[str, int] = {}
    null_block = scheduler.kv_cache_manager.block_pool.null_block
    for group in scheduler.kv_cache_manager.coordinator.single_type_managers:
        for request_id, blocks in group.req_to_blocks.items():
            counts[request_id] = counts.get(request_id, 0) + sum(block is not null_block for block in blocks)
    return counts


def random_workload(
    scheduler, clock, seed: int, after_step: Callable[[], None], requests: dict, tagged: bool = False
) -> None:
    """Random requests (some sharing a prompt prefix), a random abort now and then, one prefix-cache
    reset; ``after_step()`` after every step, the steps one second apart, then the scheduler run until
    idle. With ``tagged``, each request has a random LoRA adapter and tenant (``ADAPTERS``,
    ``TENANTS``). Each request goes into ``requests`` as it arrives, by request id, with its
    (adapter, tenant)."""
    rng = random.Random(seed)
    stepper = Stepper(scheduler)
    adapters = {name: LoRARequest(name, index + 1, f"/adapters/{name}") for index, name in enumerate(ADAPTERS) if name}
    prefixes = [list(range(1000 * p, 1000 * p + BLOCK_SIZE * rng.randint(1, 4))) for p in range(3)]
    for step in range(STEPS):
        clock.now = float(step)
        if step < ARRIVALS_UNTIL and rng.random() < 0.4:
            prefix = rng.choice(prefixes) if rng.random() < 0.7 else []
            prompt = prefix + [rng.randrange(50_000, 60_000) for _ in range(rng.randint(1, 3 * BLOCK_SIZE))]
            adapter, tenant = (rng.choice(ADAPTERS), rng.choice(TENANTS)) if tagged else (None, None)
            request = make_request(
                scheduler,
                len(prompt),
                max_tokens=rng.randint(1, 60),
                prompt_token_ids=prompt,
                lora_request=adapters.get(adapter),
                trace_headers=None if tenant is None else {TENANT_HEADER_KEY: tenant},
            )
            scheduler.add_request(request)
            requests[request.request_id] = (request, (adapter, tenant))
        if rng.random() < 0.03:
            running = [r.request_id for r, _ in requests.values() if not r.is_finished()]
            if running:
                scheduler.finish_requests([rng.choice(running)], RequestStatus.FINISHED_ABORTED)
        if step == RESET_AT:
            scheduler.reset_prefix_cache()
        if scheduler.has_requests() or stepper.in_flight:
            stepper.step()
        after_step()
    clock.now = float(STEPS)
    stepper.run_until_idle()


def run_workload(scheduler, clock, seed: int) -> tuple[list, float, dict[str, float], dict[str, int]]:
    """``random_workload``; returns every request, the integral of used tokens, and each request's
    integral of its fair share and the most blocks it held after a step."""
    pool = scheduler.kv_cache_manager.block_pool
    allocatable = pool.num_gpu_blocks - 1
    integrals = {"used": 0.0}
    share_integrals: dict[str, float] = {}
    most_blocks: dict[str, int] = {}

    def after_step() -> None:
        integrals["used"] += (allocatable - pool.get_num_free_blocks()) * BLOCK_SIZE * 1.0
        for request_id, share in fair_shares_now(scheduler).items():
            share_integrals[request_id] = share_integrals.get(request_id, 0.0) + share * 1.0
        for request_id, blocks in blocks_now(scheduler).items():
            most_blocks[request_id] = max(most_blocks.get(request_id, 0), blocks)

    requests: dict = {}
    random_workload(scheduler, clock, seed, after_step, requests)
    return [request for request, _ in requests.values()], integrals["used"], share_integrals, most_blocks


def residency_of(released: dict, request) -> float:
    return released.get(request.request_id, 0.0) * BLOCK_SIZE


@pytest.mark.parametrize("seed", range(5))
def test_the_requests_shares_add_up_to_the_pools_used_tokens(vllm_scheduler, tiny_model_dir, seed):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=40, block_size=BLOCK_SIZE)
    clock = StepClock()
    hits, released, peaks = attached_ledger(scheduler, clock)
    requests, used_integral, share_integrals, most_blocks = run_workload(scheduler, clock, seed)
    preemptions = sum(request.num_preemptions for request in requests)
    assert preemptions > 0, "the workload must preempt"
    assert sum(hit > 0 for hit in hits) > 5, "and share prefixes"
    assert all(request.is_finished() for request in requests)
    total = sum(residency_of(released, request) for request in requests)
    assert math.isclose(total, used_integral, rel_tol=1e-12), (total, used_integral)
    for request in requests:
        expected = share_integrals.get(request.request_id, 0.0)
        assert math.isclose(residency_of(released, request), expected, rel_tol=1e-12, abs_tol=1e-9), request.request_id
        # Seen after each step, and at most what its prompt and its output tokens need (its last step
        # can add a block the observation after it no longer sees: the request is freed in that step).
        held_most = most_blocks.get(request.request_id, 0)
        needed = math.ceil((request.num_prompt_tokens + request.max_tokens) / BLOCK_SIZE)
        assert held_most <= peaks.get(request.request_id, 0) <= needed, request.request_id


#: Fewer than the 9 (adapter, tenant) pairs the workload draws from: the rest must fold into OVERFLOW.
HOLDER_LIMIT = 5


def holder_workload(scheduler, clock, seed: int, holders: Holders) -> tuple[dict, float, list]:
    """``random_workload`` of tagged requests, a pass after every step checked against brute force.
    Returns each key's integral of held blocks, the integral of used blocks and every request."""
    pool = scheduler.kv_cache_manager.block_pool
    held_integrals: dict = {}
    integrals = {"used": 0.0}
    requests: dict = {}

    def after_step() -> None:
        counted = holders.count()
        assert counted.used_blocks == pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()
        held = {holding.key: holding.held_blocks for holding in counted.holdings}
        assert math.isclose(sum(held.values()), counted.used_blocks, rel_tol=1e-12, abs_tol=1e-9)
        expected: dict = {}
        for request_id, tokens in fair_shares_now(scheduler).items():
            key = holders.key(scheduler.requests[request_id])
            assert key == requests[request_id][1] or key == OVERFLOW
            expected[key] = expected.get(key, 0.0) + tokens / BLOCK_SIZE
        assert set(expected) <= set(held)
        for key, blocks in held.items():
            assert math.isclose(blocks, expected.get(key, 0.0), rel_tol=1e-12, abs_tol=1e-9), key
            held_integrals[key] = held_integrals.get(key, 0.0) + blocks
        assert math.isclose(counted.written_tokens, written_now(scheduler), rel_tol=1e-12, abs_tol=1e-9)
        assert counted.written_tokens <= counted.used_blocks * BLOCK_SIZE + 1e-9
        integrals["used"] += counted.used_blocks

    random_workload(scheduler, clock, seed, after_step, requests, tagged=True)
    return held_integrals, integrals["used"], [request for request, _ in requests.values()]


def written_now(scheduler) -> float:
    """Slots holding computed tokens, by brute force: slot by slot, each shared by the block's holders."""
    written = 0.0
    for request_id, blocks in scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks.items():
        computed = scheduler.requests[request_id].num_computed_tokens
        for index, block in enumerate(blocks):
            slots = sum(1 for slot in range(BLOCK_SIZE) if index * BLOCK_SIZE + slot < computed)
            written += slots / block.ref_cnt
    return written


@pytest.mark.parametrize("seed", range(3))
def test_holders_add_up_to_the_pool_by_adapter_and_tenant(vllm_scheduler, tiny_model_dir, seed):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=40, block_size=BLOCK_SIZE)
    clock = StepClock()
    ledger = ResidencyLedger(scheduler, clock=clock)
    holders = Holders(scheduler, limit=HOLDER_LIMIT)
    ledger.holders = holders
    on_pool, on_manager = ledger.hooks(give_up=failed)
    hook_methods(scheduler.kv_cache_manager.block_pool, on_pool)
    hook_methods(scheduler.kv_cache_manager, on_manager)
    original_acquire = scheduler.kv_cache_manager.record_prefix_cache_stats

    def record_prefix_cache_stats(request, num_hits):
        result = original_acquire(request, num_hits)
        ledger.acquire(request, num_hits)
        return result

    scheduler.kv_cache_manager.record_prefix_cache_stats = record_prefix_cache_stats
    held_integrals, used_integral, requests = holder_workload(scheduler, clock, seed, holders)
    assert all(request.is_finished() for request in requests)
    assert sum(request.num_preemptions for request in requests) > 0, "the workload must preempt"
    # Every release is in: each key's block-seconds are the integral of what it held, pass by pass.
    totals = {holding.key: holding.block_seconds for holding in holders.count().holdings}
    assert len(totals) == HOLDER_LIMIT + 1, "the limit's keys, and OVERFLOW for the rest"
    assert math.isclose(sum(totals.values()), used_integral, rel_tol=1e-12)
    for key, integral in held_integrals.items():
        assert math.isclose(totals[key], integral, rel_tol=1e-12, abs_tol=1e-9), key
