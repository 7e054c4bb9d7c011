"""Engine: count the evictable prefix-cache blocks of a pool exactly, without scanning it.

vLLM keeps no such count: a block that holds a cached prefix (it has a ``block_hash``)
and that no request references (``ref_cnt == 0``) sits in the free queue with the empty
blocks, and is evicted lazily when ``get_new_blocks`` hands it out. The count changes
only where blocks enter or leave the free queue, or lose their hash while in it:

* ``free_blocks`` sorts the blocks whose ``ref_cnt`` fell to 0: those with a hash go to the
  tail (``FreeKVCacheBlockQueue.append_n``: each one counts), the others to the front
  (``prepend_n``: none counts, so it is not hooked); ``unpin_blocks`` appends released
  blocks with or without a hash (its hook makes ``append_n`` look at each hash);
* ``free_blocks(evict_first=True)`` (vLLM 0.34 on; the SimpleCPUOffload connector's lazy
  mode) prepends the hashed blocks too: the pool's ``free_blocks`` is hooked where it takes
  ``evict_first``, and counts them only then (one call per freed request otherwise);
* ``touch`` (a prefix hit) takes unreferenced blocks out of it (``remove``);
* ``get_new_blocks(n)`` pops its first n blocks (``popleft_n``), then evicts their hashes;
* ``evict_blocks`` (KV connectors) and ``reset_prefix_cache`` drop hashes.

The hooks sit on the one pool's free queue (and, for the rare three, on the pool), so each
sees only the blocks vLLM moves in that call, no other pool pays, and the cost per step does
not grow with the pool. A failing hook marks the count as no longer exact (the probe then
stops reporting the engine) and lets vLLM's call run untouched. The count starts from one
scan of the free queue when the probe attaches (at ``Scheduler.__init__``, the pool is still
empty then). Hashes carry their KV-cache group, so hybrid models get a count per group.

A block's hash is read from its slot, spelled ``block_hash`` from vLLM 0.34 and
``_block_hash`` (under a ``block_hash`` property) before: ``hash_slot`` picks it once.
"""

from __future__ import annotations

import inspect
import types
import weakref
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Any

from otel_vllm_kv.internals import attribute, method, slot
from otel_vllm_kv.patching import hook_methods, unhook_methods

BLOCK_POOL_MODULE = "vllm.v1.core.block_pool"
FREE_QUEUE_MODULE = "vllm.v1.core.kv_cache_utils"


class EvictableBlocks:
    """The evictable blocks of one ``BlockPool``, per KV-cache group."""

    __slots__ = ("per_group", "failed", "single_group", "appending_unhashed", "hash_of", "_group_of")

    def __init__(self, pool: Any, num_groups: int) -> None:
        #: A block's hash, read from the slot this vLLM keeps it in (a C call, no property frame).
        self.hash_of = attrgetter(hash_slot(type(pool.null_block)))
        #: Updated in place (the hooks hold the list): the probe publishes when it differs from the last.
        self.per_group = [0] * max(num_groups, 1)
        #: Set when a hook could not count: the number is no longer exact.
        self.failed = False
        self.single_group = num_groups <= 1
        self._group_of = None if self.single_group else _group_reader()
        #: True while ``unpin_blocks`` runs: what it appends to the free queue may have no hash.
        self.appending_unhashed = False
        self.add(_free_queue(pool), 1)

    @property
    def total(self) -> int:
        return sum(self.per_group)

    def add(self, blocks: Iterable[Any], sign: int) -> None:
        """``blocks`` entered (sign 1) or left (sign -1) the free queue: count those with a hash."""
        group_of = self._group_of
        per_group = self.per_group
        hash_of = self.hash_of
        for block in blocks:
            block_hash = hash_of(block)
            if block_hash is not None:
                per_group[0 if group_of is None else group_of(block_hash)] += sign

    def clear(self) -> None:
        self.per_group[:] = [0] * len(self.per_group)

    def fail(self) -> None:
        """A hook could not count: the number is no longer exact (the probe reads this at every publish)."""
        self.failed = True


def hash_slot(block_class: type) -> str:
    """The slot of ``KVCacheBlock`` that holds the hash: ``block_hash`` (vLLM 0.34 on), else
    ``_block_hash`` under vLLM's ``block_hash`` property (0.31 to 0.33). Raises if neither."""
    for name in HASH_SLOTS:
        if isinstance(inspect.getattr_static(block_class, name, None), types.MemberDescriptorType):
            return name
    raise RuntimeError(f"{block_class.__name__} keeps its hash in none of the slots {', '.join(HASH_SLOTS)}")


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
    """Start counting on ``pool``: its and its free queue's own methods are hooked, so no other pool pays."""
    forget(pool)  # never two counts on one pool
    counter = EvictableBlocks(pool, num_groups)
    null_block = pool.null_block
    if counter.hash_of(null_block) is not null_block.block_hash:
        raise RuntimeError("KVCacheBlock.block_hash is not the slot the count reads")
    hook_methods(pool.free_block_queue, _queue_hooks(counter))
    hook_methods(pool, _pool_hooks(counter, frees_evicting_first=takes_evict_first(pool)))
    _watched.add(pool)
    return counter


