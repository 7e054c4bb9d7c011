"""pytest plugin for running vLLM's own ``tests/v1/core`` with and without this package.

Loaded with ``-p vllm_core_suite`` (``PYTHONPATH`` including this directory, ``tests/support``)
by ``scripts/run-vllm-core-suite``; not as ``tests.support.vllm_core_suite``: the suite runs from
vLLM's unpacked sources, whose own ``tests`` package comes first on ``sys.path``. It imports
nothing from ``tests.support``. Not a test module, so the project's own pytest run never collects it.

Always: records every test's outcome (and a one-line reason for failures and errors) and,
at session end, writes them as JSON to ``$OTEL_VLLM_KV_SUITE_REPORT`` (if set).

With ``OTEL_VLLM_KV_SUITE_INSTRUMENT=1``: at ``pytest_configure`` it instruments vLLM
(``VLLMKVCacheInstrumentor().instrument(meter_provider=...)``, an SDK ``MeterProvider``
reading into an ``InMemoryMetricReader``), so every ``Scheduler`` / ``AsyncScheduler`` the
tests build gets the package's probe, and it wraps, on the package's classes (test tooling
only, nothing in the package changes):

* ``EngineProbe.publish``: after every publish that returned, the probe's evictable
  count (``probe._evictable.per_group``) is compared with a walk of vLLM's free queue
  (``free_block_queue.get_all_free_blocks()``, blocks with a ``block_hash``, per KV-cache
  group by ``get_group_id``: ``evictable_per_group`` of ``tests/support/schedulers.py``);
* ``_ProbeRegistry.attach`` / ``_attach``: schedulers seen and probes attached;
* ``_ProbeRegistry.give_up``: every give-up, with the test id and the exception being handled.

The checks never raise into the probe (a failing check is counted as a check error), so
the instrumented run exercises exactly the package's own code paths.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

import pytest

INSTRUMENT_VARIABLE = "OTEL_VLLM_KV_SUITE_INSTRUMENT"
REPORT_VARIABLE = "OTEL_VLLM_KV_SUITE_REPORT"
#: Details kept per kind of finding (the counts are always complete).
MAX_DETAILS = 200

#: The test whose phase (setup, call, teardown) runs now; "<session>" outside any test.
_current = {"nodeid": "<session>"}


class _Figures:
    """What the instrumented run observed."""

    def __init__(self) -> None:
        self.instrumented = False
        self.instrumentation_error: str | None = None
        self.unsupported_reason: str | None = None
        self.schedulers_seen = 0
        self.probes_attached = 0
        self.schedulers_without_probe: list[str] = []
        self.publishes = 0
        self.publishes_raised = 0
        self.evictable_checks = 0
        self.mismatches = 0
        self.mismatch_details: list[dict[str, Any]] = []
        self.check_errors = 0
        self.check_error_details: list[dict[str, Any]] = []
        self.give_ups = 0
        self.give_up_details: list[dict[str, Any]] = []
        self.publishes_per_test: dict[str, int] = {}
        self.check_seconds = 0.0
        self.metric_collections = 0
        self.metric_points = 0
        self.metric_errors = 0
        self.metric_error_details: list[dict[str, Any]] = []

    def as_dict(self) -> dict[str, Any]:
        return {
            "instrumented": self.instrumented,
            "instrumentation_error": self.instrumentation_error,
            "unsupported_reason": self.unsupported_reason,
            "schedulers_seen": self.schedulers_seen,
            "probes_attached": self.probes_attached,
            "schedulers_without_probe": self.schedulers_without_probe[:MAX_DETAILS],
            "publishes": self.publishes,
            "publishes_raised": self.publishes_raised,
            "evictable_checks": self.evictable_checks,
            "mismatches": self.mismatches,
            "mismatch_details": self.mismatch_details,
            "mismatch_tests": sorted({d["test"] for d in self.mismatch_details}),
            "check_errors": self.check_errors,
            "check_error_details": self.check_error_details,
            "give_ups": self.give_ups,
            "give_up_details": self.give_up_details,
            "give_up_tests": sorted({d["test"] for d in self.give_up_details}),
            "tests_with_publishes": len(self.publishes_per_test),
            "check_seconds": round(self.check_seconds, 3),
            "metric_collections": self.metric_collections,
            "metric_points": self.metric_points,
            "metric_errors": self.metric_errors,
            "metric_error_details": self.metric_error_details,
        }


_figures = _Figures()
_outcomes: dict[str, dict[str, Any]] = {}
_collection_errors: dict[str, str] = {}
_state: dict[str, Any] = {"collected": None, "started": None, "restore": [], "instrumentor": None, "reader": None}


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _truth_per_group(scheduler: Any, width: int) -> list[int]:
    """``tests/support/schedulers.py``'s ``evictable_per_group``: hashed blocks in the free queue, per group."""
    from vllm.v1.core.kv_cache_utils import get_group_id

    manager = scheduler.kv_cache_manager
    groups = len(manager.kv_cache_config.kv_cache_groups)
    per_group = [0] * max(groups, width)
    for block in manager.block_pool.free_block_queue.get_all_free_blocks():
        if block.block_hash is not None:
            per_group[get_group_id(block.block_hash)] += 1
    return per_group


