"""The burst: distinct prompts submitted at once under one span, the engine stepped until every request finished."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from opentelemetry import baggage, context
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Tracer

from otel_vllm_kv.demo.cache_events import ADMITTED, PREEMPTED, count_kinds

if TYPE_CHECKING:
    from vllm import LLM

LOAD_SPAN = "kv-cache-demo load"
#: The burst's tenants and their shares of its requests, sent as W3C baggage (``tenants``).
TENANTS = {"team-a": 3, "team-b": 2, "team-c": 1}


@dataclass(frozen=True)
class LoadProgress:
    total: int
    finished: int = 0
    generated_tokens: int = 0
    admitted: int = 0
    preempted: int = 0


@dataclass(frozen=True)
class LoadResult:
    progress: LoadProgress
    started_at: float  # wall clock, seconds since the epoch
    seconds: float


def distinct_prompts(count: int, length: int) -> list[str]:
    """ASCII prompts of ``length`` tokens (one per byte) whose first block already differs: no shared prefix."""
    return [(f"request {index:05d} " * length)[:length] for index in range(count)]


def tenant_shares(requests: int) -> list[tuple[str, int]]:
    """How many of ``requests`` each tenant sends, in ``TENANTS``' proportions (the first takes the rest)."""
    total = sum(TENANTS.values())
    counts = [(tenant, requests * share // total) for tenant, share in TENANTS.items()]
    counts[0] = (counts[0][0], requests - sum(count for _, count in counts[1:]))
    return counts


def run_load(
    llm: LLM,
    tracer: Tracer,
    requests: int,
    prompt_tokens: int,
    output_tokens: int,
    on_progress: Callable[[LoadProgress], None],
    tenant_key: str | None = None,
) -> LoadResult:
    """Submit the burst inside the load span, each tenant's part with its baggage (``tenant_key``), and
    step the engine until it drained; report progress on change."""
    from vllm import SamplingParams

    # No per-request seed: vLLM 0.32 on CPU fails seeded sampling ("CPU Generator does not use offset").
    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    attributes = {"demo.requests": requests, "demo.prompt_tokens": prompt_tokens, "demo.output_tokens": output_tokens}
    engine = llm.llm_engine
    started_at = time.time()
    with tracer.start_as_current_span(LOAD_SPAN, attributes=attributes) as span:
        # Submitted under the span: the package puts each request's admission records on it.
        prompts = distinct_prompts(requests, prompt_tokens)
        first = 0
        for tenant, count in tenant_shares(requests) if tenant_key else [("", requests)]:
            token = context.attach(baggage.set_baggage(tenant_key, tenant)) if tenant_key else None
            try:
                llm.enqueue(prompts[first : first + count], params, use_tqdm=False)
            finally:
                if token is not None:
                    context.detach(token)
            first += count
        progress = LoadProgress(total=requests)
        on_progress(progress)
        while engine.has_unfinished_requests():
            finished = [output for output in engine.step() if output.finished]
            kinds = count_kinds(cast(ReadableSpan, span))  # the SDK's spans are readable
            current = LoadProgress(
                total=requests,
                finished=progress.finished + len(finished),
                generated_tokens=progress.generated_tokens + sum(len(o.outputs[0].token_ids) for o in finished),
                admitted=kinds[ADMITTED],
                preempted=kinds[PREEMPTED],
            )
            if current != progress:
                progress = current
                on_progress(progress)
    return LoadResult(progress, started_at, time.time() - started_at)
