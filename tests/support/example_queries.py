"""Every PromQL expression of the examples (Grafana dashboard, alert rules), runnable in plain Prometheus.

Grafana's template variables are substituted: query variables (``$model``, ``$engine``) by
``.*`` (what "All" sends with ``allValue: .*``), text and custom variables by their current
value, Grafana's built-ins (``$__rate_interval``...) by typical values. A dashboard variable's
``label_values(SELECTOR, LABEL)`` becomes ``count by (LABEL) (SELECTOR)``, which has data
exactly when the variable has values. Queries inside alert annotations (``printf "..." ... |
query``) get ``=~".+"`` for their ``%q`` label values.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DASHBOARD = EXAMPLES / "grafana" / "dashboards" / "kv-cache.json"
ALERT_RULES = EXAMPLES / "prometheus" / "alert-rules.yml"

#: Values for Grafana's built-in variables, as Grafana would compute them for a short range.
GRAFANA_BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*$", re.S)
_ANNOTATION_QUERY = re.compile(r'printf\s+"((?:[^"\\]|\\.)*)"[^}]*?\|\s*query\b')
_COMPARISON = re.compile(r"(<|>|<=|>=|==|!=)\s*(-?[0-9.]+(?:e[+-]?[0-9]+)?)\s*$")


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def load_alert_rules() -> list[dict]:
    """The alerting rules of every group, as written."""
    document = yaml.safe_load(ALERT_RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_panels(dashboard: dict | None = None) -> list[dict]:
    """Every panel that is not a row, including those collapsed inside rows."""
    dashboard = load_dashboard() if dashboard is None else dashboard
    panels = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def variable_values(dashboard: dict | None = None) -> dict[str, str]:
    """What each dashboard variable (and Grafana built-in) stands for in a plain Prometheus query."""
    dashboard = load_dashboard() if dashboard is None else dashboard
    values = dict(GRAFANA_BUILTINS)
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            values[variable["name"]] = ".*"
        elif variable["type"] in ("textbox", "constant", "custom"):
            current = variable.get("current", {}).get("value")
            values[variable["name"]] = str(current if current not in (None, "") else variable["query"])
        else:
            raise ValueError(f"dashboard variable {variable['name']}: type {variable['type']} not handled")
    return values


def substitute(expression: str, values: dict[str, str]) -> str:
    """``expression`` with Grafana variables replaced; an undefined variable raises ``KeyError``."""

    def replace(match: re.Match) -> str:
        name = next(group for group in match.groups() if group)
        return values[name]

    return _VARIABLE.sub(replace, expression)


def _variable_expressions(dashboard: dict, values: dict[str, str]) -> list[tuple[str, str]]:
    expressions = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = _LABEL_VALUES.match(query)
        if match is None:
            raise ValueError(f"dashboard variable {variable['name']}: not label_values(selector, label): {query}")
        selector, label = match.groups()
        expressions.append(
            (f"dashboard variable ${variable['name']}", f"count by ({label}) ({substitute(selector, values)})")
        )
    return expressions


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, expr) for every panel target and query variable, variables substituted."""
    dashboard = load_dashboard()
    values = variable_values(dashboard)
    expressions = _variable_expressions(dashboard, values)
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            where = f"dashboard panel {panel['title']!r} target {target.get('refId')}"
            expressions.append((where, substitute(target["expr"], values)))
    return expressions


def annotation_queries(rule: dict) -> list[tuple[str, str]]:
    """The PromQL of ``printf "..." ... | query`` in the rule's annotations, for any label value."""
    queries = []
    for name, text in sorted(rule.get("annotations", {}).items()):
        for index, match in enumerate(_ANNOTATION_QUERY.finditer(text), 1):
            query = match.group(1).replace('\\"', '"')
            queries.append((f"alert {rule['alert']} annotation {name} query {index}", query.replace("=%q", '=~".+"')))
    return queries


def alert_expressions() -> list[tuple[str, str]]:
    """(where, expr) for every alert rule's expression and its annotations' queries."""
    expressions = []
    for rule in load_alert_rules():
        expressions.append((f"alert {rule['alert']}", rule["expr"].strip()))
        expressions.extend(annotation_queries(rule))
    return expressions


def alert_thresholds() -> dict[str, tuple[str, float]]:
    """Alert name -> (comparison, threshold) for the rules whose expression ends in one."""
    thresholds = {}
    for rule in load_alert_rules():
        match = _COMPARISON.search(rule["expr"].strip())
        if match:
            thresholds[rule["alert"]] = (match.group(1), float(match.group(2)))
    return thresholds


def promql_expressions() -> list[tuple[str, str]]:
    """(where, expr) for every PromQL expression of the dashboard and of the alert rules.

    An alert expression ``absent(X)`` returns data only once X is gone; run X instead to
    check what it watches. Comparisons (``< 2048``, ``> 0.95``) return data only while
    they hold: under a load that fills the cache they do.
    """
    return [*dashboard_expressions(), *alert_expressions()]


if __name__ == "__main__":
    for where, expression in promql_expressions():
        print(f"{where}:\n    {expression}")
