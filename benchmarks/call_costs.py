"""What single Python constructs cost, in instructions: those the engine's hot paths use, beside their alternatives.

Command (from the repository root)::

    .venv/bin/python -m benchmarks.call_costs

Each case runs ``n`` and ``3 n`` times in one process under callgrind (the ``_callgrind``
marks), and its figure is the marginal cost per run minus an empty loop's. No vLLM is
imported: a plain class stands in for a scheduler or a block pool, because what is measured
is CPython's and the libraries' own cost (a wrapt wrapper, a closure, packing a record, the
SDK storing attributes), the same whatever object it is attached to. The figures, and the
package code each case stands for: docs/benchmarks.md, "Single constructs".
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import shutil
import subprocess
import tempfile
from collections import deque
from collections.abc import Callable

from benchmarks import _callgrind
from benchmarks._common import ROOT, check, command_line, exit_with, markdown_table, module_command, print_header

MODULE = "benchmarks.call_costs"

REPEATS = 2000


class _Pool:
    """A plain object with twenty attributes, like vLLM's schedulers and pools."""

    def __init__(self) -> None:
        for index in range(20):
            setattr(self, f"field{index}", index)

    def get_new_blocks(self, num_blocks: int) -> int:
        return num_blocks

    def read(self) -> int:
        return self.field1 + self.field5 + self.field10 + self.field15


def _hooked(kind: str) -> _Pool:
    """A pool whose ``get_new_blocks`` is shadowed on the instance the way ``kind`` says."""
    import wrapt

    pool = _Pool()
    original = pool.get_new_blocks
    if kind == "wrapt":

        def wrapper(wrapped: Callable, instance: object, args: tuple, kwargs: dict) -> object:
            return wrapped(*args, **kwargs)

        pool.get_new_blocks = wrapt.FunctionWrapper(original, wrapper)
    elif kind == "any":

        def get_new_blocks_any(*args: object, **kwargs: object) -> object:
            return original(*args, **kwargs)

        pool.get_new_blocks = get_new_blocks_any
    elif kind == "own":

        def get_new_blocks(num_blocks: int) -> object:
            return original(num_blocks)

        pool.get_new_blocks = get_new_blocks
    return pool


def _cases() -> dict[str, tuple[str, Callable[[], object]]]:
    """name -> (what it stands for, one run)."""
    from opentelemetry.sdk.trace import TracerProvider

    from otel_vllm_kv.admission_records import RECORD

    plain, wrapped, any_closure, own_closure = (_hooked(kind) for kind in ("plain", "wrapt", "any", "own"))
    fresh, built = _Pool(), _Pool()
    vars(built)  # CPython builds the instance __dict__ on first access; attribute reads then take another path
    span = TracerProvider().get_tracer("call-costs").start_span("generate")
    attributes14 = {f"vllm.admission.attribute{index}": index * 1000 for index in range(13)} | {"vllm.request.id": "r1"}
    events = iter(range(10**9))
    # An admission record's fields: kind, sequence, time, engine index, blocks, capacity, free, own, hits,
    # wait, waiting; as decimal text the nanosecond clock and the engine's three fields preformatted.
    text_fields = ("admitted", 1, 1_795_000_000_123_456_789, "0,256,4080", 200, 4, 0, 12_345_678, 3)
    packed_fields = (0, 1, 1_795_000_000.123_456_7, 0, 256, 4080, 200, 4, 0, 0.012_345_678, 3, 0.0, 0)
    pack = RECORD.pack
    queue = _FCFSQueue(range(3))
    queues = (queue, queue)
    queue_length = deque.__len__
    relay_write = _relay_write()
    return {
        "empty": ("the loop alone (subtracted from every other case)", lambda: None),
        "method call": ("pool.get_new_blocks(4), vLLM's own method", lambda: plain.get_new_blocks(4)),
        "wrapt FunctionWrapper on the instance": ("a pass-through wrapt wrapper", lambda: wrapped.get_new_blocks(4)),
        "closure, *args **kwargs": (
            "a pass-through closure taking any arguments (patching.hook_methods, rare hooks)",
            lambda: any_closure.get_new_blocks(4),
        ),
        "closure, the method's own parameters": (
            "a pass-through closure with vLLM's parameters (patching.hook_methods, hot hooks)",
            lambda: own_closure.get_new_blocks(4),
        ),
        "4 attribute reads": ("on an object whose __dict__ was never built", fresh.read),
        "4 attribute reads, __dict__ built": (
            "the same after one vars(object), which the package never calls",
            built.read,
        ),
        "record %-format": (
            "an admission record as decimal text: 9 fields, 2 of them nanoseconds",
            lambda: _RECORD_TEXT % text_fields,
        ),
        "record struct + hex": (
            "the same record packed by one struct call, hex-encoded (admission_records.encode)",
            lambda: pack(*packed_fields).hex(),
        ),
        "len() of vLLM's FCFS queue": (
            "two queues, each through its Python __len__ (get_request_counts)",
            lambda: len(queue) + len(queue),
        ),
        "deque.__len__ of the same": (
            "the same lengths read in C, sum(map(...))",
            lambda: sum(map(deque.__len__, queues)),
        ),
        "deque.__len__, two calls": (
            "the same, one direct call per queue (engine.admission)",
            lambda: queue_length(queue) + queue_length(queue),
        ),
        "SDK span.add_event, 14 attributes": (
            "one admission event of a batch span",
            lambda: span.add_event("admitted", attributes14, timestamp=next(events)),
        ),
        "SDK span.set_attributes, 14": (
            "the attributes of a one-request span",
            lambda: span.set_attributes(attributes14),
        ),
        "relay write, one pwrite": (
            "a publish as relay.SnapshotWriter makes it: pack, CRC-32, one pwrite (user space only: the kernel's "
            "part of the system call is not counted)",
            relay_write,
        ),
    }


