"""Exporter and probe roles across real child processes: spawn (vLLM on CPU) and fork (vLLM's default on GPU)."""

from __future__ import annotations

import multiprocessing
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from otel_vllm_kv import VLLMKVCacheInstrumentor
from otel_vllm_kv.demo.sampling import read_engines
from tests.support.schedulers import Stepper, build_scheduler, make_request


@pytest.fixture
def reader():
    reader = InMemoryMetricReader()
    VLLMKVCacheInstrumentor().instrument(meter_provider=MeterProvider(metric_readers=[reader]))
    yield reader
    VLLMKVCacheInstrumentor().uninstrument()


def _engine_child(model_dir: str, to_parent, from_parent) -> None:
    """A spawned 'engine core': instruments like a re-imported main module would, runs a real scheduler."""
    from otel_vllm_kv.plugin import load_vllm_plugin

    child_reader = InMemoryMetricReader()
    VLLMKVCacheInstrumentor().instrument(meter_provider=MeterProvider(metric_readers=[child_reader]))
    load_vllm_plugin()  # vLLM calls it too: must not instrument twice
    scheduler = build_scheduler(model_dir, num_blocks=11, block_size=16, data_parallel_index=2)
    scheduler.add_request(make_request(scheduler, num_prompt_tokens=50, max_tokens=100))
    Stepper(scheduler).step()
    to_parent.send(("stepped", read_engines(child_reader) == {}))
    from_parent.recv()


def test_spawned_engine_probes_and_only_the_exporter_exports(reader, tiny_model_dir):
    context = multiprocessing.get_context("spawn")
    to_parent, child_end = context.Pipe()
    parent_end, from_parent = context.Pipe()
    child = context.Process(target=_engine_child, args=(tiny_model_dir, child_end, from_parent))
    child.start()
    try:
        assert to_parent.recv() == ("stepped", True), "the child must not export"
        engine = read_engines(reader)[2]
        assert (engine.used, engine.free, engine.limit) == (64, 96, 160)
    finally:
        parent_end.send("exit")
        child.join(60)
    assert child.exitcode == 0
    assert read_engines(reader) == {}, "an engine that exited is no longer reported"


def test_forked_child_exports_nothing(reader, tiny_model_dir):
    scheduler = build_scheduler(tiny_model_dir)
    assert scheduler and read_engines(reader), "the exporter sees its in-process engine"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child inherits the SDK, the callbacks and the relay
        try:
            os.write(write_end, b"empty" if read_engines(reader) == {} else b"exported")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read_end, 16) == b"empty"
    assert read_engines(reader), "the exporter still exports"


def test_a_dead_exporter_named_in_the_environment_is_ignored(tmp_path, monkeypatch):
    """An engine started after its instrumenting parent died, or with a stale variable, stays unpatched:
    a relay nobody holds locked has no exporter, whatever its pid (1 always runs)."""
    from otel_vllm_kv.environment_variables import OTEL_PYTHON_VLLM_KV_EXPORTER
    from otel_vllm_kv.roles import inherited_role

    relay = tmp_path / "otel-vllm-kv-relay-left-behind"
    relay.mkdir()
    monkeypatch.setenv(OTEL_PYTHON_VLLM_KV_EXPORTER, f"1:{relay}")
    assert inherited_role() is None


MALFORMED = [
    "2147483648:/tmp",
    "\u00b2:/tmp",
    "1:/tmp",
    "0:/dev/shm/otel-vllm-kv-relay-x",
    "-1:/x",
    "7",
    "not-a-pid:/nowhere",
    "12:relative/otel-vllm-kv-relay-x",
    "4194305:/dev/shm/otel-vllm-kv-relay-x",
]


@pytest.mark.parametrize("value", MALFORMED)
def test_a_malformed_exporter_variable_is_named_as_such(value, monkeypatch):
    from otel_vllm_kv.environment_variables import OTEL_PYTHON_VLLM_KV_EXPORTER
    from otel_vllm_kv.roles import MalformedVariable, inherited_role

    monkeypatch.setenv(OTEL_PYTHON_VLLM_KV_EXPORTER, value)
    with pytest.raises(MalformedVariable, match=OTEL_PYTHON_VLLM_KV_EXPORTER):
        inherited_role()


