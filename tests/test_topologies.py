"""``vllm serve`` in the topologies operators run (docs/architecture.md, Topologies), under
``opentelemetry-instrument``, each run with and without this package
(``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=vllm_kv``) against a real OTLP receiver.

The package must take no telemetry away: the same HTTP server spans and the same number of
exporting processes per signal with and without it. With it, each engine's KV gauges are
exported once per process tree that runs it, every API server annotates the spans of the
requests its probed engines served, and vLLM's own /metrics carries the token gauges.
"""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.test._otlp_test_server import OtlpProtoTestServer
from prometheus_client.parser import text_string_to_metric_families

from otel_vllm_kv import names
from otel_vllm_kv.demo.tiny_model import server_arguments
from otel_vllm_kv.names import (
    ENGINE_INDEX,
    KV_CACHE_LIMIT,
    KV_CACHE_STATE,
    KV_CACHE_USAGE,
    PROMETHEUS_EVICTABLE_TOKENS,
    PROMETHEUS_HEADROOM_TOKENS,
    PROMETHEUS_LIMIT_TOKENS,
    PROMETHEUS_USAGE_TOKENS,
)
from tests.support.engine_load import LIMIT, distinct_prompts
from tests.support.instrumented_processes import (
    OPENTELEMETRY_INSTRUMENT,
    VLLM,
    exporting_resources,
    free_port,
    instrumented_server,
    otel_environment,
    otlp_attributes,
    vllm_process,
)

pytestmark = pytest.mark.engine
REQUESTS = 12
PROMPTS = distinct_prompts(REQUESTS, 200, first=500)
#: The Prometheus exporter's name for the limit gauge (dots become underscores).
PROMETHEUS_LIMIT = KV_CACHE_LIMIT.replace(".", "_")
PROMETHEUS_ENGINE_INDEX = ENGINE_INDEX.replace(".", "_")
OUR_VLLM_METRICS = {
    PROMETHEUS_USAGE_TOKENS,
    PROMETHEUS_LIMIT_TOKENS,
    PROMETHEUS_EVICTABLE_TOKENS,
    PROMETHEUS_HEADROOM_TOKENS,
}
VLLM_METRICS_SCRAPES = 6


@dataclass
class Run:
    statuses: list[int]
    server_spans: list
    span_exporters: int
    """Processes that exported spans (each has its own ``service.instance.id``)."""
    metric_exporters: int
    """Processes that exported metrics other than this package's."""
    kv_exporters: int
    """Processes that exported this package's KV gauges."""
    kv_exporters_by_engine: dict[int, int]
    """Engine index -> the processes that exported its KV gauges."""
    limits: dict[int, list[int]]
    """Engine index -> the limit values exported for it, one per exporting process."""
    drained_used: dict[int, int]
    """Engine index -> the last used-tokens value exported over OTLP, after the load drained."""
    prometheus_families: set[str]
    vllm_metrics_limits: list[dict[int, list[int]]]
    """Per scrape of vLLM's own /metrics: engine -> the ``vllm:kv_cache_limit_tokens`` values served."""
    stderr: str


