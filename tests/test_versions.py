"""Which vLLM releases get instrumented: the internals table checked on the installed release.

The policy (docs/versions.md): no upper bound on vLLM; a release whose every internal checks out
is instrumented with one INFO line, any other gets one WARNING naming each missing or changed
internal and no patch, once per process tree, also under ``vllm serve`` (whose root logger is at
ERROR). The fakes are the installed vLLM with one internal renamed (``fake_releases``).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import textwrap
from pathlib import Path

import pytest

from otel_vllm_kv import VLLMKVCacheInstrumentor, compat, internals
from otel_vllm_kv.demo.tiny_model import server_arguments
from otel_vllm_kv.engine import probe
from otel_vllm_kv.environment_variables import OTEL_PYTHON_VLLM_KV_VERSION_REPORTED
from otel_vllm_kv.frontend import spans
from tests.support.fake_releases import FAKES, renamed_hash_slot, renamed_method
from tests.support.instrumented_processes import free_port, support_pythonpath, vllm_process
from tests.support.telemetry import new_reader

#: ``vllm serve`` on a fake release; it imports ``tests.support``: run with ``support_pythonpath()``.
FAKE_RELEASE_SERVER = Path(__file__).parent / "support" / "fake_release_server.py"


class Verdicts(logging.Handler):
    """The lines of the version check's logger (it does not propagate: its own handler writes to stderr)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, level: int) -> list[str]:
        return [record.getMessage() for record in self.records if record.levelno == level]


@pytest.fixture
def verdicts(monkeypatch):
    monkeypatch.delenv(OTEL_PYTHON_VLLM_KV_VERSION_REPORTED, raising=False)
    handler, logger = Verdicts(), logging.getLogger(compat.LOGGER_NAME)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    VLLMKVCacheInstrumentor().uninstrument()


def patched_now() -> list[str]:
    """The package's class patches currently in place (wrapt wrappers in vLLM's classes)."""
    found = []
    for module, name, _ in (*probe.PATCHES, *spans.PATCHES):
        owner = importlib.import_module(module)
        *classes, attribute = name.split(".")
        for class_name in classes:
            owner = getattr(owner, class_name)
        if hasattr(vars(owner).get(attribute), "__wrapped__"):
            found.append(name)
    return found


def test_the_installed_release_is_instrumented_with_one_info_line(verdicts):
    VLLMKVCacheInstrumentor().instrument(meter_provider=new_reader()[1])
    (line,) = verdicts.lines(logging.INFO)
    assert f"vLLM {compat.vllm_version()}" in line and "tested on 0.31.0 to 0.34.0" in line, line
    assert not verdicts.lines(logging.WARNING)
    assert patched_now()


