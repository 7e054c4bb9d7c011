"""Who holds the KV cache, end to end: ``vllm serve`` with two LoRA adapters under
``opentelemetry-instrument``, tenants from W3C baggage, everything read from a real OTLP receiver.

One server start for the module: concurrent completions of adapters ``a`` and ``b`` and of the
base model, each with baggage tenant ``alpha``, ``beta`` or none. The holder metrics must name
exactly the (adapter, tenant) pairs sent, the residency of each must be what its requests' spans
say they held, the held points must add up to the used tokens, and no point names a request.
Adapter ``c`` is registered but never requested, tenant ``gamma`` never sent: neither has a point.
"""

from __future__ import annotations

import secrets
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.test._otlp_test_server import OtlpProtoTestServer

from otel_vllm_kv import names
from otel_vllm_kv.engine.holders import PASS_INTERVAL_SECONDS
from otel_vllm_kv.environment_variables import OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY
from tests.support.engine_load import ALLOCATABLE_BLOCKS, BLOCK_SIZE, distinct_prompts
from tests.support.instrumented_processes import instrumented_server, otel_environment, otlp_attributes
from tests.support.tiny_lora import build_adapter

pytestmark = pytest.mark.engine

BASE_MODEL = "tiny"
#: Adapter name -> its seed. ``c`` is served (``--lora-modules``) but never requested.
ADAPTERS = {"a": 1, "b": 2, "c": 3}
REQUESTED_MODELS = ("a", "b", BASE_MODEL)
BAGGAGE_KEY = "tenant.id"
#: Tenants sent in baggage; None: a request without baggage.
TENANTS = ("alpha", "beta", None)
#: A tenant no request carries.
NEVER_SENT_TENANT = "gamma"
#: Blocks twice vLLM's CPU default: a request then runs 2 x 128 steps in one block.
SERVED_BLOCK_SIZE = 2 * BLOCK_SIZE
SERVED_LIMIT = ALLOCATABLE_BLOCKS * SERVED_BLOCK_SIZE
#: 54 requests of one block each, from admission to finish: the used tokens stay steady while they run,
#: for longer than a pass interval (a few seconds), so that a pass and the exports around it fall on it.
REPEATS = 6
PROMPT_TOKENS = 8
MAX_TOKENS = SERVED_BLOCK_SIZE - PROMPT_TOKENS - 8
#: One prompt per (tenant, repeat), sent to every model: the same prompt generates apart per adapter.
PROMPTS = {
    (tenant, repeat): prompt
    for (tenant, repeat), prompt in zip(
        [(tenant, repeat) for tenant in TENANTS for repeat in range(REPEATS)],
        distinct_prompts(len(TENANTS) * REPEATS, PROMPT_TOKENS, first=700),
    )
}
#: Greedy sampling, and the generated token ids (the tiny model's bytes need not decode to text).
GREEDY = {"temperature": 0.0, "return_token_ids": True}
#: The OTLP metric export interval of the server, milliseconds: short, to catch the load's plateau at both ends.
EXPORT_INTERVAL_MS = 200
#: How long after the load the last export may take to show the idle pool.
SETTLE_SECONDS = 20.0
HOLDER_METRIC_NAMES = {names.KV_CACHE_RESIDENCY, names.KV_CACHE_HELD}
OUR_METRICS = {names.KV_CACHE_USAGE, names.KV_CACHE_LIMIT, names.KV_CACHE_WRITTEN, *HOLDER_METRIC_NAMES}
#: Every attribute a holder point may carry: the engine's, and its holder's.
HOLDER_ATTRIBUTES = {names.ENGINE_INDEX, names.MODEL_NAME, names.LORA_NAME, names.TENANT, names.OVERFLOW}

Holder = tuple  # (engine index, adapter name | None, tenant | None, overflow)


@dataclass
class SentRequest:
    model: str
    tenant: str | None
    prompt: str
    trace_id: str
    status: int = 0
    body: dict = field(default_factory=dict)

    @property
    def adapter(self) -> str | None:
        return None if self.model == BASE_MODEL else self.model

    def headers(self) -> dict[str, str]:
        # Our own trace parent: the server span of this request is then found by its trace id.
        headers = {"traceparent": f"00-{self.trace_id}-{secrets.token_hex(8)}-01"}
        if self.tenant is not None:
            headers["baggage"] = f"{BAGGAGE_KEY}={self.tenant}"
        return headers


