"""The admission, preemption and resumption events the package put on the load span, as plain records."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan

from otel_vllm_kv import names

ADMITTED = "admitted"
PREEMPTED = "preempted"
RESUMED = "resumed"
_KINDS = {names.EVENT_ADMITTED: ADMITTED, names.EVENT_PREEMPTED: PREEMPTED, names.EVENT_RESUMED: RESUMED}


@dataclass(frozen=True)
class CacheEvent:
    kind: str  # ADMITTED, PREEMPTED or RESUMED
    at: float  # the engine's wall-clock time, seconds since the epoch
    engine_index: int
    used_tokens: int  # the engine's pool right after the event


def cache_events(span: ReadableSpan) -> list[CacheEvent]:
    events = []
    for event in span.events:
        if event.name in _KINDS:
            attributes: Mapping[str, Any] = event.attributes or {}
            events.append(
                CacheEvent(
                    kind=_KINDS[event.name],
                    at=event.timestamp / 1e9,
                    engine_index=attributes[names.ENGINE_INDEX],
                    used_tokens=attributes[names.ADMISSION_USED_TOKENS],
                )
            )
    return events


def count_kinds(span: ReadableSpan) -> Counter[str]:
    """How many events of each kind the span holds (cheap enough to call after every engine step)."""
    return Counter(event.kind for event in cache_events(span))
