"""examples/: every file parses, the Prometheus files pass promtool, the pieces refer to each other
consistently, and the PromQL uses the package's own metric names; one engine test runs
examples/programmatic.py against an OTLP receiver.

Docker is not available to the suite: docker-compose.yaml is checked statically (mounted files
exist, every host name the configurations use is a service). The PromQL of the dashboard and
the alert rules also runs against a real Prometheus in test_prometheus.py.
"""

from __future__ import annotations

import glob
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from otel_vllm_kv.names import (
    ENGINE_INDEX,
    GAUGES,
    HOLDER_COUNTERS,
    HOLDER_METRICS,
    KV_CACHE_ADMISSION_HEADROOM,
    KV_CACHE_EVICTABLE,
    KV_CACHE_HELD,
    KV_CACHE_LIMIT,
    KV_CACHE_RESIDENCY,
    KV_CACHE_STATE,
    KV_CACHE_STATE_FREE,
    KV_CACHE_STATE_USED,
    KV_CACHE_USAGE,
    KV_CACHE_UTILIZATION,
    KV_CACHE_WRITTEN,
    LORA_NAME,
    MODEL_NAME,
    OVERFLOW,
    TENANT,
)
from tests.support.engine_load import BLOCK_SIZE
from tests.support.engine_load import LIMIT as ENGINE_LIMIT
from tests.support.example_queries import (
    ALERT_RULES,
    DASHBOARD,
    EXAMPLES,
    alert_expressions,
    alert_thresholds,
    dashboard_expressions,
    dashboard_panels,
    load_alert_rules,
    load_dashboard,
    promql_expressions,
)
from tests.support.prometheus_server import require_binary

RULES_TEST = EXAMPLES / "prometheus" / "alert-rules.test.yml"
PROMETHEUS_CONFIG = EXAMPLES / "prometheus" / "prometheus.yml"
COLLECTOR_CONFIG = EXAMPLES / "collector" / "otel-collector.yaml"
COMPOSE = EXAMPLES / "docker-compose.yaml"
GRAFANA_DATASOURCES = EXAMPLES / "grafana" / "provisioning" / "datasources" / "datasources.yaml"
GRAFANA_DASHBOARD_PROVIDERS = EXAMPLES / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
PROGRAMMATIC = EXAMPLES / "programmatic.py"


def prometheus_name(otel_name: str) -> str:
    """The Prometheus name of an OpenTelemetry metric or attribute, without unit/type suffixes."""
    return re.sub(r"[^a-zA-Z0-9_:]", "_", otel_name)


def python_exporter_names() -> dict[str, str]:
    """The name of each holder metric's samples from OpenTelemetry's Python Prometheus exporter,
    instruments made as the package makes them (``exporter/holder_metrics.py``).

    It adds the unit (``{token}.s`` -> ``_s``) and a counter's ``_total``, which the Collector's
    exporter with ``add_metric_suffixes: false`` does not: those are ``prometheus_name(name)``.
    """
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.metrics import Observation
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    try:
        meter = provider.get_meter("otel_vllm_kv")
        for name, instrument in HOLDER_METRICS.items():
            create = meter.create_observable_counter if name in HOLDER_COUNTERS else meter.create_observable_gauge
            create(name, [lambda options: [Observation(1)]], unit=instrument.unit)
        samples = {sample.name for family in registry.collect() for sample in family.samples}
    finally:
        provider.shutdown()
    names = {}
    for name in HOLDER_METRICS:
        (names[name],) = [sample for sample in samples if sample.startswith(prometheus_name(name))]
    return names


USAGE, LIMIT, UTILIZATION, HEADROOM, EVICTABLE = (
    prometheus_name(name)
    for name in (KV_CACHE_USAGE, KV_CACHE_LIMIT, KV_CACHE_UTILIZATION, KV_CACHE_ADMISSION_HEADROOM, KV_CACHE_EVICTABLE)
)
HELD, RESIDENCY, WRITTEN = (prometheus_name(name) for name in (KV_CACHE_HELD, KV_CACHE_RESIDENCY, KV_CACHE_WRITTEN))
#: The residency counter as OpenTelemetry's Python Prometheus exporter names it (checked below):
#: the dashboard reads both names, so that it works behind the Collector and on that exporter's port.
RESIDENCY_PYTHON_EXPORTER = f"{RESIDENCY}_s_total"
PACKAGE_METRICS = {prometheus_name(name) for name in (*GAUGES, *HOLDER_METRICS)}
DASHBOARD_METRICS = {
    USAGE,
    LIMIT,
    UTILIZATION,
    HEADROOM,
    EVICTABLE,
    HELD,
    RESIDENCY,
    RESIDENCY_PYTHON_EXPORTER,
    WRITTEN,
}
#: The metrics with one point per engine and holder; every other one has one per engine.
HOLDER_SERIES = {HELD, RESIDENCY, RESIDENCY_PYTHON_EXPORTER}
STATE, ENGINE, MODEL = (prometheus_name(name) for name in (KV_CACHE_STATE, ENGINE_INDEX, MODEL_NAME))
LORA, TENANT_LABEL, OVERFLOW_LABEL = (prometheus_name(name) for name in (LORA_NAME, TENANT, OVERFLOW))
#: The engine's identity: what every per-engine aggregation keeps, exactly.
ENGINE_IDENTITY = {MODEL, ENGINE}
#: A holder's identity on one engine (each absent where it does not apply).
HOLDER_LABELS = {LORA, TENANT_LABEL, OVERFLOW_LABEL}
PACKAGE_LABELS = {STATE, ENGINE, MODEL, *HOLDER_LABELS}
STATES = {KV_CACHE_STATE_USED, KV_CACHE_STATE_FREE}

