"""Engine-core side: count the evictable prefix-cache blocks of a pool exactly, without scanning it.

vLLM keeps no such count: a block that holds a cached prefix (it has a ``block_hash``)
and that no request references (``ref_cnt == 0``) sits in the free queue with the empty
blocks, and is evicted lazily when ``get_new_blocks`` hands it out. The count changes
only where blocks enter or leave the free queue, or lose their hash while in it, all
inside ``BlockPool``:

* ``free_blocks`` and ``unpin_blocks`` put blocks whose ``ref_cnt`` fell to 0 in it;
* ``touch`` (a prefix hit) takes blocks with ``ref_cnt == 0`` out of it;
* ``get_new_blocks(n)`` pops the first n blocks of it (and evicts their hashes);
* ``evict_blocks`` (KV connectors) and ``reset_prefix_cache`` drop hashes.

Each hook looks only at the blocks vLLM itself moves in that call, so the cost per step
does not grow with the pool. The count starts from one scan of the free queue when the
probe attaches (at ``Scheduler.__init__``, the pool is still empty then). Hashes carry
their KV-cache group, so hybrid models get a count per group.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

BLOCK_POOL_MODULE = "vllm.v1.core.block_pool"


def _is_evictable(block: Any, pool: Any) -> bool:
    """Cached, unreferenced and in this pool's free queue (blocks of another pool are freed there)."""
    return (
        block.ref_cnt == 0 and block.block_hash is not None and not block.is_null
        and getattr(block, "pool", None) in (None, pool)
    )


class EvictableBlocks:
    """The evictable blocks of one ``BlockPool``, per KV-cache group."""

    __slots__ = ("__weakref__", "per_group", "version", "failed", "_group_of")

    def __init__(self, pool: Any, num_groups: int) -> None:
        self.per_group = [0] * max(num_groups, 1)
        #: Bumped at every change, so the probe publishes only when something moved.
        self.version = 0
        #: Set when a hook could not count: the number is no longer exact.
        self.failed = False
        self._group_of = _group_reader() if num_groups > 1 else None
        self.add(_free_queue(pool), 1)

    @property
    def total(self) -> int:
        return sum(self.per_group)

    def add(self, blocks: Iterable[Any], sign: int) -> None:
        """Add (sign 1) or remove (sign -1) the given evictable blocks."""
        group_of = self._group_of
        if group_of is None:
            count = sum(1 for _ in blocks)
            if count:
                self.per_group[0] += sign * count
                self.version += 1
            return
        changed = False
        for block in blocks:
            self.per_group[group_of(block.block_hash)] += sign
            changed = True
        if changed:
            self.version += 1

    def clear(self) -> None:
        self.per_group = [0] * len(self.per_group)
        self.version += 1


def _group_reader() -> Callable[[Any], int]:
    from vllm.v1.core.kv_cache_utils import get_group_id

    return get_group_id


def _free_queue(pool: Any) -> Iterable[Any]:
    """Every evictable block of the pool, walking its free queue once."""
    queue = pool.free_block_queue
    block = queue.fake_free_list_head.next_free_block
    tail = queue.fake_free_list_tail
    while block is not None and block is not tail:
        if block.block_hash is not None and not block.is_null:
            yield block
        block = block.next_free_block


def _first_free(pool: Any, count: int) -> Iterable[Any]:
    """The evictable blocks among the next ``count`` that ``get_new_blocks`` pops."""
    block = pool.free_block_queue.fake_free_list_head.next_free_block
    for _ in range(count):
        if block.block_hash is not None:
            yield block
        block = block.next_free_block


_counters: weakref.WeakKeyDictionary[Any, EvictableBlocks] = weakref.WeakKeyDictionary()


def watch(pool: Any, num_groups: int) -> EvictableBlocks:
    counter = _counters[pool] = EvictableBlocks(pool, num_groups)
    return counter


def forget(pool: Any) -> None:
    _counters.pop(pool, None)


def clear() -> None:
    _counters.clear()


def _count(counter: EvictableBlocks, pool: Any, update: Callable[[], None]) -> None:
    try:
        update()
    except Exception:  # noqa: BLE001 - the engine must never see our failure
        counter.failed = True
        _counters.pop(pool, None)


def _free_blocks(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    counter = _counters.get(instance)
    if counter is None:
        return wrapped(*args, **kwargs)
    # vLLM passes a one-shot iterator (``reversed(blocks)``): keep the blocks to look at them after.
    blocks = list(args[0] if args else kwargs.pop("ordered_blocks"))
    result = wrapped(blocks, *args[1:], **kwargs)
    _count(counter, instance, lambda: counter.add((b for b in blocks if _is_evictable(b, instance)), 1))
    return result


def _unpin_blocks(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    counter = _counters.get(instance)
    if counter is None:
        return wrapped(*args, **kwargs)
    blocks = list(args[0] if args else kwargs.pop("blocks"))
    result = wrapped(blocks, *args[1:], **kwargs)
    _count(counter, instance, lambda: counter.add((b for b in blocks if _is_evictable(b, instance)), 1))
    return result


def _before(select: Callable[..., Iterable[Any]]) -> Callable:
    """A wrapper that removes the blocks ``select(pool, *args)`` names, then calls vLLM."""

    def wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        counter = _counters.get(instance)
        if counter is not None:
            _count(counter, instance, lambda: counter.add(list(select(instance, *args, **kwargs)), -1))
        return wrapped(*args, **kwargs)

    return wrapper


def _touched(pool: Any, blocks: Iterable[Any]) -> Iterable[Any]:
    return [block for block in blocks if _is_evictable(block, pool)]


def _allocated(pool: Any, num_blocks: int) -> Iterable[Any]:
    if num_blocks > pool.get_num_free_blocks():
        return ()  # vLLM raises, nothing moves
    return _first_free(pool, num_blocks)


def _evicted(pool: Any, block_ids: Iterable[int]) -> Iterable[Any]:
    blocks = pool.blocks
    return [blocks[i] for i in block_ids if 0 <= i < len(blocks) and _is_evictable(blocks[i], pool)]


def _reset_prefix_cache(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    result = wrapped(*args, **kwargs)
    counter = _counters.get(instance)
    if counter is not None and result:
        counter.clear()
    return result


#: (module, "Class.method", wrapper): every vLLM function the count needs.
PATCHES = (
    (BLOCK_POOL_MODULE, "BlockPool.free_blocks", _free_blocks),
    (BLOCK_POOL_MODULE, "BlockPool.unpin_blocks", _unpin_blocks),
    (BLOCK_POOL_MODULE, "BlockPool.touch", _before(_touched)),
    (BLOCK_POOL_MODULE, "BlockPool.get_new_blocks", _before(_allocated)),
    (BLOCK_POOL_MODULE, "BlockPool.evict_blocks", _before(_evicted)),
    (BLOCK_POOL_MODULE, "BlockPool.reset_prefix_cache", _reset_prefix_cache),
)