@pytest.mark.parametrize("value", ["2147483648:/tmp", "\u00b2:/tmp"])  # once OverflowError, ValueError
def test_a_malformed_exporter_variable_is_one_error_and_no_patch(value, monkeypatch, caplog, tmp_path):
    """vLLM loads the plugin in every process and does not catch what it raises: nothing may escape.
    ``instrument()`` logs one ERROR too and stays inactive (the variable is inherited, not configured):
    nothing patched, no relay made, the variable left alone."""
    from vllm.v1.engine import output_processor

    from otel_vllm_kv.environment_variables import OTEL_PYTHON_VLLM_KV_EXPORTER, OTEL_PYTHON_VLLM_KV_RELAY_DIR
    from otel_vllm_kv.plugin import load_vllm_plugin

    monkeypatch.setattr("otel_vllm_kv.roles._malformed_reported", False, raising=False)
    monkeypatch.setenv(OTEL_PYTHON_VLLM_KV_EXPORTER, value)
    monkeypatch.setenv(OTEL_PYTHON_VLLM_KV_RELAY_DIR, str(tmp_path))
    load_vllm_plugin()
    load_vllm_plugin()
    instrumentor = VLLMKVCacheInstrumentor()
    instrumentor.instrument()
    try:
        assert not hasattr(output_processor.OutputProcessor.process_outputs, "__wrapped__"), "nothing patched"
        errors = [record for record in caplog.records if record.levelname == "ERROR"]
        assert len(errors) == 1 and OTEL_PYTHON_VLLM_KV_EXPORTER in errors[0].getMessage()
        assert os.environ[OTEL_PYTHON_VLLM_KV_EXPORTER] == value and os.listdir(tmp_path) == []
    finally:
        instrumentor.uninstrument()


@given(st.text(max_size=80))
def test_any_exporter_variable_gives_a_role_none_or_a_malformed_error(value):
    from otel_vllm_kv.environment_variables import OTEL_PYTHON_VLLM_KV_EXPORTER
    from otel_vllm_kv.roles import MalformedVariable, inherited_role

    if "\x00" in value:
        return  # an environment variable cannot hold it
    saved = os.environ.get(OTEL_PYTHON_VLLM_KV_EXPORTER)
    os.environ[OTEL_PYTHON_VLLM_KV_EXPORTER] = value
    try:
        assert inherited_role() is None
    except MalformedVariable:
        pass
    finally:
        if saved is None:
            del os.environ[OTEL_PYTHON_VLLM_KV_EXPORTER]
        else:
            os.environ[OTEL_PYTHON_VLLM_KV_EXPORTER] = saved


def test_a_relative_relay_directory_is_refused(monkeypatch, tmp_path):
    """vLLM's processes may run elsewhere: a relative path would name another directory there."""
    from otel_vllm_kv.settings import read_settings

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="OTEL_PYTHON_VLLM_KV_RELAY_DIR='.' is a relative path"):
        read_settings({"OTEL_PYTHON_VLLM_KV_RELAY_DIR": "."})


def test_a_relay_parent_without_room_names_the_setting(tmp_path, monkeypatch):
    """A tmpfs out of inodes refuses the relay directory itself (ENOSPC from ``mkdtemp``)."""
    import subprocess

    from otel_vllm_kv.environment_variables import OTEL_PYTHON_VLLM_KV_EXPORTER
    from otel_vllm_kv.roles import resolve_role

    monkeypatch.delenv(OTEL_PYTHON_VLLM_KV_EXPORTER, raising=False)  # this process may have been an exporter

    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=1", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a tmpfs needs root (or CAP_SYS_ADMIN)")
    try:
        with pytest.raises(ValueError, match=f"OTEL_PYTHON_VLLM_KV_RELAY_DIR='{mount}' is unusable"):
            resolve_role(str(mount))
        assert os.listdir(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_relay_of_a_killed_exporter_is_removed_by_the_next_exporter(tmp_path):
    """SIGKILL skips the exit handler; the next instrumented process sweeps that relay, not live ones."""
    import signal
    import subprocess
    import sys

    from otel_vllm_kv.roles import remove_stale_relays

    exporter_code = (
        "from otel_vllm_kv import VLLMKVCacheInstrumentor; import os, signal, sys, time\n"
        # A shell's background job inherits SIGINT ignored; the exporter must be interruptible all the same.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "VLLMKVCacheInstrumentor().instrument()\n"
        "print(os.environ['OTEL_PYTHON_VLLM_KV_EXPORTER'].partition(':')[2], flush=True); time.sleep(600)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_PYTHON_VLLM_KV")}
    env["OTEL_PYTHON_VLLM_KV_RELAY_DIR"] = str(tmp_path)
    exporters = [
        subprocess.Popen([sys.executable, "-c", exporter_code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    killed, alive = exporters
    relays = [exporter.stdout.readline().strip() for exporter in exporters]
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert os.path.isdir(relays[0]), "SIGKILL leaves the relay behind"
        assert remove_stale_relays(str(tmp_path)) == [relays[0]]
        assert not os.path.exists(relays[0]) and os.path.isdir(relays[1]), "a live exporter's relay is kept"
    finally:
        alive.send_signal(signal.SIGINT)
        alive.wait(timeout=60)
    assert not os.path.exists(relays[1]), "an interrupted exporter removes its own relay at exit"