def forget(pool: Any) -> None:
    if pool in _watched:
        _watched.discard(pool)
        unhook_methods(pool.free_block_queue, QUEUE_METHODS)
        unhook_methods(pool, (*POOL_METHODS, "free_blocks"))


def clear() -> None:
    for pool in list(_watched):
        forget(pool)


def _queue_hooks(counter: EvictableBlocks) -> dict[str, Callable[[Callable], Callable]]:
    """The free queue's own moves, each hook bound to ``counter``, taking vLLM's own parameters.

    Each counts after vLLM's call returned (a call that raised moved nothing). The first three
    run once per request freed, per allocation and per prefix hit: with one KV-cache group they
    count inline, in the group's list cell (no frame, no attribute write).
    """
    single = counter.single_group
    counts = counter.per_group  # updated in place, never replaced
    hash_of = counter.hash_of

    def append_n(original: Callable) -> Callable:
        def append_n(blocks: list[Any]) -> Any:
            result = original(blocks)
            try:
                if single and not counter.appending_unhashed:
                    counts[0] += len(blocks)  # from free_blocks: exactly the released blocks with a hash
                else:
                    counter.add(blocks, 1)
            except Exception:  # noqa: BLE001 - the engine must never see our failure
                counter.fail()
            return result

        return append_n

    def popleft_n(original: Any) -> Callable:
        queue = original.__self__

        def popleft_n(n: int) -> Any:
            """``get_new_blocks`` takes the first ``n`` free blocks (and evicts their hashes after)."""
            if single:
                evictable = counts[0]
                if not evictable:  # no free block has a hash
                    return original(n)
                every_free_block_evictable = evictable == queue.num_free_blocks
            else:
                every_free_block_evictable = False
            blocks = original(n)
            try:
                if every_free_block_evictable:
                    counts[0] -= len(blocks)
                else:
                    counter.add(blocks, -1)
            except Exception:  # noqa: BLE001
                counter.fail()
            return blocks

        return popleft_n

    def remove(original: Callable) -> Callable:
        def remove(block: Any) -> Any:
            """``touch`` (a prefix hit) takes an unreferenced block out of the free queue."""
            result = original(block)
            try:
                if hash_of(block) is not None:
                    if single:
                        counts[0] -= 1
                    else:
                        counter.add([block], -1)
            except Exception:  # noqa: BLE001
                counter.fail()
            return result

        return remove

    def append(original: Callable) -> Callable:
        def append(block: Any) -> Any:
            result = original(block)
            try:
                counter.add([block], 1)
            except Exception:  # noqa: BLE001
                counter.fail()
            return result

        return append

    def popleft(original: Callable) -> Callable:
        def popleft() -> Any:
            block = original()
            try:
                counter.add([block], -1)
            except Exception:  # noqa: BLE001
                counter.fail()
            return block

        return popleft

    return {"append_n": append_n, "popleft_n": popleft_n, "remove": remove, "append": append, "popleft": popleft}


def takes_evict_first(pool: Any) -> bool:
    """Whether this vLLM's ``free_blocks`` can put hashed blocks at the front (0.34 on)."""
    return "evict_first" in inspect.signature(type(pool).free_blocks).parameters


