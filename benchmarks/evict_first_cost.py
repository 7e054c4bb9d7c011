"""What counting evictable blocks freed with ``evict_first`` costs per request (vLLM 0.34 on), in instructions.

Since vLLM 0.34, ``BlockPool.free_blocks(ordered_blocks, evict_first=True)`` puts hashed blocks at the
front of the free queue (``prepend_n``). The package counts them by hooking the pool's ``free_blocks``
(``prefix_cache._pool_hooks``), a frame on every call, ``evict_first`` or not. The alternative hooks
``FreeKVCacheBlockQueue.prepend_n(blocks)`` instead and counts the hashed blocks among ``blocks``.

Command (from the repository root)::

    VLLM_TARGET_DEVICE=cpu CUDA_VISIBLE_DEVICES= .venv-vllm-0.34.0/bin/python benchmarks/evict_first_cost.py

Unit: one request through a real ``KVCacheManager`` / ``BlockPool`` (the scheduler of
``tests/schedulers.py``, 256 blocks of 16 tokens, warmed up so every allocation evicts a cached
block): ``get_computed_blocks``, ``allocate_slots``, ``take_new_block_ids``, ``free``. Workloads:
64 tokens without prefix hits; 64 with 48 cached (``_workloads.SHARED_PREFIX``); 72 without hits,
whose partial last block (no hash) goes to ``prepend_n`` (a 64-token request prepends none). Variants:

* ``plain``: no count;
* ``ours``: ``prefix_cache.watch(pool, 1)``, as the package counts on 0.34 (``free_blocks`` hooked);
* ``no-free-hook``: the same with ``prefix_cache.takes_evict_first`` returning False (as on 0.31-0.33);
* ``prepend-hook``: ``no-free-hook`` plus a ``prepend_n`` hook on the pool's free queue (the
  package's closure style: vLLM's own parameter ``blocks``, the original, then ``counter.add``).

``ours - no-free-hook`` is the free_blocks hook's cost per request, ``prepend-hook - no-free-hook``
the alternative's. Each variant runs in its own process under ``valgrind --tool=callgrind``
(``PYTHONHASHSEED=0``), ``--repeat`` times; in that process a plain pool and the variant's pool
(separate schedulers, the hooks sit on the one pool) each run ``UNITS`` requests in two intervals
delimited by ``_callgrind.mark``; the figure is the marginal ``(large - small) / (large - small units)``.
Garbage is collected before each pair of intervals; the collector stays on, and its collections per
generation in each interval are reported (the same in plain and variant: the hooks allocate nothing).

Before counting, a functional check (no valgrind) frees hashed blocks with ``evict_first=True``
(and through a generator, as the SimpleCPUOffload connector does) and compares ``counter.per_group``
with a walk of the free queue (``schedulers.evictable_per_group``): ``ours`` and ``prepend-hook``
must stay exact; ``no-free-hook`` is expected to drift (why the hook exists). A table gives vLLM's
calls per request of the hooked methods (``sys.setprofile``, no valgrind). ``--smoke`` runs the checks
and each variant's process without valgrind (~2 min); the full run takes ~80 min on 2 busy cores
(callgrind runs the vLLM import too). Repeats differ by ~0.1 % per request (plain pool against plain
pool: up to 160 instructions), so a difference of a few hundred instructions needs both repeats.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import subprocess
import sys
import tempfile
import types
from concurrent.futures import ThreadPoolExecutor
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _callgrind
from _common import check, command_line, exit_with, markdown_table, print_header, tiny_model_dir

VARIANTS = ("plain", "ours", "no-free-hook", "prepend-hook")
#: name -> (prompt tokens, whether the prompt starts with ``_workloads.SHARED_PREFIX``: 48 tokens cached).
WORKLOADS = {"no prefix hits": (64, False), "48 of 64 tokens cached": (64, True),
             "72 tokens, no hits (a partial last block)": (72, False)}
#: Requests in the small and the large counted interval (the marginal is over the difference).
UNITS = (200, 600)
SMOKE_UNITS = (5, 15)
WARMUP = 100
PROMPT_TOKENS = 64


# -- the variants ---------------------------------------------------------------------------

def prepend_n_hook(counter: Any):
    """The alternative: a ``prepend_n`` hook in the closure style of ``prefix_cache._queue_hooks``."""

    def prepend_n(original):
        def prepend_n(blocks: list[Any]) -> Any:
            result = original(blocks)
            try:
                counter.add(blocks, 1)  # evict_first: hashed blocks among them; otherwise none has a hash
            except Exception:  # noqa: BLE001
                counter.fail()
            return result

        return prepend_n

    return prepend_n


def instrument(pool: Any, variant: str) -> Any:
    """Count on ``pool`` as ``variant`` says; the counter (None for plain)."""
    from otel_vllm_kv.engine import prefix_cache
    from otel_vllm_kv.patching import hook_methods

    if variant == "plain":
        return None
    saved = prefix_cache.takes_evict_first
    if variant != "ours":
        prefix_cache.takes_evict_first = lambda pool: False
    try:
        counter = prefix_cache.watch(pool, 1)
    finally:
        prefix_cache.takes_evict_first = saved
    # Our hooks are plain functions on the instance (never vars(pool): that would build its __dict__).
    hooked = isinstance(pool.free_blocks, types.FunctionType)
    check(hooked == (variant == "ours"), f"{variant}: free_blocks hooked: {hooked}")
    if variant == "prepend-hook":
        hook_methods(pool.free_block_queue, {"prepend_n": prepend_n_hook(counter)})
    return counter


# -- the unit -------------------------------------------------------------------------------

class Pool:
    """A real scheduler's KVCacheManager, warmed up; ``unit(request)`` allocates then frees one request."""

    def __init__(self, model_dir: str, variant: str, prefix: tuple[int, ...] = (), num_blocks: int = 256,
                 warmup: int = WARMUP, tokens: int = PROMPT_TOKENS) -> None:
        from schedulers import build_scheduler

        self.scheduler = build_scheduler(model_dir, log_stats=False, num_blocks=num_blocks, block_size=16,
                                         served_model_name="tiny", max_num_seqs=512, max_num_batched_tokens=8192)
        self.manager = self.scheduler.kv_cache_manager
        self.block_pool = self.manager.block_pool
        self.prefix = prefix
        self.tokens = tokens
        self.counter = instrument(self.block_pool, variant)
        self.cached_tokens = 0
        for request in self.requests(warmup):
            self.unit(request)
        self.cached_tokens = 0

    def requests(self, count: int, tokens: int | None = None, prefix: tuple[int, ...] | None = None) -> list[Any]:
        from _workloads import distinct_request

        tokens = self.tokens if tokens is None else tokens
        prefix = self.prefix if prefix is None else prefix
        return [distinct_request(self.scheduler, tokens, 1, prefix) for _ in range(count)]

    def allocate(self, request: Any) -> None:
        manager = self.manager
        computed_blocks, num_cached, _ = manager.get_computed_blocks(request)
        new_blocks = manager.allocate_slots(request, request.num_prompt_tokens - num_cached, num_cached,
                                            computed_blocks)
        if new_blocks is None:
            raise RuntimeError("allocate_slots found no room")
        manager.take_new_block_ids()
        self.cached_tokens += num_cached

    def unit(self, request: Any) -> None:
        self.allocate(request)
        self.manager.free(request)

    def exact(self) -> bool:
        from schedulers import evictable_per_group

        return self.counter is None or (not self.counter.failed
                                        and self.counter.per_group == evictable_per_group(self.scheduler))