def serve(model_dir: str, receiver: OtlpProtoTestServer, topology: Topology, with_package: bool) -> Run:
    """``vllm serve`` under ``opentelemetry-instrument``: traces over OTLP/HTTP, metrics over OTLP or Prometheus.

    A topology with ``second_node_args`` runs a second process tree beside it, a "node" with its
    own relay, as a second host would: ``--headless``, or a second server (external load balancing).
    """
    metrics_exporter = topology.metrics_exporter
    prometheus_port = free_port()
    env = otel_environment(
        OTEL_SERVICE_NAME="vllm-topology",
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
        OTEL_EXPORTER_PROMETHEUS_PORT=str(prometheus_port),
    )
    if not with_package:
        env["OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"] = "vllm_kv"
    exporters = ["--traces_exporter", "otlp", "--metrics_exporter", metrics_exporter]
    receiver.clear()
    rpc_port = str(free_port())
    with contextlib.ExitStack() as stack:
        nodes = []
        if topology.second_node_args is not None:
            command = [VLLM, "serve", *server_arguments(model_dir), *topology.second_args(rpc_port)]
            port = free_port() if topology.second_node_serves_http else None
            if port is not None:
                command += ["--port", str(port)]
            if topology.second_node_instrumented:
                command = [OPENTELEMETRY_INSTRUMENT, *exporters, *command]
            nodes.append(stack.enter_context(vllm_process(command, env, port, wait=False)))
        server = stack.enter_context(instrumented_server(model_dir, env, exporters, topology.args(rpc_port)))
        server.wait_api_servers(topology.api_servers)
        http_servers = [server, *(node for node in nodes if node.port is not None)]
        for node in http_servers[1:]:
            node.wait_healthy()
        results = _complete_across(http_servers, PROMPTS)
        spans, metrics = _settled(receiver)
        # Each scrape may reach another API server (they share the port).
        vllm_metrics_limits = [_vllm_metrics_limits(server.url("/metrics")) for _ in range(VLLM_METRICS_SCRAPES)]
        families = set()
        limits: dict[int, list[int]] = defaultdict(list)
        if metrics_exporter == "prometheus":
            with urllib.request.urlopen(f"http://127.0.0.1:{prometheus_port}/metrics", timeout=10) as response:
                for family in text_string_to_metric_families(response.read().decode()):
                    families.add(family.name)
                    if family.name == PROMETHEUS_LIMIT:
                        for sample in family.samples:
                            limits[int(sample.labels[PROMETHEUS_ENGINE_INDEX])].append(int(sample.value))
    spans += receiver.drain_spans()
    metrics += receiver.drain_metrics()
    kv_exporters_by_engine: dict[int, int] = defaultdict(int)
    drained_used = {
        index: value
        for recorded in _latest(metrics, KV_CACHE_USAGE, "used").values()
        for index, value in recorded.items()
    }
    for resource, recorded in _latest(metrics, KV_CACHE_LIMIT).items():
        for engine_index, value in recorded.items():
            limits[engine_index].append(value)
            kv_exporters_by_engine[engine_index] += 1
    return Run(
        statuses=[status for status, _ in results],
        server_spans=[
            s.span
            for s in spans
            if s.span.kind == Span.SPAN_KIND_SERVER and s.span.name.startswith("POST /v1/completions")
        ],
        span_exporters=len(exporting_resources(spans)),
        metric_exporters=len(exporting_resources([m for m in metrics if not _is_ours(m)])),
        kv_exporters=len(exporting_resources([m for m in metrics if _is_ours(m)])),
        kv_exporters_by_engine=dict(kv_exporters_by_engine),
        limits=dict(limits),
        drained_used=drained_used,
        prometheus_families=families,
        vllm_metrics_limits=vllm_metrics_limits,
        stderr=server.stderr + "".join(node.stderr for node in nodes),
    )


def _settled(receiver: OtlpProtoTestServer, quiet: float = 3.0, limit: float = 20.0) -> tuple[list, list]:
    """What the receiver got once the set of exporting processes stopped growing for ``quiet`` s.

    On 2 busy cores an API server's periodic export can lag a few seconds behind the load; a
    count taken too early would compare exporters that had not reported yet.
    """
    spans, metrics = receiver.drain_spans(), receiver.drain_metrics()
    exporters, steady_since, deadline = None, time.monotonic(), time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(0.5)
        spans += receiver.drain_spans()
        metrics += receiver.drain_metrics()
        now = (len(exporting_resources(spans)), len(exporting_resources(metrics)))
        if now != exporters:
            exporters, steady_since = now, time.monotonic()
        elif time.monotonic() - steady_since >= quiet:
            break
    return spans, metrics


def _complete_across(servers: list, prompts: list[str]) -> list:
    """Send the prompts concurrently, spread over ``servers`` as an external load balancer would."""
    shares = [prompts[index :: len(servers)] for index in range(len(servers))]
    with ThreadPoolExecutor(len(servers)) as pool:
        results = pool.map(lambda server, share: server.complete_concurrently(share, max_tokens=16), servers, shares)
        return [result for server_results in results for result in server_results]


def _vllm_metrics_limits(url: str) -> dict[int, list[int]]:
    limits: dict[int, list[int]] = defaultdict(list)
    with urllib.request.urlopen(url, timeout=10) as response:
        for family in text_string_to_metric_families(response.read().decode()):
            for sample in family.samples:
                if sample.name == PROMETHEUS_LIMIT_TOKENS:
                    limits[int(sample.labels["engine"])].append(int(sample.value))
    return dict(limits)