def _relay_write() -> Callable[[], object]:
    """One engine's publish (free blocks, one group's evictable count) through relay.SnapshotWriter."""
    from otel_vllm_kv.kv_cache import GroupLayout, PoolLayout
    from otel_vllm_kv.relay import SnapshotWriter

    directory = tempfile.mkdtemp(prefix="otel-vllm-kv-call-costs-")
    atexit.register(shutil.rmtree, directory, True)
    writer = SnapshotWriter(directory, 0, "m", PoolLayout(64, 63 * 16, groups=(GroupLayout("full_attention", 16),)))
    evictable = [3]
    return lambda: writer.write(40, evictable)


#: An admission record as decimal text (the alternative to the packed record).
_RECORD_TEXT = "%s,%d,%d,%s,%d,%d,%d,%d,%d"


class _FCFSQueue(deque):
    """vLLM's ``FCFSRequestQueue`` as far as its length goes: a ``deque`` with a Python ``__len__``."""

    def __len__(self) -> int:
        return super().__len__()


def count(repeats: int) -> None:
    """The counted process: every case, ``repeats`` then ``3 x repeats`` times, between marks."""
    cases = _cases()
    gc.disable()
    for name, (_, run) in cases.items():
        for size in (repeats, 3 * repeats):
            _callgrind.mark(f"{name}|{size}")
            for _ in range(size):
                run()
    _callgrind.mark("end|0")
    print(json.dumps(_callgrind.labels()))


def measure(repeats: int) -> list[list[str]]:
    with tempfile.TemporaryDirectory(prefix="otel-vllm-kv-call-costs-") as directory:
        out_file = os.path.join(directory, "callgrind.out")
        result = subprocess.run(
            [*_callgrind.valgrind_command(out_file), *module_command(MODULE, "--count", str(repeats))],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            check=False,
            cwd=ROOT,
        )
        check(result.returncode == 0, f"the counted process failed: {result.stderr[-2000:]}")
        marks = json.loads(result.stdout.strip().splitlines()[-1])
        counts = _callgrind.read_intervals(out_file, marks)
    per_run = {}
    for label in marks[:-1]:
        name, size = label.split("|")
        if int(size) == repeats:
            per_run[name] = (counts[f"{name}|{3 * repeats}"] - counts[label]) / (2 * repeats)
    empty = per_run.pop("empty")
    descriptions = {name: description for name, (description, _) in _cases().items()}
    return [[name, descriptions[name], f"{cost - empty:,.0f}"] for name, cost in per_run.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=REPEATS, help=f"runs per case, then 3x as many (default {REPEATS})"
    )
    parser.add_argument("--smoke", action="store_true", help="few repeats: sanity checks only")
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)  # the counted child process
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats = 20
    if args.count:
        count(args.count)
        return 0
    print_header(
        "Instructions per run of single Python constructs (callgrind, marginal)",
        command_line(MODULE),
        {"repeats": f"{args.repeats} and {3 * args.repeats}", "PYTHONHASHSEED": 0, "gc": "off"},
    )
    print(markdown_table(["construct", "stands for", "instructions per run"], measure(args.repeats)))
    print()
    print("All sanity checks passed.")
    return 0


if __name__ == "__main__":
    exit_with(main)
