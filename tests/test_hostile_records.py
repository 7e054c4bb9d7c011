"""Forged, malformed and out-of-order admission records, on real vLLM objects.

An application that builds ``AsyncLLM`` requests with its own ``trace_headers`` can put the
records' key (``admission_records.TRACE_HEADER_KEY``) there itself; an engine without a probe
echoes it, and an engine node running the package before this change appended its own records
to it. Each test here plays one such input through what vLLM runs: a real ``Scheduler`` or
``AsyncScheduler`` (``vllm_scheduler``) with the package's probe, a real ``OutputProcessor``
fed the scheduler's ``EngineCoreOutput`` s (``tests.support.frontend.Frontend``), and the
frontend's unprobed-engine reporter given vLLM's ready response and outputs (as
``test_unprobed_engines``). Where the frontend must see a foreign record, the scheduler's
outputs are altered between the engine and the frontend (``ForgingStepper``): the wire, not
vLLM, is what an attacker or an older engine controls. Spans go to the SDK's in-memory
exporter; the batch of them is then encoded as the OTLP exporter encodes one.

``decode`` is also fuzzed with ``hypothesis`` (the ``ci`` profile of ``conftest.py``: a fixed
budget of derandomized examples): nothing but ``ValueError`` leaves it, and every record it
accepts gives span attributes an exporter can encode (ints in int64, finite floats).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from otel_vllm_kv import admission_records
from otel_vllm_kv.admission_records import (
    ADMITTED,
    FINISHED,
    KINDS,
    PREEMPTED,
    RECORD,
    RESUMED,
    TRACE_HEADER_KEY,
    TRACED_HEADER_KEY,
    AdmissionRecord,
    decode,
)
from otel_vllm_kv.frontend import spans
from otel_vllm_kv.frontend.admission_attributes import record_attributes
from otel_vllm_kv.frontend.unprobed_engines import reporter
from otel_vllm_kv.relay_reader import SnapshotReader
from tests.support.frontend import (
    Frontend,
    busy_workload,
    crowd,
    expected_span,
    instrumented,
    ready_payload,
    span_events,
)
from tests.support.schedulers import Stepper, build_scheduler, make_request

INT64 = range(-(2**63), 2**63)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
#: A record as an engine of 11 blocks of 16 tokens writes one, field by field (``RECORD``'s order).
PLAUSIBLE = dict(
    kind=KINDS.index(ADMITTED),
    sequence=1,
    time=1_795_000_000.5,
    engine_index=0,
    num_blocks=11,
    limit_tokens=160,
    free_blocks=7,
    own_blocks=3,
    cached_tokens=0,
    queue_seconds=0.01,
    waiting=0,
    block_seconds=0.0,
    recomputed_tokens=0,
)
assert tuple(PLAUSIBLE) == AdmissionRecord._fields


def packed(**fields) -> str:
    """One record's text, as the engine packs it: ``PLAUSIBLE`` but the given fields (``kind`` a code)."""
    return RECORD.pack(*{**PLAUSIBLE, **fields}.values()).hex()


def code(kind: str) -> int:
    return KINDS.index(kind)


def assert_encodable(records: list[AdmissionRecord]) -> None:
    """Every value a record puts on a span fits what OTLP encodes: int64 and finite doubles."""
    for record in records:
        assert record.time_ns in INT64 and record.time_ns > 0
        for name, value in record_attributes(record).items():
            if isinstance(value, int):
                assert value in INT64, (name, value)
            else:
                assert isinstance(value, float) and math.isfinite(value), (name, value)


def decoded_or_rejected(text: object) -> list[AdmissionRecord] | None:
    """``decode(text)``, None where it raised ValueError; any other exception fails the test."""
    try:
        records = decode(text)  # type: ignore[arg-type]  # anything can sit in a mapping of headers
    except ValueError:
        return None
    assert_encodable(records)
    return records


