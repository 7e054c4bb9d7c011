"""Engine: count the evictable prefix-cache blocks of a pool exactly, without scanning it.

vLLM keeps no such count: a block that holds a cached prefix (it has a ``block_hash``)
and that no request references sits in the pool's free queue (``FreeKVCacheBlockQueue``)
with the empty blocks, and is evicted lazily when ``get_new_blocks`` hands it out. So the
evictable blocks are the free queue's blocks with a hash, and the count changes only where

* a block enters the free queue: the queue's ``append_n`` and ``prepend_n`` (called by the
  pool's ``free_blocks`` and ``unpin_blocks``) and ``append``;
* a block leaves it: ``popleft_n`` (``get_new_blocks``, which evicts the popped blocks' hashes
  only after it), ``remove`` (``touch``: a prefix hit) and ``popleft``;
* a block in it loses its hash: the pool's ``evict_blocks`` (KV connectors) and
  ``reset_prefix_cache``.

The hooks sit on the queue, not on the pool methods that call it: each sees exactly the blocks
that moved, with no reference count or owning pool to check, and counts their hashes in C. So
the cost per step does not grow with the pool. A failing hook marks the count as no longer exact
(the probe then stops reporting the engine) and lets vLLM's call run untouched. The count starts
from one scan of the free queue when the probe attaches (at ``Scheduler.__init__``, the pool is
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
FREE_QUEUE_MODULE = "vllm.v1.core.kv_cache_utils"


class EvictableBlocks:
    """The evictable blocks of one ``BlockPool``, per KV-cache group."""

    __slots__ = ("per_group", "total", "version", "failed", "_group_of")

    def __init__(self, pool: Any, num_groups: int) -> None:
        self.per_group = [0] * max(num_groups, 1)
        #: The sum of ``per_group``: while it is 0, no block in the free queue has a hash.
        self.total = 0
        #: Bumped at every change, so the probe publishes only when something moved.
        self.version = 0
        #: Set when a hook could not count: the number is no longer exact.
        self.failed = False
        self._group_of = None if num_groups <= 1 else _group_reader()
        self.add(list(_free_queue(pool)), 1)

    def add(self, blocks: list[Any], sign: int) -> None:
        """``blocks`` entered (sign 1) or left (sign -1) the free queue: count those with a hash."""
        group_of = self._group_of
        if group_of is None:
            hashed = len(blocks) - list(map(_block_hash, blocks)).count(None)  # counted in C
            if hashed:
                self.per_group[0] += sign * hashed
                self.total += sign * hashed
                self.version += 1
            return
        changed = False
        for block in blocks:
            block_hash = block._block_hash
            if block_hash is not None:
                self.per_group[group_of(block_hash)] += sign
                self.total += sign
                changed = True
        if changed:
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
    """Every block of the pool's free queue, walking it once."""
    queue = pool.free_block_queue
    block = queue.fake_free_list_head.next_free_block
    tail = queue.fake_free_list_tail
    while block is not None and block is not tail:
        yield block
        block = block.next_free_block


_watched: weakref.WeakSet[Any] = weakref.WeakSet()


def watch(pool: Any, num_groups: int) -> EvictableBlocks:
    """Start counting on ``pool``: its and its free queue's own methods are hooked, so no other pool pays."""
    if pool.null_block._block_hash is not pool.null_block.block_hash:
        raise RuntimeError("KVCacheBlock.block_hash no longer reads the _block_hash slot")
    forget(pool)  # never two counts on one pool
    counter = EvictableBlocks(pool, num_groups)
    hook_methods(pool.free_block_queue, _queue_hooks(counter))
    hook_methods(pool, _pool_hooks(counter))
    _watched.add(pool)
    return counter


def forget(pool: Any) -> None:
    if pool in _watched:
        _watched.discard(pool)
        unhook_methods(pool.free_block_queue, QUEUE_METHODS)
        unhook_methods(pool, POOL_METHODS)


def clear() -> None:
    for pool in list(_watched):
        forget(pool)


