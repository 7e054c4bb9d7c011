"""The tables of ``instructions.py``, from the counted intervals of its processes.

Figures are marginal instructions per unit: ``(large - small) / (large units - small units)``.
vLLM's own figure for a step takes out the synthetic ``ModelRunnerOutput`` (the ``harness``
workloads); a preemption's is the preemption unit minus a plain decode step of 16.
"""

from __future__ import annotations

import statistics

import _callgrind
from _common import markdown_table

#: Rows of the main table: (workload, unit, baseline, units per figure). A ``harness`` baseline
#: (the synthetic model output) is taken out of vLLM's figure only; a workload baseline (the
#: decode step inside a preemption unit) out of both vLLM's figure and the added one.
ROWS = (
    ("decode 16", "decode step, 16 running", "harness 16", 1),
    ("decode 64", "decode step, 64 running", "harness 64", 1),
    ("decode 256", "decode step, 256 running", "harness 256", 1),
    ("decode 16 (stats on)", "decode step, 16 running, stats on", "harness 16", 1),
    ("admission", "admitted request (4 per step, 1 output token)", None, 4),
    ("admission with prefix hits", "admitted request, 48 of 64 prompt tokens cached", None, 4),
    ("preemption + resumption", "preemption with its resumption", "decode 16", 1),
)


def _marginals(results: list[dict], variant: str, name: str, units: dict) -> list[float]:
    small, large = units[name]
    return [(r["counts"][f"{name}|large"] - r["counts"][f"{name}|small"]) / (large - small)
            for r in results if r["variant"] == variant and f"{name}|large" in r["counts"]]


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return "n/a"
    mean = statistics.fmean(values)
    return f"{(max(values) - min(values)) / abs(mean) * 100:.4f}%" if mean else "0"


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _number(value: float) -> str:
    return f"{value:,.0f}"


def cost_table(results: list[dict], units: dict) -> str:
    results = [r for r in results if r.get("ballast", 0) == 0]  # identical repeats: the spread is determinism
    rows = []
    for name, unit, baseline, per in ROWS:
        plain, ours = _marginals(results, "plain", name, units), _marginals(results, "ours", name, units)
        if not plain or not ours:
            continue
        base_plain = _mean(_marginals(results, "plain", baseline, units)) if baseline else 0.0
        base_ours_added = 0.0  # the harness is the same code in both variants
        if baseline and not baseline.startswith("harness"):
            base_ours_added = _mean(_marginals(results, "ours", baseline, units)) - base_plain
        vllm = (statistics.fmean(plain) - base_plain) / per
        added = (statistics.fmean(ours) - statistics.fmean(plain) - base_ours_added) / per
        rows.append([unit, _number(vllm), _number(added), f"{added / vllm * 100:+.3f}%",
                     _spread(plain), _spread(ours)])
    collection_plain = _marginals(results, "plain", "collection", units)
    collection_ours = _marginals(results, "ours", "collection", units)
    if collection_plain and collection_ours:
        added = statistics.fmean(collection_ours) - statistics.fmean(collection_plain)
        rows.append(["metric collection (exporter process; plain: the SDK with no instrument)",
                     _number(statistics.fmean(collection_plain)), _number(added), "n/a",
                     _spread(collection_plain), _spread(collection_ours)])
    return markdown_table(
        ["per", "vLLM's own instructions", "added by otel-vllm-kv", "ratio - 1", "repeat spread plain",
         "repeat spread ours"], rows)


def toggle_table(results: list[dict], units: dict) -> str:
    """Blocks on one live scheduler. Its requests grow through the run (so does vLLM's step), so each
    block is compared with the mean of its neighbours of the other kind, not with a fresh scheduler."""
    toggles = [r for r in results if r["variant"] == "toggle"]
    if not toggles:
        return ""
    small, large = units["toggle"]
    phases = [label.split("|")[0] for label in toggles[0]["counts"] if label.endswith("|large")]
    per_step = {phase: [(r["counts"][f"{phase}|large"] - r["counts"][f"{phase}|small"]) / (large - small)
                        for r in toggles] for phase in phases}
    rows = []
    for index, phase in enumerate(phases):
        neighbours = [_mean(per_step[phases[i]]) for i in (index - 1, index + 1) if 0 <= i < len(phases)]
        rows.append([phase, _number(_mean(per_step[phase])),
                     f"{(_mean(per_step[phase]) / _mean(neighbours) - 1) * 100:+.3f}%", _spread(per_step[phase])])
    return markdown_table(["block on one live scheduler", "instructions per decode step (16 running)",
                           "vs the mean of its neighbouring blocks", "repeat spread"], rows)


