"""Engine: read a built V1 ``Scheduler``'s KV-cache pool layout, free-block counter and identity.

These are the vLLM internals the probe depends on at attach time (``kv_cache`` holds the
accounting they feed, free of vLLM); each read is checked where vLLM offers a public
equivalent, so a vLLM that moved them fails at attach, not with wrong numbers.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from otel_vllm_kv.internals import attribute, method
from otel_vllm_kv.kv_cache import GroupLayout, PoolLayout

_SCHEDULER = "vllm.v1.core.sched.scheduler"
_MANAGER = "vllm.v1.core.kv_cache_manager"


def read_layout(scheduler: Any) -> PoolLayout:
    """Read N, the groups, the watermark and the token capacity from a built ``Scheduler``."""
    manager = scheduler.kv_cache_manager
    kv_cache_config = manager.kv_cache_config
    managers = manager.coordinator.single_type_managers
    groups = tuple(
        GroupLayout(_group_kind(group.kv_cache_spec), group_manager.block_size)
        for group, group_manager in zip(kv_cache_config.kv_cache_groups, managers)
    )
    num_blocks = manager.block_pool.num_gpu_blocks
    if len(groups) == 1:
        limit = (num_blocks - 1) * groups[0].block_size
    else:
        limit = _group_aware_capacity(scheduler.vllm_config, kv_cache_config)
    watermark = int(getattr(manager, "watermark_blocks", 0))
    return PoolLayout(num_blocks, limit, watermark, groups)


def _group_kind(spec: Any) -> str:
    """vLLM's own name of a group's attention type (``full_attention``, ``sliding_window``, ...)."""
    try:
        from vllm.v1.kv_cache_interface import get_kv_cache_spec_kind
    except ImportError:  # not in every release: fall back to the spec's class name
        return type(spec).__name__
    return str(get_kv_cache_spec_kind(spec).value)


def _group_aware_capacity(vllm_config: Any, kv_cache_config: Any) -> int | None:
    """``cache_config.kv_cache_size_tokens``, as the engine core sets it before building the scheduler.

    A scheduler built outside an engine core has none; vLLM's own function computes it then.
    """
    size = getattr(vllm_config.cache_config, "kv_cache_size_tokens", None)
    if size is not None:
        return int(size)
    try:
        from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config
    except ImportError:
        return None
    concurrency = get_max_concurrency_for_kv_cache_config(vllm_config, kv_cache_config)
    if not math.isfinite(concurrency):
        return None
    return int(concurrency * vllm_config.model_config.max_model_len)


def free_block_queue(scheduler: Any) -> Any:
    """The pool's free queue, whose ``num_free_blocks`` is what ``BlockPool.get_num_free_blocks`` returns.

    Reading the attribute is the per-step read (no call). Checked once against vLLM's method,
    so a vLLM that counts elsewhere fails here, at attach time, not with wrong numbers.
    """
    pool = scheduler.kv_cache_manager.block_pool
    queue = pool.free_block_queue
    if queue.num_free_blocks != pool.get_num_free_blocks():
        raise RuntimeError("BlockPool.get_num_free_blocks no longer reads free_block_queue.num_free_blocks")
    return queue


def waiting_queues(scheduler: Any) -> tuple[deque, deque, deque] | None:
    """The queues whose lengths ``Scheduler.get_request_counts()[1]`` adds, where each is a ``deque``:
    ``waiting`` and ``kv_holding_waiting``, and ``async_kv_waiting`` from vLLM 0.34 (an empty
    stand-in before, so the admission hook always adds three lengths).

    vLLM's FCFS queue (the default policy) is a ``deque`` with a Python ``__len__`` that calls
    ``super().__len__()``: two frames and a ``super`` object per queue; ``deque.__len__`` reads
    the same lengths in C, for fewer instructions (docs/benchmarks.md).
    None (use ``get_request_counts``) for other queues, e.g. the priority policy's heap.
    """
    waiting, kv_holding, async_kv = (getattr(scheduler, name, None) for name in WAITING_QUEUES)
    if async_kv is None:  # before vLLM 0.34
        async_kv = deque()
    if not (isinstance(waiting, deque) and isinstance(kv_holding, deque) and isinstance(async_kv, deque)):
        return None
    if len(waiting) + len(kv_holding) + len(async_kv) != scheduler.get_request_counts()[1]:
        raise RuntimeError(f"Scheduler.get_request_counts no longer counts {', '.join(WAITING_QUEUES)}")
    return waiting, kv_holding, async_kv


#: The scheduler's waiting queues, as ``get_request_counts`` adds them (the third from vLLM 0.34).
WAITING_QUEUES = ("waiting", "kv_holding_waiting", "async_kv_waiting")


def request_blocks(scheduler: Any) -> tuple[dict, ...]:
    """Each KV-cache group's ``req_to_blocks`` map: ``KVCacheManager.get_blocks`` reads these.

    Read at admission with one lookup, instead of ``get_blocks`` building a ``KVCacheBlocks``.
    """
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    maps = tuple(manager.req_to_blocks for manager in managers)
    if not maps or not all(isinstance(blocks, dict) for blocks in maps):
        raise RuntimeError("the KV-cache managers no longer keep a req_to_blocks map per group")
    return maps


def read_engine_identity(scheduler: Any) -> tuple[int, str]:
    """The engine's data-parallel index and served model name, as vLLM labels its own metrics."""
    parallel = scheduler.vllm_config.parallel_config
    index = getattr(parallel, "data_parallel_index", parallel.data_parallel_rank)
    served = scheduler.vllm_config.model_config.served_model_name
    if isinstance(served, (list, tuple)):
        served = served[0]
    return int(index), str(served)


#: What is read here, at attach (``internals``).
REQUIRED = (
    method("vllm.v1.core.block_pool", "BlockPool.get_num_free_blocks"),
    method(_SCHEDULER, "Scheduler.get_request_counts"),
    attribute("vllm.v1.core.block_pool", "BlockPool.num_gpu_blocks"),
    *(attribute(_SCHEDULER, f"Scheduler.{name}") for name in ("kv_cache_manager", "vllm_config", *WAITING_QUEUES[:2])),
    attribute(_SCHEDULER, f"Scheduler.{WAITING_QUEUES[2]}", required=False),
    *(attribute(_MANAGER, f"KVCacheManager.{name}") for name in ("block_pool", "kv_cache_config", "coordinator")),
    attribute("vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager.req_to_blocks"),
)