def _pool_hooks(counter: EvictableBlocks, frees_evicting_first: bool) -> dict[str, Callable[[Callable], Callable]]:
    """The pool's methods that drop hashes or append blocks without one (rare: any signature), and
    ``free_blocks`` where it takes ``evict_first`` (vLLM's own parameters)."""

    def unpin_blocks(original: Callable) -> Callable:
        def unpin_blocks(*args: Any, **kwargs: Any) -> Any:
            counter.appending_unhashed = True
            try:
                return original(*args, **kwargs)
            finally:
                counter.appending_unhashed = False

        return unpin_blocks

    def evict_blocks(original: Any) -> Callable:
        pool = original.__self__

        def evict_blocks(*args: Any, **kwargs: Any) -> Any:
            """KV connectors drop hashes (rare): the evictable ones among them leave the count first."""
            # Looked at twice, by the count then by vLLM: a one-shot iterator becomes a list.
            args = tuple(_reusable(value) for value in args)
            kwargs = {key: _reusable(value) for key, value in kwargs.items()}
            try:
                counter.add(_evicted(pool, *args, **kwargs), -1)
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

    def free_blocks(original: Any) -> Callable:
        pool = original.__self__

        def free_blocks(ordered_blocks: Iterable[Any], evict_first: bool = False) -> Any:
            """``evict_first`` sends hashed blocks to ``prepend_n``, which is not hooked: count them here."""
            if not evict_first:
                return original(ordered_blocks)
            blocks = list(ordered_blocks)  # looked at twice, by vLLM then by the count
            result = original(blocks, evict_first)
            try:
                counter.add(_prepended_with_hash(pool, blocks, counter.hash_of), 1)
            except Exception:  # noqa: BLE001 - the engine must never see our failure
                counter.fail()
            return result

        return free_blocks

    hooks: dict[str, Callable[[Callable], Callable]] = {
        "unpin_blocks": unpin_blocks,
        "evict_blocks": evict_blocks,
        "reset_prefix_cache": reset_prefix_cache,
    }
    if frees_evicting_first:
        hooks["free_blocks"] = free_blocks
    return hooks


def _prepended_with_hash(pool: Any, blocks: list[Any], hash_of: Callable[[Any], Any]) -> Iterable[Any]:
    """The blocks of ``pool`` that ``free_blocks(blocks, evict_first=True)`` put in its free queue with
    a hash (each once). Blocks of another pool were handed to that pool's own ``free_blocks``."""
    own = pool.blocks
    freed = {}
    for block in blocks:
        if (
            block.ref_cnt == 0
            and not block.is_null
            and hash_of(block) is not None
            and block.block_id < len(own)
            and own[block.block_id] is block
        ):
            freed[block.block_id] = block
    return freed.values()


def _reusable(value: Any) -> Any:
    return value if isinstance(value, (int, list, tuple, set, frozenset)) else list(value)


def _evicted(pool: Any, block_ids: Iterable[int]) -> list[Any]:
    """The blocks of ``block_ids`` in the free queue (unreferenced; vLLM's null block has no hash)."""
    blocks = pool.blocks
    return [block for block in (blocks[i] for i in block_ids if 0 <= i < len(blocks)) if block.ref_cnt == 0]


#: The ``FreeKVCacheBlockQueue`` methods hooked on each watched pool's queue, with vLLM's own parameters.
QUEUE_PARAMETERS = {
    "append_n": ("blocks",),
    "popleft_n": ("n",),
    "remove": ("block",),
    "append": ("block",),
    "popleft": (),
}
QUEUE_METHODS = tuple(QUEUE_PARAMETERS)
#: The ``BlockPool`` methods hooked on each watched pool (any signature); ``free_blocks`` too where it takes
#: ``evict_first``.
POOL_METHODS = ("unpin_blocks", "evict_blocks", "reset_prefix_cache")
#: Where ``KVCacheBlock`` keeps its hash: ``block_hash`` from vLLM 0.34, ``_block_hash`` before.
BLOCK_HASH = slot(FREE_QUEUE_MODULE, "KVCacheBlock.block_hash", "_block_hash")
HASH_SLOTS = (BLOCK_HASH.member, *BLOCK_HASH.spellings)
#: What the count needs in this vLLM: the hooked methods; ``prepend_n``, where ``free_blocks`` puts the
#: blocks without a hash (a vLLM without it would append them too, and the count would be wrong);
#: ``free_blocks`` as 0.31 to 0.33 (no ``evict_first``) or 0.34 spell it (another parameter could move
#: hashed blocks elsewhere); what the hooks and the first scan read of blocks, queue and pool.
REQUIRED = (
    *(method(FREE_QUEUE_MODULE, f"FreeKVCacheBlockQueue.{name}", names) for name, names in QUEUE_PARAMETERS.items()),
    method(FREE_QUEUE_MODULE, "FreeKVCacheBlockQueue.prepend_n", ("blocks",)),
    *(method(BLOCK_POOL_MODULE, f"BlockPool.{name}") for name in POOL_METHODS),
    method(BLOCK_POOL_MODULE, "BlockPool.free_blocks", ("ordered_blocks",), ("ordered_blocks", "evict_first=")),
    BLOCK_HASH,
    *(
        slot(FREE_QUEUE_MODULE, f"KVCacheBlock.{name}")
        for name in ("block_id", "ref_cnt", "is_null", "next_free_block")
    ),
    *(
        attribute(FREE_QUEUE_MODULE, f"FreeKVCacheBlockQueue.{name}")
        for name in ("num_free_blocks", "fake_free_list_head", "fake_free_list_tail")
    ),
    *(attribute(BLOCK_POOL_MODULE, f"BlockPool.{name}") for name in ("free_block_queue", "null_block", "blocks")),
)