def collections() -> list[int]:
    return [generation["collections"] for generation in gc.get_stats()]


def count(spec: dict) -> None:
    """The counted process: per workload, a plain pool then the variant's, each in two intervals."""
    import _workloads

    small, large = spec["units"]
    result = {"marks": None, "gc": {}, "cached_tokens": {}, "exact": {}}
    for workload, (tokens, shared) in WORKLOADS.items():
        prefix = _workloads.SHARED_PREFIX if shared else ()
        for side, variant in (("plain", "plain"), ("variant", spec["variant"])):
            label = f"{workload}|{side}"
            pool = Pool(spec["model_dir"], variant, prefix, tokens=tokens)
            batches = {"small": pool.requests(small), "large": pool.requests(large)}
            gc.collect()
            for size, requests in batches.items():
                before = collections()
                _callgrind.mark(f"{label}|{size}")
                for request in requests:
                    pool.unit(request)
                _callgrind.mark(f"{label}|{size} done")
                result["gc"][f"{label}|{size}"] = [after - was for after, was in zip(collections(), before)]
            result["cached_tokens"][label] = pool.cached_tokens
            result["exact"][label] = pool.exact()
            pool.scheduler.shutdown()
    _callgrind.mark("end")
    result["marks"] = _callgrind.labels()
    print(json.dumps(result))