# --- decode ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(" " * 16 + packed()[16:], id="hex-with-spaces"),  # fromhex skips spaces: too few bytes to unpack
        pytest.param(12345, id="int"),
        pytest.param(bytes.fromhex(packed()) * 2, id="bytes"),
        pytest.param(list(packed()), id="list"),
    ],
)
def test_decode_raises_value_error_and_nothing_else(text):
    with pytest.raises(ValueError):
        decode(text)


OUT_OF_RANGE = {
    "kind 3": dict(kind=3),
    "admission numbered 3": dict(sequence=3),
    "preemption numbered 1": dict(kind=code(PREEMPTED)),
    "resumption numbered 2": dict(kind=code(RESUMED), sequence=2),
    "sequence 0": dict(kind=code(PREEMPTED), sequence=0),
    "time NaN": dict(time=math.nan),
    "time inf": dict(time=math.inf),
    "time 1e30": dict(time=1e30),
    "time 1970": dict(time=0.0),
    "time negative": dict(time=-1.0),
    "engine_index -1": dict(engine_index=-1),
    "num_blocks 1": dict(num_blocks=1, free_blocks=0, own_blocks=0),
    "num_blocks -5": dict(num_blocks=-5),
    "limit_tokens -2": dict(limit_tokens=-2),
    "limit_tokens 2^63-1": dict(limit_tokens=2**63 - 1),
    "free_blocks -1": dict(free_blocks=-1),
    "free_blocks num_blocks": dict(free_blocks=11),
    "own_blocks -1": dict(own_blocks=-1),
    "own_blocks num_blocks": dict(own_blocks=11),
    "cached_tokens -1": dict(cached_tokens=-1),
    "queue_seconds NaN": dict(queue_seconds=math.nan),
    "queue_seconds -inf": dict(queue_seconds=-math.inf),
    "queue_seconds negative": dict(queue_seconds=-0.5),
    "queue_seconds 1e300": dict(queue_seconds=1e300),
    "waiting -1": dict(waiting=-1),
}


@pytest.mark.parametrize("fields", OUT_OF_RANGE.values(), ids=OUT_OF_RANGE)
def test_decode_rejects_a_value_no_engine_writes(fields):
    """Each field outside what an engine writes, in a record otherwise plausible, and after a valid one."""
    assert decode(packed())  # the record it is changed from is valid
    with pytest.raises(ValueError):
        decode(packed() + packed(**fields))


def test_every_value_an_engine_writes_at_the_limits_is_accepted():
    limits = [
        packed(
            sequence=2**32 - 2,
            kind=code(PREEMPTED),
            time=1e9,
            num_blocks=2,
            limit_tokens=-1,
            free_blocks=1,
            own_blocks=0,
            waiting=2**31 - 1,
            engine_index=2**31 - 1,
        ),
        packed(
            sequence=2**32 - 1,
            kind=code(RESUMED),
            time=9.2e9,
            num_blocks=2**31 - 1,
            limit_tokens=2**53 - 1,
            free_blocks=2**31 - 2,
            own_blocks=2**31 - 2,
            cached_tokens=2**31 - 1,
            queue_seconds=366 * 86_400.0,
        ),
    ]
    records = decoded_or_rejected("".join(limits))
    assert records is not None and [r.sequence for r in records] == [2**32 - 2, 2**32 - 1]


#: Each field's struct code (``RECORD``): B unsigned char, I unsigned int, i int, q long long, d double.
FIELD_CODES = RECORD.format.lstrip("<")
INTEGER_RANGES = {"B": (0, 2**8 - 1), "I": (0, 2**32 - 1), "i": (-(2**31), 2**31 - 1), "q": (-(2**63), 2**63 - 1)}
SPECIAL_DOUBLES = [
    math.nan,
    -math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    5e-324,
    1.7976931348623157e308,
    1e30,
    -1e30,
    1e9,
    9.2e9,
    9.3e9,
    366 * 86_400.0,
    1e300,
]


def any_value(struct_code: str) -> st.SearchStrategy:
    """Any value the field's struct code packs."""
    if struct_code == "d":
        return st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(SPECIAL_DOUBLES)
    low, high = INTEGER_RANGES[struct_code]
    return st.integers(low, high)


