"""Count a process's instructions per interval with valgrind's callgrind, deterministically.

The measured process calls ``mark(label)`` between intervals; ``mark`` calls
``os.getppid()``, and callgrind runs with ``--dump-before=getppid``, so every mark writes
one profile dump holding exactly the instructions since the previous one. Nothing else
in a scheduler workload calls ``getppid`` (``read_intervals`` checks that the dumps and
the marks pair up), so the counts need no client request, no compiler and no timer.
Instruction counts do not drift with machine load: with ``PYTHONHASHSEED`` fixed, the
same run repeated gives the same counts (how closely: docs/benchmarks.md, "How the
instructions are counted").
"""

from __future__ import annotations

import glob
import os
import shutil

from benchmarks._common import SanityError, check

_labels: list[str] = []


def mark(label: str) -> None:
    """End the current interval; the next one, up to the next mark, is called ``label``."""
    _labels.append(label)
    os.getppid()


def labels() -> list[str]:
    return list(_labels)


def valgrind_command(out_file: str) -> list[str]:
    if shutil.which("valgrind") is None:
        raise SanityError("valgrind is not installed (Debian: apt-get install valgrind; scripts/setup.sh does it)")
    return [
        "valgrind",
        "--tool=callgrind",
        "--dump-before=getppid",
        f"--callgrind-out-file={out_file}",
        "--dump-line=no",
        "--compress-strings=no",
        "--compress-pos=no",
    ]


def read_intervals(out_file: str, marks: list[str]) -> dict[str, int]:
    """Instructions per labelled interval, from the dumps ``out_file.1``, ``out_file.2``, ...

    Dump k (from 1) holds what ran before the k-th mark; so the interval a mark opens is
    in the next dump. The interval after the last mark (exit) is in ``out_file`` itself.
    """
    dumps = sorted(glob.glob(out_file + ".*"), key=lambda path: int(path.rsplit(".", 1)[1]))
    check(
        len(dumps) == len(marks),
        f"callgrind wrote {len(dumps)} dumps for {len(marks)} marks: "
        "something else called getppid, or the run did not finish",
    )
    counts: dict[str, int] = {}
    for label, path in zip(marks[:-1], dumps[1:]):
        check(label not in counts, f"interval {label!r} marked twice")
        counts[label] = total_instructions(path)
    return counts


def total_instructions(path: str) -> int:
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("summary:"):
                return int(line.split()[1])
    raise SanityError(f"{path}: no 'summary:' line, not a callgrind dump")


def remove_dumps(out_file: str) -> None:
    for path in glob.glob(out_file + "*"):
        os.remove(path)
