"""What the instrumentation costs the engine, in instructions: deterministic, so a repeated run gives the same figure.

Command (from the repository root; run times in benchmarks/README.md)::

    .venv/bin/python -m benchmarks.instructions           # the tables of docs/benchmarks.md
    .venv/bin/python -m benchmarks.instructions --smoke   # sanity only, no valgrind

Each variant runs in its own process under ``valgrind --tool=callgrind`` with
``PYTHONHASHSEED=0`` and the garbage collector off while counting (``_callgrind``):

* ``plain``: vLLM, not instrumented;
* ``ours``: ``VLLMKVCacheInstrumentor().instrument(meter_provider=...)`` before any
  scheduler is built (as in an engine core, where the probe attaches at ``Scheduler.__init__``),
  with the default settings (residency off);
* ``residency``: the same with ``OTEL_PYTHON_VLLM_KV_RESIDENCY=true``;
* ``toggle``: one live scheduler, instrumented and uninstrumented in turn (what a user
  toggling instrumentation runs): plain, ours, plain, ours, plain blocks on it.

Every workload (``_workloads``: real ``Scheduler`` and ``KVCacheManager``, no model) runs a
small and a large number of units in two counted intervals; the figure per unit is the
**marginal** ``(large - small) / (large units - small units)``, so set-up and interval
edges cancel. Each variant runs ``--repeat`` times (default 2) to show the figures repeat,
and ``--layouts`` more times with objects allocated first (other memory layouts).

Reported (``_instruction_report``): per decode step at 16 / 64 / 256 running (stats off, as
``LLM`` runs; and 16 with stats on, as ``vllm serve`` runs), per admitted request (with and
without prefix-cache hits; traced, as a frontend that annotates its span submits it, and
untraced), per request of 128 output tokens whole (its admission, every step it runs in, its
finish), per preemption with its resumption, per metric collection, and in the frontend per
step of outputs, per one-token request (traced and untraced) and per 128-token request whole:
vLLM's own figure (the synthetic model output taken out), the added one, the ratio and the
cost budget; a whole in-process ``LLM`` run; the toggled scheduler. ``--keep`` keeps the
callgrind dumps, where ``callgrind_annotate`` shows where the instructions go.

Sanity checks (any failure exits non-zero, in smoke mode too): every variant schedules
the same tokens, admits the same requests with the same prefix hits and preempts the same;
the instrumented runs deliver exactly one record-carrying output per admission and
resumption and report gauges (untraced workloads: none); plain runs carry none. Counts are never
checked in smoke mode.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile

from benchmarks import _callgrind, _instruction_report
from benchmarks._common import (
    ROOT,
    SanityError,
    check,
    command_line,
    exit_with,
    module_command,
    print_header,
    tiny_model_dir,
)

MODULE = "benchmarks.instructions"

VARIANTS = ("plain", "ours", "residency")
#: The instrumented variants, and the settings each adds to the environment.
INSTRUMENTED = {"ours": {}, "residency": {"OTEL_PYTHON_VLLM_KV_RESIDENCY": "true"}}
#: Units in the small and the large interval of each workload (the full run).
UNITS = {
    "decode 16": (200, 600),
    "decode 64": (100, 300),
    "decode 256": (25, 75),
    "decode 16 (stats on)": (200, 600),
    "admission": (100, 300),
    "admission with prefix hits": (100, 300),
    "admission untraced": (100, 300),
    "admission with prefix hits untraced": (100, 300),
    "admission 512 untraced": (50, 150),
    "request 128": (2, 6),
    "request 128 with prefix hits": (2, 6),
    "preemption + resumption": (100, 300),
    "collection": (100, 300),
    "frontend decode 16": (200, 600),
    "frontend request": (100, 300),
    "frontend request untraced": (100, 300),
    "frontend request 128": (2, 6),
    "holders pass 16": (100, 300),
    "holders pass 256": (10, 30),
    "harness 16": (200, 600),
    "harness 64": (100, 300),
    "harness 256": (25, 75),
}
#: Workloads whose requests outlive the step of their admission: with residency, a second record-carrying output each.
WHOLE_REQUESTS = ("request 128", "request 128 with prefix hits", "frontend request 128")
#: Requests in the small and the large batch of the end-to-end ``LLM`` run.
ENGINE_UNITS = (8, 24)
SMOKE_UNITS = (3, 6)
TOGGLE_PHASES = ("plain", "ours", "plain", "ours", "plain")
#: Objects allocated first by the ``--layouts`` runs (times 1, 2, ...): every later object of
#: vLLM and of ours sits at other addresses, which moves some counts (allocator, hash tables).
LAYOUT_BALLAST = 30_000
TOGGLE_UNITS = (60, 180)


# -- the measured process -------------------------------------------------------------------


class Instrumentation:
    """Instrument and uninstrument this process, with an in-memory reader for the gauges."""

    def __init__(self) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from otel_vllm_kv import VLLMKVCacheInstrumentor

        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.instrumentor = VLLMKVCacheInstrumentor()

    def on(self) -> None:
        self.instrumentor.instrument(meter_provider=self.provider)

    def off(self) -> None:
        self.instrumentor.uninstrument()


def counted(workload, label: str, units: tuple[int, int]) -> None:
    """The workload's two counted intervals, ``label|small`` and ``label|large``."""
    gc.collect()
    gc.disable()
    for size, count in zip(("small", "large"), units):
        _callgrind.mark(f"{label}|{size}")
        for _ in range(count):
            workload.unit()
    _callgrind.mark(f"{label}|after")
    gc.enable()