def boundary_value(struct_code: str) -> st.SearchStrategy:
    """The field's type limits, and the small numbers around zero where a range starts."""
    if struct_code == "d":
        return st.sampled_from(SPECIAL_DOUBLES)
    low, high = INTEGER_RANGES[struct_code]
    return st.sampled_from(sorted({low, low + 1, high - 1, high} | {n for n in (-2, -1, 0, 1, 2, 3) if low <= n}))


@st.composite
def valid_records(draw) -> list:
    """The fields of a record an engine could write."""
    sequence = draw(st.integers(1, 2**32 - 1))
    kind = ADMITTED if sequence == 1 else RESUMED if sequence % 2 else draw(st.sampled_from([PREEMPTED, FINISHED]))
    num_blocks = draw(st.integers(2, 2**31 - 1))
    finished = kind == FINISHED
    return [
        code(kind),
        sequence,
        draw(st.floats(1e9, 9.2e9)),
        draw(st.integers(0, 2**31 - 1)),
        num_blocks,
        draw(st.sampled_from([-1, num_blocks - 1, (num_blocks - 1) * 16, 2**53 - 1])),
        draw(st.integers(0, num_blocks - 1)),
        draw(st.integers(0, num_blocks - 1)),
        draw(st.integers(0, 2**31 - 1)),
        draw(st.floats(0.0, 366 * 86_400.0)),
        draw(st.integers(0, 2**31 - 1)),
        draw(st.floats(0.0, (num_blocks - 1) * 366 * 86_400.0)) if finished else 0.0,
        draw(st.integers(0, 2**53 - 1)) if finished else 0,
    ]


@given(st.text())
def test_fuzz_random_text(text):
    decoded_or_rejected(text)


@given(
    st.integers(1, 3).flatmap(lambda n: st.binary(min_size=n * RECORD.size, max_size=n * RECORD.size))
    | st.binary(max_size=3 * RECORD.size + 5)
)
def test_fuzz_random_bytes_hex_encoded(data):
    for text in (data.hex(), data.hex().upper()):
        decoded_or_rejected(text)


@given(
    st.none()
    | st.integers()
    | st.floats()
    | st.binary()
    | st.lists(st.text(max_size=4), max_size=3)
    | st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2)
)
def test_fuzz_what_is_not_text(value):
    assert decoded_or_rejected(value) is None


@given(st.lists(valid_records(), min_size=1, max_size=3), st.data())
def test_fuzz_truncations_of_valid_records(records, data):
    text = "".join(RECORD.pack(*fields).hex() for fields in records)
    assert len(decoded_or_rejected(text) or ()) == len(records), "an engine's records decode"
    cut = data.draw(st.integers(0, len(text) - 1))
    suffix = data.draw(st.sampled_from(["", "0", "00", " ", "zz", "\u00b2"]))
    decoded_or_rejected(text[:cut] + suffix)


@given(st.tuples(*map(boundary_value, FIELD_CODES)))
def test_fuzz_boundary_values_of_every_field(fields):
    decoded_or_rejected(RECORD.pack(*fields).hex())


@given(valid_records(), st.integers(0, len(FIELD_CODES) - 1), st.data())
def test_fuzz_valid_records_with_one_field_changed(fields, index, data):
    struct_code = FIELD_CODES[index]
    fields[index] = data.draw(any_value(struct_code) | boundary_value(struct_code))
    decoded_or_rejected(RECORD.pack(*fields).hex())


@given(valid_records(), st.integers(0, len(FIELD_CODES) - 1), st.data())
def test_fuzz_the_quick_range_check_passes_only_what_the_full_one_does(fields, index, data):
    """``decode`` leaves a record to the field-by-field check only when the quick one fails: the quick one
    passes every record an engine writes, and nothing the full one rejects."""
    assert admission_records._plainly_in_range(RECORD.unpack(RECORD.pack(*fields)))
    fields[index] = data.draw(any_value(FIELD_CODES[index]) | boundary_value(FIELD_CODES[index]))
    unpacked = RECORD.unpack(RECORD.pack(*fields))
    if admission_records._plainly_in_range(unpacked):
        assert admission_records._out_of_range(*unpacked) is None, unpacked