def run_variant(variant: str, units: tuple[int, int], model_dir: str, directory: str, index: int,
                counted: bool = True) -> dict:
    """One process of ``variant``: under callgrind (``counted``), or plain Python for the sanity checks alone."""
    out_file = os.path.join(directory, f"callgrind.{variant}.{index}.out")
    spec = {"variant": variant, "units": units, "model_dir": model_dir}
    valgrind = _callgrind.valgrind_command(out_file) if counted else []
    result = subprocess.run(
        [*valgrind, sys.executable, os.path.abspath(__file__), "--count", json.dumps(spec)],
        capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"}, check=False,
    )
    check(result.returncode == 0, f"{variant}: the counted process failed: {result.stderr[-3000:]}")
    child = json.loads(result.stdout.strip().splitlines()[-1])
    counts = _callgrind.read_intervals(out_file, child["marks"]) if counted else {}
    _callgrind.remove_dumps(out_file)
    per_request, gc_counts = {}, {}
    for workload in WORKLOADS:
        for side in ("plain", "variant"):
            label = f"{workload}|{side}"
            if counted:
                marginal = counts[f"{label}|large"] - counts[f"{label}|small"]
                per_request[(workload, side)] = marginal / (units[1] - units[0])
            gc_counts[(workload, side)] = (child["gc"][f"{label}|small"], child["gc"][f"{label}|large"])
            cached = child["cached_tokens"][label]
            expected = sum(units) * (48 if WORKLOADS[workload][1] else 0)
            check(cached == expected, f"{variant} {label}: {cached} cached tokens, expected {expected}")
            check(child["exact"][label], f"{variant} {label}: the count differs from a walk of the free queue")
    return {"per_request": per_request, "gc": gc_counts}


# -- the functional check ---------------------------------------------------------------------

def functional_check(model_dir: str) -> list[list[str]]:
    """Free hashed blocks with ``evict_first=True``; is each variant's count still a walk's?"""
    from _workloads import SHARED_PREFIX
    from schedulers import evictable_per_group

    rows = []
    for variant in VARIANTS[1:]:
        pool = Pool(model_dir, variant, num_blocks=40, warmup=0)
        manager, block_pool, counter = pool.manager, pool.block_pool, pool.counter
        steps = []

        def allocated(tokens: int = PROMPT_TOKENS, prefix: tuple[int, ...] = ()) -> Any:
            request = pool.requests(1, tokens, prefix)[0]
            pool.allocate(request)
            return request

        def note(what: str) -> None:
            steps.append((what, list(counter.per_group), evictable_per_group(pool.scheduler)))

        manager.free(allocated())
        note("free, 64 tokens (4 blocks to the tail)")
        blocks = manager.pop_blocks_for_free(allocated(72))  # 4 hashed blocks and a partial one
        block_pool.free_blocks((block for block in reversed(blocks)), evict_first=True)  # a generator, as the connector
        note("free_blocks(generator, evict_first=True), 72 tokens")
        shared, other = allocated(prefix=SHARED_PREFIX), allocated(prefix=SHARED_PREFIX)  # 3 blocks at ref_cnt 2
        block_pool.free_blocks(list(reversed(manager.pop_blocks_for_free(shared))), evict_first=True)
        note("evict_first, 3 of 4 blocks still referenced")
        block_pool.free_blocks(list(reversed(manager.pop_blocks_for_free(other))), evict_first=True)
        note("evict_first, their last reference")
        for _ in range(8):
            manager.free(allocated())  # get_new_blocks pops the prepended hashed blocks first
        note("8 more requests (evicting the prepended blocks)")
        exact = all(ours == walk for _, ours, walk in steps) and not counter.failed
        for what, ours, walk in steps:
            rows.append([variant, what, str(ours), str(walk), "yes" if ours == walk else "NO"])
        expected = variant != "no-free-hook"
        check(exact == expected, f"{variant}: count exact {exact}, expected {expected}")
        pool.scheduler.shutdown()
    return rows


def calls_per_request(model_dir: str, units: int = 20) -> list[list[str]]:
    """What one unit calls of the hooked methods (vLLM's own, on a plain pool), and with how many blocks."""
    import _workloads

    names = ("free_blocks", "prepend_n", "append_n", "popleft_n", "remove")
    rows = []
    for workload, (tokens, shared) in WORKLOADS.items():
        pool = Pool(model_dir, "plain", _workloads.SHARED_PREFIX if shared else (), tokens=tokens)
        requests = pool.requests(units)
        calls = dict.fromkeys(names, 0)
        blocks = dict.fromkeys(names, 0)

        def profile(frame: Any, event: str, arg: Any) -> None:
            name = frame.f_code.co_name
            if event == "call" and name in calls and "/vllm/v1/core/" in frame.f_code.co_filename:
                calls[name] += 1
                argument = frame.f_locals.get("blocks", frame.f_locals.get("n"))
                blocks[name] += argument if isinstance(argument, int) else len(argument) if argument is not None else 0

        sys.setprofile(profile)
        try:
            for request in requests:
                pool.unit(request)
        finally:
            sys.setprofile(None)
        for name in names:
            per_call = f"{blocks[name] / calls[name]:.2f}" if calls[name] and name in ("prepend_n", "append_n",
                                                                                      "popleft_n") else "-"
            rows.append([workload, name, f"{calls[name] / units:.2f}", per_call])
        pool.scheduler.shutdown()
    return rows