@dataclass
class Export:
    """One metric export of the package's instruments."""

    time_ns: int
    used: dict[int, int] = field(default_factory=dict)
    limit: dict[int, int] = field(default_factory=dict)
    written: dict[int, float] = field(default_factory=dict)
    held: dict[Holder, float] = field(default_factory=dict)
    residency: dict[Holder, float] = field(default_factory=dict)
    wire: list[bytes] = field(default_factory=list)
    point_attributes: list[dict] = field(default_factory=list)

    def held_sum(self, engine: int) -> float:
        return sum(value for holder, value in self.held.items() if holder[0] == engine)

    def idle(self) -> bool:
        return bool(self.used) and not any(self.used.values()) and not any(self.held.values())


@dataclass
class Run:
    requests: list[SentRequest]
    load_start_ns: int
    load_end_ns: int
    exports: list[Export]
    server_spans: dict[str, Span]
    """Trace id (hex) -> the HTTP server span of that completion."""
    stderr: str

    @property
    def load_seconds(self) -> float:
        return (self.load_end_ns - self.load_start_ns) / 1e9

    @property
    def last(self) -> Export:
        return self.exports[-1]

    def during_load(self) -> list[Export]:
        return [e for e in self.exports if self.load_start_ns <= e.time_ns <= self.load_end_ns]


def _holder(attributes: dict) -> Holder:
    return (
        attributes[names.ENGINE_INDEX],
        attributes.get(names.LORA_NAME),
        attributes.get(names.TENANT),
        attributes.get(names.OVERFLOW, False),
    )


def split_exports(recorded: list) -> list[Export]:
    """The package's metrics in arrival order, one ``Export`` per export: a name seen again starts the next.

    The receiver handles one request at a time, so the metrics of an export arrive together.
    """
    exports: list[Export] = []
    seen: set[str] = set()
    for item in recorded:
        metric = item.metric
        if metric.name not in OUR_METRICS:
            continue
        if not exports or metric.name in seen:
            exports.append(Export(time_ns=0))
            seen = set()
        seen.add(metric.name)
        export = exports[-1]
        export.wire.append(metric.SerializeToString())
        points = getattr(metric, metric.WhichOneof("data")).data_points
        for point in points:
            attributes = otlp_attributes(point.attributes)
            value = point.as_int if point.WhichOneof("value") == "as_int" else point.as_double
            engine = attributes[names.ENGINE_INDEX]
            if metric.name == names.KV_CACHE_USAGE:
                export.time_ns = max(export.time_ns, point.time_unix_nano)
                if attributes[names.KV_CACHE_STATE] == names.KV_CACHE_STATE_USED:
                    export.used[engine] = value
            elif metric.name == names.KV_CACHE_LIMIT:
                export.limit[engine] = value
            elif metric.name == names.KV_CACHE_WRITTEN:
                export.written[engine] = value
            else:
                export.point_attributes.append(attributes)
                target = export.residency if metric.name == names.KV_CACHE_RESIDENCY else export.held
                target[_holder(attributes)] = value
    return [export for export in exports if export.used]


