"""Frontend: put each request's admission records on the spans the user sees.

vLLM's ``OutputProcessor`` runs in the process that submits requests (``LLM``,
``AsyncLLM``, the OpenAI server). At ``add_request`` the span current in the caller's
context is remembered; records arriving on the request's outputs (``admission_records``) are
applied to it: attributes if it submitted this one request, one event per request if
it submitted several (a batch ``LLM.generate``). vLLM's own ``llm_request`` span,
created at finish by ``do_tracing`` through ``instrument_manual``, gets the admission
attributes, and is parented on the remembered span when there is one, so a trace shows
one tree. Only recording spans are touched; with nothing recording, no request is tracked.
A tracked request is submitted with ``TRACED_HEADER_KEY`` in its ``trace_headers``: the engine
writes records only for those (and for every request while ``unprobed_engines`` still has to see
whether an engine runs a probe).

Each ``OutputProcessor`` keeps its own tracked requests, on itself (as OpenTelemetry's
instrumentations keep state on the object they trace): a process can hold several (several
``LLM`` or ``AsyncLLM``), each letting go of its own requests only, and their request ids can
coincide. Records are checked (``admission_records.decode``) and applied in order, one request
at a time: a malformed or out-of-order record costs its own request only, with one warning.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from itertools import compress, repeat
from operator import attrgetter, contains
from typing import Any

from opentelemetry import trace

from otel_vllm_kv import names
from otel_vllm_kv.admission_records import (
    ADMITTED,
    FINISHED,
    PREEMPTED,
    TRACE_HEADER_KEY,
    TRACED_HEADER_KEY,
    AdmissionRecord,
    decode,
    with_header,
)
from otel_vllm_kv.diagnostics import WarnOnce
from otel_vllm_kv.frontend import unprobed_engines
from otel_vllm_kv.frontend.admission_attributes import record_attributes
from otel_vllm_kv.internals import method
from otel_vllm_kv.patching import apply_patches, hook_methods, remove_patches, unhook_methods

_logger = logging.getLogger(__name__)

OUTPUT_PROCESSOR_MODULE = "vllm.v1.engine.output_processor"
_trace_headers = attrgetter("trace_headers")
VLLM_REQUEST_SPAN = "llm_request"
#: The attribute of an ``OutputProcessor`` holding its tracked requests (vLLM's internal id -> request).
TRACKED_REQUESTS_ATTRIBUTE = "_otel_vllm_kv_requests"


class _TrackedRequest:
    __slots__ = ("span", "submitted", "external_id", "last_sequence", "admission", "preemptions", "preempted_seconds")

    def __init__(self, span: Any, submitted: list[int] | None, external_id: str) -> None:
        self.span = span
        #: How many requests ``span`` submitted so far: one counter shared by them all, so a
        #: record's "one request or several?" reads it without a lookup.
        self.submitted = submitted
        self.external_id = external_id
        self.last_sequence = 0
        self.admission: dict = {}
        self.preemptions = 0
        #: The resumptions' waits, summed: the time it spent preempted.
        self.preempted_seconds = 0.0


class _Annotator:
    def __init__(self) -> None:
        #: Every ``OutputProcessor`` that tracks requests, so ``clear`` reaches them all.
        self.processors: weakref.WeakSet[Any] = weakref.WeakSet()
        #: Every ``OutputProcessor`` whose ``add_request`` is hooked (``_attach_submissions``).
        self.submitting: weakref.WeakSet[Any] = weakref.WeakSet()
        self.submissions: weakref.WeakKeyDictionary[Any, list[int]] = weakref.WeakKeyDictionary()
        self.tracing: _TrackedRequest | None = None
        self.warn_once = WarnOnce(_logger, "otel-vllm-kv could not annotate a request span; requests are unaffected")

    def track(self, output_processor: Any, request: Any) -> bool:
        """Track ``request`` if a span will show its records: whether it does."""
        span = trace.get_current_span()
        recording = span.is_recording()
        if not recording and not output_processor.tracing_enabled:
            return False
        submitted = None
        if recording:
            submitted = self.submissions.get(span)
            if submitted is None:
                submitted = self.submissions[span] = [0]
            submitted[0] += 1
        external_id = getattr(request, "external_req_id", None) or request.request_id
        requests = tracked_requests(output_processor)
        if requests is None:
            requests = {}
            setattr(output_processor, TRACKED_REQUESTS_ATTRIBUTE, requests)
            hook_methods(output_processor, {"process_outputs": _annotating(output_processor, requests)})
            self.processors.add(output_processor)
        requests[request.request_id] = _TrackedRequest(span if recording else None, submitted, external_id)
        return True

    @property
    def requests(self) -> dict[str, _TrackedRequest]:
        """The requests every ``OutputProcessor`` tracks, merged (to inspect; the hooks read their own)."""
        merged: dict[str, _TrackedRequest] = {}
        for processor in list(self.processors):
            merged.update(tracked_requests(processor) or {})
        return merged

    def apply(self, tracked: _TrackedRequest, text: str) -> None:
        """Apply the records in ``text`` that come next for the request, in order.

        The engine keeps a record until an output carries it, so one seen before (a lower number) is
        skipped; one further on than the next (a gap) is not the engine's, and is reported once all the
        others were applied, so a forged number cannot hold back the genuine records after it.
        """
        out_of_order = None
        for event in decode(text):
            sequence = event.sequence
            if sequence == tracked.last_sequence + 1 or _finished_after_preemption(event, tracked.last_sequence):
                tracked.last_sequence = sequence
                self._apply_event(tracked, event)
            elif sequence > tracked.last_sequence:
                out_of_order = sequence
        if out_of_order is not None:
            raise ValueError(f"admission record {out_of_order} out of order after {tracked.last_sequence}")

    def _apply_event(self, tracked: _TrackedRequest, event: AdmissionRecord) -> None:
        attributes = record_attributes(event)
        if event.kind == ADMITTED:
            tracked.admission = attributes
        elif event.kind == FINISHED:
            tracked.admission = {**tracked.admission, **attributes}  # vLLM's llm_request span gets them too
        elif event.kind == PREEMPTED:
            tracked.preemptions += 1
        else:  # resumed
            tracked.preempted_seconds += event.queue_seconds
        span = tracked.span
        if span is None or not span.is_recording():
            return
        single = tracked.submitted is not None and tracked.submitted[0] == 1
        if not single:
            attributes = {**attributes, names.REQUEST_ID: tracked.external_id}
        if event.kind == ADMITTED or event.kind == FINISHED:
            if single:
                if event.kind == ADMITTED:  # "never preempted" reads as 0 in a trace view, not as a missing row
                    attributes = {**attributes, names.REQUEST_PREEMPTIONS: 0}
                span.set_attributes(attributes)
            else:
                name = names.EVENT_ADMITTED if event.kind == ADMITTED else names.EVENT_FINISHED
                span.add_event(name, attributes, timestamp=event.time_ns)
            return
        name = names.EVENT_PREEMPTED if event.kind == PREEMPTED else names.EVENT_RESUMED
        span.add_event(name, attributes, timestamp=event.time_ns)
        if single:
            if event.kind == PREEMPTED:
                span.set_attribute(names.REQUEST_PREEMPTIONS, tracked.preemptions)
            else:
                span.set_attribute(names.REQUEST_PREEMPTED_DURATION, tracked.preempted_seconds)

    def clear(self) -> None:
        for processor in list(self.submitting):
            unhook_methods(processor, ("add_request",))
        self.submitting = weakref.WeakSet()
        for processor in list(self.processors):
            unhook_methods(processor, ("process_outputs",))
            try:
                # Never vars(): it would build the object's __dict__ and slow vLLM's own attribute reads.
                delattr(processor, TRACKED_REQUESTS_ATTRIBUTE)
            except AttributeError:
                pass
        self.processors = weakref.WeakSet()
        self.submissions = weakref.WeakKeyDictionary()
        self.tracing = None


annotator = _Annotator()


def _finished_after_preemption(event: AdmissionRecord, last_sequence: int) -> bool:
    """A request finished while preempted (aborted before its resumption): its finish, numbered
    after the resumption it never had, comes next."""
    return (
        event.kind == FINISHED and last_sequence >= 2 and not last_sequence & 1 and event.sequence == last_sequence + 2
    )


def tracked_requests(output_processor: Any) -> dict[str, _TrackedRequest] | None:
    """The requests ``output_processor`` tracks, None before its first (a lookup in C, and the missing
    attribute raises no exception to be caught)."""
    return getattr(output_processor, TRACKED_REQUESTS_ATTRIBUTE, None)


def _forget(requests: dict[str, _TrackedRequest], request_ids: Any) -> None:
    for request_id in request_ids:
        requests.pop(request_id, None)


def _submitting(output_processor: Any) -> Callable[[Callable], Callable]:
    """The hook of one ``OutputProcessor``'s own ``add_request`` (``patching.hook_methods``): track each new
    request, and ask its engine for records if it is tracked. A closure on the processor, set at its first
    request (``_attach_submissions``): as a wrapt class patch it cost 5,000 instructions more per request,
    a third of what the package adds to a request nobody traces (docs/benchmarks.md). Any signature."""

    def hook(original: Callable) -> Callable:
        def add_request(*args: Any, **kwargs: Any) -> Any:
            request = args[0] if args else kwargs["request"]
            is_new = request.request_id not in output_processor.request_states
            result = original(*args, **kwargs)
            if is_new:
                try:
                    # Before vLLM sends it to its engine core (``LLMEngine`` and ``AsyncLLM`` call this first):
                    # the engine writes records only for requests that ask (``engine.admission``).
                    if annotator.track(output_processor, request) or unprobed_engines.reporter.undecided:
                        request.trace_headers = with_header(request.trace_headers, TRACED_HEADER_KEY, "1")
                except Exception:  # noqa: BLE001
                    annotator.warn_once()
            return result

        return add_request

    return hook


def _attach_submissions(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    """``OutputProcessor.add_request`` reaches this on a processor without a hook of its own: at its first
    request since ``instrument()``. Hook it, then submit through the hook. On a hooked one only when a class
    patch laid over ours (the tenants', anyone's) runs beneath the hook: then it is vLLM's call."""
    if instance in annotator.submitting:
        return wrapped(*args, **kwargs)
    try:
        hook_methods(instance, {"add_request": _submitting(instance)}, beneath=(_attach_submissions,))
        annotator.submitting.add(instance)
    except Exception:  # noqa: BLE001 - this processor's requests go unannotated
        annotator.warn_once()
        return wrapped(*args, **kwargs)
    return instance.add_request(*args, **kwargs)


