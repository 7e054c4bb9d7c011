"""KV-cache accounting: a pool's layout and occupancy, and block counts in tokens (pure: no vLLM).

What is read from vLLM, and how, is ``engine.pool_reading``.

With N = ``block_pool.num_gpu_blocks``, F = free blocks, U = N - 1 - F used blocks:

* vLLM reserves block 0 as a null block that is never allocatable, so the pool has
  N - 1 allocatable blocks and ``utilization = 1 - F / (N - 1)``, the very expression
  of ``BlockPool.get_usage`` (so it equals ``kv_cache_usage`` bit for bit);
* prefix-cached blocks that no request references sit in the free queue (evicted
  lazily on reuse), so they count in F; ``prefix_cache`` counts them apart (E);
* the admission watermark: vLLM admits a waiting request, while others run, only if
  F - ``watermark_blocks`` covers its blocks, so headroom = max(F - W, 0).

Tokens. With one KV-cache group of block size B (the manager's ``block_size``, which
already includes the decode-context-parallel factor ``kv_cache_spec.block_size *
dcp_world_size``; the cache config's block size does not), ``limit = (N - 1) * B`` and
every count is exact: ``tokens(x) = x * B``. Several groups (hybrid models: full plus
sliding-window attention, Mamba) draw blocks of different sizes from one shared pool, so
no B exists; the limit is then vLLM's own group-aware capacity
``cache_config.kv_cache_size_tokens`` (requests of ``max_model_len`` that fit, times
``max_model_len``) and blocks convert at the pool's average rate,
``tokens(x) = floor(x * limit / (N - 1))``: the share of that capacity x blocks stand
for. The same formula gives x * B for one group, so there is one conversion.
``used = tokens(U)`` and ``free = limit - used``, so used + free = limit always.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class GroupLayout(NamedTuple):
    """One KV-cache group: vLLM's name of its attention type and its tokens per block."""

    kind: str
    block_size: int


@dataclass(frozen=True)
class PoolLayout:
    """What is fixed once the KV cache is allocated."""

    num_blocks: int
    """All blocks of the pool, the reserved null block included (N)."""
    limit_tokens: int | None
    """Token capacity: (N - 1) x B for one group, vLLM's ``kv_cache_size_tokens`` for several;
    None where neither is known (token values are then not reported)."""
    watermark_blocks: int | None = 0
    """Blocks vLLM keeps free when admitting a waiting request while others run; None where unknown."""
    groups: tuple[GroupLayout, ...] = ()
    """The KV-cache groups sharing the pool, in vLLM's group order."""

    @property
    def allocatable_blocks(self) -> int:
        return self.num_blocks - 1

    def tokens(self, blocks: int) -> int | None:
        """What ``blocks`` blocks hold, in tokens (see the module docstring)."""
        if self.limit_tokens is None:
            return None
        return tokens_in(blocks, self.limit_tokens, self.allocatable_blocks)


def tokens_in(blocks: int, limit_tokens: int, allocatable_blocks: int) -> int | None:
    """``blocks`` blocks of a pool of ``allocatable_blocks`` holding ``limit_tokens``, in tokens."""
    if allocatable_blocks <= 0:
        return None
    return blocks * limit_tokens // allocatable_blocks


def utilization(free_blocks: int, allocatable_blocks: int) -> float:
    """The same expression as ``BlockPool.get_usage``, so the float is bit-identical to vLLM's."""
    return 1.0 - (free_blocks / allocatable_blocks) if allocatable_blocks else 0.0


@dataclass(frozen=True)
class KVCacheOccupancy:
    """One engine's pool at one moment, in blocks and (where the limit is known) tokens."""

    utilization: float
    limit_blocks: int
    used_blocks: int
    free_blocks: int
    evictable_blocks: int | None
    headroom_blocks: int | None
    limit_tokens: int | None
    used_tokens: int | None
    free_tokens: int | None
    evictable_tokens: int | None
    headroom_tokens: int | None


def occupancy(layout: PoolLayout, free_blocks: int, evictable_blocks: int | None = 0) -> KVCacheOccupancy:
    """The occupancy that ``free_blocks`` free (``evictable_blocks`` of them prefix-cached) describe.

    Evictable blocks and the watermark may be unknown (None): so are then the values from them.
    """
    allocatable = layout.allocatable_blocks
    used_blocks = allocatable - free_blocks
    watermark = layout.watermark_blocks
    headroom_blocks = None if watermark is None else max(free_blocks - watermark, 0)
    used_tokens = layout.tokens(used_blocks)
    limit = layout.limit_tokens if used_tokens is not None else None
    return KVCacheOccupancy(
        utilization(free_blocks, allocatable),
        allocatable,
        used_blocks,
        free_blocks,
        evictable_blocks,
        headroom_blocks,
        limit,
        used_tokens,
        None if limit is None or used_tokens is None else limit - used_tokens,
        _tokens_or_none(layout, evictable_blocks),
        _tokens_or_none(layout, headroom_blocks),
    )


def _tokens_or_none(layout: PoolLayout, blocks: int | None) -> int | None:
    return None if blocks is None else layout.tokens(blocks)
