"""The tables of ``instructions.py``, from the counted intervals of its processes.

Figures are marginal instructions per unit: ``(large - small) / (large units - small units)``.
vLLM's own figure for a step takes out the synthetic ``ModelRunnerOutput`` (the ``harness``
workloads); a preemption's is the preemption unit minus a plain decode step of 16.
"""

from __future__ import annotations

import statistics

from benchmarks._common import markdown_table

#: Rows of the main table: (workload, unit, baseline, units per figure). A ``harness`` baseline
#: (the synthetic model output) is taken out of vLLM's figure only, as often as ``HARNESS_STEPS``
#: says a unit has steps (once unless it says); a workload baseline (the decode step inside a
#: preemption unit) out of both vLLM's figure and the added one.
ROWS = (
    ("decode 16", "decode step, 16 running", "harness 16", 1),
    ("decode 64", "decode step, 64 running", "harness 64", 1),
    ("decode 256", "decode step, 256 running", "harness 256", 1),
    ("decode 16 (stats on)", "decode step, 16 running, vLLM's statistics on", "harness 16", 1),
    ("admission", "admitted request (4 per step, 1 output token), traced", None, 4),
    ("admission with prefix hits", "admitted request, 48 of 64 prompt tokens cached, traced", None, 4),
    ("admission untraced", "admitted request (4 per step, 1 output token), untraced", None, 4),
    ("admission with prefix hits untraced", "admitted request, 48 of 64 prompt tokens cached, untraced", None, 4),
    ("admission 512 untraced", "admitted request of 512 prompt tokens (4 per step, 1 output token), untraced", None, 4),
    ("request 128", "a request of 128 output tokens, whole (16 at a time), traced", "harness 16", 16),
    (
        "request 128 with prefix hits",
        "a request of 128 output tokens, whole, 48 of 64 prompt tokens cached, traced",
        "harness 16",
        16,
    ),
    ("preemption + resumption", "preemption with its resumption", "decode 16", 1),
    ("frontend decode 16", "frontend: one step's outputs of 16 decoding requests", None, 1),
    ("frontend request", "frontend: a request submitted, admitted, finished (4 per step), traced", None, 4),
    ("frontend request untraced", "frontend: the same, untraced", None, 4),
    ("frontend request 128", "frontend: a request of 128 output tokens, whole (16 at a time)", None, 16),
)
#: The cost budget: at most this much added, in percent of vLLM's own instructions. A request's is held
#: over its whole life (128 output tokens, the length ``vllm bench serve`` asks for by default).
BUDGETS = {
    "decode 16": 1.0,
    "decode 16 (stats on)": 1.0,
    "request 128": 3.0,
    "request 128 with prefix hits": 3.0,
    "frontend decode 16": 1.0,
    "frontend request 128": 3.0,
}
#: Requests of one output token: every fixed cost of a request and none of vLLM's decode steps to set it
#: against, the worst case; reported against the request budget, not held to it.
WORST_CASES = (
    "admission",
    "admission with prefix hits",
    "admission untraced",
    "admission with prefix hits untraced",
    "admission 512 untraced",
    "frontend request",
    "frontend request untraced",
)
REQUEST_BUDGET = BUDGETS["request 128"]
#: Steps in one unit of a workload whose ``harness`` baseline is one step's synthetic output.
HARNESS_STEPS = {"request 128": 128, "request 128 with prefix hits": 128}
#: Held to less than the decode step at 16 running.
BELOW_DECODE_16 = ("decode 64", "decode 256")


def _marginals(results: list[dict], variant: str, name: str, units: dict) -> list[float]:
    if name not in units:
        return []
    small, large = units[name]
    return [
        (r["counts"][f"{name}|large"] - r["counts"][f"{name}|small"]) / (large - small)
        for r in results
        if r["variant"] == variant and f"{name}|large" in r.get("counts", {})
    ]


def _spread(values: list[float]) -> float | None:
    """(max - min) / mean, in percent; None for fewer than two values."""
    if len(values) < 2 or not statistics.fmean(values):
        return None
    return (max(values) - min(values)) / abs(statistics.fmean(values)) * 100


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _number(value: float) -> str:
    return f"{value:,.0f}"


