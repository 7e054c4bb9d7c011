"""Every name, unit, description and setting is defined once, in code; the docs must say the same."""

from __future__ import annotations

import os
import re

from otel_vllm_kv import environment_variables, names
from otel_vllm_kv.names import GAUGES, PROMETHEUS_FAMILIES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        return handle.read()


def test_every_gauge_is_defined_in_the_docs_with_its_unit_and_description():
    metrics = read("docs/metrics.md")
    readme = read("README.md")
    for name, gauge in GAUGES.items():
        assert f"| `{name}` | `{gauge.unit}` |" in metrics, f"{name}: no row with unit {gauge.unit} in docs/metrics.md"
        assert f"| `{name}` | {gauge.description} |" in metrics, f"{name}: its description differs in docs/metrics.md"
        assert f"`{name}`" in readme, f"{name} is missing from the README's metric table"


def test_vllm_metrics_families_reuse_the_gauges_descriptions_and_are_documented():
    descriptions = {gauge.description for gauge in GAUGES.values()}
    docs = read("docs/metrics.md")
    for family, (help_text, _) in PROMETHEUS_FAMILIES.items():
        assert help_text in descriptions, f"{family}: a help text of its own"
        assert f"`{family}" in docs, f"{family} is not documented"


#: The constants in ``names`` that name span attributes and events.
SPAN_NAME_PREFIXES = ("ADMISSION_", "REQUEST_", "CACHE_READ_", "EVENT_")


def test_every_span_attribute_and_event_is_documented():
    docs = read("docs/metrics.md")
    span_names = [value for key, value in vars(names).items() if key.startswith(SPAN_NAME_PREFIXES)]
    assert len(span_names) >= 15
    # The docs group siblings: `vllm.admission.kv_cache.used_tokens` / `free_tokens` / `limit_tokens`.
    documented = set(re.findall(r"`([a-z_.]+)`", docs))
    for name in span_names:
        parent, _, leaf = name.rpartition(".")
        assert name in documented or (leaf in documented and any(d.startswith(parent + ".") for d in documented)), (
            f"span attribute or event {name} is not in docs/metrics.md"
        )


def test_every_setting_is_in_the_readme():
    readme = read("README.md")
    variables = [value for key, value in vars(environment_variables).items() if key.startswith("OTEL_")]
    assert variables
    for variable in variables:
        assert f"| `{variable}` |" in readme, f"{variable} is not in the README's settings table"


def test_the_version_policy_doc_has_a_row_per_tested_release_and_the_tables_size():
    from otel_vllm_kv import compat, internals

    versions = read("docs/versions.md")
    for release in compat.TESTED_RELEASES:
        assert re.search(rf"^\| {re.escape(release)} ", versions, re.MULTILINE), f"no row for {release}"
    assert f"{len(internals.required())} entries" in versions, "the table's size changed: update docs/versions.md"
