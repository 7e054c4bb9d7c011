"""Whether a process still runs: the relay's reader drops the files of dead writers, and
``roles`` ignores (and sweeps the relays of) exporters that died."""

from __future__ import annotations

import os


def is_alive(pid: int) -> bool:
    """Whether a process with this pid runs (it may belong to another user); zombies are dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (command) state ...": the command may hold spaces and parentheses.
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True
