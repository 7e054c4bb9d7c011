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
does not grow with the pool. A failing hook marks the count as no longer exact (the probe
then stops reporting the engine) and lets vLLM's call run untouched. The count starts from
one scan of the free queue when the probe attaches (at ``Scheduler.__init__``, the pool is
still empty then). Hashes carry their KV-cache group, so hybrid models get a count per group.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.instrumentation.utils import unwrap
from wrapt import wrap_function_wrapper

BLOCK_POOL_MODULE = "vllm.v1.core.block_pool"


class EvictableBlocks:
    """The evictable blocks of one ``BlockPool``, per KV-cache group."""

    __slots__ = ("per_group", "version", "failed", "_group_of", "_owned")

    def __init__(self, pool: Any, num_groups: int) -> None:
        self.per_group = [0] * max(num_groups, 1)
        #: Bumped at every change, so the probe publishes only when something moved.
        self.version = 0
        #: Set when a hook could not count: the number is no longer exact.
        self.failed = False
        self._group_of = _group_reader() if num_groups > 1 else None
        # Blocks know their pool where deferred frees may mix pools (``free_blocks`` forwards those).
        self._owned = hasattr(pool.null_block, "pool")
        self.add(_free_queue(pool), 1)

    @property
    def total(self) -> int:
        return sum(self.per_group)

    def evictable(self, pool: Any, blocks: Iterable[Any]) -> list[Any]:
        """Those of ``blocks`` that are cached, unreferenced and ``pool``'s (vLLM's null block has no hash)."""
        if self._owned:
            return [b for b in blocks if b.ref_cnt == 0 and b.block_hash is not None and b.pool is pool]
        return [b for b in blocks if b.ref_cnt == 0 and b.block_hash is not None]

    def add(self, blocks: Iterable[Any], sign: int) -> None:
        """Add (sign 1) or remove (sign -1) the given evictable blocks."""
        group_of = self._group_of
        if group_of is None:
            count = len(blocks) if isinstance(blocks, list) else sum(1 for _ in blocks)
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

    def fail(self) -> None:
        """A hook could not count: the number is no longer exact (the version tells the probe)."""
        self.failed = True
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


_watched: weakref.WeakSet[Any] = weakref.WeakSet()


def watch(pool: Any, num_groups: int) -> EvictableBlocks:
    """Start counting on ``pool``: its own methods are wrapped, so no other pool pays anything.

    Wrapping the instance, not the class, also halves the cost of each call on this hot
    path: wrapt need not bind the wrapper to the instance at every call.
    """
    forget(pool)  # never two counts on one pool
    counter = EvictableBlocks(pool, num_groups)
    for name, wrapper in _wrappers(counter).items():
        wrap_function_wrapper(pool, name, wrapper)
    _watched.add(pool)
    return counter


def forget(pool: Any) -> None:
    if pool in _watched:
        _watched.discard(pool)
        for name in POOL_METHODS:
            unwrap(pool, name)


def clear() -> None:
    for pool in list(_watched):
        forget(pool)


def _wrappers(counter: EvictableBlocks) -> dict[str, Callable]:
    """Every ``BlockPool`` method the count wraps, with its wrapper bound to ``counter``."""

    def released(argument: str) -> Callable:
        """``free_blocks`` / ``unpin_blocks``: blocks whose ``ref_cnt`` fell to 0 joined the free queue."""

        def wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
            if counter.failed:
                return wrapped(*args, **kwargs)
            # vLLM passes a one-shot iterator (``reversed(blocks)``): keep the blocks to look at them after.
            blocks = args[0] if args else kwargs.pop(argument)
            if not isinstance(blocks, list):
                blocks = list(blocks)
            result = wrapped(blocks, *args[1:], **kwargs)
            try:
                counter.add(counter.evictable(instance, blocks), 1)
            except Exception:  # noqa: BLE001 - the engine must never see our failure
                counter.fail()
            return result

        return wrapper

    def leaving(select: Callable[..., list[Any]]) -> Callable:
        """Removes the blocks ``select(counter, pool, *args)`` names, then calls vLLM."""

        def wrapper(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
            if not counter.failed:
                # Looked at twice, by the count then by vLLM: a one-shot iterator becomes a list.
                args = tuple(_reusable(value) for value in args)
                kwargs = {key: _reusable(value) for key, value in kwargs.items()}
                try:
                    counter.add(select(counter, instance, *args, **kwargs), -1)
                except Exception:  # noqa: BLE001 - the engine must never see our failure
                    counter.fail()
            return wrapped(*args, **kwargs)

        return wrapper

    def reset(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        result = wrapped(*args, **kwargs)
        if result:
            counter.clear()
        return result

    return {
        "free_blocks": released("ordered_blocks"),
        "unpin_blocks": released("blocks"),
        "touch": leaving(_touched),
        "get_new_blocks": leaving(_allocated),
        "evict_blocks": leaving(_evicted),
        "reset_prefix_cache": reset,
    }


def _reusable(value: Any) -> Any:
    return value if isinstance(value, (int, list, tuple, set, frozenset)) else list(value)


def _touched(counter: EvictableBlocks, pool: Any, blocks: Iterable[Any]) -> list[Any]:
    return counter.evictable(pool, blocks)


def _allocated(counter: EvictableBlocks, pool: Any, num_blocks: int) -> list[Any]:
    """The evictable blocks among the first ``num_blocks`` of the free queue, which ``get_new_blocks`` pops."""
    if num_blocks > pool.get_num_free_blocks():
        return []  # vLLM raises, nothing moves
    cached = []
    block = pool.free_block_queue.fake_free_list_head.next_free_block
    for _ in range(num_blocks):
        if block.block_hash is not None:
            cached.append(block)
        block = block.next_free_block
    return cached


def _evicted(counter: EvictableBlocks, pool: Any, block_ids: Iterable[int]) -> list[Any]:
    blocks = pool.blocks
    return counter.evictable(pool, [blocks[i] for i in block_ids if 0 <= i < len(blocks)])


#: The ``BlockPool`` methods wrapped on each watched pool.
POOL_METHODS = ("free_blocks", "unpin_blocks", "touch", "get_new_blocks", "evict_blocks", "reset_prefix_cache")
#: (module, "Class.method") pairs the count needs in this vLLM.
REQUIRED = tuple((BLOCK_POOL_MODULE, f"BlockPool.{name}") for name in POOL_METHODS)