def child(spec: dict) -> dict:
    from benchmarks import _workloads
    from otel_vllm_kv.engine import holders

    variant, units = spec["variant"], spec["units"]
    if spec.get("engine"):
        from benchmarks import _engine_run

        return _engine_run.run(spec)
    instrumentation = Instrumentation()
    tallies = {}
    if variant == "toggle":
        workload = _workloads.Decode(spec["model_dir"], 16, len(TOGGLE_PHASES) * (2 + sum(TOGGLE_UNITS)))
        for index, phase in enumerate(TOGGLE_PHASES):
            if index:
                instrumentation.on() if phase == "ours" else instrumentation.off()
            workload.unit()  # two uncounted steps after each switch
            workload.unit()
            counted(workload, f"{index + 1}. {phase}", units["toggle"])
        workload.close()
        tallies["toggle"] = vars(workload.tally)
    else:
        if variant in INSTRUMENTED:
            instrumentation.on()
            # The pass runs once a second of wall clock, a few steps under valgrind: the ``holders pass``
            # workloads count it alone, and no other figure includes it.
            holders.PASS_INTERVAL_SECONDS = math.inf
        ballast = [object() for _ in range(spec.get("ballast", 0))]  # see --layouts
        for name in spec["workloads"]:
            workload = _workloads.build(name, spec["model_dir"], sum(units[name]), instrumentation.reader)
            counted(workload, name, units[name])
            workload.close()
            tallies[name] = vars(workload.tally) | {"points": getattr(workload, "points", 0)}
        del ballast
    _callgrind.mark("exit")
    return {"variant": variant, "marks": _callgrind.labels(), "tallies": tallies, "ballast": spec.get("ballast", 0)}


# -- the parent ---------------------------------------------------------------------------


def run_variant(variant: str, spec: dict, directory: str, under_valgrind: bool, repeat: int) -> dict:
    """Start the measured process (under callgrind unless smoke); return its result and counts."""
    out_file = os.path.join(directory, f"callgrind.{variant}.{repeat}")
    command = module_command(MODULE, "--child", json.dumps(spec | {"variant": variant}))
    if under_valgrind:
        command = _callgrind.valgrind_command(out_file) + command
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(PYTHONHASHSEED="0", OMP_NUM_THREADS="1", VLLM_LOGGING_LEVEL="WARNING", **INSTRUMENTED.get(variant, {}))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    return {"process": process, "out_file": out_file, "variant": variant, "valgrind": under_valgrind}