def _over_layouts(results: list[dict], name: str, units: dict, ours_variant: str) -> tuple[int, str, list[float]]:
    """Over memory layouts: how many, added / plain (synthetic output included) as mean ± standard error,
    and the spread of plain's and ours' figures."""
    by_variant = {}
    for variant in ("plain", ours_variant):
        values: dict[int, float] = {}
        for r in results:
            if r["variant"] == variant and f"{name}|large" in r.get("counts", {}):
                values.setdefault(r.get("ballast", 0), _marginals([r], variant, name, units)[0])
        by_variant[variant] = list(values.values())
    plain, ours = by_variant["plain"], by_variant[ours_variant]
    if len(plain) < 2 or len(ours) < 2:
        return len(plain), "n/a", []
    error = (statistics.variance(plain) / len(plain) + statistics.variance(ours) / len(ours)) ** 0.5
    added = _mean(ours) - _mean(plain)
    text = f"{added / _mean(plain) * 100:+.3f}% ± {error / _mean(plain) * 100:.3f}%"
    return len(plain), text, [_spread(plain), _spread(ours)]


def cost_table(results: list[dict], units: dict, ours_variant: str = "ours") -> str:
    """The main table of one instrumented variant: per unit, vLLM's own instructions, the added ones, and the budget."""
    repeats = [r for r in results if r.get("ballast", 0) == 0]  # identical processes: their spread is determinism
    rows, repeat_spreads, layout_spreads, ratios, layouts = [], [], [], {}, 0
    for name, unit, baseline, per in ROWS:
        plain, ours = _marginals(repeats, "plain", name, units), _marginals(repeats, ours_variant, name, units)
        if not plain or not ours:
            continue
        base_plain = (
            _mean(_marginals(repeats, "plain", baseline, units)) * HARNESS_STEPS.get(name, 1) if baseline else 0.0
        )
        base_ours_added = 0.0  # the harness is the same code in both variants
        if baseline and not baseline.startswith("harness"):
            base_ours_added = _mean(_marginals(repeats, ours_variant, baseline, units)) - base_plain
        vllm = (statistics.fmean(plain) - base_plain) / per
        added = (statistics.fmean(ours) - statistics.fmean(plain) - base_ours_added) / per
        ratios[name] = added / vllm * 100
        layouts, over_layouts, spreads = _over_layouts(results, name, units, ours_variant)
        layout_spreads += spreads
        repeat_spreads += [_spread(plain), _spread(ours)]
        rows.append([unit, _number(vllm), _number(added), f"{ratios[name]:+.3f}%", over_layouts, _budget(name, ratios)])
    collection_plain = _marginals(repeats, "plain", "collection", units)
    collection_ours = _marginals(repeats, ours_variant, "collection", units)
    if collection_plain and collection_ours:
        added = statistics.fmean(collection_ours) - statistics.fmean(collection_plain)
        rows.append(
            [
                "metric collection, exporter process (vLLM's own: the SDK alone)",
                _number(statistics.fmean(collection_plain)),
                _number(added),
                "n/a",
                "n/a",
                "none",
            ]
        )
        repeat_spreads += [_spread(collection_plain), _spread(collection_ours)]
    for running in (16, 256):
        passes = _marginals(repeats, ours_variant, f"holders pass {running}", units)
        nothing = _marginals(repeats, "plain", f"holders pass {running}", units)
        step = _marginals(repeats, "plain", f"decode {running}", units)
        if passes and nothing and ours_variant == "residency":
            added = statistics.fmean(passes) - statistics.fmean(nothing)
            vllm = _mean(step) - _mean(_marginals(repeats, "plain", f"harness {running}", units))
            rows.append(
                [
                    f"holders pass, {running} running, at most once a second (vLLM's own: one decode step)",
                    _number(vllm),
                    _number(added),
                    f"{added / vllm * 100:+.3f}%",
                    "n/a",
                    "none",
                ]
            )
            repeat_spreads += [_spread(passes)]
    headers = ["per", "vLLM's own instructions", "added by otel-vllm-kv", "added / vLLM's own"]
    headers += [f"over {layouts} memory layouts: added / plain", "budget"]
    notes = (
        "vLLM's own: plain, minus the synthetic model output for a step, minus a plain decode step for a "
        "preemption. Over layouts: mean ± standard error, plain there including the synthetic output (and a "
        "preemption's decode step)."
    )
    repeat_spreads = [spread for spread in repeat_spreads if spread is not None]
    if repeat_spreads:
        notes += f" Identical processes differ by at most {max(repeat_spreads):.4f}% ((max - min) / mean)."
    layout_spreads = [spread for spread in layout_spreads if spread is not None]
    if layout_spreads:
        notes += f" A layout moves a figure by up to {max(layout_spreads):.2f}%."
    return markdown_table(headers, rows) + "\n\n" + notes


