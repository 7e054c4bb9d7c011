"""Debian's Prometheus (2.42) run by a test: scrape given targets every second, answer PromQL."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.instrumented_processes import free_port, unavailable

SCRAPE_INTERVAL_SECONDS = 1


def require_binary(name: str) -> str:
    """The binary's path; missing fails under CI (``scripts/setup.sh`` installs it) and skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not found: install Debian's prometheus package (scripts/setup.sh does, as root)")
    return path


@dataclass
class Prometheus:
    port: int

    def _get(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expression: str, at: float | None = None) -> list[dict]:
        """An instant query's result vector (each item has ``metric`` labels and ``value``)."""
        params = {"query": expression} if at is None else {"query": expression, "time": f"{at:.3f}"}
        return self._get("/api/v1/query", **params)["result"]

    def value(self, expression: str, at: float | None = None) -> float:
        """The single sample an instant query returns."""
        result = self.query(expression, at)
        assert len(result) == 1, f"{expression}: {result}"
        return float(result[0]["value"][1])

    def query_range(self, expression: str, start: float, end: float) -> list[dict]:
        return self._get(
            "/api/v1/query_range",
            query=expression,
            start=f"{start:.3f}",
            end=f"{end:.3f}",
            step=str(SCRAPE_INTERVAL_SECONDS),
        )["result"]

    def targets_up(self) -> dict[str, float]:
        return {item["metric"]["job"]: float(item["value"][1]) for item in self.query("up")}


@contextlib.contextmanager
def running_prometheus(directory: str, targets: dict[str, str], rule_files: list[str] = ()) -> Iterator[Prometheus]:
    """Prometheus scraping ``targets`` (job name -> host:port) every second, stopped at exit."""
    binary = require_binary("prometheus")
    port = free_port()
    config = os.path.join(directory, "prometheus.yml")
    scrape_configs = [{"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in targets.items()]
    with open(config, "w") as file:  # JSON is YAML
        json.dump(
            {
                "global": {"scrape_interval": f"{SCRAPE_INTERVAL_SECONDS}s", "evaluation_interval": "1s"},
                "rule_files": list(rule_files),
                "scrape_configs": scrape_configs,
            },
            file,
        )
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={os.path.join(directory, 'data')}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(directory, "prometheus.log"), "w"),
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, open(os.path.join(directory, "prometheus.log")).read()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "prometheus did not become ready"
                time.sleep(0.5)
        yield Prometheus(port)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