def _check(probe: Any) -> None:
    """Compare the probe's evictable count with a walk of the free queue (never raises)."""
    started = time.perf_counter()
    test = _current["nodeid"]
    try:
        scheduler = probe.scheduler()
        if scheduler is None:
            return
        counted = list(probe._evictable.per_group)
        truth = _truth_per_group(scheduler, len(counted))
        _figures.evictable_checks += 1
        if counted != truth:
            _figures.mismatches += 1
            if len(_figures.mismatch_details) < MAX_DETAILS:
                queue = scheduler.kv_cache_manager.block_pool.free_block_queue
                _figures.mismatch_details.append(
                    {
                        "test": test,
                        "probe": counted,
                        "free_queue": truth,
                        "num_free_blocks": queue.num_free_blocks,
                        "same_queue_as_at_attach": queue is probe._queue,
                        "publish_in_test": _figures.publishes_per_test.get(test, 0),
                        "scheduler": type(scheduler).__name__,
                    }
                )
    except Exception as error:  # noqa: BLE001 - a failing check must never reach the probe (it would give up)
        _figures.check_errors += 1
        if len(_figures.check_error_details) < MAX_DETAILS:
            _figures.check_error_details.append({"test": test, "error": _short(repr(error))})
    finally:
        _figures.check_seconds += time.perf_counter() - started


def _wrap(owner: Any, name: str, make: Any) -> None:
    original = owner.__dict__[name]
    setattr(owner, name, make(original))
    _state["restore"].append((owner, name, original))


def _install_checks() -> None:
    from otel_vllm_kv.engine import probe as probe_module

    def publish(original: Any) -> Any:
        def publish(self: Any) -> None:
            test = _current["nodeid"]
            _figures.publishes += 1
            _figures.publishes_per_test[test] = _figures.publishes_per_test.get(test, 0) + 1
            try:
                original(self)
            except BaseException:
                _figures.publishes_raised += 1  # the probe's hook gives up: counted there
                raise
            _check(self)

        return publish

    def attach(original: Any) -> Any:
        def attach(self: Any, scheduler: Any) -> Any:
            first_sight = scheduler not in self._probes
            result = original(self, scheduler)
            if first_sight:
                _figures.schedulers_seen += 1
                if result is None:
                    _figures.schedulers_without_probe.append(_current["nodeid"])
            return result

        return attach

    def _attach(original: Any) -> Any:
        def _attach(self: Any, scheduler: Any) -> Any:
            result = original(self, scheduler)
            if result is not None:
                _figures.probes_attached += 1
            return result

        return _attach

    def give_up(original: Any) -> Any:
        def give_up(self: Any, scheduler: Any) -> None:
            error = sys.exc_info()[1]
            _figures.give_ups += 1
            if len(_figures.give_up_details) < MAX_DETAILS:
                _figures.give_up_details.append(
                    {
                        "test": _current["nodeid"],
                        "scheduler": type(scheduler).__name__,
                        "error": None if error is None else _short(repr(error)),
                        "traceback": None
                        if error is None
                        else _short(
                            "".join(traceback.format_exception(type(error), error, error.__traceback__)[-4:]), 2000
                        ),
                    }
                )
            return original(self, scheduler)

        return give_up

    _wrap(probe_module.EngineProbe, "publish", publish)
    _wrap(probe_module._ProbeRegistry, "attach", attach)
    _wrap(probe_module._ProbeRegistry, "_attach", _attach)
    _wrap(probe_module._ProbeRegistry, "give_up", give_up)