def serve_and_load(model_dir: str, adapter_dirs: dict[str, str], receiver: OtlpProtoTestServer, env_extra: dict) -> Run:
    env = otel_environment(
        OTEL_SERVICE_NAME="vllm-holders",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
        OTEL_METRIC_EXPORT_INTERVAL=str(EXPORT_INTERVAL_MS),
        OTEL_PYTHON_VLLM_KV_RESIDENCY="true",
        **env_extra,
    )
    vllm_args = [
        "--enable-lora",
        "--lora-modules",
        *(f"{name}={path}" for name, path in adapter_dirs.items()),
        "--max-lora-rank",
        "8",
        # One slot more than the adapters requested: vLLM < 0.33 on CPU gives a base request
        # batched with adapter requests the last slot's adapter unless it is empty (tiny_lora).
        "--max-loras",
        "3",
        "--block-size",
        str(SERVED_BLOCK_SIZE),
    ]
    requests = [
        SentRequest(model, tenant, PROMPTS[tenant, repeat], secrets.token_hex(16))
        for model in REQUESTED_MODELS
        for tenant in TENANTS
        for repeat in range(REPEATS)
    ]
    receiver.clear()
    with instrumented_server(
        model_dir, env, ["--traces_exporter", "otlp", "--metrics_exporter", "otlp"], vllm_args
    ) as server:
        load_start_ns = time.time_ns()

        def send(request: SentRequest) -> None:
            request.status, request.body = server.complete(
                request.prompt, MAX_TOKENS, model=request.model, headers=request.headers(), fields=GREEDY
            )

        with ThreadPoolExecutor(len(requests)) as pool:
            list(pool.map(send, requests))
        load_end_ns = time.time_ns()
        recorded, spans = _settled(receiver, load_end_ns, len(requests))
    server_spans = {
        s.span.trace_id.hex(): s.span
        for s in spans
        if s.span.kind == Span.SPAN_KIND_SERVER and s.span.name.startswith("POST /v1/completions")
    }
    return Run(requests, load_start_ns, load_end_ns, split_exports(recorded), server_spans, server.stderr)


def _settled(receiver: OtlpProtoTestServer, load_end_ns: int, span_count: int) -> tuple[list, list]:
    """Everything received until an export after the load shows the pool idle (nothing used, nothing
    held) and every completion's spans arrived, or ``SETTLE_SECONDS`` passed."""
    recorded, spans = [], []
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.5)
        recorded += receiver.drain_metrics()
        spans += receiver.drain_spans()
        exports = [e for e in split_exports(recorded) if e.time_ns > load_end_ns]
        server_spans = [s for s in spans if s.span.kind == Span.SPAN_KIND_SERVER]
        if exports and exports[-1].idle() and len(server_spans) >= span_count:
            break
    return recorded, spans


@pytest.fixture(scope="module")
def receiver():
    with OtlpProtoTestServer() as server:
        yield server


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    return {
        name: build_adapter(tiny_model_dir, str(tmp_path_factory.mktemp(f"lora-{name}")), seed)
        for name, seed in ADAPTERS.items()
    }


@pytest.fixture(scope="module")
def run(tiny_model_dir, adapter_dirs, receiver) -> Run:
    return serve_and_load(tiny_model_dir, adapter_dirs, receiver, {OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY: BAGGAGE_KEY})


def sent_holders(run: Run) -> set[Holder]:
    return {(0, request.adapter, request.tenant, False) for request in run.requests}


def test_every_completion_succeeds_and_the_adapters_really_run(run):
    assert [request.status for request in run.requests] == [200] * len(run.requests), run.stderr[-3000:]
    texts: dict[str, dict[str, tuple]] = defaultdict(dict)
    for request in run.requests:
        assert request.body["model"] == request.model
        texts[request.prompt][request.model] = tuple(request.body["choices"][0]["token_ids"])
    for prompt, by_model in texts.items():
        assert len(by_model) == len(REQUESTED_MODELS)
        assert len(set(by_model.values())) == len(REQUESTED_MODELS), f"{prompt[:10]!r}: {by_model}"


def test_residency_has_a_point_for_exactly_the_pairs_sent(run):
    assert run.exports, run.stderr[-3000:]
    residency = run.last.residency
    assert set(residency) == sent_holders(run), "one point per (adapter, tenant) sent, none other"
    assert all(value > 0 for value in residency.values()), residency
    points = run.last.point_attributes
    assert not any(attributes.get(names.OVERFLOW) for attributes in points), "32 holders: no overflow"
    assert not any(attributes.get(names.TENANT) == NEVER_SENT_TENANT for attributes in points)
    assert {attributes.get(names.LORA_NAME) for attributes in points} == {"a", "b", None}, "adapter c never ran"
    for attributes in points:
        assert attributes[names.MODEL_NAME] == BASE_MODEL, "the engine's served model, whichever adapter"


