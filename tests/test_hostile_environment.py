"""Real engines in hostile environments: never the reason an engine dies or a gauge lies.

- A full tmpfs as the relay directory: the engine generates the same tokens, one warning names
  the setting and the mount, and nothing is left behind.
- Two exporters in two pid namespaces sharing one relay parent (``--ipc=host`` containers
  share /dev/shm), each with a live engine: both keep their gauges.
- A malformed ``OTEL_PYTHON_VLLM_KV_EXPORTER`` in a plain ``LLM``'s environment: vLLM runs;
  the package's plugin, loaded by vLLM in each of its processes, logs one ERROR there.

"The same tokens" are those of a run without the package: vLLM told not to load its plugin
(``VLLM_PLUGINS``), nothing instrumented, the engine in one process (``without-package`` in
scenarios/greedy_tokens.py), once per module. The module's greedy runs go two at a time (an
engine start is mostly one process importing at a time: on two cores, two runs together took
48 s, one alone 40 s), and all of them end before the two pid-namespace exporters start: never
more than two engines at once.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from otel_vllm_kv.environment_variables import OTEL_PYTHON_VLLM_KV_EXPORTER, OTEL_PYTHON_VLLM_KV_RELAY_DIR
from otel_vllm_kv.names import KV_CACHE_LIMIT, KV_CACHE_STATE, KV_CACHE_USAGE, MODEL_NAME
from tests.support.engine_load import LIMIT
from tests.support.instrumented_processes import otel_environment, support_pythonpath

HERE = os.path.dirname(os.path.abspath(__file__))
SCENARIOS = os.path.join(HERE, "scenarios")
ENGINE_TIMEOUT = 300
#: How the scenarios format the records of non-vLLM loggers (the package's among them).
LOGGED = re.compile(r"\b(?P<level>[A-Z]+) \[pid (?P<pid>\d+)\] (?P<logger>[\w.]+): (?P<message>.*)")
MALFORMED_VALUE = "2147483648:/tmp"
"""A value of ``OTEL_PYTHON_VLLM_KV_EXPORTER`` that no exporter writes: a pid past the C int range
(``os.kill`` raised ``OverflowError`` inside vLLM's plugin loading). Other values: ``test_roles.py``."""


def scenario_environment(**settings: str) -> dict[str, str]:
    """No ``OTEL_*`` variable of this process (an in-process test may have instrumented it), the
    scenarios' helpers importable, and this process's ``PYTHONPATH`` kept (it may select the
    package under test)."""
    return otel_environment(PYTHONPATH=support_pythonpath(), **settings)


def run_greedy(model_dir: str, mode: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list | None]:
    """scenarios/greedy_tokens.py to completion; its result (output merged into stdout) and its tokens."""
    result = subprocess.run(
        [sys.executable, os.path.join(SCENARIOS, "greedy_tokens.py"), model_dir, mode],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=ENGINE_TIMEOUT,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("TOKENS ")]
    return result, json.loads(lines[-1][len("TOKENS ") :]) if lines else None


def tail(output: str, lines: int = 60) -> str:
    return "\n".join(output.splitlines()[-lines:])


class GreedyRuns:
    """scenarios/greedy_tokens.py runs, two at a time, started at once; ``result(name)`` waits for one."""

    def __init__(self, model_dir: str, runs: dict[str, tuple[str, dict[str, str]]]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=2)
        self._runs = {name: self._pool.submit(run_greedy, model_dir, mode, env) for name, (mode, env) in runs.items()}

    def result(self, name: str) -> tuple[subprocess.CompletedProcess, list | None]:
        return self._runs[name].result()

    def tokens_without_package(self) -> list[list[int]]:
        result, tokens = self.result(WITHOUT_PACKAGE)
        assert result.returncode == 0 and tokens, tail(result.stdout)
        assert len({tuple(sequence) for sequence in tokens}) == len(tokens), "each prompt its own continuation"
        return tokens

    def close(self) -> None:
        """Once every run has ended."""
        self._pool.shutdown(wait=True)


WITHOUT_PACKAGE, FULL_TMPFS, MALFORMED = "without the package", "full tmpfs", "malformed exporter variable"


@pytest.fixture(scope="module")
def greedy_runs(request, tiny_model_dir):
    """The runs that the module's selected tests need, in this order: the one without the package
    (short) first, so the other two overlap."""
    selected = {item.originalname for item in request.session.items if getattr(item, "module", None) is request.module}
    runs = {}
    if selected & {
        test_a_full_relay_tmpfs_leaves_the_engine_generating_with_one_warning.__name__,
        test_a_malformed_exporter_variable_leaves_vllm_generating.__name__,
    }:
        runs[WITHOUT_PACKAGE] = ("without-package", scenario_environment())
    if test_a_full_relay_tmpfs_leaves_the_engine_generating_with_one_warning.__name__ in selected:
        try:
            mount_point = request.getfixturevalue("full_tmpfs")
        except pytest.skip.Exception:
            pass  # that test skips too, with the reason
        else:
            runs[FULL_TMPFS] = ("instrumented", scenario_environment(**{OTEL_PYTHON_VLLM_KV_RELAY_DIR: mount_point}))
    if test_a_malformed_exporter_variable_leaves_vllm_generating.__name__ in selected:
        runs[MALFORMED] = ("plain", scenario_environment(**{OTEL_PYTHON_VLLM_KV_EXPORTER: MALFORMED_VALUE}))
    started = GreedyRuns(tiny_model_dir, runs)
    try:
        yield started
    finally:
        started.close()


# --- a full tmpfs as the relay directory ---------------------------------------------------


@pytest.fixture(scope="module")
def full_tmpfs(tmp_path_factory):
    """A 64 KiB tmpfs with no free byte left (one file, ``filler``, holds it all); unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = str(tmp_path_factory.mktemp("full-relay-tmpfs"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", mount_point], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not allowed here: {mounted.stderr.strip()}")
    try:
        descriptor = os.open(os.path.join(mount_point, "filler"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            while True:
                os.write(descriptor, b"\xff" * 4096)
        except OSError as error:
            assert error.errno == 28, error  # ENOSPC
        finally:
            os.close(descriptor)
        assert os.statvfs(mount_point).f_bavail == 0
        yield mount_point
    finally:
        if subprocess.run(["umount", mount_point]).returncode != 0:
            subprocess.run(["umount", "--lazy", mount_point], check=True)


@pytest.mark.engine
def test_a_full_relay_tmpfs_leaves_the_engine_generating_with_one_warning(full_tmpfs, greedy_runs):
    result, tokens = greedy_runs.result(FULL_TMPFS)
    assert result.returncode == 0, f"exit {result.returncode}:\n{tail(result.stdout)}"
    tokens_without_package = greedy_runs.tokens_without_package()
    warnings = [
        line for line in result.stdout.splitlines() if OTEL_PYTHON_VLLM_KV_RELAY_DIR in line and full_tmpfs in line
    ]
    problems = []
    if tokens != tokens_without_package:
        problems.append("the tokens differ from those without the package")
    if len(warnings) != 1:
        problems.append(f"{len(warnings)} lines name the setting and the directory, not one:\n" + "\n".join(warnings))
    if os.listdir(full_tmpfs) != ["filler"]:
        problems.append(f"left behind in the relay directory: {sorted(os.listdir(full_tmpfs))}")
    assert not problems, "\n".join(problems)


# --- a malformed OTEL_PYTHON_VLLM_KV_EXPORTER --------------------------------------------------


def exporter_variable_errors(output: str) -> Counter:
    """{pid: ERROR records naming the variable that pid logged}."""
    return Counter(
        match["pid"]
        for match in map(LOGGED.search, output.splitlines())
        if match and match["level"] == "ERROR" and OTEL_PYTHON_VLLM_KV_EXPORTER in match["message"]
    )


@pytest.mark.engine
def test_a_malformed_exporter_variable_leaves_vllm_generating(greedy_runs):
    """vLLM loads the package's plugin in each of its processes (the user's, the engine core, the
    worker): each of them meets the variable."""
    result, tokens = greedy_runs.result(MALFORMED)
    assert result.returncode == 0, f"exit {result.returncode}:\n{tail(result.stdout)}"
    assert tokens == greedy_runs.tokens_without_package(), "the same tokens as without the package"
    errors = exporter_variable_errors(result.stdout)
    assert errors and max(errors.values()) == 1, f"at most one ERROR per process, at least one: {dict(errors)}"


# --- two exporters in two pid namespaces, one relay parent ------------------------------------


class CommandedExporter:
    """scenarios/gauges_on_command.py in its own session (so that it and its engine processes can
    be stopped together), its merged output collected by a thread."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith(("READY", "GAUGES ")):
                self._replies.put(line.strip())
        self._replies.put(None)

    def reply(self, timeout: float = ENGINE_TIMEOUT) -> str:
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            line = None
        assert line is not None, "no reply:\n" + "".join(self.lines[-60:])
        return line

    def wait_ready(self) -> None:
        assert self.reply() == "READY"

    def gauges(self) -> list:
        """[metric name, attributes, value] of each point of the limit and usage gauges."""
        self.process.stdin.write("gauges\n")
        self.process.stdin.flush()
        return json.loads(self.reply(timeout=60)[len("GAUGES ") :])

    def request_exit(self) -> None:
        try:
            self.process.stdin.write("exit\n")
            self.process.stdin.flush()
        except OSError:  # it has exited
            pass

    def stop(self) -> None:
        """After ``request_exit``: wait for the exit, then kill whatever is left of its session."""
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:  # its session: the engine core and the worker too, whatever happened
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def one_engine_of_the_tiny_model(points: list) -> bool:
    limits = [(attributes[MODEL_NAME], value) for name, attributes, value in points if name == KV_CACHE_LIMIT]
    usage = sorted((attributes[KV_CACHE_STATE], value) for name, attributes, value in points if name == KV_CACHE_USAGE)
    return (
        limits == [("tiny", LIMIT)]
        and [state for state, _ in usage] == ["free", "used"]
        and sum(value for _, value in usage) == LIMIT
    )