def _budget(name: str, ratios: dict[str, float]) -> str:
    if name in BUDGETS:
        limit = BUDGETS[name]
        return f"at most +{limit:g}%: " + ("met" if ratios[name] <= limit else "EXCEEDED")
    if name in WORST_CASES:
        return f"worst case: {'under' if ratios[name] <= REQUEST_BUDGET else 'over'} +{REQUEST_BUDGET:g}%"
    if name in BELOW_DECODE_16 and "decode 16" in ratios:
        return "below 16's: " + ("met" if ratios[name] < ratios["decode 16"] else "EXCEEDED")
    return "none"


def toggle_table(results: list[dict], units: dict) -> str:
    """Blocks on one live scheduler. Its requests grow through the run (so does vLLM's step), so each
    block is compared with the mean of its neighbours of the other kind, not with a fresh scheduler."""
    toggles = [r for r in results if r["variant"] == "toggle"]
    if not toggles:
        return ""
    small, large = units["toggle"]
    phases = [label.split("|")[0] for label in toggles[0]["counts"] if label.endswith("|large")]
    per_step = {
        phase: [(r["counts"][f"{phase}|large"] - r["counts"][f"{phase}|small"]) / (large - small) for r in toggles]
        for phase in phases
    }
    rows = []
    for index, phase in enumerate(phases):
        neighbours = [_mean(per_step[phases[i]]) for i in (index - 1, index + 1) if 0 <= i < len(phases)]
        rows.append(
            [
                phase,
                _number(_mean(per_step[phase])),
                f"{(_mean(per_step[phase]) / _mean(neighbours) - 1) * 100:+.3f}%",
                "n/a" if _spread(per_step[phase]) is None else f"{_spread(per_step[phase]):.4f}%",
            ]
        )
    return markdown_table(
        [
            "block on one live scheduler",
            "instructions per decode step (16 running)",
            "vs the mean of its neighbouring blocks",
            "repeat spread",
        ],
        rows,
    )


def engine_table(results: list[dict], units: dict) -> str:
    plain = _marginals(results, "plain", "engine", units)
    ours = _marginals(results, "ours", "engine", units)
    if not plain or not ours:
        return ""
    engine = next(r for r in results if r["variant"] == "ours" and "tokens" in r)
    tokens = sum(len(request) for batch in engine["tokens"] for request in batch)
    requests = sum(len(batch) for batch in engine["tokens"])
    ratio = _mean(ours) / _mean(plain)
    table = markdown_table(
        ["per request (in-process LLM, 48 prompt + 32 output tokens)", "plain", "ours", "added", "ratio", "budget"],
        [
            [
                "instructions",
                _number(_mean(plain)),
                _number(_mean(ours)),
                _number(_mean(ours) - _mean(plain)),
                f"{ratio:.5f}",
                "at most 1.01: " + ("met" if ratio <= 1.01 else "EXCEEDED"),
            ]
        ],
    )
    return (
        f"{table}\n\n{requests} requests, {tokens} output tokens, identical in both variants; every request's "
        "admission annotated on its span in ours."
    )


def report(results: list[dict], units: dict) -> str:
    parts = ["## Instructions per unit of work (marginal), default settings", "", cost_table(results, units)]
    if any(r["variant"] == "residency" for r in results):
        parts += ["", "## The same with residency on", "", cost_table(results, units, "residency")]
    engine = engine_table(results, units)
    if engine:
        parts += ["", "## End to end: a whole in-process LLM run", "", engine]
    toggles = toggle_table(results, units)
    if toggles:
        parts += ["", "## Instrumenting and uninstrumenting a live scheduler", "", toggles]
    return "\n".join(parts)