def _annotating(output_processor: Any, requests: dict[str, _TrackedRequest]) -> Callable[[Callable], Callable]:
    """The hook of one ``OutputProcessor``'s own ``process_outputs`` (``patching.hook_methods``), set when
    it is first given a request to track: apply the records an engine step's outputs carry, then forget
    the requests vLLM let go.

    This runs every step of an API server, so it is a closure on that one processor rather than a
    wrapt class patch, which costs an extra 5,000 instructions per call here (docs/benchmarks.md).
    The outputs that carry records are found in C (``map``, ``compress``), so the Python loop runs
    per record, not per running request; and the processor's tracked requests are compared with its
    own only when the step ended some of them. Each output's records are applied in a ``try`` of
    their own (free in CPython 3.11 until something raises): one request's bad record costs no other
    request its attributes. Any signature: vLLM added ``weight_version`` in 0.32.
    """

    def hook(original: Callable) -> Callable:
        def process_outputs(*args: Any, **kwargs: Any) -> Any:
            if not requests:
                return original(*args, **kwargs)
            try:
                outputs = args[0] if args else kwargs["engine_core_outputs"]
                if any(map(_trace_headers, outputs)):
                    headers = list(map(_trace_headers, outputs))
                    with_headers = list(compress(outputs, headers))
                    present = list(filter(None, headers))
                    for output in compress(with_headers, map(contains, present, repeat(TRACE_HEADER_KEY))):
                        tracked = requests.get(output.request_id)
                        if tracked is not None:
                            try:
                                annotator.apply(tracked, output.trace_headers[TRACE_HEADER_KEY])
                            except Exception:  # noqa: BLE001 - a malformed or forged record: this request's loss only
                                annotator.warn_once()
            except Exception:  # noqa: BLE001
                annotator.warn_once()
            states = output_processor.request_states
            known = len(states)
            result = original(*args, **kwargs)
            if len(states) != known:  # vLLM let requests go (finished, or stopped in this process)
                _forget(requests, requests.keys() - states.keys())
            return result

        return process_outputs

    return hook