# --- The frontend: records applied in order, one request at a time ----------------------------------------


@dataclass
class ForgingStepper(Stepper):
    """An engine whose outputs are altered on their way to the frontend.

    ``forge(request_id, text)`` gives the text to send under the records' key instead of ``text``, what the
    engine wrote there (None: no key). The engine's own texts are kept, by request, in ``genuine``.
    """

    forge: Callable[[str, str | None], str | None] = lambda request_id, text: text
    genuine: dict[str, list[str]] = field(default_factory=dict)

    def finish(self, output) -> None:
        sent = len(self.outputs)
        super().finish(output)
        for engine_outputs in self.outputs[sent:]:
            for core_output in engine_outputs.outputs:
                headers = core_output.trace_headers or {}
                text = headers.get(TRACE_HEADER_KEY)
                if text is not None:
                    self.genuine.setdefault(core_output.request_id, []).append(text)
                forged = self.forge(core_output.request_id, text)
                if forged != text:  # a new mapping: the engine's request keeps its own
                    core_output.trace_headers = {**headers, TRACE_HEADER_KEY: forged}

    def records(self, request_id: str) -> list[AdmissionRecord]:
        """The request's records as the engine wrote them, each once, in order."""
        seen: dict[int, AdmissionRecord] = {}
        for text in self.genuine.get(request_id, ()):
            for record in decode(text):
                seen.setdefault(record.sequence, record)
        return [seen[sequence] for sequence in sorted(seen)]


def forging_frontend(tokenizer, model_dir: str, forge: Callable, **options) -> tuple[Frontend, ForgingStepper]:
    frontend = Frontend(tokenizer, model_dir, **options)
    frontend.stepper = ForgingStepper(frontend.scheduler, forge=forge)
    return frontend, frontend.stepper


@pytest.fixture
def frontend_warnings(monkeypatch, caplog):
    """The frontend's warnings in this test (its one warning per process is reset for it)."""
    monkeypatch.setattr(spans.annotator.warn_once, "warned", False)
    with caplog.at_level(logging.WARNING, logger="otel_vllm_kv"):
        yield lambda: [r.getMessage() for r in caplog.records if r.name.startswith("otel_vllm_kv")]


@pytest.mark.usefixtures("vllm_scheduler")
def test_a_record_numbered_far_ahead_holds_back_no_genuine_record(
    tokenizer, tiny_model_dir, tracer_provider, frontend_warnings
):
    """Request 0's outputs carry a record numbered 2^32 - 1 ahead of the engine's own (what an engine node
    running the package before this change sends for a request that arrived with it). It is not the next
    record, so it is skipped with one warning, and every genuine record of that request still applies: its
    admission, preemptions and resumptions, as for the other requests."""
    far_ahead = packed(kind=code(RESUMED), sequence=2**32 - 1)

    def forge(request_id: str, text: str | None) -> str | None:
        return far_ahead + text if text is not None and request_id == "req-0-int" else text

    provider, _ = tracer_provider
    with instrumented(provider):
        frontend, engine = forging_frontend(tokenizer, tiny_model_dir, forge, num_blocks=6)
        opened = crowd(frontend, provider.get_tracer("test"), spans_per_request=True)
    preemptions = 0
    for index, span in enumerate(opened):
        records = engine.records(f"req-{index}-int")
        preemptions += sum(record.kind == PREEMPTED for record in records)
        assert (dict(span.attributes), span_events(span)) == expected_span(records)
    assert preemptions > 0, "vLLM preempted and resumed: later genuine records were applied"
    warnings = frontend_warnings()
    assert len(warnings) == 1 and "could not annotate a request span" in warnings[0]


