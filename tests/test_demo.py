"""The README's first command: ``python -m otel_vllm_kv.demo``, its options, its OTEL_* handling, one real run."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
from opentelemetry.test._otlp_test_server import OtlpProtoTestServer, RecordedMetric, RecordedSpan

from otel_vllm_kv import names
from otel_vllm_kv.demo import engine as demo_engine
from otel_vllm_kv.demo.__main__ import main
from otel_vllm_kv.demo.load import TENANTS
from otel_vllm_kv.demo.options import build_parser
from otel_vllm_kv.demo.otel_env import read_export_settings
from otel_vllm_kv.names import KV_CACHE_LIMIT, KV_CACHE_USAGE
from tests.support.engine_load import BLOCK_SIZE, LIMIT
from tests.support.instrumented_processes import otel_environment, otlp_attributes

DEMO = [sys.executable, "-m", "otel_vllm_kv.demo"]
OTEL_VARIABLES = [
    "OTEL_METRICS_EXPORTER",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_METRIC_EXPORT_INTERVAL",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
]


@pytest.fixture
def no_engine(monkeypatch):
    """Clear OTEL_* and make any attempt to start an engine fail the test."""
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)

    def refuse(*args, **kwargs):
        raise AssertionError("the demo must not start an engine here")

    monkeypatch.setattr(demo_engine, "tiny_engine", refuse)


def test_help_explains_every_option_and_the_otel_variables():
    result = subprocess.run([*DEMO, "--help"], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for action in build_parser()._actions:
        for option in action.option_strings:
            assert option in text
        assert action.help and len(action.help) > 15, f"{action.option_strings} needs an explanation"
    for variable in OTEL_VARIABLES:
        assert variable in text
    assert "otlp | console | none" in text and "grpc | http/protobuf" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--requests", "0"], "argument --requests: must be a positive integer, got '0'"),
        (["--prompt-tokens", "many"], "argument --prompt-tokens: must be a positive integer, got 'many'"),
        (["--prompt-tokens", "1500", "--output-tokens", "600"], "must not exceed the model's 2048 tokens"),
        (["--interval", "0"], "argument --interval: must be between 0.01 and 10 seconds"),
        (["--chart", "/no/such/directory/chart.png"], "argument --chart: directory '/no/such/directory' does not"),
        (["--chart", "chart.svg"], "argument --chart: must be a .png file name"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
    ],
)
def test_bad_options_fail_with_a_clear_message(no_engine, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("OTEL_METRICS_EXPORTER", "prometheus", "otlp, console, none"),
        ("OTEL_TRACES_EXPORTER", "otlp,zipkin", "otlp, console, none"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "grpc, http/protobuf"),
        ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http", "grpc, http/protobuf"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "GRPC2", "grpc, http/protobuf"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "1s", "a positive integer (milliseconds)"),
    ],
)
def test_bad_otel_values_fail_at_start_naming_the_variable(no_engine, monkeypatch, capsys, variable, value, accepted):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert f"{variable}={value!r} is invalid; accepted values: {accepted}" in captured.err
    assert "starting" not in captured.out


def test_otel_variables_choose_the_exporters():
    nothing = read_export_settings({})
    assert (nothing.metrics.exporters, nothing.traces.exporters) == ((), ()), "no network unless asked"
    endpoint = read_export_settings(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
    )
    assert (endpoint.metrics.exporters, endpoint.traces.exporters) == ((), ("otlp",))
    assert endpoint.traces.protocol == "http/protobuf"
    both = read_export_settings(
        {
            "OTEL_METRICS_EXPORTER": "console, otlp",
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc",
        }
    )
    assert both.metrics.exporters == ("console", "otlp") and both.metrics.protocol == "grpc", "the signal's own wins"
    assert both.traces.exporters == ()


# --- one real run -----------------------------------------------------------------------------------------------

# 12 requests end with 7 blocks each: 84 > 63 blocks, so the cache fills and vLLM must preempt.
REQUESTS, PROMPT_TOKENS, OUTPUT_TOKENS = 12, 300, 500
SUMMARY = re.compile(
    r"(?P<requests>\d+) requests, (?P<generated>[\d,]+) tokens generated in (?P<seconds>[\d.]+) s; "
    r"peak used (?P<peak>[\d,]+) of (?P<limit>[\d,]+) tokens \((?P<percent>[\d.]+)%\); "
    r"(?P<admissions>\d+) admissions, (?P<preemptions>\d+) preemptions, (?P<resumptions>\d+) resumptions; "
    r"used at the end (?P<end>[\d,]+)"
)
TENANT_LINE = re.compile(r"^  (?P<tenant>\S+) held (?P<seconds>[\d,]+) token-seconds$")
ENGINE_LINE = re.compile(
    r"engine 0 \[[#.]+\]\s+(?P<percent>[\d.]+)%\s+used\s+(?P<used>[\d,]+)\s+"
    r"free\s+(?P<free>[\d,]+)\s+\(evictable\s+(?P<evictable>[\d,]+)\)\s+limit\s+(?P<limit>[\d,]+)"
)


def number(text: str) -> int:
    return int(text.replace(",", ""))


@pytest.fixture(scope="module")
def demo_run(tiny_model_dir, tmp_path_factory):
    """The demo in a subprocess (stdout not a terminal: plain lines), exporting OTLP/HTTP to a receiver."""
    workdir = tmp_path_factory.mktemp("demo")
    with OtlpProtoTestServer() as receiver:
        env = otel_environment(
            OTEL_SERVICE_NAME="demo-under-test",
            OTEL_METRICS_EXPORTER="otlp",
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
            # The SDK's default interval, longer than the load: the demo's own flush once the burst has
            # drained (while the engine is still reported) must deliver the gauges.
            OTEL_METRIC_EXPORT_INTERVAL="60000",
        )
        args = [
            "--requests",
            str(REQUESTS),
            "--prompt-tokens",
            str(PROMPT_TOKENS),
            "--output-tokens",
            str(OUTPUT_TOKENS),
            "--interval",
            "0.05",
            "--model-dir",
            tiny_model_dir,
        ]
        result = subprocess.run(
            [*DEMO, *args], check=False, cwd=workdir, env=env, capture_output=True, text=True, timeout=500
        )
        recorded = [*receiver.drain_spans(), *receiver.drain_metrics()]  # the demo flushed before it exited
    return result, workdir, recorded


@pytest.mark.engine
def test_demo_fills_and_drains_the_cache_and_feeds_a_collector(demo_run):
    result, workdir, recorded = demo_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()

    # The live view (plain lines) and the summary.
    engine_lines = [ENGINE_LINE.search(line) for line in lines if ENGINE_LINE.search(line)]
    assert len(engine_lines) > 5, result.stdout
    for line in engine_lines:
        assert number(line["used"]) + number(line["free"]) == number(line["limit"]) == LIMIT
    assert max(number(line["used"]) for line in engine_lines) == LIMIT
    assert number(engine_lines[-1]["used"]) == 0, "drained at the end"
    # What the finished requests leave in the prefix cache: free, yet still reusable.
    assert 0 < number(engine_lines[-1]["evictable"]) <= number(engine_lines[-1]["free"])
    assert number(engine_lines[-1]["evictable"]) % BLOCK_SIZE == 0
    (summary,) = [SUMMARY.search(line) for line in lines if SUMMARY.search(line)]
    assert number(summary["requests"]) == number(summary["admissions"]) == REQUESTS
    assert number(summary["generated"]) == REQUESTS * OUTPUT_TOKENS
    assert (number(summary["peak"]), number(summary["limit"]), summary["percent"]) == (LIMIT, LIMIT, "100.0")
    preemptions = number(summary["preemptions"])
    assert preemptions > 0 and number(summary["resumptions"]) == preemptions
    assert number(summary["end"]) == 0

    # What each tenant held: every one of them, in the order of their shares of the burst.
    held = {match["tenant"]: number(match["seconds"]) for match in map(TENANT_LINE.search, lines) if match}
    assert list(held) == sorted(TENANTS) and all(seconds > 0 for seconds in held.values())
    assert held["team-a"] > held["team-c"], "team-a sent three times team-c's requests"

    # The chart.
    (chart_line,) = [line for line in lines if line.startswith("chart: ")]
    chart = workdir / "kv-cache-demo.png"
    assert chart_line == f"chart: {chart.resolve()}"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 20_000
    import matplotlib.image

    pixels = matplotlib.image.imread(chart)
    assert pixels.shape[0] >= 400 and pixels.shape[1] >= 800
    assert pixels.std() > 0.05, "the chart is not blank"

    # What the collector received.
    metrics = [item for item in recorded if isinstance(item, RecordedMetric)]
    spans = [item for item in recorded if isinstance(item, RecordedSpan)]
    for item in [*metrics, *spans]:
        assert otlp_attributes(item.resource.attributes)["service.name"] == "demo-under-test"
    limits = [point.as_int for m in metrics if m.metric.name == KV_CACHE_LIMIT for point in m.metric.gauge.data_points]
    assert limits and set(limits) == {LIMIT}
    usage = {
        otlp_attributes(point.attributes)["vllm.kv_cache.state"]: point.as_int
        for m in metrics
        if m.metric.name == KV_CACHE_USAGE
        for point in m.metric.gauge.data_points
    }
    assert usage == {"used": 0, "free": LIMIT}, "exported once the burst had drained"
    (load,) = [item.span for item in spans if item.span.name == "kv-cache-demo load"]
    events = {
        name: [e for e in load.events if e.name == name]
        for name in (names.EVENT_ADMITTED, names.EVENT_PREEMPTED, names.EVENT_RESUMED)
    }
    admitted = events[names.EVENT_ADMITTED]
    assert len(admitted) == REQUESTS
    assert len({otlp_attributes(e.attributes)[names.REQUEST_ID] for e in admitted}) == REQUESTS
    assert len(events[names.EVENT_PREEMPTED]) == len(events[names.EVENT_RESUMED]) == preemptions
    # Conservation, end to end: the tenants' exported residency is what the requests say they held.
    finished = [e for e in load.events if e.name == names.EVENT_FINISHED]
    assert len(finished) == REQUESTS
    spans_total = sum(otlp_attributes(e.attributes)[names.REQUEST_KV_TOKEN_SECONDS] for e in finished)
    residency = {
        otlp_attributes(point.attributes)[names.TENANT]: point.as_double
        for m in metrics
        if m.metric.name == names.KV_CACHE_RESIDENCY
        for point in m.metric.sum.data_points
    }
    assert set(residency) == set(TENANTS)
    assert math.isclose(sum(residency.values()), spans_total, rel_tol=1e-9)
    for event in [e for kind in events.values() for e in kind]:
        attributes = otlp_attributes(event.attributes)
        assert attributes[names.ADMISSION_USED_TOKENS] + attributes[names.ADMISSION_FREE_TOKENS] == LIMIT
        assert load.start_time_unix_nano <= event.time_unix_nano <= load.end_time_unix_nano
