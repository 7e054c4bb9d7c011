"""Every engine the suite, the demo, the examples and the benchmarks start on the tiny model runs
in float32, so that no CPU (Intel with AMX included) takes vLLM's AMX attention kernel, which
dies with SIGILL (docs/cpu-paths.md). Checked with vLLM's own argument parsing, dtype
resolution and kernel selection; no engine is started here."""

from __future__ import annotations

import pytest
import torch
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from otel_vllm_kv.demo.tiny_model import HIDDEN_SIZE, NUM_HEADS, engine_kwargs, server_arguments

#: vLLM's CPU block size (the tiny engines' cache: 128 tokens per block).
CPU_BLOCK_SIZE = 128


def _server_dtype(model_dir: str) -> torch.dtype:
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return AsyncEngineArgs.from_cli_args(parser.parse_args(server_arguments(model_dir))).create_model_config().dtype


def test_vllm_would_run_the_tiny_model_in_bfloat16_by_default(tiny_model_dir):
    """The reason for the setting: ``dtype="auto"`` downcasts the float32 config on CPU."""
    auto = EngineArgs(**engine_kwargs(tiny_model_dir, dtype="auto")).create_model_config()
    assert auto.dtype == torch.bfloat16


@pytest.mark.parametrize("start", ["LLM / AsyncLLM keyword arguments", "server command line"])
def test_tiny_model_engines_run_in_float32(tiny_model_dir, start):
    if start == "server command line":
        dtype = _server_dtype(tiny_model_dir)
    else:
        dtype = EngineArgs(**engine_kwargs(tiny_model_dir)).create_model_config().dtype
    assert dtype == torch.float32


def test_an_amx_cpu_would_give_the_tiny_engines_the_vector_attention_kernel(tiny_model_dir, monkeypatch):
    """vLLM's own selection, asked as if this CPU had AMX tiles: bfloat16 would take "amx"."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    head_size = HIDDEN_SIZE // NUM_HEADS
    dtype = EngineArgs(**engine_kwargs(tiny_model_dir)).create_model_config().dtype
    assert _get_attn_isa(torch.bfloat16, CPU_BLOCK_SIZE, head_size) == "amx"
    assert _get_attn_isa(dtype, CPU_BLOCK_SIZE, head_size) == "vec"