MALFORMED = {
    "unknown kind": packed(kind=9),
    "not hex": "zz" * RECORD.size,
    "hex with spaces": " " * 16 + packed()[16:],
    "cut short": packed()[:-2],
}


@pytest.mark.usefixtures("vllm_scheduler")
@pytest.mark.parametrize("malformed", MALFORMED.values(), ids=MALFORMED)
def test_a_malformed_record_costs_only_its_own_request(
    tokenizer, tiny_model_dir, tracer_provider, malformed, frontend_warnings
):
    """Three requests admitted in one step, one span each; the first one's outputs carry a malformed record
    (as an engine without a probe echoes a key the application set). The two others, later in the same
    batch of outputs, get their admission; the first gets none; one warning."""

    def forge(request_id: str, text: str | None) -> str | None:
        return malformed if request_id == "req-0-int" else text

    provider, _ = tracer_provider
    with instrumented(provider):
        frontend, engine = forging_frontend(tokenizer, tiny_model_dir, forge, num_blocks=41)
        opened = crowd(frontend, provider.get_tracer("test"), spans_per_request=True)
    assert not opened[0].attributes and not opened[0].events
    for index, span in enumerate(opened[1:], start=1):
        assert (dict(span.attributes), span_events(span)) == expected_span(engine.records(f"req-{index}-int"))
    assert len(frontend_warnings()) == 1


@pytest.mark.usefixtures("vllm_scheduler")
def test_a_forged_time_cannot_fail_the_export_of_the_other_spans(tokenizer, tiny_model_dir, tracer_provider):
    """Request 0's first output carries, after its admission, a preemption timestamped 1e30 s. Before this
    change it became a span event at 10^39 ns, and encoding the batch of spans for OTLP (``encode_spans``,
    as the OTLP exporter encodes each batch) failed: every request's span was lost. Now the record is
    rejected, the batch encodes, and the other requests' spans carry their admission."""
    forged_once = []

    def forge(request_id: str, text: str | None) -> str | None:
        if text is None or request_id != "req-0-int" or forged_once:
            return text
        forged_once.append(request_id)
        return text + packed(kind=code(PREEMPTED), sequence=2, time=1e30, own_blocks=0)

    provider, exporter = tracer_provider
    with instrumented(provider):
        frontend, engine = forging_frontend(tokenizer, tiny_model_dir, forge, num_blocks=41)
        opened = crowd(frontend, provider.get_tracer("test"), spans_per_request=True)
    assert forged_once
    exported = exporter.get_finished_spans()
    assert sorted(span.name for span in exported) == ["submit 0", "submit 1", "submit 2"]
    encoded = encode_spans(exported)
    assert sum(len(scope.spans) for resource in encoded.resource_spans for scope in resource.scope_spans) == 3
    for index, span in enumerate(opened[1:], start=1):
        assert dict(span.attributes) == expected_span(engine.records(f"req-{index}-int"))[0]
    assert all(event.timestamp in INT64 for span in exported for event in span.events)