def _is_ours(recorded) -> bool:
    return recorded.metric.name.startswith("vllm.kv_cache.")


def _latest(metrics: list, name: str, state: str | None = None) -> dict[tuple, dict[int, int]]:
    """Per exporting resource, the last value of gauge ``name`` (of that ``state``) for each engine index."""
    latest: dict[tuple, dict[int, int]] = defaultdict(dict)
    for recorded in metrics:
        if recorded.metric.name != name:
            continue
        resource = tuple(sorted(otlp_attributes(recorded.resource.attributes).items()))
        for point in recorded.metric.gauge.data_points:
            attributes = otlp_attributes(point.attributes)
            if state is None or attributes[KV_CACHE_STATE] == state:
                latest[resource][attributes[ENGINE_INDEX]] = point.as_int
    return latest


@dataclass(frozen=True)
class Topology:
    vllm_args: tuple[str, ...]
    metrics_exporter: str
    engines: int
    server_spans: int
    """HTTP server spans expected without the package: 0 where no API server can auto-instrument."""
    process_trees: int = 1
    """Process trees that export KV gauges: one per "node"."""
    vllm_metrics_engines: int | None = None
    """Engines on the /metrics the server answers on; default: all."""
    second_node_args: tuple[str, ...] | None = None
    """A second node: ``vllm serve`` with these arguments, a process tree of its own; None: none."""
    second_node_instrumented: bool = True
    """Whether the second node runs under ``opentelemetry-instrument`` (else plain ``vllm serve``)."""
    second_node_serves_http: bool = False
    """Whether the second node is a server too (external load balancing) rather than ``--headless``."""
    instances: int = 1
    """Process trees that each report every engine index (independent instances)."""
    api_servers: int = 1
    """API-server processes of the first ``vllm serve``."""
    probed_engines: int | None = None
    """Engines that run a probe, hence whose requests' spans are annotated; default: all."""

    def args(self, rpc_port: str) -> list[str]:
        return [argument.replace(RPC_PORT, rpc_port) for argument in self.vllm_args]

    def second_args(self, rpc_port: str) -> list[str]:
        return [argument.replace(RPC_PORT, rpc_port) for argument in self.second_node_args]


#: Stands for the head's data-parallel RPC port, a free port chosen per run.
RPC_PORT = "{rpc_port}"
_TWO_NODES = (
    "--data-parallel-size",
    "2",
    "--data-parallel-size-local",
    "1",
    "--data-parallel-address",
    "127.0.0.1",
    "--data-parallel-rpc-port",
    RPC_PORT,
)
_HEAD = (*_TWO_NODES, "--api-server-count", "1")
_HEADLESS = (*_TWO_NODES, "--headless", "--data-parallel-start-rank", "1")

TOPOLOGIES = {
    # vllm serve starts one API-server process per engine by default (internal load balancing).
    "data parallel 2, OTLP": Topology(
        ("--data-parallel-size", "2"),
        "otlp",
        engines=2,
        server_spans=REQUESTS,
        api_servers=2,
    ),
    # Every spawned process tries the launcher's Prometheus port; opentelemetry-instrument then
    # skips the API servers altogether (no server spans), with or without this package.
    "one engine, 2 API servers, Prometheus": Topology(
        ("--api-server-count", "2"),
        "prometheus",
        1,
        server_spans=0,
        api_servers=2,
    ),
    # Two "nodes" on this host, each its own process tree and relay: the head serves HTTP and
    # runs engine 0; the headless node runs engine 1 and exports it itself.
    "head and headless node, OTLP": Topology(
        _HEAD,
        "otlp",
        engines=2,
        server_spans=REQUESTS,
        process_trees=2,
        vllm_metrics_engines=1,
        second_node_args=_HEADLESS,
    ),
    # The headless node started without opentelemetry-instrument (as a node someone forgot to
    # wrap): its engine has no probe, and the head reports it from vLLM's scheduler statistics.
    "head and uninstrumented headless node, OTLP": Topology(
        _HEAD,
        "otlp",
        engines=2,
        server_spans=REQUESTS,
        second_node_args=_HEADLESS,
        second_node_instrumented=False,
        probed_engines=1,
    ),
    # Two independent instances behind a load balancer, each its own process tree: both report
    # engine 0, told apart by their resources (service.instance.id).
    "two independent instances, OTLP": Topology(
        (),
        "otlp",
        engines=1,
        server_spans=REQUESTS,
        process_trees=2,
        instances=2,
        second_node_args=(),
        second_node_serves_http=True,
    ),
}
#: The warning that names an engine without a probe.
NO_PROBE_WARNING = "vLLM engine 1 (data-parallel rank 1) runs no probe"