def _queue_hooks(counter: EvictableBlocks) -> dict[str, Callable[[Callable], Callable]]:
    """The free queue's methods that move blocks, each hook bound to ``counter``.

    Each takes vLLM's own parameters (the cheapest call there is) and counts after vLLM's call
    returned: a call that raised moved nothing. Popped blocks still carry their hashes then.
    """

    def joining(original: Callable) -> Callable:
        def append_n(blocks: list[Any]) -> Any:  # also prepend_n: the same parameter
            result = original(blocks)
            if blocks:  # free_blocks prepends its blocks without a hash, often none
                try:
                    counter.add(blocks, 1)
                except Exception:  # noqa: BLE001 - the engine must never see our failure
                    counter.fail()
            return result

        return append_n

    def popleft_n(original: Callable) -> Callable:
        def popleft_n(n: int) -> Any:
            blocks = original(n)
            if counter.total:  # else none of them has a hash
                try:
                    counter.add(blocks, -1)
                except Exception:  # noqa: BLE001
                    counter.fail()
            return blocks

        return popleft_n

    def one(sign: int) -> Callable[[Callable], Callable]:
        """``append(block)`` and ``remove(block)``: one block in or out."""

        def hook(original: Callable) -> Callable:
            def one_block(block: Any) -> Any:
                result = original(block)
                if block._block_hash is not None:
                    try:
                        counter.add([block], sign)
                    except Exception:  # noqa: BLE001
                        counter.fail()
                return result

            return one_block

        return hook

    def popleft(original: Callable) -> Callable:
        def popleft() -> Any:
            block = original()
            try:
                counter.add([block], -1)
            except Exception:  # noqa: BLE001
                counter.fail()
            return block

        return popleft

    return {"append_n": joining, "prepend_n": joining, "popleft_n": popleft_n, "append": one(1), "remove": one(-1),
            "popleft": popleft}


def _pool_hooks(counter: EvictableBlocks) -> dict[str, Callable[[Callable], Callable]]:
    """The pool's methods that drop hashes of blocks in the free queue (rare: any signature)."""

    def evict_blocks(original: Any) -> Callable:
        pool = original.__self__

        def evict_blocks(*args: Any, **kwargs: Any) -> Any:
            """KV connectors drop hashes: the free ones among them leave the count first."""
            # Looked at twice, by the count then by vLLM: a one-shot iterator becomes a list.
            args = tuple(_reusable(value) for value in args)
            kwargs = {key: _reusable(value) for key, value in kwargs.items()}
            try:
                counter.add(_free_of(pool, *args, **kwargs), -1)
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

    return {"evict_blocks": evict_blocks, "reset_prefix_cache": reset_prefix_cache}


def _reusable(value: Any) -> Any:
    return value if isinstance(value, (int, list, tuple, set, frozenset)) else list(value)


def _free_of(pool: Any, block_ids: Iterable[int]) -> list[Any]:
    """The blocks of ``block_ids`` in the free queue (no request references them; the null block is never)."""
    blocks = pool.blocks
    return [block for block in (blocks[i] for i in block_ids if 0 <= i < len(blocks))
            if block.ref_cnt == 0 and not block.is_null]


#: The ``FreeKVCacheBlockQueue`` methods hooked on each watched pool's queue, with their parameters.
QUEUE_PARAMETERS = {"append_n": ("blocks",), "prepend_n": ("blocks",), "popleft_n": ("n",), "append": ("block",),
                    "remove": ("block",), "popleft": ()}
QUEUE_METHODS = tuple(QUEUE_PARAMETERS)
#: The ``BlockPool`` methods hooked on each watched pool (any signature).
POOL_METHODS = ("evict_blocks", "reset_prefix_cache")
#: (module, "Class.method", parameters or None) the count needs in this vLLM.
REQUIRED = (
    *((FREE_QUEUE_MODULE, f"FreeKVCacheBlockQueue.{name}", names) for name, names in QUEUE_PARAMETERS.items()),
    *((BLOCK_POOL_MODULE, f"BlockPool.{name}", None) for name in POOL_METHODS),
)