def _after_abort_requests(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    aborted = wrapped(*args, **kwargs)  # the internal ids of every request it aborted
    requests = tracked_requests(instance)
    if requests and aborted:
        _forget(requests, aborted)
    return aborted


def _around_do_tracing(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    engine_core_output = args[0] if args else kwargs["engine_core_output"]
    requests = tracked_requests(instance)
    annotator.tracing = requests.get(engine_core_output.request_id) if requests else None
    try:
        return wrapped(*args, **kwargs)
    finally:
        annotator.tracing = None


def _around_instrument_manual(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
    tracked = annotator.tracing
    if tracked is not None and kwargs.get("span_name") == VLLM_REQUEST_SPAN:
        try:
            attributes = {**(kwargs.get("attributes") or {}), **tracked.admission}
            attributes[names.REQUEST_PREEMPTIONS] = tracked.preemptions
            if tracked.preemptions:
                attributes[names.REQUEST_PREEMPTED_DURATION] = tracked.preempted_seconds
            kwargs = {**kwargs, "attributes": attributes}
            if tracked.span is not None:
                kwargs["context"] = trace.set_span_in_context(tracked.span)
        except Exception:  # noqa: BLE001
            annotator.warn_once()
    return wrapped(*args, **kwargs)


#: (module, name, wrapper): every vLLM function the span annotation wraps.
PATCHES = (
    (OUTPUT_PROCESSOR_MODULE, "OutputProcessor.add_request", _attach_submissions),
    (OUTPUT_PROCESSOR_MODULE, "OutputProcessor.abort_requests", _after_abort_requests),
    (OUTPUT_PROCESSOR_MODULE, "OutputProcessor.do_tracing", _around_do_tracing),
    (OUTPUT_PROCESSOR_MODULE, "instrument_manual", _around_instrument_manual),
)


#: The method each tracking ``OutputProcessor`` gets a hook of its own on (``_annotating``).
REQUIRED = (method(OUTPUT_PROCESSOR_MODULE, "OutputProcessor.process_outputs"),)


def install() -> None:
    apply_patches(PATCHES)


def uninstall() -> None:
    remove_patches(PATCHES)
    annotator.clear()
