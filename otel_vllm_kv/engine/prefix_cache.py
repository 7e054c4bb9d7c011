"""Engine: count the evictable prefix-cache blocks of a pool exactly, without scanning it.

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
from operator import attrgetter
from typing import Any

from otel_vllm_kv.patching import hook_methods, unhook_methods

#: ``KVCacheBlock.block_hash`` is a Python property returning the slot ``_block_hash``: the slot is read
#: in C, the property costs a Python frame per block (``watch`` checks the slot is there).
_block_hash = attrgetter("_block_hash")

BLOCK_POOL_MODULE = "vllm.v1.core.block_pool"


class EvictableBlocks:
    """The evictable blocks of one ``BlockPool``, per KV-cache group."""

    __slots__ = ("per_group", "total", "version", "failed", "single_group", "blocks_know_pool", "_group_of")

    def __init__(self, pool: Any, num_groups: int) -> None:
        self.per_group = [0] * max(num_groups, 1)
        #: The sum of ``per_group``: while it is 0, an allocation cannot take an evictable block.
        self.total = 0
        #: Bumped at every change, so the probe publishes only when something moved.
        self.version = 0
        #: Set when a hook could not count: the number is no longer exact.
        self.failed = False
        self.single_group = num_groups <= 1
        self._group_of = None if self.single_group else _group_reader()
        # Blocks know their pool where deferred frees may mix pools (``free_blocks`` forwards those).
        self.blocks_know_pool = hasattr(pool.null_block, "pool")
        self.add(_free_queue(pool), 1)

    def evictable(self, pool: Any, blocks: Iterable[Any]) -> list[Any]:
        """Those of ``blocks`` that are cached, unreferenced and ``pool``'s (vLLM's null block has no hash)."""
        if self.blocks_know_pool:
            return [b for b in blocks if b.ref_cnt == 0 and b._block_hash is not None and b.pool is pool]
        return [b for b in blocks if b.ref_cnt == 0 and b._block_hash is not None]

    def add(self, blocks: Iterable[Any], sign: int) -> None:
        """Add (sign 1) or remove (sign -1) the given evictable blocks."""
        group_of = self._group_of
        if group_of is None:
            count = len(blocks) if isinstance(blocks, list) else sum(1 for _ in blocks)
            if count:
                self.per_group[0] += sign * count
                self.total += sign * count
                self.version += 1
            return
        changed = False
        for block in blocks:
            self.per_group[group_of(block._block_hash)] += sign
            self.total += sign
            changed = True
        if changed:
            self.version += 1

    def changed(self, count: int) -> None:
        """One group: ``count`` more (or, negative, fewer) evictable blocks."""
        if count:
            self.per_group[0] += count
            self.total += count
            self.version += 1

    def clear(self) -> None:
        self.per_group = [0] * len(self.per_group)
        self.total = 0
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
    """Start counting on ``pool``: its own methods are hooked, so no other pool pays anything."""
    if pool.null_block._block_hash is not pool.null_block.block_hash:
        raise RuntimeError("KVCacheBlock.block_hash no longer reads the _block_hash slot")
    forget(pool)  # never two counts on one pool
    counter = EvictableBlocks(pool, num_groups)
    hook_methods(pool, _hooks(counter))
    _watched.add(pool)
    return counter


def forget(pool: Any) -> None:
    if pool in _watched:
        _watched.discard(pool)
        unhook_methods(pool, POOL_METHODS)


def clear() -> None:
    for pool in list(_watched):
        forget(pool)


def _hooks(counter: EvictableBlocks) -> dict[str, Callable[[Callable], Callable]]:
    """Every ``BlockPool`` method the count hooks, with its hook bound to ``counter``.

    The hot three (``free_blocks``, ``get_new_blocks``, ``touch``, once per request or block
    allocation) take vLLM's own parameters, the cheapest call there is; the rare ones take any.
    """

    single = counter.single_group

    def joined(pool: Any, blocks: list[Any]) -> None:
        """``blocks`` were released: count those that joined the free queue with a cached prefix."""
        counter.add(counter.evictable(pool, blocks), 1)

    def free_blocks(original: Any) -> Callable:
        pool = original.__self__
        queue = pool.free_block_queue

        def free_blocks(ordered_blocks: Iterable[Any]) -> Any:
            if counter.failed:
                return original(ordered_blocks)
            # vLLM passes a one-shot iterator (``reversed(blocks)``): keep the blocks to look at them after.
            blocks = ordered_blocks if isinstance(ordered_blocks, list) else list(ordered_blocks)
            before = queue.num_free_blocks
            result = original(blocks)
            try:
                if not single:
                    joined(pool, blocks)
                else:
                    hashed = len(blocks) - list(map(_block_hash, blocks)).count(None)  # counted in C
                    if hashed and queue.num_free_blocks - before == len(blocks):
                        # Every block joined this pool's free queue: the hashed ones are the evictable
                        # ones, without a Python loop (and ``changed`` inline: one frame less per free).
                        counter.per_group[0] += hashed
                        counter.total += hashed
                        counter.version += 1
                    elif hashed:
                        joined(pool, blocks)  # some are still referenced (shared prefixes)
            except Exception:  # noqa: BLE001 - the engine must never see our failure
                counter.fail()
            return result

        return free_blocks

    def unpin_blocks(original: Any) -> Callable:
        pool = original.__self__

        def unpin_blocks(*args: Any, **kwargs: Any) -> Any:
            if counter.failed:
                return original(*args, **kwargs)
            blocks = list(args[0] if args else kwargs.pop("blocks"))
            result = original(blocks, *args[1:], **kwargs)
            try:
                joined(pool, blocks)
            except Exception:  # noqa: BLE001
                counter.fail()
            return result

        return unpin_blocks

    def get_new_blocks(original: Any) -> Callable:
        queue = original.__self__.free_block_queue

        def get_new_blocks(num_blocks: int) -> Any:
            """Pops the first ``num_blocks`` of the free queue; nothing to count while none is evictable."""
            if counter.total and not counter.failed:
                try:
                    if single and counter.total == queue.num_free_blocks and num_blocks <= counter.total:
                        counter.changed(-num_blocks)  # every free block is evictable: so is each one popped
                    elif num_blocks <= queue.num_free_blocks:  # else vLLM raises, nothing moves
                        cached = []
                        block = queue.fake_free_list_head.next_free_block
                        for _ in range(num_blocks):
                            if block._block_hash is not None:
                                cached.append(block)
                            block = block.next_free_block
                        if not cached:
                            pass  # none of the popped blocks holds a cached prefix: nothing moves
                        elif single:  # ``changed``, inline: one frame less per allocation
                            counter.per_group[0] -= len(cached)
                            counter.total -= len(cached)
                            counter.version += 1
                        else:
                            counter.add(cached, -1)
                except Exception:  # noqa: BLE001
                    counter.fail()
            return original(num_blocks)

        return get_new_blocks

    def touch(original: Any) -> Callable:
        pool = original.__self__

        def touch(blocks: Any) -> Any:
            """A prefix hit: nothing to count while no block is evictable."""
            if counter.total and not counter.failed:
                # Looked at twice, by the count then by vLLM: a one-shot iterator becomes a list.
                if not isinstance(blocks, (list, tuple)):
                    blocks = list(blocks)
                try:
                    counter.add(counter.evictable(pool, blocks), -1)
                except Exception:  # noqa: BLE001
                    counter.fail()
            return original(blocks)

        return touch

    def evict_blocks(original: Any) -> Callable:
        pool = original.__self__

        def evict_blocks(*args: Any, **kwargs: Any) -> Any:
            """KV connectors drop hashes (rare): the evictable ones among them leave the count first."""
            if not counter.failed:
                # Looked at twice, by the count then by vLLM: a one-shot iterator becomes a list.
                args = tuple(_reusable(value) for value in args)
                kwargs = {key: _reusable(value) for key, value in kwargs.items()}
                try:
                    counter.add(_evicted(counter, pool, *args, **kwargs), -1)
                except Exception:  # noqa: BLE001
                    counter.fail()
            return original(*args, **kwargs)

        return evict_blocks

    def reset_prefix_cache(original: Callable) -> Callable:
        def reset_prefix_cache(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            if result:
                counter.clear()
            return result

        return reset_prefix_cache

    return {
        "free_blocks": free_blocks,
        "unpin_blocks": unpin_blocks,
        "touch": touch,
        "get_new_blocks": get_new_blocks,
        "evict_blocks": evict_blocks,
        "reset_prefix_cache": reset_prefix_cache,
    }


def _reusable(value: Any) -> Any:
    return value if isinstance(value, (int, list, tuple, set, frozenset)) else list(value)


def _evicted(counter: EvictableBlocks, pool: Any, block_ids: Iterable[int]) -> list[Any]:
    blocks = pool.blocks
    return counter.evictable(pool, [blocks[i] for i in block_ids if 0 <= i < len(blocks)])


#: The ``BlockPool`` methods hooked on each watched pool.
POOL_METHODS = ("free_blocks", "unpin_blocks", "touch", "get_new_blocks", "evict_blocks", "reset_prefix_cache")
#: The parameters of the methods hooked with vLLM's own signature (the others take any).
HOOKED_PARAMETERS = {"free_blocks": ("ordered_blocks",), "touch": ("blocks",), "get_new_blocks": ("num_blocks",)}
#: (module, "Class.method", parameters or None) the count needs in this vLLM.
REQUIRED = tuple((BLOCK_POOL_MODULE, f"BlockPool.{name}", HOOKED_PARAMETERS.get(name)) for name in POOL_METHODS)