@pytest.fixture
def unshare_pid():
    """The command prefix of a process in a new pid namespace (skips where that is not allowed)."""
    command = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
    try:
        probe = subprocess.run([*command, "true"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("unshare (util-linux) is not installed")
    if probe.returncode != 0:
        pytest.skip(f"a new pid namespace is not allowed here: {probe.stderr.strip()}")
    return command


@pytest.mark.engine
def test_exporters_in_two_pid_namespaces_sharing_a_relay_parent_keep_their_gauges(
    tiny_model_dir, unshare_pid, tmp_path, greedy_runs
):
    """B's instrument() sweeps the shared relay parent for relays of dead exporters while A lives;
    A's pid means nothing in B's namespace."""
    greedy_runs.close()  # two engines at most
    env = scenario_environment(**{OTEL_PYTHON_VLLM_KV_RELAY_DIR: str(tmp_path)})
    command = [sys.executable, os.path.join(SCENARIOS, "gauges_on_command.py"), tiny_model_dir]
    exporters = []
    try:
        exporters.append(first := CommandedExporter(command, env))
        first.wait_ready()
        assert one_engine_of_the_tiny_model(first.gauges()), "alone, A reports its engine"
        exporters.append(second := CommandedExporter([*unshare_pid, *command], env))
        second.wait_ready()
        gauges = {"A": first.gauges(), "B (other pid namespace)": second.gauges()}
        wrong = {name: points for name, points in gauges.items() if not one_engine_of_the_tiny_model(points)}
        assert not wrong, f"each exporter reports its one engine; not: {wrong}"
    finally:
        for exporter in exporters:  # both engines shut down at once
            exporter.request_exit()
        for exporter in exporters:
            exporter.stop()
