"""Arize Phoenix run by a test: a real OTLP trace backend with a web UI, read back through its REST API.

Phoenix lives in its own venv (``.venv-phoenix``, ``scripts/setup.sh``): its pins must not meet
vLLM's. It runs as its own process with its own temporary working directory (its SQLite store),
on free ports, bound to 127.0.0.1, with no telemetry and no outside resources; stopped at exit.
UI, REST (``/v1/projects/<project>/spans``), GraphQL and OTLP/HTTP (``/v1/traces``) share one
port; OTLP/gRPC has its own.

What Phoenix keeps of a span: its name, trace and span ids, parent id, times, status,
attributes (with their types) and events (with theirs); not its kind (``span_kind`` is
OpenInference's, ``UNKNOWN`` for a plain OpenTelemetry span) nor its resource. The project is the
``x-project-name`` header of the export or the resource attribute ``openinference.project.name``,
else ``default``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests.support.instrumented_processes import ROOT, free_port, stop_process, unavailable

#: ``phoenix`` in the venv ``scripts/setup.sh`` makes for it.
PHOENIX = os.path.join(ROOT, ".venv-phoenix", "bin", "phoenix")
#: The resource attribute that names a span's Phoenix project.
PROJECT_RESOURCE_ATTRIBUTE = "openinference.project.name"
DEFAULT_PROJECT = "default"
#: Spans per page of the REST API (its maximum is larger; a page this size answers quickly).
PAGE_SIZE = 1000


def require_phoenix() -> str:
    """``phoenix``'s path; missing fails under CI (``scripts/setup.sh`` installs it) and skips elsewhere."""
    if not os.access(PHOENIX, os.X_OK):
        unavailable(f"{PHOENIX} not found: scripts/setup.sh installs arize-phoenix in .venv-phoenix")
    return PHOENIX


@dataclass
class PhoenixSpan:
    """A span as Phoenix's REST API returns it (``GET /v1/projects/<project>/spans``)."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    start_time: str
    end_time: str
    attributes: dict
    events: list[dict] = field(default_factory=list)

    @classmethod
    def from_json(cls, item: dict) -> PhoenixSpan:
        return cls(
            name=item["name"],
            trace_id=item["context"]["trace_id"],
            span_id=item["context"]["span_id"],
            parent_id=item.get("parent_id"),
            start_time=item["start_time"],
            end_time=item["end_time"],
            attributes=item.get("attributes") or {},
            events=item.get("events") or [],
        )

    def event_names(self) -> list[str]:
        return [event["name"] for event in self.events]


@dataclass
class Phoenix:
    port: int
    grpc_port: int
    working_dir: str
    process: subprocess.Popen

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def traces_endpoint(self) -> str:
        """OTLP/HTTP traces (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, vLLM's ``--otlp-traces-endpoint``)."""
        return self.url("/v1/traces")

    def get(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(self.url(path + query), timeout=30) as response:
            return json.loads(response.read())

    def projects(self) -> list[str]:
        return [project["name"] for project in self.get("/v1/projects")["data"]]

    def spans(self, project: str = DEFAULT_PROJECT) -> list[PhoenixSpan]:
        """Every span of ``project``, page after page (``next_cursor``); none for a project not yet made."""
        if project not in self.projects():
            return []
        spans: list[PhoenixSpan] = []
        cursor = None
        while True:
            params = {"limit": PAGE_SIZE, **({"cursor": cursor} if cursor else {})}
            page = self.get(f"/v1/projects/{urllib.parse.quote(project, safe='')}/spans", **params)
            spans += [PhoenixSpan.from_json(item) for item in page["data"]]
            cursor = page.get("next_cursor")
            if not cursor:
                return spans

    def wait_for_spans(self, project: str, done, timeout: float = 30) -> list[PhoenixSpan]:
        """``spans(project)`` once ``done(spans)`` is true; the last read when ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans(project)
            if done(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.5)

    def span_page(self, span_id: str) -> str:
        """The UI's page of the span's trace, with the span selected."""
        return self.url(f"/redirects/spans/{span_id}")

    def log(self) -> str:
        with open(os.path.join(self.working_dir, "phoenix.log"), errors="replace") as file:
            return file.read()


def start_phoenix(working_dir: str) -> Phoenix:
    """Start ``phoenix serve`` in the background (it needs 11-25 s to be healthy: ``wait_healthy``)."""
    binary = require_phoenix()
    port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PHOENIX_"))}
    env.update(
        PHOENIX_WORKING_DIR=working_dir,
        PHOENIX_PORT=str(port),
        PHOENIX_GRPC_PORT=str(grpc_port),
        PHOENIX_HOST="127.0.0.1",
        PHOENIX_TELEMETRY_ENABLED="false",
        PHOENIX_ALLOW_EXTERNAL_RESOURCES="false",
    )
    env.pop("PYTHONPATH", None)  # the test venv's paths mean nothing to Phoenix's
    process = subprocess.Popen(
        [binary, "serve"],
        cwd=working_dir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(working_dir, "phoenix.log"), "w"),
    )
    return Phoenix(port, grpc_port, working_dir, process)


def wait_healthy(phoenix: Phoenix, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert phoenix.process.poll() is None, "phoenix exited:\n" + phoenix.log()[-3000:]
        try:
            urllib.request.urlopen(phoenix.url("/healthz"), timeout=2)
            return
        except OSError:
            assert time.monotonic() < deadline, "phoenix did not become healthy:\n" + phoenix.log()[-3000:]
            time.sleep(0.3)


def stop_phoenix(phoenix: Phoenix) -> None:
    stop_process(phoenix.process, signal.SIGTERM, timeout=20)


@contextlib.contextmanager
def running_phoenix(working_dir: str, wait: bool = True) -> Iterator[Phoenix]:
    """Phoenix serving from ``working_dir``, healthy first if ``wait`` (else call ``wait_healthy``), stopped at exit."""
    phoenix = start_phoenix(working_dir)
    try:
        if wait:
            wait_healthy(phoenix)
        yield phoenix
    finally:
        stop_phoenix(phoenix)