@pytest.mark.usefixtures("vllm_scheduler")
@pytest.mark.parametrize("same_ids", [False, True], ids=["distinct-ids", "same-ids"])
def test_each_output_processor_keeps_and_forgets_its_own_requests(tokenizer, tiny_model_dir, vllm_tracing, same_ids):
    """Two ``OutputProcessor`` s in one process (two ``LLM`` s), each with a request under its own span: the
    second finishes its request while the first's is still waiting for its admission. The first request
    is still annotated, its admission is its own engine's (also when both have the same request id, as two
    ``LLM`` s numbering requests alike), and vLLM's ``llm_request`` span of each gets its own admission."""
    provider, exporter = vllm_tracing
    tracer = provider.get_tracer("test")
    names_of = ("req-0", "req-0") if same_ids else ("first-0", "second-0")
    with instrumented(provider):
        first, second = (Frontend(tokenizer, tiny_model_dir, num_blocks=41, tracing_enabled=True) for _ in range(2))
        opened = [tracer.start_span("first"), tracer.start_span("second")]
        for frontend, span, external_id, prompt in zip((first, second), opened, names_of, ("a" * 30, "b" * 60)):
            with trace.use_span(span):
                frontend.submit(external_id, prompt, max_tokens=3)
        second.run_until_idle()
        first.run_until_idle()
        assert spans.annotator.requests == {}, "each finished request is forgotten"
    for span in opened:
        span.end()
    admissions = [frontend.records()[f"{name}-int"][0] for frontend, name in zip((first, second), names_of)]
    assert [record.own_blocks for record in admissions] == [2, 4], "two different admissions"
    expected = [expected_span(frontend.records()[f"{name}-int"]) for frontend, name in zip((first, second), names_of)]
    assert [(dict(span.attributes), span_events(span)) for span in opened] == expected
    vllm_spans = {s.parent.span_id: s for s in exporter.get_finished_spans() if s.name == "llm_request"}
    for span, admission in zip(opened, admissions):
        vllm_span = vllm_spans[span.context.span_id]
        assert {name: vllm_span.attributes[name] for name in record_attributes(admission)} == record_attributes(
            admission
        )


# --- The engine: a key it did not write is replaced --------------------------------------------------------

FOREIGN = {
    "a plausible record": packed(own_blocks=9, free_blocks=0, cached_tokens=999, waiting=5),
    "not records": "injected",
}


@pytest.mark.usefixtures("vllm_scheduler")
@pytest.mark.parametrize("foreign", FOREIGN.values(), ids=FOREIGN)
def test_the_engine_replaces_a_records_key_a_request_arrived_with(tiny_model_dir, tracer_provider, foreign):
    """Requests that arrive with the records' key in their ``trace_headers``, beside a ``traceparent``: every
    output carries the engine's own records only (each numbered from 1, admitted, then preempted and
    resumed in turn), and once delivered each request has its ``traceparent`` back, without the key."""
    with instrumented(tracer_provider[0]):
        scheduler = build_scheduler(tiny_model_dir, num_blocks=6, block_size=16)
        requests = [make_request(scheduler, 30, max_tokens=40, first_token=1000 * i) for i in range(3)]
        for request in requests:
            # From a frontend that traces it (``TRACED_HEADER_KEY``), as ``AsyncLLM`` sends an application's own.
            request.trace_headers = {"traceparent": TRACEPARENT, TRACE_HEADER_KEY: foreign, TRACED_HEADER_KEY: "1"}
            scheduler.add_request(request)
        stepper = Stepper(scheduler)
        stepper.run_until_idle()
    carried: dict[str, dict[int, AdmissionRecord]] = {request.request_id: {} for request in requests}
    for engine_outputs in stepper.outputs:
        for output in engine_outputs.outputs:
            headers = output.trace_headers
            assert headers["traceparent"] == TRACEPARENT
            for record in decode(headers[TRACE_HEADER_KEY]) if TRACE_HEADER_KEY in headers else ():
                assert carried[output.request_id].setdefault(record.sequence, record) == record
    kinds = []
    for request in requests:
        records = [carried[request.request_id][n] for n in sorted(carried[request.request_id])]
        assert [record.sequence for record in records] == list(range(1, len(records) + 1))
        assert [record.num_blocks for record in records] == [6] * len(records), "the engine's own"
        kinds += [record.kind for record in records]
        assert request.trace_headers == {"traceparent": TRACEPARENT}
    assert kinds.count(ADMITTED) == 3 and kinds.count(PREEMPTED) == kinds.count(RESUMED) > 0


