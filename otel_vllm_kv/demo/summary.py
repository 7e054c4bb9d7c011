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
    token_seconds: dict[str, float]  # by tenant ("no tenant" for none), all engines, in the last sample

    def __str__(self) -> str:
        peak = self.peak_used / self.limit if self.limit else 0.0
        return (
            f"{self.requests} requests, {self.generated_tokens:,} tokens generated in {self.seconds:.1f} s; "
            f"peak used {self.peak_used:,} of {self.limit:,} tokens ({peak:.1%}); "
            f"{self.admissions} admissions, {self.preemptions} preemptions, {self.resumptions} resumptions; "
            f"used at the end {self.used_at_end:,}"
        ) + "".join(f"\n  {tenant} held {seconds:,.0f} token-seconds" for tenant, seconds in self.token_seconds.items())


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
        token_seconds=_token_seconds(samples[-1]) if samples else {},
    )


def _token_seconds(sample: Sample) -> dict[str, float]:
    totals: dict[str, float] = {}
    for readings in sample.holders.values():
        for tenant, reading in readings.items():
            name = tenant or "no tenant"
            totals[name] = totals.get(name, 0.0) + (reading.token_seconds or 0.0)
    return dict(sorted(totals.items()))
