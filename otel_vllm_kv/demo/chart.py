"""The PNG chart: used and free tokens over time per engine, the limit, admissions and preemptions marked, and
the used tokens' holders stacked by tenant."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter

from otel_vllm_kv.demo.cache_events import ADMITTED, PREEMPTED, RESUMED, CacheEvent
from otel_vllm_kv.demo.sampling import Sample

#: How each kind of event is marked, at the engine's used tokens right after it.
MARKERS = {
    ADMITTED: {"marker": "^", "color": "tab:blue", "edgecolor": "black", "linewidths": 0.5, "s": 40},
    RESUMED: {"marker": "o", "facecolors": "none", "edgecolors": "tab:purple", "s": 40},
    PREEMPTED: {"marker": "x", "color": "tab:red", "s": 50},
}


#: The fills of the tenants' held tokens, in their sorted order.
TENANT_COLORS = ["tab:orange", "tab:cyan", "tab:olive", "tab:pink", "tab:gray", "tab:brown"]


def _held(sample: Sample, index: int, tenant: str) -> float:
    reading = sample.holders.get(index, {}).get(tenant or None)
    return (reading.held_tokens or 0.0) if reading else 0.0


def write_chart(path: Path, samples: list[Sample], events: list[CacheEvent], origin: float, title: str) -> Path:
    """Draw one panel per engine into ``path`` (PNG, Agg backend); return its absolute path. Times from ``origin``."""
    engines = sorted({index for sample in samples for index in sample.engines}) or [0]
    figure = Figure(figsize=(11, 1.5 + 3.5 * len(engines)), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(engines), 1, sharex=True, squeeze=False)[:, 0]
    for ax, index in zip(axes, engines, strict=True):
        _draw_engine(ax, index, samples, [event for event in events if event.engine_index == index], origin)
    axes[-1].set_xlabel("seconds since the burst was submitted")
    figure.suptitle(title)
    path = Path(path).resolve()
    figure.savefig(path, format="png")
    return path


def _draw_engine(ax, index: int, samples: list[Sample], events: list[CacheEvent], origin: float) -> None:
    series = [(sample.at - origin, sample.engines[index]) for sample in samples if index in sample.engines]
    times = [at for at, _ in series]
    # A sample holds only engines that report tokens (``Sampler``): the ``or 0`` never applies.
    used = [gauges.used or 0 for _, gauges in series]
    limit = max((gauges.limit or 0 for _, gauges in series), default=0)
    tenants = sorted({tenant or "" for sample in samples for tenant in sample.holders.get(index, {})})
    if tenants:  # who holds the used tokens, stacked (each counted at most once a second: a step late)
        held = [[_held(sample, index, tenant) for sample in samples if index in sample.engines] for tenant in tenants]
        labels = [f"held by {tenant or 'no tenant'} (counted each second)" for tenant in tenants]
        ax.stackplot(times, held, step="post", labels=labels, colors=TENANT_COLORS[: len(tenants)], alpha=0.45)
    else:
        ax.fill_between(times, used, step="post", color="tab:blue", alpha=0.25, linewidth=0)
    ax.step(times, used, where="post", color="tab:blue", label="used tokens")
    ax.step(times, [gauges.free for _, gauges in series], where="post", color="tab:green", label="free tokens")
    ax.axhline(limit, color="black", linestyle="--", linewidth=1, label=f"limit ({limit:,} tokens)")
    for kind, style in MARKERS.items():
        marked = [event for event in events if event.kind == kind]
        if marked:
            ax.scatter(
                [event.at - origin for event in marked],
                [event.used_tokens for event in marked],
                label=f"{kind} ({len(marked)})",
                zorder=3,
                **style,
            )
    ax.set_title(f"engine {index}", loc="left")
    ax.set_ylabel("KV-cache tokens")
    ax.set_ylim(0, limit * 1.08 or 1)
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
