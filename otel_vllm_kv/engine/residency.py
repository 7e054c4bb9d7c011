"""Engine: what each request holds of the KV cache over time, in fair-share token-seconds.

A block held by k requests at once (a prefix shared through the prefix cache) counts 1/k to
each, so the shares of all requests add up to the pool's used tokens at every instant, and
their integrals to the integral of ``used`` (the conservation law the tests check).

Exact without per-step work: each block keeps a *share clock*, the integral of 1/k over the
time it was held (``share``), brought up to date only when its holder count k changes. A
holder that acquired block b when its clock read c_a and released it when it read c_r held
``tokens per block x (c_r - c_a)`` token-seconds of it. So:

* a fresh block (``BlockPool.get_new_blocks``: k 0 -> 1) starts its clock at 0, and its
  holder's acquisition reads 0: nothing is recorded per request;
* a prefix hit (``BlockPool.touch``: k -> k + 1) settles the clock at the old k first; the
  admission that follows (``acquire``) adds up the clocks of the request's blocks, as its
  acquisition;
* ``KVCacheManager.free(request)`` (finish, abort, preemption) settles the clocks of the
  request's blocks at their k before vLLM lowers it, and adds them up as its release.

Nothing runs per running request per step; a decode step that allocates a block pays one
list store per block. A block's tokens are the pool's capacity-equivalent tokens per block,
``limit / (N - 1)`` (``kv_cache``), so hybrid models are counted as the gauges count them.
Blocks a sliding-window group releases before the request ends (``remove_skipped_blocks``)
are not seen per request: only full-attention groups are exact (``exact``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from otel_vllm_kv.patching import hook_methods, unhook_methods

POOL_METHODS = ("get_new_blocks", "touch")
MANAGER_METHODS = ("free",)
#: The attributes this package sets on a vLLM ``Request`` for its residency.
ACQUIRED_ATTRIBUTE = "_otel_vllm_kv_acquired"
RESIDENCY_ATTRIBUTE = "_otel_vllm_kv_residency"
PEAK_ATTRIBUTE = "_otel_vllm_kv_peak_blocks"


class RequestResidency:
    """What one request held, as ``free`` leaves it on the request (``RESIDENCY_ATTRIBUTE``)."""

    __slots__ = ("share_seconds", "peak_blocks", "releases")

    def __init__(self) -> None:
        #: Fair-share block-seconds: times the tokens per block, token-seconds.
        self.share_seconds = 0.0
        self.peak_blocks = 0
        self.releases = 0


class ResidencyLedger:
    """The share clocks of one ``BlockPool`` and the hooks that keep them."""

    __slots__ = ("share", "since", "tokens_per_block", "clock", "exact", "_group_blocks", "_null_block")

    def __init__(self, scheduler: Any, tokens_per_block: float, clock: Callable[[], float] = time.monotonic) -> None:
        manager = scheduler.kv_cache_manager
        pool = manager.block_pool
        num_blocks = pool.num_gpu_blocks
        #: Per block id: the integral of 1 / holders over the time it was held, up to ``since``.
        self.share = [0.0] * num_blocks
        self.since = [0.0] * num_blocks
        self.tokens_per_block = tokens_per_block
        self.clock = clock
        managers = manager.coordinator.single_type_managers
        self._group_blocks = tuple(group.req_to_blocks for group in managers)
        self._null_block = pool.null_block
        self.exact = all(type(group).__name__ == "FullAttentionManager" for group in managers)

    def attach(self, scheduler: Any) -> None:
        manager = scheduler.kv_cache_manager
        hook_methods(manager.block_pool, {"get_new_blocks": self._allocated, "touch": self._touched})
        hook_methods(manager, {"free": self._freed})

    @staticmethod
    def detach(scheduler: Any) -> None:
        manager = scheduler.kv_cache_manager
        unhook_methods(manager.block_pool, POOL_METHODS)
        unhook_methods(manager, MANAGER_METHODS)

    def _allocated(self, original: Callable) -> Callable:
        share, since, clock = self.share, self.since, self.clock

        def get_new_blocks(num_blocks: int) -> Any:
            blocks = original(num_blocks)
            now = clock()
            for block in blocks:
                index = block.block_id
                share[index] = 0.0
                since[index] = now
            return blocks

        return get_new_blocks

    def _touched(self, original: Callable) -> Callable:
        share, since, clock = self.share, self.since, self.clock

        def touch(blocks: Any) -> Any:
            now = clock()
            for block in blocks:
                index = block.block_id
                holders = block.ref_cnt
                if holders > 0:
                    share[index] += (now - since[index]) / holders
                since[index] = now
            return original(blocks)

        return touch

    def acquire(self, request: Any) -> None:
        """At admission, after vLLM allocated the request's blocks: their clocks are its acquisition."""
        share, null_block = self.share, self._null_block
        request_id = request.request_id
        acquired = 0.0
        for group in self._group_blocks:
            for block in group.get(request_id, ()):
                if block is not null_block:
                    acquired += share[block.block_id]
        setattr(request, ACQUIRED_ATTRIBUTE, acquired)

    def _freed(self, original: Callable) -> Callable:
        share, since, clock, null_block = self.share, self.since, self.clock, self._null_block
        group_blocks = self._group_blocks

        def free(request: Any) -> Any:
            now = clock()
            request_id = request.request_id
            released = 0.0
            held = 0
            for group in group_blocks:
                for block in group.get(request_id, ()):
                    if block is null_block:
                        continue
                    index = block.block_id
                    share[index] += (now - since[index]) / block.ref_cnt
                    since[index] = now
                    released += share[index]
                    held += 1
            if held:
                residency = getattr(request, RESIDENCY_ATTRIBUTE, None)
                if residency is None:
                    residency = RequestResidency()
                    setattr(request, RESIDENCY_ATTRIBUTE, residency)
                residency.share_seconds += released - getattr(request, ACQUIRED_ATTRIBUTE, 0.0)
                residency.peak_blocks = max(residency.peak_blocks, held)
                residency.releases += 1
            return original(request)

        return free
