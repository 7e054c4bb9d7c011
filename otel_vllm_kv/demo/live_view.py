"""What the demo shows while the load runs: a rich table and progress bar on a terminal, plain lines otherwise.

Both views take samples (from the sampler's thread) and load progress (from the engine loop).
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Protocol, TextIO

from rich import box
from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.progress_bar import ProgressBar
from rich.table import Table

from otel_vllm_kv.demo.load import LoadProgress
from otel_vllm_kv.demo.sampling import EngineReading, Sample

if TYPE_CHECKING:
    from typing_extensions import Self

BAR_WIDTH = 20


class LiveView(Protocol):
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc_info) -> None: ...
    def show_progress(self, progress: LoadProgress) -> None: ...
    def show_sample(self, sample: Sample) -> None: ...


def open_view(total_requests: int, plain: bool) -> LiveView:
    """The rich view if stdout is a terminal and plain lines were not asked for, else the plain one."""
    if plain or not sys.stdout.isatty():
        return PlainView(total_requests)
    return RichView(total_requests)


def text_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    filled = round(width * fraction)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def tokens(value: int | None) -> str:
    """A token count with thousands separators; "-" for a gauge the engine does not report."""
    return "-" if value is None else f"{value:,}"


def format_engine(index: int, gauges: EngineReading) -> str:
    utilization = gauges.utilization or 0.0
    return (
        f"engine {index} {text_bar(utilization)} {utilization:6.1%}  "
        f"used {tokens(gauges.used):>6}  free {tokens(gauges.free):>6} (evictable {tokens(gauges.evictable):>6})  "
        f"limit {tokens(gauges.limit):>6}"
    )


class PlainView:
    """One line per engine for each sample in which anything changed, for logs and pipes."""

    def __init__(self, total_requests: int, out: TextIO | None = None) -> None:
        self._out = out or sys.stdout
        self._progress = LoadProgress(total=total_requests)
        self._shown: tuple | None = None
        self._origin = time.time()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def show_progress(self, progress: LoadProgress) -> None:
        self._progress = progress  # printed with the next sample

    def show_sample(self, sample: Sample) -> None:
        progress = self._progress
        state = (sample.engines, progress.finished, progress.preempted)
        if state == self._shown:
            return
        self._shown = state
        width = len(str(progress.total))
        head = (
            f"{sample.at - self._origin:7.2f}s  requests {progress.finished:>{width}}/{progress.total}  "
            f"preempted {progress.preempted:>3}"
        )
        for index, gauges in sample.engines.items():
            print(f"{head} | {format_engine(index, gauges)}", file=self._out, flush=True)


class RichView:
    """A compact table of every engine's tokens above a progress bar of the requests, redrawn in place."""

    def __init__(self, total_requests: int) -> None:
        self._progress = Progress(
            TextColumn("[bold]requests"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
        )
        self._task = self._progress.add_task("load", total=total_requests, status="", start=False)
        self._live = Live(self._render(None), refresh_per_second=8)

    def __enter__(self) -> Self:
        self._live.__enter__()
        self._progress.start_task(self._task)
        return self

    def __exit__(self, *exc_info) -> None:
        self._live.__exit__(*exc_info)

    def show_progress(self, progress: LoadProgress) -> None:
        status = (
            f"{progress.admitted} admitted · {progress.preempted} preempted · "
            f"{progress.generated_tokens:,} tokens generated"
        )
        self._progress.update(self._task, completed=progress.finished, status=status)

    def show_sample(self, sample: Sample) -> None:
        self._live.update(self._render(sample))

    def _render(self, sample: Sample | None) -> RenderableType:
        table = Table(title="vLLM KV cache (tokens)", box=box.SIMPLE, title_justify="left")
        table.add_column("engine", justify="right")
        for column in ("used", "free", "of which evictable", "limit"):
            table.add_column(column, justify="right", min_width=7)
        table.add_column("utilization")
        table.add_column("", justify="right", min_width=6)
        for index, gauges in (sample.engines if sample else {}).items():
            utilization = gauges.utilization or 0.0
            table.add_row(
                str(index),
                tokens(gauges.used),
                tokens(gauges.free),
                tokens(gauges.evictable),
                tokens(gauges.limit),
                ProgressBar(total=1.0, completed=utilization, width=30),
                f"{utilization:.1%}",
            )
        return Group(table, self._progress)