def finish(started: dict) -> dict:
    stdout, stderr = started["process"].communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if started["process"].returncode != 0 or not lines:
        raise SanityError(
            f"{started['variant']}: exit {started['process'].returncode}; end of stderr:\n{stderr[-3000:]}"
        )
    result = json.loads(lines[-1])
    if started["valgrind"]:
        result["counts"] = _callgrind.read_intervals(started["out_file"], result["marks"])
        result["out_file"] = started["out_file"]
    return result


def check_tallies(results: list[dict]) -> None:
    if not results:
        return
    plain = next(result for result in results if result["variant"] == "plain")["tallies"]
    for result in results:
        for name, tally in result["tallies"].items():
            check(not tally["problems"], f"{result['variant']} {name}: {'; '.join(tally['problems'])}")
            if result["variant"] == "toggle":
                continue
            same = ("scheduled_tokens", "admitted", "cached_tokens", "preempted")
            check(
                all(tally[key] == plain[name][key] for key in same),
                f"{name}: {result['variant']} did {[tally[k] for k in same]}, plain {[plain[name][k] for k in same]}",
            )
            if result["variant"] == "plain":
                check(tally["records"] == 0 and tally["points"] == 0, f"{name}: plain carried records or points")
            elif name.endswith("untraced"):
                check(tally["records"] == 0, f"{name}: {tally['records']} outputs carried records, untraced")
            else:
                # With residency, a request that finishes after the step of its admission has one output more
                # with a record: its finish (one-token requests finish in that step, on the same output).
                expected = tally["admitted"] + tally["preempted"]
                if result["variant"] == "residency" and name in WHOLE_REQUESTS:
                    expected += tally["admitted"]
                check(
                    tally["records"] == expected,
                    f"{name}: {tally['records']} outputs carried records for {tally['admitted']} admissions "
                    f"and {tally['preempted']} resumptions",
                )
                if name == "collection":
                    check(tally["points"] >= 4, f"collection: ours reported {tally['points']} points")
        for name in ("admission with prefix hits", "admission with prefix hits untraced"):
            if name in result["tallies"]:
                tally = result["tallies"][name]
                check(tally["cached_tokens"] == tally["admitted"] * 48, f"{name}: not every prompt hit 48 tokens")


def check_engine_runs(results: list[dict]) -> None:
    if not results:
        return
    plain = next(result for result in results if result["variant"] == "plain")
    ours = next(result for result in results if result["variant"] == "ours")
    check(ours["tokens"] == plain["tokens"], "end to end: the instrumented engine generated other tokens")
    check(
        plain["annotated_spans"] == 0 and plain["spans"] == ours["spans"] > 0,
        f"end to end: spans plain {plain['spans']}, ours {ours['spans']}",
    )
    requests = 4 + sum(len(batch) for batch in ours["tokens"])
    check(
        ours["annotated_spans"] == requests,
        f"end to end: {ours['annotated_spans']} admission annotations for {requests} requests",
    )