@pytest.mark.usefixtures("vllm_scheduler")
def test_headers_given_back_when_the_probe_goes_leave_a_foreign_key_out(tiny_model_dir, tracer_provider):
    """A request admitted with a foreign key, its record not delivered yet when the instrumentation is
    removed: it gets its headers back, without the foreign key."""
    with instrumented(tracer_provider[0]):
        scheduler = build_scheduler(tiny_model_dir)
        request = make_request(scheduler, 20, max_tokens=5)
        request.trace_headers = {
            "traceparent": TRACEPARENT,
            TRACE_HEADER_KEY: FOREIGN["a plausible record"],
            TRACED_HEADER_KEY: "1",
        }
        scheduler.add_request(request)
        scheduler.schedule()
        (record,) = decode(request.trace_headers[TRACE_HEADER_KEY])
        assert (record.kind, record.own_blocks) == (ADMITTED, 2)
    assert request.trace_headers == {"traceparent": TRACEPARENT}


# --- The frontend's unprobed-engine reporter -----------------------------------------------------------


@pytest.fixture
def stats_relay(tmp_path, monkeypatch):
    """The unprobed-engine reporter writing what it derives from vLLM's statistics into a relay of this test's own."""
    monkeypatch.setattr(reporter, "relay_directory", str(tmp_path))
    yield SnapshotReader(str(tmp_path))
    reporter.clear()


def observe_until_idle(scheduler, stepper: Stepper, engine_index: int = 0, until: Callable = lambda: False) -> None:
    """The engine's steps as the frontend's client receives them, until the scheduler is idle or ``until()``."""
    while scheduler.has_requests() and not until():
        stepper.step()
        for outputs in stepper.outputs:
            outputs.engine_index = engine_index  # as the engine core sets it before sending
            reporter.observe(scheduler, outputs)
        stepper.outputs.clear()


UNPROBED_FORGERIES = {
    "not records": "not records",
    "another engine's admission": packed(engine_index=1, num_blocks=41, limit_tokens=640),
    "another pool's admission": packed(num_blocks=11),
    "a preemption": packed(kind=code(PREEMPTED), sequence=2, num_blocks=41, limit_tokens=640, own_blocks=0),
}


@pytest.mark.parametrize("forged", UNPROBED_FORGERIES.values(), ids=UNPROBED_FORGERIES)
def test_a_forged_key_does_not_pass_an_engine_without_a_probe_for_a_probed_one(
    stats_relay, tiny_model_dir, forged, caplog
):
    """An engine without a probe echoes the key its requests arrived with. Only an admission (or
    resumption) record of this engine, its index and its block count, marks it probed: with anything
    else the frontend reports it from vLLM's statistics, and says so once."""
    scheduler = build_scheduler(tiny_model_dir, num_blocks=41, block_size=16, served_model_name="tiny")
    reporter.add_engine(scheduler, ready_payload(scheduler, engine_index=0))
    stepper = busy_workload(scheduler)
    for request in scheduler.requests.values():
        request.trace_headers = {TRACE_HEADER_KEY: forged}
    with caplog.at_level(logging.WARNING, logger="otel_vllm_kv"):
        observe_until_idle(scheduler, stepper)
    assert reporter.clients[scheduler][0].probed is False
    (snapshot,) = stats_relay.read()
    assert snapshot.free_blocks == scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("otel_vllm_kv")]
    assert len(warnings) == 1 and "runs no probe" in warnings[0]


def test_a_second_ready_response_for_a_rank_closes_the_writer_it_replaces(stats_relay, tiny_model_dir):
    """vLLM applies a ready response again when a data-parallel rank's engine is replaced (elastic scaling):
    the frontend's file for the engine it replaces goes, so the relay does not report two engine 0s."""
    scheduler = build_scheduler(tiny_model_dir, num_blocks=41, block_size=16, served_model_name="tiny")
    payload = ready_payload(scheduler, engine_index=0)
    reporter.add_engine(scheduler, payload)
    stepper = busy_workload(scheduler)
    observe_until_idle(scheduler, stepper, until=lambda: bool(stats_relay.read()))
    replaced = reporter.clients[scheduler][0]
    assert replaced.writer is not None and len(stats_relay.read()) == 1
    reporter.add_engine(scheduler, payload)
    assert reporter.clients[scheduler][0] is not replaced
    assert stats_relay.read() == [], "the replaced engine's file is gone"
