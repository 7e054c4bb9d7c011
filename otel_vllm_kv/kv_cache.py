"""Read a V1 scheduler's KV-cache pool in blocks, O(1): the one module that reads vLLM internals.

Token accounting (single KV-cache group), with N = ``block_pool.num_gpu_blocks``,
F = free blocks and B = the group manager's block size:

* vLLM reserves block 0 as a null block that is never allocatable, so
  ``limit = (N - 1) * B`` and ``utilization = 1 - F / (N - 1)``, the very
  expression of ``BlockPool.get_usage`` (so it equals ``kv_cache_usage`` exactly);
* ``free = F * B``: prefix-cached blocks that no request references are in the
  free queue (evicted lazily on reuse), so they count as free;
* ``used = limit - free``, at block granularity (a request's partly filled last
  block counts in full).

B is the manager's ``block_size``, which already includes the decode-context
parallel factor (``kv_cache_spec.block_size * dcp_world_size``); the scheduler
config's block size does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PoolLayout:
    """What is fixed once the KV cache is allocated."""

    num_blocks: int
    """All blocks of the pool, the reserved null block included (N)."""
    block_size: int
    """Tokens per block of the single group's manager (B); 0 if there are several groups."""
    num_groups: int
    """KV-cache groups sharing the pool; more than one for hybrid models."""

    @property
    def is_hybrid(self) -> bool:
        return self.num_groups != 1


@dataclass(frozen=True)
class KVCacheTokens:
    """Occupancy of one engine's KV cache; tokens are None for hybrid models."""

    utilization: float
    used_blocks: int
    free_blocks: int
    limit_tokens: int | None
    used_tokens: int | None
    free_tokens: int | None


def read_layout(scheduler: Any) -> PoolLayout:
    """Read N, B and the group count from a built ``Scheduler``."""
    manager = scheduler.kv_cache_manager
    groups = len(manager.kv_cache_config.kv_cache_groups)
    block_size = manager.coordinator.single_type_managers[0].block_size if groups == 1 else 0
    return PoolLayout(manager.block_pool.num_gpu_blocks, block_size, groups)


def free_block_reader(scheduler: Any):
    """Return the pool's bound ``get_num_free_blocks``: the per-step read is this one call."""
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks


def to_tokens(layout: PoolLayout, free_blocks: int) -> KVCacheTokens:
    """Turn a free-block count into the occupancy vLLM's ``kv_cache_usage`` describes."""
    allocatable = layout.num_blocks - 1
    used_blocks = allocatable - free_blocks
    # Same expression as BlockPool.get_usage, so the float is bit-identical.
    utilization = 1.0 - (free_blocks / allocatable) if allocatable else 0.0
    if layout.is_hybrid:
        return KVCacheTokens(utilization, used_blocks, free_blocks, None, None, None)
    size = layout.block_size
    return KVCacheTokens(
        utilization, used_blocks, free_blocks, allocatable * size, used_blocks * size, free_blocks * size
    )


def read_engine_identity(scheduler: Any) -> tuple[int, str]:
    """The engine's data-parallel index and served model name, as vLLM labels its own metrics."""
    parallel = scheduler.vllm_config.parallel_config
    index = getattr(parallel, "data_parallel_index", parallel.data_parallel_rank)
    served = scheduler.vllm_config.model_config.served_model_name
    if isinstance(served, (list, tuple)):
        served = served[0]
    return int(index), str(served)