def profile_table(results: list[dict], name: str, units: dict, per: int = 1, top: int = 12) -> str:
    """Where our instructions go: self cost per function, ours minus plain, per unit (first repeat)."""
    def per_function(variant: str) -> dict[str, float]:
        result = next(r for r in results if r["variant"] == variant and f"{name}|large" in r["counts"])
        small, large = (_callgrind.self_cost_by_function(_callgrind.dump_for(result["out_file"], result["marks"],
                                                                             f"{name}|{size}"))
                        for size in ("small", "large"))
        span = (units[name][1] - units[name][0]) * per
        return {function: (large.get(function, 0) - small.get(function, 0)) / span
                for function in set(small) | set(large)}

    plain, ours = per_function("plain"), per_function("ours")
    deltas = {function: ours.get(function, 0.0) - plain.get(function, 0.0) for function in set(plain) | set(ours)}
    total = sum(deltas.values())
    rows = [[function, _number(delta), f"{delta / total * 100:.1f}%" if total else "n/a"]
            for function, delta in sorted(deltas.items(), key=lambda item: -item[1])[:top]]
    return markdown_table(["function (C level; Python code runs in _PyEval_EvalFrameDefault)",
                           "added instructions per unit", "share of the added"], rows)


def layout_table(results: list[dict], units: dict) -> str:
    """Each figure over every memory layout run: mean, spread, and the added cost with its standard error."""
    rows = []
    for name, unit, baseline, per in ROWS:
        by_variant = {}
        for variant in ("plain", "ours"):
            values = {}
            for r in results:
                if r["variant"] == variant and f"{name}|large" in r.get("counts", {}):
                    values.setdefault(r.get("ballast", 0), _marginals([r], variant, name, units)[0])
            by_variant[variant] = list(values.values())
        plain, ours = by_variant["plain"], by_variant["ours"]
        if len(plain) < 2 or len(ours) < 2:
            continue
        error = (statistics.variance(plain) / len(plain) + statistics.variance(ours) / len(ours)) ** 0.5
        added = _mean(ours) - _mean(plain)
        rows.append([unit, str(len(plain)), _number(_mean(plain) / per), _spread(plain), _spread(ours),
                     f"{_number(added / per)} ± {_number(error / per)}",
                     f"{added / _mean(plain) * 100:+.3f}% ± {error / _mean(plain) * 100:.3f}%"])
    if not rows:
        return ""
    return markdown_table(["per (synthetic output included)", "layouts", "plain", "layout spread plain",
                           "layout spread ours", "added (mean ± standard error)", "added / plain"], rows)


def calls_table(results: list[dict]) -> str:
    """Our Python functions called per unit: the same at 16, 64 and 256 running means nothing per request."""
    counted = next((r["calls"] for r in results if r["variant"] == "calls"), None)
    if not counted:
        return ""
    workloads = [name for name, *_ in ROWS if name in counted] + [n for n in ("collection",) if n in counted]
    functions = sorted({function for name in workloads for function in counted[name]})
    rows = [[function, *(f"{counted[name].get(function, 0):.2f}" for name in workloads)] for function in functions]
    rows.append(["all", *(f"{sum(counted[name].values()):.2f}" for name in workloads)])
    return markdown_table(["function of otel_vllm_kv (calls per unit)", *workloads], rows)


def engine_table(results: list[dict], units: dict) -> str:
    plain = _marginals(results, "plain", "engine", units)
    ours = _marginals(results, "ours", "engine", units)
    if not plain or not ours:
        return ""
    engine = next(r for r in results if r["variant"] == "ours" and "tokens" in r)
    tokens = sum(len(request) for batch in engine["tokens"] for request in batch)
    requests = sum(len(batch) for batch in engine["tokens"])
    return markdown_table(
        ["per request (in-process LLM, 48 prompt + 32 output tokens)", "plain", "ours", "added", "ratio"],
        [["instructions", _number(_mean(plain)), _number(_mean(ours)), _number(_mean(ours) - _mean(plain)),
          f"{_mean(ours) / _mean(plain):.5f}"]]) + (
        f"\n\n{requests} requests, {tokens} output tokens, identical in both variants; every request's "
        "admission annotated on its span in ours.")


def report(results: list[dict], units: dict) -> str:
    parts = ["## Instructions per unit (marginal)", "", cost_table(results, units), "",
             "vLLM's own: plain, minus the synthetic model output (harness) for steps, minus a plain decode step "
             "for a preemption. ratio - 1: added / vLLM's own. repeat spread: (max - min) / mean of the "
             "marginal figure over the processes of each variant."]
    layout = layout_table(results, units)
    if layout:
        parts += ["", "## Over memory layouts (0, 30,000, 60,000, ... objects allocated first)", "", layout]
    engine = engine_table(results, units)
    if engine:
        parts += ["", "## End to end: a whole in-process LLM run", "", engine]
    calls = calls_table(results)
    if calls:
        parts += ["", "## Our Python functions called per unit (sys.setprofile, instrumented run)", "", calls]
    toggles = toggle_table(results, units)
    if toggles:
        parts += ["", "## Instrumenting and uninstrumenting a live scheduler", "", toggles]
    for name, per in (("decode 16", 1), ("admission", 4)):
        if any(f"{name}|large" in r["counts"] for r in results if r["variant"] == "ours"):
            parts += ["", f"## Where the added instructions go: {name} (per {'admitted request' if per > 1 else 'step'})",
                      "", profile_table(results, name, units, per)]
    return "\n".join(parts)