# -- the report -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2, help="processes per variant (default 2)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ", ".join(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="processes at once (default 2)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"sanity checks only: {SMOKE_UNITS} units, one process per variant, no valgrind")
    parser.add_argument("--count", help=argparse.SUPPRESS)  # the counted child process
    args = parser.parse_args(argv)
    if args.count:
        count(json.loads(args.count))
        return 0
    from vllm.v1.core.block_pool import BlockPool

    check("evict_first" in inspect.signature(BlockPool.free_blocks).parameters,
          "this vLLM's BlockPool.free_blocks takes no evict_first (vLLM 0.34 on)")
    units = SMOKE_UNITS if args.smoke else UNITS
    repeat = 1 if args.smoke else args.repeat
    variants = args.variants.split(",")
    check(set(variants) <= set(VARIANTS), f"unknown variant in {variants}")
    print_header("Counting evictable blocks freed with evict_first: the free_blocks hook vs a prepend_n hook",
                 command_line(), {"units": f"{units[0]} and {units[1]} requests",
                                  "warm-up": WARMUP, "PYTHONHASHSEED": 0, "gc": "on, collected before each pool",
                                  "repeat": repeat, "valgrind": "no (smoke)" if args.smoke else "callgrind"})
    model_dir = tiny_model_dir()
    print("## Functional check: free_blocks(..., evict_first=True) frees hashed blocks\n")
    print(markdown_table(["variant", "after", "counter.per_group", "walk of the free queue", "exact"],
                         functional_check(model_dir)))
    print("\n## vLLM's calls per request (plain pool): the hooked methods\n")
    print(markdown_table(["workload", "method", "calls per request", "blocks per call (n for popleft_n)"],
                         calls_per_request(model_dir)))
    print()
    sys.stdout.flush()
    with tempfile.TemporaryDirectory(prefix="otel-vllm-kv-evict-first-") as directory:
        jobs = [(variant, index) for index in range(repeat) for variant in variants]
        with ThreadPoolExecutor(args.jobs) as executor:
            futures = {job: executor.submit(run_variant, job[0], units, model_dir, directory, job[1], not args.smoke)
                       for job in jobs}
            results = {job: future.result() for job, future in futures.items()}
    if args.smoke:
        print("Smoke: every variant's process ran and kept its count exact; instructions not counted.\n")
        print("All sanity checks passed.")
        return 0
    print("## Instructions per request (marginal)\n")
    rows, deltas = [], {}
    for workload in WORKLOADS:
        for variant, index in jobs:
            result = results[(variant, index)]
            plain = result["per_request"][(workload, "plain")]
            mine = result["per_request"][(workload, "variant")]
            deltas.setdefault((workload, variant), []).append(mine - plain)
            rows.append([workload, variant, index + 1, f"{plain:,.1f}", f"{mine:,.1f}", f"{mine - plain:+,.1f}",
                         _gc(result["gc"][(workload, "plain")]), _gc(result["gc"][(workload, "variant")])])
    print(markdown_table(["workload", "variant", "run", "plain pool, same process", "variant pool", "variant - plain",
                          "gc plain (small; large, gen 0/1/2)", "gc variant"], rows))
    print()
    if {"ours", "no-free-hook", "prepend-hook"} <= set(variants):
        print("## The two hooks per request: differences of (variant - plain), mean over runs\n")
        rows = []
        for workload in WORKLOADS:
            mean = {variant: sum(values) / len(values) for (each_workload, variant), values in deltas.items()
                    if each_workload == workload}
            for name, variant in (("free_blocks hook (ours - no-free-hook)", "ours"),
                                  ("prepend_n hook (prepend-hook - no-free-hook)", "prepend-hook")):
                each = [a - b for a, b in zip(deltas[(workload, variant)], deltas[(workload, "no-free-hook")])]
                rows.append([workload, name, f"{mean[variant] - mean['no-free-hook']:+,.1f}",
                             ", ".join(f"{value:+,.1f}" for value in each)])
        print(markdown_table(["workload", "difference", "instructions per request", "run by run"], rows))
        print()
    print("All sanity checks passed.")
    return 0


def _gc(pair: tuple[list[int], list[int]]) -> str:
    return "; ".join("/".join(str(n) for n in counts) for counts in pair)


if __name__ == "__main__":
    exit_with(main)
