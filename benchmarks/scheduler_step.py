"""Per-step cost of the instrumentation on a real vLLM V1 scheduler, beside vLLM's own statistics path.

Command (from the repository root)::

    .venv/bin/python benchmarks/scheduler_step.py            # full run, ~3-5 min on 2 cores
    .venv/bin/python benchmarks/scheduler_step.py --smoke    # sanity only, ~15-25 s

A real ``Scheduler`` with a real ``KVCacheManager`` (block size 16, enough blocks that
nothing is ever preempted) and no model: each step is ``schedule()`` then
``update_from_output()`` with a fake ``ModelRunnerOutput`` sampling one token per
scheduled request, as ``EngineCore.step`` does once the model ran. Only those two calls
are timed (``time.perf_counter_ns``, garbage collector off, warm-up steps discarded).

Configurations: steady decode with 16, 64 and 256 running requests (no arrivals, no
finishes; prompt lengths spread over 16..80 tokens so the free-block count changes
nearly every step), and an admission-heavy phase (``--arrivals`` new short requests
before every step, each living ``--admission-max-tokens`` steps, so every step admits
and finishes that many).

Variants, run in the same process in rounds (``--pairs``, the order rotated each round,
a fresh scheduler for every run because the probe attaches at ``Scheduler.__init__``):

* ``plain``: vLLM as ``LLM`` runs it by default (``log_stats=False``), not instrumented;
* ``ours``: the same after ``VLLMKVCacheInstrumentor().instrument(meter_provider=...)``,
  an ``InMemoryMetricReader`` collected every ``--collect-every`` steps (between steps;
  its cost is reported separately: in a default multiprocess engine it runs in the
  frontend process, not in the engine core), ``uninstrument()`` after the run;
* ``vllm-stats``: not instrumented, ``log_stats=True`` (as ``vllm serve`` runs): the
  scheduler's own statistics, plus, timed separately, the frontend's share of vLLM's
  statistics path for that step: ``IterationStats`` built from the step's outputs with
  vLLM's own methods (what ``OutputProcessor`` does with stats on) and
  ``PrometheusStatLogger.record(scheduler_stats, iteration_stats)``.

Reported per configuration: median step time of each variant (µs), the median over
rounds of the per-round ratio ours/plain, the added µs per step and per admission, and
the cost of vLLM's statistics path per step for reference. A second table gives the
probe's hooks in tight loops (per step and per admission, ns per call: far less sensitive
to noise than the A/B step times).

Sanity checks (any failure exits non-zero, in smoke mode too): every variant schedules
exactly the same tokens and admissions; nothing is preempted; the instrumented run
reported gauges with used + free = limit matching the pool at every collection, and
delivered one admission record per admitted request on its outputs; uninstrumented
runs carry none. Timings are never checked.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    SanityError,
    check,
    command_line,
    markdown_table,
    median,
    print_header,
    tiny_model_dir,
)

VARIANTS = ("plain", "ours", "vllm-stats")
BLOCK_SIZE = 16


@dataclass(frozen=True)
class Config:
    name: str
    running: int  # decode: requests running throughout; admission: 0
    arrivals: int  # admission: new requests before every step
    max_tokens: int
    prompt_min: int
    prompt_max: int

    def prompt_length(self, index: int) -> int:
        span = self.prompt_max - self.prompt_min + 1
        return self.prompt_min + (index * 37) % span

    def blocks_needed(self) -> int:
        per_request = -(-(self.prompt_max + self.max_tokens) // BLOCK_SIZE)
        concurrent = self.running or self.arrivals * (self.max_tokens + 1)
        return concurrent * per_request + 32


@dataclass
class Run:
    config: str
    variant: str
    step_ns: list[int] = field(default_factory=list)  # measured steps only
    admissions_measured: int = 0
    running_measured: list[int] = field(default_factory=list)
    # Totals over all steps (warm-up included): must agree across variants.
    scheduled_tokens: int = 0
    admissions: int = 0
    preemptions: int = 0
    relay_outputs: int = 0
    collections: int = 0
    collect_ns: list[int] = field(default_factory=list)
    frontend_stats_ns: list[int] = field(default_factory=list)
    prometheus_record_ns: list[int] = field(default_factory=list)


class FrontendStats:
    """vLLM's frontend statistics for each step, as ``OutputProcessor`` computes them with stats on.

    Uses vLLM's own ``IterationStats.update_from_output`` / ``update_from_finished_request``
    with per-request ``RequestStateStats``; detokenization and the rest of output
    processing are left out (they run with or without statistics).
    """

    def __init__(self) -> None:
        from vllm.v1.metrics.stats import LoRARequestStates

        self.requests: dict[str, list] = {}  # id -> [RequestStateStats, is_prefilling, prompt len, max tokens]
        self.lora_states = LoRARequestStates(log_stats=True)

    def add(self, request) -> None:
        from vllm.v1.metrics.stats import RequestStateStats

        self.requests[request.request_id] = [
            RequestStateStats(arrival_time=time.time()), True, request.num_prompt_tokens, request.max_tokens,
        ]

    def iteration_stats(self, engine_core_outputs):
        from vllm.v1.metrics.stats import IterationStats

        if not engine_core_outputs.outputs:
            return None
        stats = IterationStats()
        timestamp = engine_core_outputs.timestamp or time.monotonic()
        for output in engine_core_outputs.outputs:
            state = self.requests.get(output.request_id)
            if state is None:
                continue
            stats.update_from_output(output, timestamp, state[1], state[0], self.lora_states, None)
            state[1] = False
            if output.finish_reason is not None:
                stats.update_from_finished_request(
                    finish_reason=output.finish_reason, request_id=output.request_id,
                    num_prompt_tokens=state[2], max_tokens_param=state[3], req_stats=state[0],
                )
                del self.requests[output.request_id]
        return stats


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from _scheduler import build_vllm_config
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        self.args = args
        self.model_dir = tiny_model_dir()
        self.configs = [
            Config(f"decode {n}", running=n, arrivals=0, max_tokens=args.warmup + args.steps + 16,
                   prompt_min=16, prompt_max=80)
            for n in args.batch_sizes
        ]
        self.configs.append(Config(
            "admission", running=0, arrivals=args.arrivals, max_tokens=args.admission_max_tokens,
            prompt_min=16, prompt_max=64,
        ))
        self.vllm_configs = {}
        for config in self.configs:
            concurrent = config.running or config.arrivals * (config.max_tokens + 1)
            self.vllm_configs[config.name] = build_vllm_config(
                self.model_dir, num_blocks=config.blocks_needed(), block_size=BLOCK_SIZE,
                max_num_seqs=max(2 * concurrent, 64),
                max_num_batched_tokens=max(8192, (concurrent + config.arrivals) * config.prompt_max),
            )
        # One Prometheus stat logger for the process (it registers vLLM's collectors globally).
        self.prometheus = PrometheusStatLogger(next(iter(self.vllm_configs.values())), engine_indexes=[0])

    # -- one run -----------------------------------------------------------------------

    def run(self, config: Config, variant: str) -> Run:
        from _scheduler import build_scheduler, fake_runner_output, make_request
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from otel_vllm_kv import VLLMKVCacheInstrumentor
        from otel_vllm_kv.admission_records import TRACE_HEADER_KEY

        args = self.args
        result = Run(config.name, variant)
        instrumentor = reader = provider = None
        if variant == "ours":
            reader = InMemoryMetricReader()
            provider = MeterProvider(metric_readers=[reader])
            instrumentor = VLLMKVCacheInstrumentor()
            instrumentor.instrument(meter_provider=provider)
        frontend = FrontendStats() if variant == "vllm-stats" else None
        scheduler = build_scheduler(self.vllm_configs[config.name], log_stats=variant == "vllm-stats")
        request_index = 0

        def add(count: int) -> None:
            nonlocal request_index
            for _ in range(count):
                request = make_request(scheduler, config.prompt_length(request_index), config.max_tokens)
                request_index += 1
                scheduler.add_request(request)
                if frontend is not None:
                    frontend.add(request)

        add(config.running)
        perf = time.perf_counter_ns
        total_steps = args.warmup + args.steps
        gc.collect()
        gc.disable()
        try:
            for step in range(total_steps):
                if config.arrivals:
                    add(config.arrivals)
                t0 = perf()
                scheduler_output = scheduler.schedule()
                t1 = perf()
                runner_output = fake_runner_output(scheduler_output)
                t2 = perf()
                engine_core_outputs = scheduler.update_from_output(scheduler_output, runner_output)
                t3 = perf()

                admitted = len(scheduler_output.scheduled_new_reqs)
                result.admissions += admitted
                result.scheduled_tokens += scheduler_output.total_num_scheduled_tokens
                result.preemptions += len(scheduler_output.preempted_req_ids or ())
                for outputs in engine_core_outputs.values():
                    for output in outputs.outputs:
                        if output.trace_headers and TRACE_HEADER_KEY in output.trace_headers:
                            result.relay_outputs += 1
                if step >= args.warmup:
                    result.step_ns.append((t1 - t0) + (t3 - t2))
                    result.admissions_measured += admitted
                    result.running_measured.append(len(scheduler.running))

                if frontend is not None:
                    check(any(o.scheduler_stats is not None for o in engine_core_outputs.values()),
                          "log_stats=True: the scheduler attaches SchedulerStats to every step")
                    for outputs in engine_core_outputs.values():
                        t4 = perf()
                        iteration_stats = frontend.iteration_stats(outputs)
                        t5 = perf()
                        self.prometheus.record(outputs.scheduler_stats, iteration_stats, None, 0)
                        t6 = perf()
                        if step >= args.warmup:
                            result.frontend_stats_ns.append(t5 - t4)
                            result.prometheus_record_ns.append(t6 - t5)
                if reader is not None and (step % args.collect_every == 0 or step == total_steps - 1):
                    t7 = perf()
                    data = reader.get_metrics_data()
                    t8 = perf()
                    result.collect_ns.append(t8 - t7)
                    self._check_gauges(data, scheduler, config)
                    result.collections += 1
        finally:
            gc.enable()
            scheduler.shutdown()
            if instrumentor is not None:
                instrumentor.uninstrument()
                provider.shutdown()
        return result

    @staticmethod
    def _check_gauges(data, scheduler, config: Config) -> None:
        from otel_vllm_kv.exporter.gauges import KV_CACHE_LIMIT, KV_CACHE_STATE, KV_CACHE_USAGE

        values: dict[str, float] = {}
        for resource_metrics in data.resource_metrics if data else ():
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    for point in metric.data.data_points:
                        if metric.name == KV_CACHE_USAGE:
                            values[point.attributes[KV_CACHE_STATE]] = point.value
                        elif metric.name == KV_CACHE_LIMIT:
                            values["limit"] = point.value
        check(set(values) == {"used", "free", "limit"},
              f"{config.name}: the instrumented run reported no gauges (got {sorted(values)})")
        pool = scheduler.kv_cache_manager.block_pool
        limit = (pool.num_gpu_blocks - 1) * BLOCK_SIZE
        free = pool.get_num_free_blocks() * BLOCK_SIZE
        check(values["limit"] == limit and values["used"] + values["free"] == limit,
              f"{config.name}: gauges {values} inconsistent with limit {limit}")
        check(values["free"] == free, f"{config.name}: gauge free {values['free']} != pool's {free} tokens")

    # -- all runs ----------------------------------------------------------------------

    def run_all(self) -> dict[str, list[dict[str, Run]]]:
        rounds: dict[str, list[dict[str, Run]]] = {config.name: [] for config in self.configs}
        if not self.args.smoke:  # one discarded round: first-run effects (imports, caches, allocator)
            for config in self.configs:
                for variant in VARIANTS:
                    self.run(config, variant)
            print("warm-up round done", file=sys.stderr, flush=True)
        for round_index in range(self.args.pairs):
            for config in self.configs:
                order = VARIANTS[round_index % 3:] + VARIANTS[:round_index % 3]
                runs = {variant: self.run(config, variant) for variant in order}
                self._check_round(config, runs)
                rounds[config.name].append(runs)
            print(f"round {round_index + 1}/{self.args.pairs} done", file=sys.stderr, flush=True)
        return rounds

    def _check_round(self, config: Config, runs: dict[str, Run]) -> None:
        plain = runs["plain"]
        for variant, run in runs.items():
            check((run.scheduled_tokens, run.admissions) == (plain.scheduled_tokens, plain.admissions),
                  f"{config.name}: {variant} scheduled {run.scheduled_tokens} tokens / {run.admissions} admissions, "
                  f"plain {plain.scheduled_tokens} / {plain.admissions}: the workloads differ")
            check(run.preemptions == 0, f"{config.name}: {variant} preempted {run.preemptions} requests")
            check(len(run.step_ns) == self.args.steps, f"{config.name}: {variant} measured {len(run.step_ns)} steps")
            if variant != "ours":
                check(run.relay_outputs == 0, f"{config.name}: uninstrumented {variant} carried admission records")
        ours = runs["ours"]
        check(ours.collections > 0, f"{config.name}: no collection in the instrumented run")
        check(ours.relay_outputs == ours.admissions,
              f"{config.name}: {ours.admissions} admissions but {ours.relay_outputs} outputs carried a record")
        if config.running:
            check(ours.admissions == config.running and min(plain.running_measured) == config.running,
                  f"{config.name}: expected {config.running} requests running throughout")
        else:
            check(plain.admissions_measured >= self.args.steps * config.arrivals * 0.9,
                  f"{config.name}: only {plain.admissions_measured} admissions in {self.args.steps} steps")


def hook_microbenchmark(model_dir: str, calls: int) -> list[list[str]]:
    """The probe's hooks in tight loops, plain vs instrumented: noise-resistant ns per step / per admission.

    * per step: ``Scheduler.make_stats()`` with stats off (what every step calls), the
      free-block count unchanged; plus the relay write done when it changed;
    * per admission: what the scheduler calls on the manager for each request it admits,
      ``record_prefix_cache_stats(request, 0)`` then ``get_blocks(id)`` twice (the second
      through ``get_block_ids`` when it builds the step's output), on fresh WAITING requests;
    * the evictable prefix-cache count's block-pool hooks: a request's life in the pool,
      ``get_new_blocks(8)`` then ``free_blocks(reversed(blocks))``; and a prefix hit on 8
      cached blocks, ``touch`` then ``free_blocks`` (they become evictable again).
    """
    from _scheduler import build_scheduler, build_vllm_config, fake_runner_output, make_request
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from otel_vllm_kv import VLLMKVCacheInstrumentor
    from otel_vllm_kv.engine import probe

    vllm_config = build_vllm_config(model_dir, num_blocks=64, block_size=BLOCK_SIZE, max_num_seqs=16,
                                    max_num_batched_tokens=4096)
    admissions = max(calls // 10, 20)

    def per_call(function) -> float:
        best = float("inf")
        for _ in range(5):
            gc.disable()
            start = time.perf_counter_ns()
            for _ in range(calls):
                function()
            best = min(best, (time.perf_counter_ns() - start) / calls)
            gc.enable()
        return best

    def per_admission(instrumented: bool) -> float:
        from otel_vllm_kv.admission_records import TRACE_HEADER_KEY

        best = float("inf")
        for _ in range(5):
            scheduler = build_scheduler(vllm_config, log_stats=False)
            requests = [make_request(scheduler, 20, 4) for _ in range(admissions)]
            for request in requests:
                scheduler.add_request(request)
            manager = scheduler.kv_cache_manager
            record_prefix_cache_stats, get_blocks = manager.record_prefix_cache_stats, manager.get_blocks
            gc.disable()
            start = time.perf_counter_ns()
            for request in requests:
                record_prefix_cache_stats(request, 0)
                get_blocks(request.request_id)
                get_blocks(request.request_id)
            best = min(best, (time.perf_counter_ns() - start) / admissions)
            gc.enable()
            recorded = sum(bool(request.trace_headers) and TRACE_HEADER_KEY in request.trace_headers for request in requests)
            check(recorded == (admissions if instrumented else 0),
                  f"admission microbenchmark: {recorded} of {admissions} requests got a record")
            scheduler.shutdown()
        return best

    def pool_cycles() -> tuple[float, float, float]:
        """ns per allocate-and-free of 1 and of 8 new blocks, and per touch-and-free of 8 cached ones."""
        scheduler = build_scheduler(vllm_config, log_stats=False)
        scheduler.add_request(make_request(scheduler, 8 * BLOCK_SIZE + 1, 1))
        while scheduler.has_requests():
            scheduler.update_from_output(*fake_step(scheduler))
        pool = scheduler.kv_cache_manager.block_pool
        cached = [block for block in pool.free_block_queue.get_all_free_blocks() if block.block_hash is not None]
        check(len(cached) == 8, f"pool microbenchmark: {len(cached)} cached blocks, expected 8")

        def allocate_and_free_one() -> None:  # a decoding request crossing into a new block
            pool.free_blocks(reversed(pool.get_new_blocks(1)))

        def allocate_and_free() -> None:
            pool.free_blocks(reversed(pool.get_new_blocks(8)))

        def hit_and_free() -> None:
            pool.touch(cached)
            pool.free_blocks(reversed(cached))

        # Allocation takes uncached blocks from the front of the queue; the cached ones stay at the tail.
        results = (per_call(allocate_and_free_one) - base, per_call(allocate_and_free) - base,
                   per_call(hit_and_free) - base)
        check(all(block.block_hash is not None and block.ref_cnt == 0 for block in cached),
              "pool microbenchmark: the cached blocks must stay cached and free")
        scheduler.shutdown()
        return results

    def fake_step(scheduler):
        output = scheduler.schedule()
        return output, fake_runner_output(output)

    def loop_overhead() -> None:
        pass

    base = per_call(loop_overhead)
    scheduler = build_scheduler(vllm_config, log_stats=False)
    plain_step = per_call(scheduler.make_stats) - base
    scheduler.shutdown()
    plain_admission = per_admission(False)
    plain_pool = pool_cycles()

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    instrumentor = VLLMKVCacheInstrumentor()
    instrumentor.instrument(meter_provider=provider)
    try:
        scheduler = build_scheduler(vllm_config, log_stats=False)
        ours_step = per_call(scheduler.make_stats) - base
        writer = probe.registry.probe(scheduler)._writer
        write = per_call(lambda: writer.write(5, [0])) - base
        scheduler.shutdown()
        ours_admission = per_admission(True)
        ours_pool = pool_cycles()
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
    return [
        ["per step: `Scheduler.make_stats()` (stats off), free blocks unchanged",
         f"{plain_step:.0f}", f"{ours_step:.0f}", f"{ours_step - plain_step:+.0f}"],
        ["per step, when free blocks changed: relay write (seqlock record in the mmap)", "0", f"{write:.0f}",
         f"{write:+.0f}"],
        ["per admission: `record_prefix_cache_stats` + 2 x `get_blocks`",
         f"{plain_admission:.0f}", f"{ours_admission:.0f}", f"{ours_admission - plain_admission:+.0f}"],
        *(
            [f"evictable count: {what}", f"{plain:.0f}", f"{ours:.0f}", f"{ours - plain:+.0f}"]
            for what, plain, ours in zip(
                ("`get_new_blocks(1)` + `free_blocks` (1 uncached block)",
                 "`get_new_blocks(8)` + `free_blocks` (8 uncached blocks)",
                 "prefix hit, `touch` + `free_blocks` (8 cached blocks)"),
                plain_pool, ours_pool,
            )
        ),
    ]


def summarise(bench: Bench, rounds: dict[str, list[dict[str, Run]]]) -> tuple[list, list]:
    main_rows, stats_rows = [], []
    for config in bench.configs:
        per_round = rounds[config.name]
        medians = {v: [median(r[v].step_ns) / 1000 for r in per_round] for v in VARIANTS}
        ratios = [o / p for o, p in zip(medians["ours"], medians["plain"])]
        added = [o - p for o, p in zip(medians["ours"], medians["plain"])]
        admissions_per_step = median(r["plain"].admissions_measured / len(r["plain"].step_ns) for r in per_round)
        running = median(median(r["plain"].running_measured) for r in per_round)
        collect = median(ns / 1000 for r in per_round for ns in r["ours"].collect_ns)
        added_per_admission = (median(added) / admissions_per_step) if admissions_per_step else None
        main_rows.append([
            config.name, f"{running:.0f}", f"{admissions_per_step:.1f}",
            f"{median(medians['plain']):.1f}", f"{median(medians['ours']):.1f}",
            f"{median(ratios):.4f}", f"{min(ratios):.4f}..{max(ratios):.4f}",
            f"{median(added):+.2f}",
            f"{added_per_admission:+.2f}" if added_per_admission is not None else "n/a",
            f"{collect:.0f}",
        ])
        engine_stats = median(s - p for s, p in zip(medians["vllm-stats"], medians["plain"]))
        frontend = median(ns / 1000 for r in per_round for ns in r["vllm-stats"].frontend_stats_ns)
        record = median(ns / 1000 for r in per_round for ns in r["vllm-stats"].prometheus_record_ns)
        vllm_total = engine_stats + frontend + record
        stats_rows.append([
            config.name, f"{median(medians['vllm-stats']):.1f}",
            f"{median(s / p for s, p in zip(medians['vllm-stats'], medians['plain'])):.4f}",
            f"{engine_stats:+.1f}", f"{frontend:.1f}", f"{record:.1f}", f"{vllm_total:.1f}",
            f"{median(added):+.2f}",
            f"{100 * median(added) / vllm_total:.1f}%" if vllm_total > 0 else "n/a",
        ])
    return main_rows, stats_rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Per-step cost of otel-vllm-kv on a real vLLM scheduler (no model), "
        "interleaved with plain runs, beside vLLM's own statistics path. Prints markdown tables.",
        epilog="Exact command: .venv/bin/python benchmarks/scheduler_step.py [--smoke]",
    )
    parser.add_argument("--pairs", type=int, default=5, help="rounds of (plain, ours, vllm-stats) runs (default 5)")
    parser.add_argument("--steps", type=int, default=400, help="measured steps per run (default 400)")
    parser.add_argument("--warmup", type=int, default=50, help="steps discarded at the start of a run (default 50)")
    parser.add_argument("--batch-sizes", type=lambda text: [int(x) for x in text.split(",")], default=[16, 64, 256],
                        help="running requests in the decode configurations (default 16,64,256)")
    parser.add_argument("--arrivals", type=int, default=16,
                        help="admission phase: new requests before every step (default 16)")
    parser.add_argument("--admission-max-tokens", type=int, default=4,
                        help="admission phase: tokens each request generates (default 4)")
    parser.add_argument("--collect-every", type=int, default=50,
                        help="instrumented runs: collect the metric reader every N steps (default 50)")
    parser.add_argument("--micro-calls", type=int, default=20000, help="calls per tight-loop measurement")
    parser.add_argument("--cpu", type=int, help="pin this process to one CPU (os.sched_setaffinity) for steadier timings")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, 1 round: checks that everything works (exit 1 if a check fails), "
                        "timings are meaningless")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pairs, args.steps, args.warmup, args.collect_every, args.micro_calls = 1, 20, 5, 7, 200
        args.batch_sizes, args.arrivals = [16, 64], 8
    if args.pairs < 1 or args.steps < 1 or args.warmup < 0 or args.collect_every < 1:
        parser.error("--pairs, --steps and --collect-every must be positive, --warmup not negative")
    if args.warmup < args.admission_max_tokens + 1:
        parser.error("--warmup must exceed --admission-max-tokens so the admission phase is in steady state")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # This process must own the relay (export): forget an owner inherited from a parent that instrumented.
    for name in [name for name in os.environ if name.startswith("OTEL_PYTHON_VLLM_KV_")]:
        del os.environ[name]
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    print_header(
        "otel-vllm-kv: scheduler step cost" + (" (SMOKE: sizes too small for timing)" if args.smoke else ""),
        command_line(),
        {"pairs": args.pairs, "steps": args.steps, "warmup": args.warmup, "batch sizes": args.batch_sizes,
         "arrivals/step": args.arrivals, "admission max_tokens": args.admission_max_tokens,
         "block size": BLOCK_SIZE, "collect every": args.collect_every,
         "pinned to CPU": "no" if args.cpu is None else args.cpu},
    )
    started = time.monotonic()
    try:
        bench = Bench(args)
        rounds = bench.run_all()
        micro = hook_microbenchmark(bench.model_dir, args.micro_calls)
    except SanityError as error:
        print(f"SANITY CHECK FAILED: {error}")
        return 1
    main_rows, stats_rows = summarise(bench, rounds)
    print("## Step time, plain vs instrumented (µs per `schedule()` + `update_from_output()`)")
    print()
    print(markdown_table(
        ["config", "running", "admitted/step", "plain µs", "ours µs", "ratio ours/plain (median)",
         "ratio range", "added µs/step", "added µs/admission", "collect µs"],
        main_rows,
    ))
    print()
    print("Medians over steps per run; ratio and added µs: median over rounds of the per-round values. "
          "added µs/admission = added µs/step ÷ admissions/step (all of the added cost charged to admissions). "
          "collect µs: one `InMemoryMetricReader` collection (between steps, not in the step time; in a "
          "multiprocess engine it runs in the frontend process). Target: ratio <= 1.02 at every batch size.")
    print()
    print("## vLLM's own statistics path, for reference (µs per step)")
    print()
    print(markdown_table(
        ["config", "log_stats=True µs", "ratio stats/plain", "scheduler stats µs", "IterationStats µs",
         "Prometheus record µs", "vLLM stats total µs", "ours added µs", "ours / vLLM stats"],
        stats_rows,
    ))
    print()
    print("scheduler stats: step time with `log_stats=True` minus plain (engine core). IterationStats: vLLM's "
          "frontend statistics of the step (`IterationStats.update_from_output` / `update_from_finished_request` "
          "per output). Prometheus record: `PrometheusStatLogger.record(scheduler_stats, iteration_stats)`. "
          "Target: ours a small fraction of vLLM's own statistics path.")
    print()
    print("## The probe's hooks in tight loops (ns per call, best of 5)")
    print()
    print(markdown_table(["hook", "plain ns", "ours ns", "added ns"], micro))
    print()
    print(f"All sanity checks passed. Wall time {time.monotonic() - started:.0f} s.")
    if args.smoke:
        print("SMOKE RUN: sizes are too small for the timings to mean anything.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
