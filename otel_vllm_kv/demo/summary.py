"""The figures printed once the burst has drained."""

from __future__ import annotations

from dataclasses import dataclass

from otel_vllm_kv.demo.cache_events import ADMITTED, PREEMPTED, RESUMED, CacheEvent
from otel_vllm_kv.demo.load import LoadResult
from otel_vllm_kv.demo.sampling import Sample


@dataclass(frozen=True)
class Summary:
    requests: int
    generated_tokens: int
    seconds: float
    peak_used: int  # the most used tokens any engine reported in a sample
    limit: int  # that engine's limit
    admissions: int
    preemptions: int
    resumptions: int
    used_at_end: int  # all engines, in the last sample

    def __str__(self) -> str:
        peak = self.peak_used / self.limit if self.limit else 0.0
        return (
            f"{self.requests} requests, {self.generated_tokens:,} tokens generated in {self.seconds:.1f} s; "
            f"peak used {self.peak_used:,} of {self.limit:,} tokens ({peak:.1%}); "
            f"{self.admissions} admissions, {self.preemptions} preemptions, {self.resumptions} resumptions; "
            f"used at the end {self.used_at_end:,}"
        )


def summarize(result: LoadResult, samples: list[Sample], events: list[CacheEvent]) -> Summary:
    # A sample holds only engines that report tokens (``Sampler``): the ``or 0`` never applies.
    engines = [gauges for sample in samples for gauges in sample.engines.values()]
    peak = max(engines, key=lambda gauges: gauges.used or 0, default=None)
    kinds = [event.kind for event in events]
    return Summary(
        requests=result.progress.finished,
        generated_tokens=result.progress.generated_tokens,
        seconds=result.seconds,
        peak_used=(peak.used or 0) if peak else 0,
        limit=(peak.limit or 0) if peak else 0,
        admissions=kinds.count(ADMITTED),
        preemptions=kinds.count(PREEMPTED),
        resumptions=kinds.count(RESUMED),
        used_at_end=sum(gauges.used or 0 for gauges in samples[-1].engines.values()) if samples else 0,
    )
