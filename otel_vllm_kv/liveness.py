"""Whether the process that made a relay directory or file still runs: it holds a lock on it.

A pid proves nothing here. Two containers started with ``--ipc=host`` share ``/dev/shm``, and
from inside another pid namespace the exporter's pid names no process (or another one); a pid
may also be reused. So the exporter holds an exclusive ``flock`` on its relay directory and
each writer on its relay file, for as long as it lives. The kernel drops the lock with the
holder's last descriptor, however the process ends (SIGKILL included), and every process that
opens the same inode on the shared tmpfs sees the lock, whatever its pid namespace.

``flock`` locks belong to an open file description, so a lock test from the holder's own
process (an in-process engine and its exporter) sees it too, and closing another descriptor of
the file does not drop it (unlike POSIX record locks). A forked child would share the
description and keep the lock after its parent died; the child closes its copies at fork.
"""

from __future__ import annotations

import fcntl
import os
import weakref


class HeldLock:
    """An exclusive lock on an open descriptor (which it owns), held until ``release``."""

    __slots__ = ("_descriptor", "__weakref__")

    def __init__(self, descriptor: int) -> None:
        self._descriptor = descriptor
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.release()  # the descriptor is ours: never leak it
            raise
        _held.add(self)

    def release(self) -> None:
        descriptor, self._descriptor = self._descriptor, -1
        if descriptor >= 0:
            os.close(descriptor)

    __del__ = release  # a holder dropped without ``release`` lets go with its last reference


_held: weakref.WeakSet[HeldLock] = weakref.WeakSet()


def _close_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's locked descriptors (the parent keeps its locks)."""
    for lock in list(_held):
        try:
            lock.release()
        except OSError:
            pass


os.register_at_fork(after_in_child=_close_inherited_locks)


def is_held(descriptor: int) -> bool:
    """Whether some live process holds the exclusive lock on the file open at ``descriptor``."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(descriptor, fcntl.LOCK_UN)
    return False


def directory_is_held(path: str) -> bool:
    """Whether a live process holds ``path``, a directory (never followed if a symlink); False if it is gone."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return is_held(descriptor)
    finally:
        os.close(descriptor)