_STRING = r'"(?:[^"\\]|\\.)*"'
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}


def metric_names(expression: str) -> set[str]:
    """The metric names an expression selects (identifiers that are neither functions, keywords nor labels)."""
    text = re.sub(_STRING, '""', expression)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        if match.group() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue  # a keyword or a function call
        names.add(match.group())
    return names


def label_matchers(expression: str) -> list[tuple[str, str, str]]:
    """(label, operator, value) of every matcher inside ``{...}``."""
    matchers = []
    for selector in re.findall(r"\{([^}]*)\}", expression):
        for label, operator, value in re.findall(rf"(\w+)\s*(=~|!~|!=|=)\s*({_STRING})", selector):
            matchers.append((label, operator, json.loads(value)))
    return matchers


def grouping_lists(expression: str) -> list[set[str]]:
    """The labels of each ``by``/``without``/``on``/``ignoring``/``group_*`` list, one set per list."""
    return [
        {label.strip() for label in labels.split(",") if label.strip()} for _, labels in _GROUPING.findall(expression)
    ]


def grouping_labels(expression: str) -> set[str]:
    return set().union(*grouping_lists(expression))


def is_holder_expression(expression: str) -> bool:
    """Whether the expression reads a metric with one point per engine and holder."""
    return bool(metric_names(expression) & HOLDER_SERIES)


def assert_grouped_by_engine_or_holder(expression: str, where) -> None:
    """Per engine: every list is exactly the engine's identity. Per holder (the expression reads a
    holder metric): the lists together are exactly the engine's identity and the holder's labels,
    each list one of the two (a holder aggregation never drops one holder label)."""
    holder = ENGINE_IDENTITY | HOLDER_LABELS
    lists = grouping_lists(expression)
    assert lists, (where, "no aggregation: duplicate series (two jobs) stay apart")
    if is_holder_expression(expression):
        assert grouping_labels(expression) == holder, (where, expression)
        assert all(labels in (ENGINE_IDENTITY, holder) for labels in lists), (where, lists)
    else:
        assert all(labels == ENGINE_IDENTITY for labels in lists), (where, lists)


def run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


# --- every file parses --------------------------------------------------------------------


def test_every_yaml_and_json_file_parses():
    yaml_files = [Path(p) for p in glob.glob(str(EXAMPLES / "**" / "*.y*ml"), recursive=True)]
    json_files = [Path(p) for p in glob.glob(str(EXAMPLES / "**" / "*.json"), recursive=True)]
    expected = {
        COLLECTOR_CONFIG,
        PROMETHEUS_CONFIG,
        ALERT_RULES,
        RULES_TEST,
        COMPOSE,
        GRAFANA_DATASOURCES,
        GRAFANA_DASHBOARD_PROVIDERS,
    }
    assert expected <= set(yaml_files) and DASHBOARD in json_files
    for path in yaml_files:
        assert isinstance(load_yaml(path), dict), path
    for path in json_files:
        assert isinstance(json.loads(path.read_text()), dict), path