@pytest.fixture(scope="module")
def receiver():
    with OtlpProtoTestServer() as server:
        yield server


@pytest.fixture(scope="module", params=list(TOPOLOGIES))
def runs(request, tiny_model_dir, receiver):
    """The topology served twice: without the package, then with it."""
    topology = TOPOLOGIES[request.param]
    arguments = (tiny_model_dir, receiver, topology)
    without = serve(*arguments, with_package=False)
    with_package = serve(*arguments, with_package=True)
    return without, with_package, topology


def test_no_telemetry_is_taken_away(runs):
    without, with_package, topology = runs
    metrics_exporter = topology.metrics_exporter
    assert without.statuses == with_package.statuses == [200] * REQUESTS
    assert len(without.server_spans) == topology.server_spans, without.stderr[-3000:]
    assert len(with_package.server_spans) == len(without.server_spans), with_package.stderr[-3000:]
    assert with_package.span_exporters == without.span_exporters
    for failure in ("Address already in use", "Failed to auto initialize"):
        assert with_package.stderr.count(failure) == without.stderr.count(failure), failure
    unprobed = topology.engines - (topology.probed_engines or topology.engines)
    assert with_package.stderr.count(NO_PROBE_WARNING) == unprobed, "one warning names the engine without a probe"
    if metrics_exporter == "prometheus":
        assert without.prometheus_families <= with_package.prometheus_families
        added = with_package.prometheus_families - without.prometheus_families
        # Ours under both names (the exporter's and vLLM's /metrics collector share the default
        # registry), plus the exporter's target_info, which appears once it has a metric.
        assert all(name.startswith("vllm_kv_cache_") or name in {*OUR_VLLM_METRICS, "target_info"} for name in added)
    else:
        assert with_package.metric_exporters == without.metric_exporters
        assert (without.kv_exporters, with_package.kv_exporters) == (0, topology.process_trees)


def test_each_engine_is_exported_once_with_its_limit(runs):
    without, with_package, topology = runs
    assert without.limits == {}
    instances = topology.instances
    assert with_package.limits == {index: [LIMIT] * instances for index in range(topology.engines)}
    if topology.metrics_exporter == "otlp":
        assert with_package.kv_exporters_by_engine == {index: instances for index in range(topology.engines)}
        assert with_package.drained_used == {index: 0 for index in range(topology.engines)}, "idle: nothing used"


def test_vllms_own_metrics_endpoint_serves_every_engine_once(runs):
    """With several API servers vLLM serves a multiprocess registry; every scrape, whichever
    server answers it, carries each engine's token limit once."""
    without, with_package, topology = runs
    assert without.vllm_metrics_limits == [{}] * VLLM_METRICS_SCRAPES
    engines = topology.engines if topology.vllm_metrics_engines is None else topology.vllm_metrics_engines
    expected = {index: [LIMIT] for index in range(engines)}
    assert with_package.vllm_metrics_limits == [expected] * VLLM_METRICS_SCRAPES


def test_every_api_server_annotates_the_spans_of_its_requests(runs):
    _, with_package, topology = runs
    if not topology.server_spans:
        pytest.skip("no API server of this topology records spans, with or without the package")
    probed = topology.engines if topology.probed_engines is None else topology.probed_engines
    engine_indexes = []
    for span in with_package.server_spans:
        attributes = otlp_attributes(span.attributes)
        if names.ENGINE_INDEX in attributes:
            assert attributes[names.ADMISSION_LIMIT_TOKENS] == LIMIT, with_package.stderr[-3000:]
        engine_indexes.append(attributes.get(names.ENGINE_INDEX))
    assert set(engine_indexes) - {None} == set(range(probed)), "requests of every probed engine are annotated"
    if probed == topology.engines:
        assert None not in engine_indexes, "every span is annotated"
    else:
        assert None in engine_indexes, "the requests the unprobed engine served carry nothing"
