"""Which role this process plays: the first to instrument is the exporter and owns the relay;
the processes it starts are engines (they probe) or frontends, never a second exporter.

vLLM starts engine cores (and workers) as child processes, by ``spawn`` on CPU. A
spawned child re-imports the user's main module and, under ``opentelemetry-instrument``,
is auto-instrumented again, so ``instrument()`` runs there too. The exporter therefore
records itself in an environment variable before any engine starts; a process that
inherits the variable from a live exporter probes (an engine) or annotates spans (a frontend),
and never exports the gauges.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass

from otel_vllm_kv.environment_variables import OTEL_PYTHON_VLLM_KV_EXPORTER
from otel_vllm_kv.processes import is_alive

_RELAY_PREFIX = "otel-vllm-kv-"


@dataclass(frozen=True)
class Role:
    exporter_pid: int
    relay_directory: str

    @property
    def is_exporter(self) -> bool:
        return self.exporter_pid == os.getpid()


def inherited_role() -> Role | None:
    """The role named by the environment, if it names a live exporter and an existing relay."""
    value = os.environ.get(OTEL_PYTHON_VLLM_KV_EXPORTER, "")
    pid_text, _, directory = value.partition(":")
    if not pid_text.isdigit() or not os.path.isdir(directory):
        return None
    pid = int(pid_text)
    if pid != os.getpid() and not is_alive(pid):
        return None
    return Role(pid, directory)


def resolve_role(relay_parent_directory: str) -> Role:
    """Join a live exporter inherited from the parent process, or become the exporter."""
    role = inherited_role()
    if role is not None:
        return role
    remove_stale_relays(relay_parent_directory)
    directory = tempfile.mkdtemp(prefix=f"{_RELAY_PREFIX}{os.getpid()}-", dir=relay_parent_directory)
    exporter_pid = os.getpid()
    atexit.register(_remove_relay, directory, exporter_pid)
    os.environ[OTEL_PYTHON_VLLM_KV_EXPORTER] = f"{exporter_pid}:{directory}"
    return Role(exporter_pid, directory)


def remove_stale_relays(parent_directory: str) -> list[str]:
    """Remove relay directories of this user whose exporter died without its exit handler (SIGKILL).

    A directory whose pid is alive is kept, even if the pid was reused: leaking a few
    hundred bytes is better than removing a live relay.
    """
    removed: list[str] = []
    try:
        entries = list(os.scandir(parent_directory))
    except OSError:
        return removed
    for entry in entries:
        pid_text = entry.name[len(_RELAY_PREFIX):].partition("-")[0]
        if not entry.name.startswith(_RELAY_PREFIX) or not pid_text.isdigit():
            continue
        try:
            mine = entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == os.getuid()
        except OSError:
            continue
        if mine and not is_alive(int(pid_text)):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _remove_relay(directory: str, exporter_pid: int) -> None:
    # A forked child inherits atexit handlers; only the exporter removes the relay.
    if os.getpid() == exporter_pid:
        shutil.rmtree(directory, ignore_errors=True)
