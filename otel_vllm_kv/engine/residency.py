"""Engine: what each request holds of the KV cache over time, in fair-share block-seconds.

A block held by k requests at once (a prefix shared through the prefix cache) counts 1/k to
each, so the shares of all requests add up to the pool's used blocks at every instant, and
their integrals to the integral of ``used`` (the conservation law the tests check).

Exact without per-step work: each block keeps a *share clock*, the integral of 1/k over the
time it was held (``share``), brought up to date only when its holder count k changes. A
holder that acquired block b when its clock read c_a and released it when it read c_r held
``c_r - c_a`` block-seconds of it. So:

* a fresh block (``BlockPool.get_new_blocks``: k 0 -> 1) starts its clock at 0, and its
  holder's acquisition reads 0: nothing is kept per request;
* a prefix hit (``BlockPool.touch``: k -> k + 1) settles the clock at the old k first and adds
  it up; the admission that follows (``acquire``) keeps that sum as the request's acquisition
  (only when not 0): its other blocks are fresh;
* ``KVCacheManager.free(request)`` (finish, abort, preemption) settles the clocks of the
  request's blocks at their k before vLLM lowers it, and adds them up as its release. A block
  whose last holder this is keeps its clock unsettled: a prefix hit that revives it later
  reads that clock as its acquisition and settles from there, so only differences of one
  block's clock are ever used.

Nothing runs per running request per step; a decode step that allocates a block pays one
list store per block. A request admitted without prefix hits and never preempted costs a
dictionary miss at its release and nothing at its admission (``benchmarks.instructions``).
Times are the engine's ``time.monotonic()``. Blocks a sliding-window group releases before
the request ends (``remove_skipped_blocks``) are not seen per request: only full-attention
groups are exact (``exact``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from otel_vllm_kv.admission_records import TENANT_HEADER_KEY as tenant_key
from otel_vllm_kv.admission_records import TRACED_HEADER_KEY
from otel_vllm_kv.engine.admission import TRACED_TYPES
from otel_vllm_kv.holdings import NO_HOLDER_NAMES
from otel_vllm_kv.internals import attribute, method

BLOCK_POOL_MODULE = "vllm.v1.core.block_pool"
KV_CACHE_MANAGER_MODULE = "vllm.v1.core.kv_cache_manager"
POOL_METHODS = ("get_new_blocks", "touch")
MANAGER_METHODS = ("free",)
#: The parameters of the hooked methods, checked against the installed vLLM at attach.
HOOKED_PARAMETERS = {"get_new_blocks": ("num_blocks",), "touch": ("blocks",), "free": ("request",)}

#: ``on_release(request, block_seconds, peak_blocks, recomputed_tokens)``: a finished request gave its
#: blocks back; ``block_seconds`` times the pool's tokens per block are its token-seconds.
OnRelease = Callable[[Any, float, int, int], None]


class PreemptedResidency:
    """What a preempted request held before its resumption, by request id in ``ResidencyLedger.preempted``.

    Kept in the ledger, never as attributes of vLLM's ``Request``: an attribute added to every
    request after its ``__init__`` makes CPython give up the instances' shared-key layout, and
    every attribute read vLLM makes on its requests slows down.
    """

    __slots__ = ("block_seconds", "peak_blocks", "computed_tokens", "recomputed_tokens")

    def __init__(self, block_seconds: float, peak_blocks: int, computed_tokens: int, recomputed_tokens: int) -> None:
        self.block_seconds = block_seconds
        self.peak_blocks = peak_blocks
        #: Tokens it had computed when it was preempted (0 once resumed).
        self.computed_tokens = computed_tokens
        #: Tokens computed again after its preemptions: those it had, less its prefix hits at resumption.
        self.recomputed_tokens = recomputed_tokens


class ResidencyLedger:
    """The share clocks of one ``BlockPool``, and the hooks that keep them (``patching.hook_methods``).

    ``on_release`` runs when a finished request gave its blocks back; ``give_up()`` when a hook
    failed (the hook lets vLLM's call run untouched).
    """

    __slots__ = (
        "share",
        "since",
        "clock",
        "exact",
        "on_release",
        "holders",
        "acquired",
        "touched",
        "preempted",
        "_finished",
        "_group_blocks",
        "_null_block",
    )

    def __init__(self, scheduler: Any, clock: Callable[[], float] = time.monotonic) -> None:
        from vllm.v1.request import RequestStatus

        manager = scheduler.kv_cache_manager
        pool = manager.block_pool
        #: Per block id: the integral of 1 / holders over the time it was held, up to ``since``.
        self.share = [0.0] * pool.num_gpu_blocks
        self.since = [0.0] * pool.num_gpu_blocks
        self.clock = clock
        self.on_release: OnRelease | None = None
        #: Block-seconds by holder key (``holders.Holders``), added at every release that held blocks.
        self.holders: Any = None
        #: The share clocks of a running request's blocks at its last admission, where not 0 (prefix hits).
        self.acquired: dict[str, float] = {}
        #: The clocks of the blocks ``touch`` revived or shared since the last admission: the next one's acquisition.
        self.touched = 0.0
        #: Every preempted request not finished yet, by vLLM's request id.
        self.preempted: dict[str, PreemptedResidency] = {}
        self._finished = frozenset(status for status in RequestStatus if RequestStatus.is_finished(status))
        managers = manager.coordinator.single_type_managers
        self._group_blocks = tuple(group.req_to_blocks for group in managers)
        self._null_block = pool.null_block
        self.exact = all(type(group).__name__ == "FullAttentionManager" for group in managers)

    def hooks(self, give_up: Callable[[], None]) -> tuple[dict, dict]:
        """The hooks of the pool's and of the manager's own methods."""
        on_pool = {"get_new_blocks": self._allocated(give_up), "touch": self._touched(give_up)}
        return on_pool, {"free": self._freed(give_up)}

    def _allocated(self, give_up: Callable[[], None]) -> Callable[[Callable], Callable]:
        share, since, clock = self.share, self.since, self.clock

        def hook(original: Callable) -> Callable:
            def get_new_blocks(num_blocks: int) -> Any:
                blocks = original(num_blocks)
                try:
                    now = clock()
                    for block in blocks:
                        index = block.block_id
                        share[index] = 0.0
                        since[index] = now
                except Exception:  # noqa: BLE001 - the engine must never see our failure
                    give_up()
                return blocks

            return get_new_blocks

        return hook

    def _touched(self, give_up: Callable[[], None]) -> Callable[[Callable], Callable]:
        share, since, clock, null_block = self.share, self.since, self.clock, self._null_block
        ledger = self

        def hook(original: Callable) -> Callable:
            def touch(blocks: Any) -> Any:
                try:
                    now = clock()
                    acquired = 0.0
                    for block in blocks:
                        if block is null_block:
                            continue
                        index = block.block_id
                        holders = block.ref_cnt
                        if holders > 0:
                            settled = share[index] + (now - since[index]) / holders
                            share[index] = settled
                        else:  # revived from the cache: its clock reads on from where its last holder left it
                            settled = share[index]
                        since[index] = now
                        acquired += settled
                    ledger.touched += acquired
                except Exception:  # noqa: BLE001
                    give_up()
                return original(blocks)

            return touch

        return hook

    def acquire(self, request: Any, num_hits: int) -> None:
        """At an admission with prefix hits or a resumption, after vLLM allocated the request's
        blocks: their clocks are its acquisition. Its fresh blocks' clocks read 0, so that is what
        ``touch`` added up for its prefix hits (``touched``): vLLM's ``allocate_slots`` touches a
        request's hits and nothing else before this admission hook, and only when it admits it."""
        request_id = request.request_id
        acquired = self.touched
        if acquired:
            self.touched = 0.0
            if num_hits:
                self.acquired[request_id] = acquired
        past = self.preempted.get(request_id)
        if past is not None and past.computed_tokens:
            past.recomputed_tokens += max(past.computed_tokens - num_hits, 0)
            past.computed_tokens = 0

    def _freed(self, give_up: Callable[[], None]) -> Callable[[Callable], Callable]:
        share, since, clock, null_block = self.share, self.since, self.clock, self._null_block
        group_blocks, finished = self._group_blocks, self._finished
        acquisitions, preempted = self.acquired, self.preempted
        ledger = self
        traced_types = TRACED_TYPES

        def hook(original: Callable) -> Callable:
            def free(request: Any) -> Any:
                try:
                    now = clock()
                    request_id = request.request_id
                    released = 0.0
                    held = 0
                    for group in group_blocks:
                        for block in group.get(request_id, ()):
                            if block is null_block:
                                continue
                            index = block.block_id
                            holders_now = block.ref_cnt
                            if holders_now == 1:  # back to the pool: its clock is read again only relative to itself
                                released += share[index] + (now - since[index])
                            else:
                                settled = share[index] + (now - since[index]) / holders_now
                                share[index] = settled
                                since[index] = now
                                released += settled
                            held += 1
                    if acquisitions:
                        released -= acquisitions.pop(request_id, 0.0)
                    holders = ledger.holders
                    headers = request.trace_headers
                    if held and holders is not None:
                        # ``Holders.key``'s lookup, inline: a call per release costs more than all of this.
                        lora = request.lora_request
                        if lora is None and (not headers or tenant_key not in headers):
                            key = NO_HOLDER_NAMES  # most requests: no tuple to build
                        else:
                            key = (
                                None if lora is None else lora.lora_name,
                                headers.get(tenant_key) if headers else None,
                            )
                        totals = holders.block_seconds
                        total = totals.get(key)
                        if total is None:
                            key = holders.key(request)
                            total = totals[key]
                        totals[key] = total + released
                    past = preempted.pop(request_id, None) if preempted else None
                    if request.status in finished:
                        on_release = ledger.on_release
                        if (
                            on_release is None
                            or headers is None
                            or not (type(headers) in traced_types or TRACED_HEADER_KEY in headers)
                        ):
                            pass  # no frontend traces it: no finished record (``traced``, inline)
                        elif past is None:
                            if held:
                                on_release(request, released, held, 0)
                        else:
                            peak = held if held > past.peak_blocks else past.peak_blocks
                            on_release(request, past.block_seconds + released, peak, past.recomputed_tokens)
                    elif past is None:
                        if held:  # a preemption: vLLM resets num_computed_tokens right after this call
                            preempted[request_id] = PreemptedResidency(released, held, request.num_computed_tokens, 0)
                    else:
                        past.block_seconds += released
                        if held > past.peak_blocks:
                            past.peak_blocks = held
                        past.computed_tokens = request.num_computed_tokens
                        preempted[request_id] = past
                except Exception:  # noqa: BLE001
                    give_up()
                return original(request)

            return free

        return hook


#: What the ledger needs in this vLLM: the hooked methods with their parameters (a vLLM that renamed
#: one fails at attach), and the pool's size. ``KVCacheBlock``'s ``block_id`` and ``ref_cnt`` are
#: ``prefix_cache``'s already.
REQUIRED = (
    *(method(BLOCK_POOL_MODULE, f"BlockPool.{name}", HOOKED_PARAMETERS[name]) for name in POOL_METHODS),
    *(method(KV_CACHE_MANAGER_MODULE, f"KVCacheManager.{name}", HOOKED_PARAMETERS[name]) for name in MANAGER_METHODS),
    attribute(BLOCK_POOL_MODULE, "BlockPool.num_gpu_blocks"),
)
