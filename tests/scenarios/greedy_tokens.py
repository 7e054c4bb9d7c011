"""Run by test_hostile_environment: the tiny model generates greedily for a few prompts;
prints one line ``TOKENS <json>`` with the token ids of each.

Usage: greedy_tokens.py MODEL_DIR MODE, MODE one of:

- ``without-package``: vLLM never loads this package's plugin (``VLLM_PLUGINS`` names vLLM's
  other general plugins only) and nothing here instruments; the engine core and its worker
  run in this process (a single process: half the cost of an engine start; the same tokens
  as a spawned engine core on the float32 tiny model).
- ``plain``: a default ``LLM`` (spawned engine core and worker); vLLM loads the package's
  plugin in each process, nothing instruments.
- ``instrumented``: the same, instrumented first (an SDK in-memory reader).

Every process of the run (this one, and the engine core and worker, which re-import this
module under ``spawn``) logs the records of non-vLLM loggers with their level and pid, so the
test can tell which process logged what.
"""

import json
import logging
import os
import sys

logging.basicConfig(format="%(levelname)s [pid %(process)d] %(name)s: %(message)s")

#: Distinct last bytes: the tiny model's greedy continuation differs for each (one token per byte).
PROMPTS = [
    "Hello",
    "The quick brown fox",
    "0000 0000 0000",
    "zzzzzzzzzzzzzz",
    "KV cache: 8064 tokens, 35% free?",
    "the quick brown fox jumps; " * 12,
]
MAX_TOKENS = 32


def _without_package() -> dict:
    """Keep this package's plugin out of vLLM and run the engine in this one process."""
    from importlib.metadata import entry_points

    os.environ["VLLM_PLUGINS"] = ",".join(
        plugin.name
        for plugin in entry_points(group="vllm.general_plugins")
        if plugin.value.split(".")[0] != "otel_vllm_kv"
    )
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return {"distributed_executor_backend": "uni"}


if __name__ == "__main__":
    model_dir, mode = sys.argv[1:]
    overrides = _without_package() if mode == "without-package" else {}
    from vllm import LLM, SamplingParams

    # Importing the package changes nothing until instrument() is called.
    from otel_vllm_kv.demo.tiny_model import engine_kwargs

    if mode == "instrumented":
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from otel_vllm_kv import VLLMKVCacheInstrumentor

        VLLMKVCacheInstrumentor().instrument(meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]))
    # vLLM's CPU worker refuses to start unless this fraction of the host's memory is free (0.92 by
    # default), which fails beside any other engine; the cache stays 1 GiB (VLLM_CPU_KVCACHE_SPACE).
    llm = LLM(**engine_kwargs(model_dir, gpu_memory_utilization=0.3, **overrides))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)  # greedy, fixed length
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    tokens = [list(output.outputs[0].token_ids) for output in outputs]
    if mode != "without-package":
        llm.llm_engine.engine_core.shutdown()
    print("TOKENS " + json.dumps(tokens), flush=True)
