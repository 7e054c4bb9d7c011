"""A hybrid model end to end: the Gemma2-style tiny model, whose sliding-window and full-attention
layers make vLLM's CPU build keep two KV-cache groups in one block pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.engine_load import ALLOCATABLE_BLOCKS
from tests.support.instrumented_processes import otel_environment, support_pythonpath

pytestmark = pytest.mark.engine
HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def report(hybrid_model_dir) -> dict:
    """VLLM_ENABLE_V1_MULTIPROCESSING=0 runs the scheduler in the scenario's process, so every
    engine step can be checked against vLLM's own metrics of that same step."""
    env = {**otel_environment(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONPATH": support_pythonpath()}
    script = os.path.join(HERE, "scenarios", "hybrid_llm.py")
    result = subprocess.run(
        [sys.executable, script, hybrid_model_dir], check=False, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_vllm_runs_it_with_two_kv_cache_groups(report):
    assert report["engine_core"] == "InprocClient"
    assert sorted(map(tuple, report["groups"].values())) == [("full_attention", 128), ("sliding_window", 128)]


def test_every_step_agrees_with_what_vllm_publishes(report):
    """Limit = kv_cache_size_tokens, used + free = limit, utilization = kv_cache_usage_perc, blocks, evictable."""
    assert report["steps"] > 300
    assert report["mismatches"] == []
    assert len(report["usages"]) > 5 and max(report["usages"]) > 0.5, "the pool should fill up and drain"


def test_the_limit_is_vllms_group_aware_capacity_not_blocks_times_block_size(report):
    published, idle = report["published"], report["idle"]
    assert idle["limit"] == published["kv_cache_size_tokens"] == 3971
    assert idle["limit"] != (published["num_gpu_blocks"] - 1) * 128
    assert (idle["used"], idle["free"]) == (0, idle["limit"])


def test_finished_prefixes_stay_evictable_in_both_groups_until_reused(report):
    idle, reusing = report["idle"], report["reusing"]
    assert all(blocks > 0 for blocks in idle["evictable_blocks"])
    assert idle["evictable"] == sum(idle["evictable_blocks"]) * idle["limit"] // ALLOCATABLE_BLOCKS
    # The shared 610-byte prefix fills 4 full-attention blocks: a new request hits them.
    assert reusing["prefix_cache_hits"] == 4 * 128
    assert reusing["evictable"] < idle["evictable"]
