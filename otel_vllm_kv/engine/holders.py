"""Engine: who holds the KV cache, by LoRA adapter and tenant (never by request).

A request's key (``holdings``) is its LoRA adapter's name (``Request.lora_request.lora_name``)
and its tenant: the value the frontend put in its ``trace_headers`` under
``TENANT_HEADER_KEY``, from W3C baggage (``frontend.tenants``). Each engine keeps at most
``limit`` keys; a request of any further key counts under ``OVERFLOW``, as OpenTelemetry's SDK
folds attribute sets past its cardinality limit, and so does a key that is not short printable
text (one warning).

Two figures per key, in blocks:

* block-seconds: what its requests held, added at each release (finish, abort, preemption)
  from ``residency``: the key's share of the integral of ``used``;
* held now, from a *pass* over the requests holding blocks (vLLM's ``req_to_blocks``): a block
  held by k requests counts 1/k to each, so the keys add up to the pool's used blocks. The pass
  also counts the tokens written into those blocks (one KV-cache group only): a request's full
  blocks and the filled part of its last, each shared 1/k; not the empty tail of its last
  block nor blocks allocated ahead of its computed tokens.

The pass is O(blocks held), so it runs after a step at most once every
``PASS_INTERVAL_SECONDS`` (``probe``): the steps between pay one clock read.
"""

from __future__ import annotations

import logging
from typing import Any

from otel_vllm_kv.admission_records import TENANT_HEADER_KEY
from otel_vllm_kv.diagnostics import WarnOnce
from otel_vllm_kv.holdings import OVERFLOW, HolderKey, HoldersPass, Holding, valid_name
from otel_vllm_kv.internals import attribute
from otel_vllm_kv.settings import DEFAULT_HOLDER_LIMIT

_logger = logging.getLogger(__name__)

#: How often at most the pass counts what each key holds now.
PASS_INTERVAL_SECONDS = 1.0
#: Keys per engine unless ``OTEL_PYTHON_VLLM_KV_HOLDER_LIMIT`` says otherwise.
DEFAULT_LIMIT = DEFAULT_HOLDER_LIMIT


class Holders:
    """One engine's holders: ``residency`` adds each release to ``block_seconds``; ``count`` is a pass."""

    __slots__ = (
        "block_seconds",
        "limit",
        "next_pass",
        "_named",
        "_requests",
        "_pool",
        "_group_blocks",
        "_null_block",
        "_block_size",
        "_warn",
    )

    def __init__(self, scheduler: Any, limit: int = DEFAULT_LIMIT) -> None:
        manager = scheduler.kv_cache_manager
        managers = manager.coordinator.single_type_managers
        #: Block-seconds by key, summed over every release; every key admitted so far.
        self.block_seconds: dict[HolderKey, float] = {}
        self.limit = limit
        #: Keys admitted under their names (``OVERFLOW`` aside).
        self._named = 0
        #: ``time.monotonic()`` after which the next pass is due.
        self.next_pass = 0.0
        self._requests = scheduler.requests
        self._pool = manager.block_pool
        self._group_blocks = tuple(group.req_to_blocks for group in managers)
        self._null_block = manager.block_pool.null_block
        # Per-token slots only where every block is the request's own run of tokens.
        full_attention = len(managers) == 1 and type(managers[0]).__name__ == "FullAttentionManager"
        self._block_size = managers[0].block_size if full_attention else None
        self._warn = WarnOnce(
            _logger,
            "otel-vllm-kv: a LoRA adapter name or tenant that is not printable text of at most 100 characters "
            "is counted under otel.metric.overflow",
        )

    def key(self, request: Any) -> HolderKey:
        """The request's key, in ``block_seconds`` from now on; a new one is admitted while there is room."""
        lora = request.lora_request
        headers = request.trace_headers
        key = (None if lora is None else lora.lora_name, headers.get(TENANT_HEADER_KEY) if headers else None)
        block_seconds = self.block_seconds
        if key in block_seconds:
            return key
        if not (valid_name(key[0]) and valid_name(key[1])):
            self._warn()
            key = OVERFLOW
        elif self._named >= self.limit:
            key = OVERFLOW
        else:
            self._named += 1
        block_seconds.setdefault(key, 0.0)
        return key

    def count(self) -> HoldersPass:
        """The pass: what each key holds now (every key seen so far; 0 for those holding nothing)."""
        held: dict[HolderKey, float] = dict.fromkeys(self.block_seconds, 0.0)
        requests, null_block, block_size = self._requests, self._null_block, self._block_size
        written = 0.0
        for group in self._group_blocks:
            for request_id, blocks in group.items():
                share = 0.0
                for block in blocks:
                    if block is not null_block:
                        share += 1.0 / block.ref_cnt
                if not share:
                    continue
                request = requests.get(request_id)
                key = OVERFLOW if request is None else self.key(request)
                held[key] = held.get(key, 0.0) + share
                if block_size is not None and request is not None:
                    written += _written(blocks, request.num_computed_tokens, block_size)
        holdings = tuple(Holding(key, self.block_seconds.get(key, 0.0), share) for key, share in held.items())
        used_blocks = self._pool.num_gpu_blocks - 1 - self._pool.get_num_free_blocks()
        return HoldersPass(holdings, used_blocks, written if block_size is not None else None)


def _written(blocks: list, computed_tokens: int, block_size: int) -> float:
    """The slots of ``blocks`` that hold computed tokens, each block shared 1/k."""
    full, filled = divmod(computed_tokens, block_size)
    written = 0.0
    for block in blocks[:full]:
        written += block_size / block.ref_cnt
    if filled and full < len(blocks):
        written += filled / blocks[full].ref_cnt
    return written


#: What the holders read of vLLM besides what ``admission`` and ``residency`` read.
REQUIRED = (attribute("vllm.v1.request", "Request.lora_request"),)