def test_a_newer_release_whose_internals_check_out_is_instrumented_and_says_so(verdicts, monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.35.1")
    VLLMKVCacheInstrumentor().instrument(meter_provider=new_reader()[1])
    (line,) = verdicts.lines(logging.INFO)
    assert "vLLM 0.35.1" in line and "vLLM 0.34.0 is the newest release it was tested on" in line, line
    assert patched_now()


@pytest.mark.parametrize(
    "fake", [renamed_method, renamed_hash_slot], ids=["hooked method renamed", "hash slot renamed"]
)
def test_a_release_with_one_internal_renamed_gets_one_warning_and_no_patch(verdicts, monkeypatch, fake):
    internal = fake(monkeypatch)
    VLLMKVCacheInstrumentor().instrument(meter_provider=new_reader()[1])
    (warning,) = verdicts.lines(logging.WARNING)
    assert f"vLLM {compat.vllm_version()}" in warning and internal in warning, warning
    assert not verdicts.lines(logging.INFO)
    assert patched_now() == []
    # A process it starts (here: the same one, the variable inherited) reaches the same verdict silently.
    VLLMKVCacheInstrumentor().uninstrument()
    VLLMKVCacheInstrumentor().instrument(meter_provider=new_reader()[1])
    assert len(verdicts.records) == 1 and patched_now() == []


def test_a_hooked_method_with_another_signature_gets_one_warning_and_no_patch(verdicts, monkeypatch):
    """The hot hooks take vLLM's own parameters: a vLLM whose ``popleft_n`` grew one is not patched."""
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue

    original = FreeKVCacheBlockQueue.popleft_n

    def popleft_n(self, n, zero_fill=False):
        return original(self, n)

    monkeypatch.setattr(FreeKVCacheBlockQueue, "popleft_n", popleft_n)
    VLLMKVCacheInstrumentor().instrument(meter_provider=new_reader()[1])
    (warning,) = verdicts.lines(logging.WARNING)
    assert "FreeKVCacheBlockQueue.popleft_n(n): changed (takes (n, zero_fill=))" in warning, warning
    assert patched_now() == []


def test_the_table_reads_the_same_from_source_as_from_the_live_classes():
    """One table, two readers: the release script (source text) and the run-time check agree here."""

    def installed_source(module: str) -> str | None:
        spec = importlib.util.find_spec(module)
        return None if spec is None or spec.origin is None else Path(spec.origin).read_text()

    for internal in internals.required():
        live, text = internals.check_installed(internal), internals.check_source(internal, installed_source)
        assert (live.status, live.detail) == (text.status, text.detail), (live, text)


@pytest.mark.parametrize(
    ("source", "status", "detail"),
    [
        ("class FreeKVCacheBlockQueue:\n    def popleft_n(self, n): ...", "present", ""),
        ("class FreeKVCacheBlockQueue:\n    def popleft_n(self, count): ...", "changed", "takes (count)"),
        (
            "class FreeKVCacheBlockQueue:\n    def popleft_n(self, n, *, fast=True): ...",
            "changed",
            "takes other kinds of parameters",
        ),
        ("class FreeKVCacheBlockQueue:\n    def pop_many(self, n): ...", "missing", ""),
        ("class Other:\n    def popleft_n(self, n): ...", "missing", "no FreeKVCacheBlockQueue"),
    ],
)
def test_source_reading_tells_present_changed_and_missing_methods(source, status, detail):
    internal = internals.method("m", "FreeKVCacheBlockQueue.popleft_n", ("n",))
    finding = internals.check_source(internal, {"m": textwrap.dedent(source)}.get)
    assert (finding.status, finding.detail) == (status, detail)


@pytest.mark.parametrize(
    ("source", "status", "detail"),
    [
        ("@dataclass(slots=True)\nclass KVCacheBlock:\n    block_hash: int | None = None", "present", ""),
        (
            "@dataclass(slots=True)\nclass KVCacheBlock:\n    _block_hash: int | None = None",
            "present",
            "as _block_hash",
        ),
        ("@dataclass\nclass KVCacheBlock:\n    block_hash: int | None = None", "missing", "no such slot"),
        ("class KVCacheBlock:\n    __slots__ = ('block_hash',)", "present", ""),
    ],
)
def test_source_reading_tells_slots_from_plain_fields(source, status, detail):
    finding = internals.check_source(internals.slot("m", "KVCacheBlock.block_hash", "_block_hash"), {"m": source}.get)
    assert (finding.status, finding.detail) == (status, detail)


# --- Under `vllm serve` (its root logger at ERROR) ----------------------------------------------


@pytest.mark.engine
@pytest.mark.parametrize("fake", ["none", *FAKES])
def test_under_vllm_serve_the_verdict_is_one_line_and_a_refused_release_still_serves(tiny_model_dir, fake):
    """The whole tree (server, engine core, worker) says it once; a refused release serves untouched."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
        "PYTHONPATH": support_pythonpath(),
        "FAKE_VLLM_RELEASE": fake,
    }
    command = [
        sys.executable,
        str(FAKE_RELEASE_SERVER),
        "serve",
        *server_arguments(tiny_model_dir),
        "--port",
        str(port),
    ]
    with vllm_process(command, env, port) as server:
        status, body = server.complete("hello", max_tokens=4)
        output = server.stderr
    assert status == 200, body
    lines = [
        line
        for line in output.splitlines()
        if "otel-vllm-kv" in line and ("instruments vLLM" in line or "does not recognise" in line)
    ]
    assert len(lines) == 1, "\n".join(lines) or output[-3000:]
    if fake == "none":
        assert lines[0].startswith("INFO") and "instruments vLLM" in lines[0], lines[0]
    else:
        assert lines[0].startswith("WARNING") and "does not recognise" in lines[0], lines[0]
        assert "vllm.kv_cache" not in output  # nothing patched: no relay, no probe