def _instrument() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from otel_vllm_kv import VLLMKVCacheInstrumentor, compat

    try:  # the package's own verdict on this vLLM, for the report (the run's flag is what counts)
        _figures.unsupported_reason = compat.unsupported_reason()
    except Exception as error:  # noqa: BLE001 - informational only
        _figures.unsupported_reason = f"(compat.unsupported_reason() failed: {error!r})"
    reader = InMemoryMetricReader()
    instrumentor = VLLMKVCacheInstrumentor()
    _install_checks()
    instrumentor.instrument(meter_provider=MeterProvider(metric_readers=[reader]))
    _state["instrumentor"], _state["reader"] = instrumentor, reader
    from otel_vllm_kv.engine import probe as probe_module

    # instrument() returns quietly when it does not recognise this vLLM: that is no instrumented run.
    _figures.instrumented = (
        instrumentor.is_instrumented_by_opentelemetry and probe_module.registry.relay_directory is not None
    )


def pytest_configure(config: pytest.Config) -> None:
    _state["started"] = time.time()
    if os.environ.get(INSTRUMENT_VARIABLE) == "1":
        try:
            _instrument()
        except Exception:  # noqa: BLE001 - reported (and failed on) by the runner, not raised into pytest
            _figures.instrumentation_error = traceback.format_exc()


def pytest_collection_finish(session: pytest.Session) -> None:
    _state["collected"] = len(session.items)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        _collection_errors[report.nodeid] = _short(crash.message if crash is not None else str(report.longrepr)[-300:])


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    _current["nodeid"] = nodeid


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    _current["nodeid"] = "<session>"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """After each test's call, while its engines live: read the package's gauges once (an exporter's collection)."""
    yield
    if _figures.instrumented:
        try:
            points = _metric_points() or 0
            _figures.metric_collections += 1
            _figures.metric_points += points
        except Exception as error:  # noqa: BLE001 - counted, never raised into the test
            _figures.metric_errors += 1
            if len(_figures.metric_error_details) < MAX_DETAILS:
                _figures.metric_error_details.append({"test": item.nodeid, "error": _short(repr(error))})


def _reason(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return _short(crash.message)
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:  # a skip: (file, line, reason)
        return _short(report.longrepr[2])
    return _short(str(report.longrepr)[-300:])


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _outcomes.setdefault(
        report.nodeid, {"outcome": None, "reason": None, "teardown_error": False, "seconds": 0.0}
    )
    entry["seconds"] = round(entry["seconds"] + report.duration, 3)
    if report.when == "setup":
        if report.failed:
            entry["outcome"], entry["reason"] = "error", _reason(report)
        elif report.skipped:
            entry["outcome"], entry["reason"] = "skipped", _reason(report)
    elif report.when == "call":
        if hasattr(report, "wasxfail"):
            entry["outcome"] = "xfailed" if report.skipped else "xpassed"
        else:
            entry["outcome"] = report.outcome
        if not report.passed:
            entry["reason"] = _reason(report)
    elif report.when == "teardown" and report.failed:
        entry["teardown_error"] = True
        if entry["outcome"] in (None, "passed"):
            entry["outcome"], entry["reason"] = "error", "teardown: " + _reason(report)


def _metric_points() -> int | None:
    reader = _state["reader"]
    if reader is None:
        return None
    data = reader.get_metrics_data()
    if data is None:
        return 0
    return sum(
        len(metric.data.data_points)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get(REPORT_VARIABLE)
    if not path:
        return
    counts: dict[str, int] = {}
    for entry in _outcomes.values():
        counts[entry["outcome"] or "unknown"] = counts.get(entry["outcome"] or "unknown", 0) + 1
    report = {
        "instrument_requested": os.environ.get(INSTRUMENT_VARIABLE) == "1",
        "exitstatus": int(exitstatus),
        "seconds": round(time.time() - (_state["started"] or time.time()), 1),
        "collected": _state["collected"],
        "collection_errors": _collection_errors,
        "counts": counts,
        "outcomes": _outcomes,
        "figures": _figures.as_dict(),
    }
    with open(path, "w", encoding="utf-8") as file:
        json.dump(report, file, indent=1, sort_keys=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    for owner, name, original in reversed(_state["restore"]):
        setattr(owner, name, original)
    _state["restore"].clear()
    instrumentor = _state["instrumentor"]
    if instrumentor is not None and instrumentor.is_instrumented_by_opentelemetry:
        try:
            instrumentor.uninstrument()
        except Exception:  # noqa: BLE001 - the report is written; nothing to fail any more
            pass
