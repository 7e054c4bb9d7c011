"""Fair-share KV residency is exact: on real schedulers, through random workloads with shared
prefixes, preemptions, aborts and a prefix-cache reset, the requests' token-seconds add up to
the integral of the pool's used tokens over the same steps."""

from __future__ import annotations

import math
import random

import pytest
from vllm.v1.request import RequestStatus

from otel_vllm_kv.engine.residency import ResidencyLedger
from otel_vllm_kv.patching import hook_methods
from tests.support.schedulers import Stepper, build_scheduler, make_request

BLOCK_SIZE = 16


class StepClock:
    """The time of the step being run: one second per step, so integrals are sums."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def attached_ledger(scheduler, clock) -> tuple[list[int], dict]:
    """Keep the residency of the scheduler's requests; returns the prefix hits of each admission and
    the residency of each finished request, by request id (filled as they finish)."""
    ledger = ResidencyLedger(scheduler, clock=clock)
    released = {}
    ledger.on_release = lambda request, residency: released.__setitem__(request.request_id, residency)
    on_pool, on_manager = ledger.hooks(give_up=failed)
    hits = []

    def record_prefix_cache_stats(original):
        def hook(request, num_hits):
            result = original(request, num_hits)
            ledger.acquire(request, num_hits)
            hits.append(num_hits)
            return result

        return hook

    hook_methods(scheduler.kv_cache_manager.block_pool, on_pool)
    hook_methods(scheduler.kv_cache_manager, {**on_manager, "record_prefix_cache_stats": record_prefix_cache_stats})
    return hits, released


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


def run_workload(scheduler, clock, seed: int) -> tuple[list, float, dict[str, float]]:
    """Random requests (some sharing a prompt prefix), a random abort now and then, one prefix-cache
    reset; returns every request, the integral of used tokens and each request's integral of its
    fair share, step by step."""
    rng = random.Random(seed)
    stepper = Stepper(scheduler)
    pool = scheduler.kv_cache_manager.block_pool
    allocatable = pool.num_gpu_blocks - 1
    prefixes = [list(range(1000 * p, 1000 * p + BLOCK_SIZE * rng.randint(1, 4))) for p in range(3)]
    requests, used_integral, share_integrals = [], 0.0, {}
    for step in range(400):
        clock.now = float(step)
        if step < 300 and rng.random() < 0.4:
            prefix = rng.choice(prefixes) if rng.random() < 0.7 else []
            prompt = prefix + [rng.randrange(50_000, 60_000) for _ in range(rng.randint(1, 3 * BLOCK_SIZE))]
            request = make_request(scheduler, len(prompt), max_tokens=rng.randint(1, 60), prompt_token_ids=prompt)
            scheduler.add_request(request)
            requests.append(request)
        if rng.random() < 0.03:
            running = [r.request_id for r in requests if not r.is_finished()]
            if running:
                scheduler.finish_requests([rng.choice(running)], RequestStatus.FINISHED_ABORTED)
        if step == 150:
            scheduler.reset_prefix_cache()
        if scheduler.has_requests() or stepper.in_flight:
            stepper.step()
        used_integral += (allocatable - pool.get_num_free_blocks()) * BLOCK_SIZE * 1.0
        for request_id, share in fair_shares_now(scheduler).items():
            share_integrals[request_id] = share_integrals.get(request_id, 0.0) + share * 1.0
    clock.now = 400.0
    stepper.run_until_idle()
    return requests, used_integral, share_integrals


def residency_of(released: dict, request) -> float:
    residency = released.get(request.request_id)
    return 0.0 if residency is None else residency.block_seconds * BLOCK_SIZE


@pytest.mark.parametrize("seed", range(5))
def test_the_requests_shares_add_up_to_the_pools_used_tokens(vllm_scheduler, tiny_model_dir, seed):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=40, block_size=BLOCK_SIZE)
    clock = StepClock()
    hits, released = attached_ledger(scheduler, clock)
    requests, used_integral, share_integrals = run_workload(scheduler, clock, seed)
    preemptions = sum(request.num_preemptions for request in requests)
    assert preemptions > 0, "the workload must preempt"
    assert sum(hit > 0 for hit in hits) > 5, "and share prefixes"
    assert all(request.is_finished() for request in requests)
    total = sum(residency_of(released, request) for request in requests)
    assert math.isclose(total, used_integral, rel_tol=1e-12), (total, used_integral)
    for request in requests:
        expected = share_integrals.get(request.request_id, 0.0)
        assert math.isclose(residency_of(released, request), expected, rel_tol=1e-12, abs_tol=1e-9), request.request_id