def test_each_pairs_residency_is_what_its_requests_held(run):
    """Per pair, the counter is the sum of its requests' span token-seconds (one ledger); all of it is
    at most the whole pool held for the whole load."""
    by_pair: dict[Holder, float] = defaultdict(float)
    for request in run.requests:
        span = run.server_spans[request.trace_id]
        by_pair[0, request.adapter, request.tenant, False] += otlp_attributes(span.attributes)[
            names.REQUEST_KV_TOKEN_SECONDS
        ]
    residency = run.last.residency
    for holder, token_seconds in by_pair.items():
        assert residency.get(holder) == pytest.approx(token_seconds, rel=1e-6), holder
    assert run.last.limit == {0: SERVED_LIMIT}
    assert 0 < sum(residency.values()) <= SERVED_LIMIT * run.load_seconds


def test_held_points_add_up_to_the_used_tokens(run):
    last = run.last
    assert last.time_ns > run.load_end_ns and last.idle(), "the pool is idle after the load: nothing held"
    assert set(last.held) == sent_holders(run), "every holder seen keeps a point, at 0 when idle"
    for export in run.exports:
        for engine, used in export.used.items():
            held = export.held_sum(engine)
            # A pass counts whole blocks shared 1/k, each adding up to 1: its sum is whole blocks.
            assert held / SERVED_BLOCK_SIZE == pytest.approx(round(held / SERVED_BLOCK_SIZE), abs=1e-6)
            assert 0 <= held <= SERVED_LIMIT
            if engine in export.written:
                assert export.written[engine] <= held + 1e-6, "written tokens are within the pass's used"
    steady = steady_exports(run)
    if not steady:
        pytest.skip(f"no export caught the load's used tokens steady over a pass interval: {used_and_held(run)}")
    for export in steady:
        assert export.held_sum(0) == pytest.approx(export.used[0]), used_and_held(run)


def steady_exports(run: Run) -> list[Export]:
    """The exports of the load whose used tokens had not changed for longer than the pass interval.

    A pass is up to a second (and a step) older than the usage of the same export. Before the
    first finish the used tokens only grow, so the same value at both ends of the window means it
    held throughout: the pass then counted what the export's usage shows.
    """
    loaded = [export for export in run.during_load() if export.used.get(0)]
    # A pass interval, and the step that ends it: twice the mean step (the load's duration over its steps).
    window_ns = (PASS_INTERVAL_SECONDS + 2 * run.load_seconds / MAX_TOKENS) * 1e9
    steady = []
    for index, export in enumerate(loaded):
        window_start = [j for j in range(index) if export.time_ns - loaded[j].time_ns >= window_ns]
        if window_start and all(e.used[0] == export.used[0] for e in loaded[window_start[-1] : index]):
            steady.append(export)
    return steady


def used_and_held(run: Run) -> list[tuple[float, int, float]]:
    """(seconds into the load, used, held sum) of engine 0 per export: a failure's figures."""
    return [
        (round((export.time_ns - run.load_start_ns) / 1e9, 2), export.used.get(0), export.held_sum(0))
        for export in run.exports
    ]


def test_every_server_span_carries_what_its_request_held(run):
    assert set(run.server_spans) >= {request.trace_id for request in run.requests}, run.stderr[-3000:]
    for request in run.requests:
        attributes = otlp_attributes(run.server_spans[request.trace_id].attributes)
        assert attributes[names.REQUEST_KV_TOKEN_SECONDS] > 0
        assert attributes[names.REQUEST_KV_PEAK_TOKENS] == SERVED_BLOCK_SIZE, "one block throughout"
        assert attributes[names.REQUEST_KV_RECOMPUTED_TOKENS] == 0, "the pool never runs short"


def test_no_metric_point_names_a_request(run):
    """Nothing of a request in the metrics: not its id (vLLM's internal id extends the response's), its
    trace, or its prompt; holder points carry the engine's and the holder's attributes only."""
    identifiers = [request.body["id"].encode() for request in run.requests]
    identifiers += [request.prompt.encode() for request in run.requests]
    identifiers += [
        form for request in run.requests for form in (request.trace_id.encode(), bytes.fromhex(request.trace_id))
    ]
    for export in run.exports:
        for wire in export.wire:
            assert not any(identifier in wire for identifier in identifiers)
        for attributes in export.point_attributes:
            assert set(attributes) <= HOLDER_ATTRIBUTES, attributes