def with_baselines(workloads: list[str]) -> list[str]:
    """The workloads asked for, plus the baselines their rows subtract (``_instruction_report.ROWS``):
    a decode step without its ``harness`` would have no figure of vLLM's own; a holders pass is set
    against a decode step of as many running."""
    baselines = {row_workload: baseline for row_workload, _, baseline, _ in _instruction_report.ROWS if baseline}
    baselines |= {f"holders pass {running}": f"decode {running}" for running in (16, 256)}
    wanted = list(workloads)
    for workload in wanted:  # grows while it runs: a baseline's own baseline is added too
        baseline = baselines.get(workload)
        if baseline is not None and baseline not in wanted:
            wanted.append(baseline)
    return wanted


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.report:
        saved = [json.load(open(os.path.join(path, "results.json"), encoding="utf-8")) for path in args.report]
        results = [result for run in saved for result in run["results"]]
        print(_instruction_report.report(results, saved[0]["units"]))
        return 0
    units = {name: SMOKE_UNITS if args.smoke else UNITS[name] for name in UNITS}
    units["toggle"] = SMOKE_UNITS if args.smoke else TOGGLE_UNITS
    units["engine"] = SMOKE_UNITS if args.smoke else ENGINE_UNITS
    print_header(
        "Instructions per unit of work, plain vLLM vs instrumented (callgrind)",
        command_line(MODULE),
        {
            "repeat": args.repeat,
            "units (small, large)": "smoke" if args.smoke else json.dumps(UNITS),
            "PYTHONHASHSEED": 0,
            "gc": "off while counting",
            "block size": 16,
        },
    )
    directory = tempfile.mkdtemp(prefix="otel-vllm-kv-callgrind-")
    spec = {"model_dir": tiny_model_dir(), "workloads": with_baselines(args.workloads), "units": units}
    variants = tuple(args.variants) + (("toggle",) if args.toggle else ())
    engine_variants = ("plain", "ours")  # the end-to-end run: default settings
    jobs = [(variant, "engine", spec | {"engine": True}) for variant in engine_variants] if args.engine else []
    jobs += [(variant, repeat, spec) for repeat in range(1 if args.smoke else args.repeat) for variant in variants]
    jobs += [
        (variant, f"layout{layout}", spec | {"ballast": layout * LAYOUT_BALLAST})
        for layout in range(1, 0 if args.smoke else args.layouts + 1)
        for variant in args.variants
    ]
    results: list[dict] = []
    try:
        for start in range(0, len(jobs), args.jobs):
            batch = [
                run_variant(variant, job_spec, directory, not args.smoke, repeat)
                for variant, repeat, job_spec in jobs[start : start + args.jobs]
            ]
            results.extend(finish(started) for started in batch)
            print(f"{len(results)}/{len(jobs)} processes done", file=sys.stderr, flush=True)
        with open(os.path.join(directory, "results.json"), "w", encoding="utf-8") as handle:
            json.dump({"results": results, "units": units}, handle)
        check_tallies([result for result in results if "tallies" in result])
        check_engine_runs([result for result in results if "tokens" in result])
        if not args.smoke:
            print(_instruction_report.report(results, units))
        print("All sanity checks passed.")
    finally:
        if args.keep:
            print(f"callgrind dumps kept in {directory}", file=sys.stderr)
        else:
            for result in results:
                if "out_file" in result:
                    _callgrind.remove_dumps(result["out_file"])
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2, help="processes per variant (default 2)")
    parser.add_argument("--jobs", type=int, default=2, help="processes run at once (default 2)")
    parser.add_argument(
        "--workloads",
        type=lambda text: text.split(","),
        default=list(UNITS),
        help="comma-separated workloads (default: all): " + ", ".join(UNITS),
    )
    parser.add_argument("--no-engine", dest="engine", action="store_false", help="skip the end-to-end LLM runs")
    parser.add_argument(
        "--variants",
        type=lambda text: [v for v in text.split(",") if v],
        default=list(VARIANTS),
        help="comma-separated, of plain,ours,residency (default all; empty: none, e.g. for --engine alone)",
    )
    parser.add_argument(
        "--layouts",
        type=int,
        default=2,
        help="also run each variant with 1, 2, ... N x 30,000 objects allocated first (other "
        "memory layouts): the spread is what layout alone changes (default 2; none in smoke)",
    )
    parser.add_argument("--no-toggle", dest="toggle", action="store_false", help="skip the toggling process")
    parser.add_argument("--keep", action="store_true", help="keep the callgrind dumps (their directory is printed)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no valgrind: sanity checks only")
    parser.add_argument(
        "--report", nargs="+", metavar="DIR", help="print the tables again from kept runs' directories (--keep), merged"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_with(main)
