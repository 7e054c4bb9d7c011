"""A real vLLM V1 ``Scheduler`` over a real ``KVCacheManager``, driven without a model.

Everything but the forward pass is vLLM's own: ``schedule()`` allocates blocks, and
``update_from_output()`` consumes a fake ``ModelRunnerOutput`` that sampled one token
(id 7) for every scheduled request, as ``EngineCore.step`` would after the model ran.
(The test suite has the same idea in ``tests/schedulers.py``; benchmarks do not import
from ``tests/``.)
"""

from __future__ import annotations

import itertools

import torch
from vllm.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

#: The tiny model's context length: prompt + output of one request must fit.
MAX_MODEL_LEN = 2048
SAMPLED_TOKEN = 7

_serials = itertools.count(1)
init_none_hash(sha256)


def build_vllm_config(model_dir: str, num_blocks: int, block_size: int, max_num_seqs: int,
                      max_num_batched_tokens: int) -> VllmConfig:
    model_config = ModelConfig(model=model_dir, max_model_len=MAX_MODEL_LEN, dtype="float32", seed=0,
                               served_model_name="tiny")
    cache_config = CacheConfig(block_size=block_size, enable_prefix_caching=True)
    cache_config.num_gpu_blocks = num_blocks
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=MAX_MODEL_LEN, is_encoder_decoder=False,
    )
    return VllmConfig(model_config=model_config, cache_config=cache_config,
                      scheduler_config=scheduler_config, parallel_config=ParallelConfig())


def build_scheduler(vllm_config: VllmConfig, log_stats: bool) -> Scheduler:
    """A fresh Scheduler (a fresh KVCacheManager and block pool) on ``vllm_config``."""
    block_size = vllm_config.cache_config.block_size
    num_blocks = vllm_config.cache_config.num_gpu_blocks
    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32)
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)]
    )
    return Scheduler(
        vllm_config=vllm_config, kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size, log_stats=log_stats,
    )


def make_request(scheduler: Scheduler, num_prompt_tokens: int, max_tokens: int, prefix: tuple[int, ...] = ()) -> Request:
    """A request of ``prefix`` then a serial number: no two requests share a block past ``prefix``."""
    serial = next(_serials)
    prompt = [*prefix, serial, *range(1, num_prompt_tokens - len(prefix))]
    return Request(
        f"bench-{serial}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), None,
        block_hasher=get_request_block_hasher(scheduler.block_size, sha256),
    )


def fake_runner_output(scheduler_output) -> ModelRunnerOutput:
    """What the model runner would return: one sampled token for every scheduled request."""
    request_ids = list(scheduler_output.num_scheduled_tokens)
    return ModelRunnerOutput(
        req_ids=request_ids,
        req_id_to_index={request_id: index for index, request_id in enumerate(request_ids)},
        sampled_token_ids=[[SAMPLED_TOKEN] for _ in request_ids],
        logprobs=None,
        prompt_logprobs_dict={},
        pooler_output=[],
    )
