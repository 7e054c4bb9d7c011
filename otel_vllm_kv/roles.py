"""Which role this process plays: the first to instrument is the exporter and owns the relay;
the processes it starts are engines (they probe) or frontends, never a second exporter.

vLLM starts engine cores (and workers) as child processes, by ``spawn`` on CPU. A
spawned child re-imports the user's main module and, under ``opentelemetry-instrument``,
is auto-instrumented again, so ``instrument()`` runs there too. The exporter therefore
records itself in an environment variable before any engine starts; a process that
inherits the variable from a live exporter probes (an engine) or annotates spans (a frontend),
and never exports the gauges. The exporter proves it lives by the lock it holds on its relay
directory (``liveness``), never by its pid alone.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

from otel_vllm_kv.environment_variables import OTEL_PYTHON_VLLM_KV_EXPORTER, OTEL_PYTHON_VLLM_KV_RELAY_DIR
from otel_vllm_kv.liveness import HeldLock, directory_is_held

_logger = logging.getLogger(__name__)

#: Relay directories are ``otel-vllm-kv-relay-<random>``; releases before the lock named them
#: ``otel-vllm-kv-<pid>-<random>``, which this package neither joins nor removes.
RELAY_PREFIX = "otel-vllm-kv-relay-"
#: The largest pid Linux hands out (``PID_MAX_LIMIT`` on 64-bit: 2^22).
_PID_MAX = 4_194_304
_EXPORTER_VALUE = re.compile(r"([1-9][0-9]{0,6}):(/.+)", re.ASCII)


class MalformedVariable(ValueError):
    """``OTEL_PYTHON_VLLM_KV_EXPORTER`` holds something the package never writes there."""


_malformed_reported = False


def report_malformed(error: MalformedVariable) -> None:
    """One ERROR per process (the plugin and ``instrument()`` may both meet the variable)."""
    global _malformed_reported
    if not _malformed_reported:
        _malformed_reported = True
        _logger.error("otel-vllm-kv: %s", error)


@dataclass(frozen=True)
class Role:
    exporter_pid: int
    relay_directory: str

    @property
    def is_exporter(self) -> bool:
        return self.exporter_pid == os.getpid()


def inherited_role() -> Role | None:
    """The role named by the environment, if it names a live exporter's relay; raises
    ``MalformedVariable`` if the variable holds what no exporter writes (never anything else)."""
    value = os.environ.get(OTEL_PYTHON_VLLM_KV_EXPORTER, "")
    if not value:
        return None
    match = _EXPORTER_VALUE.fullmatch(value)
    if match is None or int(match[1]) > _PID_MAX or not os.path.basename(match[2]).startswith(RELAY_PREFIX):
        raise MalformedVariable(
            f"{OTEL_PYTHON_VLLM_KV_EXPORTER}={value[:200]!r} is malformed; it is set by otel-vllm-kv itself "
            f"as <pid>:<absolute path of an {RELAY_PREFIX}* directory>. Unset it. otel-vllm-kv stays "
            "inactive in this process; vLLM is unaffected."
        )
    pid, directory = int(match[1]), match[2]
    if not directory_is_held(directory):
        return None  # its exporter died: nobody reads that relay
    return Role(pid, directory)


def resolve_role(relay_parent_directory: str) -> Role:
    """Join a live exporter inherited from the parent process, or become the exporter."""
    role = inherited_role()
    if role is not None:
        return role
    remove_stale_relays(relay_parent_directory)
    directory = _create_relay(relay_parent_directory)
    exporter_pid = os.getpid()
    atexit.register(_remove_relay, directory, exporter_pid)
    os.environ[OTEL_PYTHON_VLLM_KV_EXPORTER] = f"{exporter_pid}:{directory}"
    return Role(exporter_pid, directory)


#: The lock of each relay this process made, held until its exit handler removes that relay.
_relay_locks: dict[str, HeldLock] = {}


def _create_relay(parent_directory: str) -> str:
    """A new private relay directory, locked by this process before it appears under its name.

    It is made under a hidden name, locked, then renamed: another exporter's sweep never
    sees it unlocked. A failure names the setting (a full tmpfs gives ENOSPC here).
    """
    try:
        hidden = tempfile.mkdtemp(prefix=f".{RELAY_PREFIX}", dir=parent_directory)
        try:
            lock = HeldLock(os.open(hidden, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            directory = os.path.join(parent_directory, os.path.basename(hidden)[1:])
            os.rename(hidden, directory)
        except OSError:
            shutil.rmtree(hidden, ignore_errors=True)
            raise
    except OSError as error:
        raise ValueError(
            f"{OTEL_PYTHON_VLLM_KV_RELAY_DIR}={parent_directory!r} is unusable: cannot create a relay "
            f"directory there ({error.strerror}); accepted values: an existing, writable directory "
            "(default /dev/shm)"
        ) from error
    _relay_locks[directory] = lock
    return directory


def remove_stale_relays(parent_directory: str) -> list[str]:
    """Remove relay directories of this user whose exporter died without its exit handler (SIGKILL).

    Stale means unlocked: a live exporter holds its directory's lock, whatever pid namespace
    it runs in, so no exporter ever removes another's live relay.
    """
    removed: list[str] = []
    try:
        entries = list(os.scandir(parent_directory))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(RELAY_PREFIX):
            continue
        try:
            mine = entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == os.getuid()
        except OSError:
            continue
        if mine and not directory_is_held(entry.path):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _remove_relay(directory: str, exporter_pid: int) -> None:
    # A forked child inherits atexit handlers; only the exporter removes the relay.
    if os.getpid() == exporter_pid:
        shutil.rmtree(directory, ignore_errors=True)
        lock = _relay_locks.pop(directory, None)
        if lock is not None:
            lock.release()