def test_python_examples_compile_and_programmatic_help_works(tmp_path):
    scripts = glob.glob(str(EXAMPLES / "**" / "*.py"), recursive=True)
    assert str(PROGRAMMATIC) in scripts
    for script in scripts:
        py_compile.compile(script, cfile=str(tmp_path / "compiled.pyc"), doraise=True)
    result = run([sys.executable, str(PROGRAMMATIC), "--help"])
    assert result.returncode == 0, result.stderr
    for option in ("--model", "--requests", "--max-tokens", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        assert option in result.stdout


def test_shell_scripts_parse():
    scripts = glob.glob(str(EXAMPLES / "**" / "*.sh"), recursive=True)
    assert str(EXAMPLES / "zero_code.sh") in scripts
    for script in scripts:
        result = run(["bash", "-n", script])
        assert result.returncode == 0, (script, result.stderr)
        assert os.access(script, os.X_OK), f"{script} is not executable"


def _zero_code_run(tmp_path: Path, *arguments: str) -> tuple[list[str], dict[str, str]]:
    """What ``zero_code.sh`` executes: an ``opentelemetry-instrument`` on PATH that records it."""
    recorder = tmp_path / "opentelemetry-instrument"
    recorder.write_text(
        "#!/usr/bin/env python3\nimport json, os, sys\n"
        'print(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ)}))\n'
    )
    recorder.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    env["PATH"] = f"{tmp_path}:{env['PATH']}"
    result = subprocess.run(
        ["bash", str(EXAMPLES / "zero_code.sh"), *arguments], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    return run["argv"], run["env"]


def test_zero_code_script_runs_each_mode_under_opentelemetry_instrument(tmp_path):
    argv, env = _zero_code_run(tmp_path, "otlp", "MODEL", "--port", "8001")
    assert argv[:4] == ["--traces_exporter", "otlp", "--metrics_exporter", "otlp"]
    assert argv[4:7] == ["vllm", "serve", "MODEL"] and argv[-2:] == ["--port", "8001"], "vLLM arguments passed on"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] in argv, "vLLM's own tracing goes to the same collector"
    argv, env = _zero_code_run(tmp_path, "prometheus", "MODEL")
    assert argv[argv.index("--metrics_exporter") + 1] == "prometheus" and env["OTEL_EXPORTER_PROMETHEUS_PORT"]
    argv, env = _zero_code_run(tmp_path, "offline", "MODEL")
    script = Path(argv[argv.index("python") + 1])
    assert script.resolve() == (EXAMPLES / "offline_batch.py").resolve() and argv[-2:] == ["--model", "MODEL"]
    assert int(env["OTEL_METRIC_EXPORT_INTERVAL"]) > 0 and env["OTEL_SERVICE_NAME"]
    result = subprocess.run(
        ["bash", str(EXAMPLES / "zero_code.sh"), "nonsense", "MODEL"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "unknown mode" in result.stderr


def test_examples_readme_mentions_every_file():
    readme = (EXAMPLES / "README.md").read_text()
    for path in Path(EXAMPLES).rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.name != "README.md":
            assert str(path.relative_to(EXAMPLES)) in readme, f"examples/README.md does not mention {path}"


# --- Prometheus: promtool -----------------------------------------------------------------


def test_promtool_check_rules():
    promtool = require_binary("promtool")
    result = run([promtool, "check", "rules", str(ALERT_RULES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_alert_rules())} rules found" in result.stdout


def test_promtool_check_config(tmp_path):
    promtool = require_binary("promtool")
    # As mounted in docker-compose.yaml: the configuration with its rule file beside it.
    shutil.copy(PROMETHEUS_CONFIG, tmp_path / "prometheus.yml")
    for rule_file in load_yaml(PROMETHEUS_CONFIG)["rule_files"]:
        shutil.copy(PROMETHEUS_CONFIG.parent / rule_file, tmp_path / rule_file)
    result = run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_promtool_rule_unit_tests_pass():
    promtool = require_binary("promtool")
    result = run([promtool, "test", "rules", RULES_TEST.name], cwd=RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _duration_minutes(text: str) -> float:
    value, unit = re.fullmatch(r"(\d+)([smh])", text).groups()
    return int(value) * {"s": 1 / 60, "m": 1, "h": 60}[unit]


def test_rule_unit_tests_cover_every_alert_firing_once_its_for_elapsed_and_not_before():
    rules = {rule["alert"]: rule for rule in load_alert_rules()}
    assert set(rules) == {
        "KVCacheFreeTokensLow",
        "KVCacheSaturated",
        "KVCacheMetricsAbsent",
        "KVCacheHolderDominant",
        "KVCacheFragmented",
    }
    document = load_yaml(RULES_TEST)
    assert [os.path.normpath(RULES_TEST.parent / f) for f in document["rule_files"]] == [str(ALERT_RULES)]
    fired, quiet = {}, {}
    for case in document["tests"]:
        for check in case["alert_rule_test"]:
            minutes = _duration_minutes(check["eval_time"])
            (fired if check["exp_alerts"] else quiet).setdefault(check["alertname"], []).append(minutes)
            for alert in check["exp_alerts"]:
                assert alert["exp_annotations"]["summary"] and alert["exp_annotations"]["description"]
    for name, rule in rules.items():
        pending = _duration_minutes(rule["for"])
        assert fired.get(name), f"{name}: no unit test expects it to fire"
        assert quiet.get(name), f"{name}: no unit test expects it not to fire"
        assert min(fired[name]) >= pending, f"{name}: expected to fire before its `for` ({rule['for']}) elapsed"
        assert any(m < pending for m in quiet[name]), f"{name}: no check that it is only pending before {rule['for']}"


def test_alert_rules_use_the_package_metrics_and_say_the_values():
    thresholds = alert_thresholds()
    assert thresholds["KVCacheFreeTokensLow"][0] == "<" and thresholds["KVCacheFreeTokensLow"][1] >= 1
    assert thresholds["KVCacheSaturated"][0] == ">" and 0 < thresholds["KVCacheSaturated"][1] < 1
    # A share of the engine's limit held by one holder, and of its used tokens written.
    assert thresholds["KVCacheHolderDominant"][0] == ">" and 0 < thresholds["KVCacheHolderDominant"][1] < 1
    assert thresholds["KVCacheFragmented"][0] == "<" and 0 < thresholds["KVCacheFragmented"][1] < 1
    holder_alerts = set()
    for rule in load_alert_rules():
        expression = rule["expr"]
        assert metric_names(expression) and metric_names(expression) <= PACKAGE_METRICS, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        if rule["alert"] in thresholds:
            # One alert per engine (per engine and holder for a holder metric), whatever
            # job/instance duplicates the series.
            assert_grouped_by_engine_or_holder(expression, rule["alert"])
            assert "$value" in rule["annotations"]["summary"] and "| query" in rule["annotations"]["description"]
            assert "tokens" in rule["annotations"]["description"]
            if is_holder_expression(expression):
                holder_alerts.add(rule["alert"])
                # Holder labels absent (base model, no tenant) must still read.
                for label in (LORA, TENANT_LABEL):
                    assert f"or $labels.{label} " in rule["annotations"]["summary"], (rule["alert"], label)
                assert f"$labels.{OVERFLOW_LABEL}" in rule["annotations"]["summary"], rule["alert"]
    assert holder_alerts == {"KVCacheHolderDominant"}
    assert {HELD, LIMIT} <= metric_names(next(r["expr"] for r in load_alert_rules() if r["alert"] in holder_alerts))
    fragmented = next(rule for rule in load_alert_rules() if rule["alert"] == "KVCacheFragmented")
    assert metric_names(fragmented["expr"]) == {WRITTEN, USAGE}
    assert f'{USAGE}{{{STATE}="used"}} > 0' in fragmented["expr"], "no ratio while nothing is used"
    absent = next(rule for rule in load_alert_rules() if rule["alert"] == "KVCacheMetricsAbsent")
    assert absent["expr"].strip() == f"absent({LIMIT})"


# --- Grafana dashboard --------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard_model():
    dashboard = load_dashboard()
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    datasource_uids = {source["uid"] for source in load_yaml(GRAFANA_DATASOURCES)["datasources"]}
    panels = dashboard_panels(dashboard)
    assert len({panel["id"] for panel in panels}) == len(panels), "panel ids are unique"
    assert {panel["type"] for panel in panels} <= {"timeseries", "stat", "gauge"}
    for panel in panels:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"]["uid"] in datasource_uids, panel["title"]
        assert panel["targets"], f"{panel['title']}: no target"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{panel['title']} {target['refId']}: empty expr"
            assert target["datasource"]["uid"] in datasource_uids
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"])
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["model"]["query"]["query"] == f"label_values({LIMIT}, {MODEL})"
    assert variables["engine"]["query"]["query"] == f'label_values({LIMIT}{{{MODEL}=~"$model"}}, {ENGINE})'
    assert variables["tenant"]["query"]["query"] == (
        f'label_values({HELD}{{{MODEL}=~"$model", {ENGINE}=~"$engine"}}, {TENANT_LABEL})'
    )
    for name in ("model", "engine", "tenant"):
        assert variables[name]["datasource"]["uid"] in datasource_uids
        # .* also matches an absent label: "All" keeps the holders without a tenant.
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    for panel in panels:
        if "repeat" in panel:
            assert variables[panel["repeat"]]["multi"] and variables[panel["repeat"]]["includeAll"], panel["title"]


def test_dashboard_uses_only_the_package_metrics_and_labels():
    used = set()
    for where, expression in dashboard_expressions():
        names = metric_names(expression)
        assert names and names <= DASHBOARD_METRICS, (where, names)
        used |= names
        labels = grouping_labels(expression) | {label for label, _, _ in label_matchers(expression)}
        assert labels <= PACKAGE_LABELS, (where, labels)
        assert {value for label, _, value in label_matchers(expression) if label == STATE} <= STATES, where
    assert used == DASHBOARD_METRICS


def test_dashboard_selects_by_model_and_engine_and_folds_duplicate_series():
    holder_targets = 0
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expression, where = target["expr"], (panel["title"], target["refId"])
            for name, selector in re.findall(r"\b(vllm_kv_cache_\w+)(\{[^}]*\})", expression):
                assert f'{MODEL}=~"$model"' in selector, (where, selector)
                assert f'{ENGINE}=~"$engine"' in selector, (where, selector)
                # The tenant filter on every holder series, and on nothing else (no other has the label).
                assert (f'{TENANT_LABEL}=~"$tenant"' in selector) == (name in HOLDER_SERIES), (where, selector)
            # Every aggregation keeps exactly the engine's identity, and a holder metric's also the
            # holder's: no job/instance duplicates, one series per engine (and holder).
            assert_grouped_by_engine_or_holder(expression, where)
            identity = ENGINE_IDENTITY | (HOLDER_LABELS if is_holder_expression(expression) else set())
            holder_targets += is_holder_expression(expression)
            for label in identity:
                assert f"{{{{{label}}}}}" in target["legendFormat"], (where, label)
    assert holder_targets >= 2


def _panel_expressions() -> dict[str, list[str]]:
    return {panel["title"]: [target["expr"] for target in panel["targets"]] for panel in dashboard_panels()}


def test_dashboard_has_used_free_limit_utilization_and_headroom_panels():
    panels = _panel_expressions()
    tokens = next(exprs for title, exprs in panels.items() if "used / free / limit" in title)
    assert any(f'{STATE}="used"' in e for e in tokens) and any(f'{STATE}="free"' in e for e in tokens)
    assert any(LIMIT in e for e in tokens)
    assert any(UTILIZATION in e for title, exprs in panels.items() if "Utilization" in title for e in exprs)
    headroom = next(exprs for title, exprs in panels.items() if title.startswith("Admission headroom"))
    assert HEADROOM in headroom[0]
    assert any(f'{STATE}="free"' in e and LIMIT in e for e in headroom), "free as a share of the limit"
    fit = next(exprs for title, exprs in panels.items() if "still fit" in title)
    assert "$max_request_tokens" in fit[0] and HEADROOM in fit[0]
    evictable = next(exprs for title, exprs in panels.items() if "evictable" in title)
    assert EVICTABLE in evictable[0]


def test_dashboard_has_who_holds_the_kv_cache_panels():
    dashboard = load_dashboard()
    rows = [panel for panel in dashboard["panels"] if panel["type"] == "row"]
    (row,) = [panel for panel in rows if panel["title"].startswith("Who holds the KV cache")]
    after_row = [panel for panel in dashboard["panels"] if panel["gridPos"]["y"] > row["gridPos"]["y"]]
    panels = {panel["title"]: panel for panel in after_row + row.get("panels", [])}
    held = next(panel for title, panel in panels.items() if title.startswith("Held tokens"))
    # Stacked, one panel per engine: an engine's holders stack up to its used tokens.
    assert held["repeat"] == "engine" and held["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    holders, used = held["targets"]
    assert metric_names(holders["expr"]) == {HELD}
    assert metric_names(used["expr"]) == {USAGE} and f'{STATE}="used"' in used["expr"]
    (unstacked,) = held["fieldConfig"]["overrides"]
    assert unstacked["matcher"]["options"] == used["refId"]
    assert {"id": "custom.stacking", "value": {"mode": "none", "group": "B"}} in unstacked["properties"]
    # Token-seconds per second: the average tokens held over the interval, under either exporter's name.
    residency = next(panel for title, panel in panels.items() if title.startswith("Residency rate"))
    (rate,) = residency["targets"]
    assert metric_names(rate["expr"]) == {RESIDENCY, RESIDENCY_PYTHON_EXPORTER}
    for name in (RESIDENCY, RESIDENCY_PYTHON_EXPORTER):
        assert re.search(rf"rate\({name}\{{[^}}]*\}}\[\$__rate_interval\]\)", rate["expr"]), name
    # Fragmentation: written beside used, and written / used.
    fragmentation = next(panel for title, panel in panels.items() if "fragmentation" in title)
    assert {frozenset(metric_names(target["expr"])) for target in fragmentation["targets"]} == {
        frozenset({WRITTEN}),
        frozenset({USAGE}),
    }
    share = next(panel for title, panel in panels.items() if title.startswith("Written share"))
    assert re.fullmatch(
        rf"max by \([^)]*\) \({WRITTEN}\{{[^}}]*\}}\) / max by \([^)]*\) \({USAGE}\{{[^}}]*\}}\)",
        share["targets"][0]["expr"],
    )
    assert share["fieldConfig"]["defaults"]["unit"] == "percentunit"


def test_residency_names_are_what_the_collector_and_the_python_exporter_produce():
    # The Collector (add_metric_suffixes: false, test_collector_pipelines_use_only_defined_components)
    # strips forbidden characters only, a counter keeping its name: prometheus_name(). The Python
    # exporter adds the unit and _total.
    names = python_exporter_names()
    assert names[KV_CACHE_RESIDENCY] == RESIDENCY_PYTHON_EXPORTER
    assert names[KV_CACHE_HELD] == HELD and names[KV_CACHE_WRITTEN] == WRITTEN, "gauges: same name on both paths"
    assert load_yaml(COLLECTOR_CONFIG)["exporters"]["prometheus"]["add_metric_suffixes"] is False


def test_promql_expressions_lists_every_dashboard_and_rule_expression():
    expressions = promql_expressions()
    listed = [expression for _, expression in expressions]
    targets = [target for panel in dashboard_panels() for target in panel["targets"]]
    dashboard_exprs = [expression for where, expression in dashboard_expressions() if "panel" in where]
    assert len(dashboard_exprs) == len(targets)
    for expression in dashboard_exprs:
        assert "$" not in expression and "[[" not in expression, expression
    for rule in load_alert_rules():
        assert rule["expr"].strip() in listed, rule["alert"]
    assert len([where for where, _ in expressions if where.startswith("dashboard variable")]) == 3
    assert len([where for where, _ in alert_expressions() if "annotation" in where]) == 7
    assert len(set(where for where, _ in expressions)) == len(expressions), "each place named once"


# The PromQL on synthetic series in promtool: engine 0 full, engine 1 idle, each scraped under two
# jobs (like the exporter's port and vLLM's /metrics), every 15 s. Every dashboard expression must
# return one series per engine, or per (engine, holder) when it reads a holder metric; the alert
# expressions only the full engine (and of its holders, those past the threshold). An engine's
# held tokens and residency rate add up to its used tokens: the duplicates are not counted twice.
_SYNTHETIC = {
    ("0", KV_CACHE_STATE_USED): ENGINE_LIMIT,
    ("0", KV_CACHE_STATE_FREE): 0,
    ("0", LIMIT): ENGINE_LIMIT,
    ("0", UTILIZATION): 1,
    ("0", HEADROOM): 0,
    ("0", EVICTABLE): 0,
    ("0", WRITTEN): ENGINE_LIMIT * 2 // 5,  # 40 % of the used tokens: fragmented
    ("1", KV_CACHE_STATE_USED): 0,
    ("1", KV_CACHE_STATE_FREE): ENGINE_LIMIT,
    ("1", LIMIT): ENGINE_LIMIT,
    ("1", UTILIZATION): 0,
    ("1", HEADROOM): ENGINE_LIMIT,
    ("1", EVICTABLE): 4096,
    ("1", WRITTEN): 0,
}
#: Each engine's holders, (adapter, tenant, overflow) -> tokens held now and on average since the
#: start (its residency grows by that many token-seconds per second). An engine's add up to its used tokens.
_HOLDERS: dict[str, dict[tuple[str | None, str | None, str | None], int]] = {
    "0": {
        (None, "alpha", None): 54 * BLOCK_SIZE,  # 86 % of the limit
        ("a", "beta", None): 5 * BLOCK_SIZE,
        (None, None, None): 3 * BLOCK_SIZE,  # the base model, no tenant
        (None, None, "true"): 1 * BLOCK_SIZE,  # every holder past the holder limit
    },
    "1": {(None, "alpha", None): 0, (None, None, None): 0},  # held before, nothing now
}
_INTERVAL_SECONDS, _STEPS = 15, 80
_JOBS = (("otel", "host:9464"), ("vllm", "host:8000"))
#: The residency under the Collector's name on one job, the Python exporter's on the other: the
#: dashboard reads both names, once.
_RESIDENCY_NAMES = {"otel": RESIDENCY, "vllm": RESIDENCY_PYTHON_EXPORTER}
_COMPARE = {">": float.__gt__, "<": float.__lt__, ">=": float.__ge__, "<=": float.__le__}


def _holder_labels(holder: tuple[str | None, str | None, str | None]) -> dict[str, str]:
    return {label: value for label, value in zip((LORA, TENANT_LABEL, OVERFLOW_LABEL), holder) if value is not None}


def _labels(labels: dict[str, str]) -> str:
    return "{" + ", ".join(f'{key}="{value}"' for key, value in labels.items()) + "}"


def _synthetic_series() -> list[dict]:
    series = []
    for job, instance in _JOBS:
        scrape = {"job": job, "instance": instance, "otel_scope_name": "otel_vllm_kv"}
        for (engine, kind), value in _SYNTHETIC.items():
            labels = {**scrape, ENGINE: engine, MODEL: "tiny"}
            if kind in STATES:
                name, labels[STATE] = USAGE, kind
            else:
                name = kind
            series.append({"series": f"{name}{_labels(labels)}", "values": f"{value}x{_STEPS}"})
        for engine, holders in _HOLDERS.items():
            for holder, tokens in holders.items():
                labels = _labels({**scrape, ENGINE: engine, MODEL: "tiny", **_holder_labels(holder)})
                series.append({"series": f"{HELD}{labels}", "values": f"{tokens}x{_STEPS}"})
                token_seconds = tokens * _INTERVAL_SECONDS
                series.append({"series": f"{_RESIDENCY_NAMES[job]}{labels}", "values": f"0+{token_seconds}x{_STEPS}"})
    return series


def test_every_expression_returns_one_series_per_engine_on_synthetic_data(tmp_path):
    promtool = require_binary("promtool")
    for engine, holders in _HOLDERS.items():
        assert sum(holders.values()) == _SYNTHETIC[(engine, KV_CACHE_STATE_USED)], engine
    tenants = sorted({holder[1] or "" for holders in _HOLDERS.values() for holder in holders})
    thresholds = alert_thresholds()
    checks = []
    for where, expression in promql_expressions():
        if expression.startswith("absent("):
            continue  # covered by alert-rules.test.yml
        if where.startswith("dashboard variable"):
            (label,) = re.match(r"count by \((\w+)\)", expression).groups()
            wrapped = f"count by ({label}) ({expression})"
            values = {MODEL: ["tiny"], ENGINE: ["0", "1"], TENANT_LABEL: tenants}[label]
            # A holder without a tenant counts under no label at all.
            expected = [{"labels": _labels({label: value} if value else {}), "value": 1} for value in values]
        else:
            alert = where.split()[1] if where.startswith("alert ") and "annotation" not in where else None
            engines = ["0"] if alert else ["0", "1"]
            if is_holder_expression(expression):
                identity = [MODEL, ENGINE, *sorted(HOLDER_LABELS)]
                series = [
                    {MODEL: "tiny", ENGINE: engine, **_holder_labels(holder)}
                    for engine in engines
                    for holder, tokens in _HOLDERS[engine].items()
                    if alert is None or _COMPARE[thresholds[alert][0]](tokens / ENGINE_LIMIT, thresholds[alert][1])
                ]
            else:
                identity = [MODEL, ENGINE]
                series = [{MODEL: "tiny", ENGINE: engine} for engine in engines]
            assert series, (where, "nothing expected: the synthetic data does not exercise it")
            wrapped = f"count by ({', '.join(identity)}) ({expression})"
            expected = [{"labels": _labels(labels), "value": 1} for labels in series]
            if is_holder_expression(expression) and where.startswith("dashboard panel"):
                # Held now and held on average: an engine's holders add up to its used tokens.
                used = [
                    {"labels": _labels({MODEL: "tiny", ENGINE: e}), "value": _SYNTHETIC[(e, KV_CACHE_STATE_USED)]}
                    for e in ("0", "1")
                ]
                summed = f"sum by ({MODEL}, {ENGINE}) ({expression})"
                checks.append({"expr": summed, "eval_time": "10m", "exp_samples": used})
        checks.append({"expr": wrapped, "eval_time": "10m", "exp_samples": expected})
    assert len(checks) >= len(promql_expressions()) - 1
    (tmp_path / "empty-rules.yml").write_text("groups: []\n")
    (tmp_path / "expressions.test.yml").write_text(
        json.dumps(
            {
                "rule_files": ["empty-rules.yml"],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": f"{_INTERVAL_SECONDS}s",
                        "input_series": _synthetic_series(),
                        "promql_expr_test": checks,
                    }
                ],
            }
        )
    )
    result = run([promtool, "test", "rules", "expressions.test.yml"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Collector, Prometheus, Grafana, docker-compose wiring --------------------------------


def _components(config: dict, kind: str) -> set[str]:
    return set((config.get(kind) or {}).keys())


def test_collector_pipelines_use_only_defined_components():
    config = load_yaml(COLLECTOR_CONFIG)
    pipelines = config["service"]["pipelines"]
    assert {"metrics", "traces"} <= set(pipelines)
    for name, pipeline in pipelines.items():
        assert pipeline["receivers"] and pipeline["exporters"], name
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(kind, [])) <= _components(config, kind), (name, kind)
    used = {
        c
        for pipeline in pipelines.values()
        for kind in ("receivers", "processors", "exporters")
        for c in pipeline.get(kind, [])
    }
    assert used == {c for kind in ("receivers", "processors", "exporters") for c in _components(config, kind)}
    assert pipelines["metrics"]["exporters"] == ["prometheus"] and "batch" in pipelines["metrics"]["processors"]
    assert "otlp/jaeger" in pipelines["traces"]["exporters"]
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317") and protocols["http"]["endpoint"].endswith(":4318")
    prometheus = config["exporters"]["prometheus"]
    assert prometheus["add_metric_suffixes"] is False, "names as OpenTelemetry's Python Prometheus exporter's"
    assert prometheus["resource_to_telemetry_conversion"]["enabled"] is False
    assert config["exporters"]["otlp/jaeger"]["tls"]["insecure"] is True


def test_collector_tempo_alternative_is_valid_once_uncommented():
    lines = COLLECTOR_CONFIG.read_text().splitlines()
    start = lines.index("  # otlp/tempo:")
    block = []
    for line in lines[start:]:
        if not line.startswith("  # "):
            break
        block.append("  " + line[len("  # ") :])
    tempo = yaml.safe_load("\n".join(["exporters:", *block]))["exporters"]["otlp/tempo"]
    assert tempo == {"endpoint": "tempo:4317", "tls": {"insecure": True}}


def _compose() -> dict:
    return load_yaml(COMPOSE)


def _mounts(service: dict) -> list[tuple[str, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts.append((source, target))
    return mounts


def _host_path(container_path: str, service: dict) -> Path | None:
    """The file of examples/ that a service sees at ``container_path``, through its bind mounts."""
    for source, target in _mounts(service):
        if source.startswith(".") and (container_path == target or container_path.startswith(target.rstrip("/") + "/")):
            return (EXAMPLES / source / os.path.relpath(container_path, target)).resolve()
    return None


def test_compose_mounts_exist_and_configs_are_where_the_services_read_them():
    compose = _compose()
    services = compose["services"]
    assert {"collector", "prometheus", "grafana", "jaeger", "vllm"} <= set(services)
    named_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for source, _ in _mounts(service):
            if source.startswith("."):
                assert (EXAMPLES / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named_volumes, f"{name}: {source} is neither in examples/ nor a named volume"
    # Each service's configuration file, as its command or provisioning names it.
    collector_config = services["collector"]["command"][0].split("=", 1)[1]
    assert _host_path(collector_config, services["collector"]) == COLLECTOR_CONFIG.resolve()
    prometheus_config = next(a for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    assert _host_path(prometheus_config.split("=", 1)[1], services["prometheus"]) == PROMETHEUS_CONFIG.resolve()
    grafana = services["grafana"]
    datasources = "/etc/grafana/provisioning/datasources/datasources.yaml"
    assert _host_path(datasources, grafana) == GRAFANA_DATASOURCES.resolve()
    dashboards_dir = load_yaml(GRAFANA_DASHBOARD_PROVIDERS)["providers"][0]["options"]["path"]
    assert _host_path(f"{dashboards_dir}/{DASHBOARD.name}", grafana) == DASHBOARD.resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _host_path(home, grafana) == DASHBOARD.resolve()


def _host(address: str) -> str:
    return urlparse(address).hostname if "://" in address else address.rsplit(":", 1)[0]


def test_every_host_the_configurations_name_is_a_compose_service():
    services = _compose()["services"]
    hosts = {}
    for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                hosts[f"prometheus job {job['job_name']}"] = target
    collector = load_yaml(COLLECTOR_CONFIG)
    for name, exporter in collector["exporters"].items():
        if name != "prometheus":
            hosts[f"collector exporter {name}"] = exporter["endpoint"]
    for source in load_yaml(GRAFANA_DATASOURCES)["datasources"]:
        hosts[f"grafana datasource {source['name']}"] = source["url"]
    vllm = services["vllm"]
    hosts["vllm OTEL_EXPORTER_OTLP_ENDPOINT"] = vllm["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    hosts["vllm --otlp-traces-endpoint"] = next(
        arg.split("=", 1)[1] for arg in vllm["command"] if arg.startswith("--otlp-traces-endpoint=")
    )
    assert len(hosts) >= 7
    for where, address in hosts.items():
        assert _host(address) in services, f"{where}: {address} is not a service of docker-compose.yaml"
    # The port Prometheus scrapes is the one the Collector's exporter listens on.
    scraped = {target for where, target in hosts.items() if _host(target) == "collector" and where.startswith("prom")}
    assert scraped == {f"collector:{collector['exporters']['prometheus']['endpoint'].rsplit(':', 1)[1]}"}


def test_prometheus_config_loads_the_alert_rules():
    config = load_yaml(PROMETHEUS_CONFIG)
    assert [PROMETHEUS_CONFIG.parent / f for f in config["rule_files"]] == [ALERT_RULES]
    # Several samples inside every alert's pending window, or an alert could fire on one scrape.
    shortest_for = min(_duration_minutes(rule["for"]) for rule in load_alert_rules())
    assert _duration_minutes(config["global"]["scrape_interval"]) * 4 <= shortest_for
    collector_job = next(job for job in config["scrape_configs"] if job["job_name"] == "otel-collector")
    assert collector_job["honor_labels"] is True


def test_vllm_image_copies_existing_sources():
    compose = _compose()["services"]["vllm"]
    context = (EXAMPLES / compose["build"]["context"]).resolve()
    dockerfile = context / compose["build"]["dockerfile"]
    assert dockerfile.is_file()
    ignored = (dockerfile.parent / (dockerfile.name + ".dockerignore")).read_text().splitlines()
    kept = {line[1:] for line in ignored if line.startswith("!")}
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (context / source).exists(), source
                assert source in kept, f"{source} is excluded from the build context"
    assert '"opentelemetry-instrument"' in dockerfile.read_text()


# --- the programmatic example, end to end --------------------------------------------------


@pytest.mark.engine
def test_programmatic_example_exports_the_gauges_and_the_span(tmp_path):
    from opentelemetry.test._otlp_test_server import OtlpProtoTestServer

    from otel_vllm_kv import names
    from tests.support.instrumented_processes import otel_environment, otlp_attributes

    requests, max_tokens = 4, 50
    with OtlpProtoTestServer() as receiver:
        env = otel_environment(
            OTEL_SERVICE_NAME="programmatic-example",
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
            OTEL_PYTHON_VLLM_KV_RELAY_DIR=str(tmp_path),
        )
        result = subprocess.run(
            [sys.executable, str(PROGRAMMATIC), "--requests", str(requests), "--max-tokens", str(max_tokens)],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        metrics, spans = receiver.drain_metrics(), receiver.drain_spans()
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"{requests} requests, {requests * max_tokens} tokens generated" in result.stdout, result.stdout
    assert "Traceback" not in result.stderr, result.stderr[-4000:]

    limits = [point for m in metrics if m.metric.name == KV_CACHE_LIMIT for point in m.metric.gauge.data_points]
    assert limits and {point.as_int for point in limits} == {ENGINE_LIMIT}, "the final flush reports the engine's limit"
    assert {otlp_attributes(point.attributes)[MODEL_NAME] for point in limits} == {"tiny"}
    assert {otlp_attributes(m.resource.attributes)["service.name"] for m in metrics} == {"programmatic-example"}

    (batch,) = [recorded.span for recorded in spans if recorded.span.name == "batch-generate"]
    admitted = [event for event in batch.events if event.name == names.EVENT_ADMITTED]
    assert len(admitted) == requests
    for event in admitted:
        attributes = otlp_attributes(event.attributes)
        assert attributes[names.ADMISSION_LIMIT_TOKENS] == ENGINE_LIMIT
        assert attributes[names.ADMISSION_USED_TOKENS] + attributes[names.ADMISSION_FREE_TOKENS] == ENGINE_LIMIT
