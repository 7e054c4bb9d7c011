"""The installed vLLM made into a release the package must refuse, yet one that still runs.

Each fake renames one internal the package touches, the way a new release might, and keeps
vLLM itself working, so a server started on it serves requests while the package stays off:

* ``renamed_method``: ``BlockPool.evict_blocks`` (hooked by the evictable count) becomes
  ``evict_cached_blocks``; vLLM calls it only from KV connectors, which the tests do not run.
* ``renamed_hash_slot``: the slot ``KVCacheBlock`` keeps its hash in (``block_hash`` from 0.34,
  ``_block_hash`` before) moves to ``renamed_block_hash``; a property under the old name
  forwards to it, so vLLM's code still reads and writes the hash, but the slot the count reads
  at C speed is gone.

``patch`` is pytest's ``monkeypatch`` in-process (undone after the test), or ``Permanent()``
in a server process (``fake_release_server.py``).
"""

from __future__ import annotations

import types
from typing import Any

from otel_vllm_kv.engine.prefix_cache import HASH_SLOTS


class Permanent:
    """``monkeypatch``'s two calls, not undone."""

    @staticmethod
    def setattr(target: Any, name: str, value: Any, raising: bool = True) -> None:
        setattr(target, name, value)

    @staticmethod
    def delattr(target: Any, name: str) -> None:
        delattr(target, name)


def renamed_method(patch: Any) -> str:
    """Returns the internal the package's warning must name."""
    from vllm.v1.core.block_pool import BlockPool

    patch.setattr(BlockPool, "evict_cached_blocks", BlockPool.evict_blocks, raising=False)
    patch.delattr(BlockPool, "evict_blocks")
    return "BlockPool.evict_blocks"


def renamed_hash_slot(patch: Any) -> str:
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    (name,) = [name for name in HASH_SLOTS if isinstance(vars(KVCacheBlock).get(name), types.MemberDescriptorType)]
    member = vars(KVCacheBlock)[name]
    patch.setattr(KVCacheBlock, "renamed_block_hash", member, raising=False)
    patch.setattr(KVCacheBlock, name, property(member.__get__, member.__set__))
    return "KVCacheBlock.block_hash"


FAKES = {"renamed_method": renamed_method, "renamed_hash_slot": renamed_hash_slot}
