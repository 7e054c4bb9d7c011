"""Shared-memory relay: each engine core publishes its pool snapshot, the exporting process reads it.

One small file per engine (per scheduler) in the owner's private relay directory,
mapped into memory on both sides. The header is written once, before the file
appears under its final name; the record after it is a seqlock (an odd sequence
number while the writer is mid-update), so the reader never sees a torn record
and neither side ever blocks on the other. A writer whose reader died keeps
writing into memory nobody reads; a reader drops files whose writer died.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
import time
from dataclasses import dataclass

from otel_vllm_kv.kv_cache import PoolLayout

_MAGIC = b"OVKV"
_FORMAT_VERSION = 1
_MODEL_NAME_BYTES = 256
# magic, format version, model name length, engine index, writer pid, N, B, groups, padding, name
_HEADER = struct.Struct(f"<4sHHiIQQII{_MODEL_NAME_BYTES}s")
# The seqlock's sequence number, then the values that change every step.
_SEQUENCE = struct.Struct("<Q")
_VALUES = struct.Struct("<q")
_SEQUENCE_OFFSET = _HEADER.size
_VALUES_OFFSET = _SEQUENCE_OFFSET + _SEQUENCE.size
_FILE_SIZE = _VALUES_OFFSET + _VALUES.size
_FILE_PREFIX = "engine-"
_READ_ATTEMPTS = 64

_file_counter = itertools.count()


@dataclass(frozen=True)
class EngineSnapshot:
    """The latest published state of one engine's KV-cache pool."""

    engine_index: int
    model_name: str
    pid: int
    layout: PoolLayout
    free_blocks: int


class SnapshotWriter:
    """Engine-core side: owns one relay file and rewrites its record in place."""

    __slots__ = ("_map", "_path", "_sequence")

    def __init__(self, directory: str, engine_index: int, model_name: str, layout: PoolLayout) -> None:
        pid = os.getpid()
        name = f"{_FILE_PREFIX}{engine_index}-{pid}-{time.time_ns()}-{next(_file_counter)}"
        temporary = os.path.join(directory, f".{name}")
        self._path = os.path.join(directory, name)
        encoded = model_name.encode("utf-8")[:_MODEL_NAME_BYTES]
        descriptor = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(descriptor, _FILE_SIZE)
            self._map = mmap.mmap(descriptor, _FILE_SIZE)
        finally:
            os.close(descriptor)
        _HEADER.pack_into(
            self._map, 0, _MAGIC, _FORMAT_VERSION, len(encoded), engine_index, pid,
            layout.num_blocks, layout.block_size, layout.num_groups, 0, encoded,
        )
        self._sequence = 0
        os.rename(temporary, self._path)

    def write(self, free_blocks: int) -> None:
        """Publish one record; the odd sequence number marks it as being rewritten."""
        sequence = self._sequence + 1
        _SEQUENCE.pack_into(self._map, _SEQUENCE_OFFSET, sequence)
        _VALUES.pack_into(self._map, _VALUES_OFFSET, free_blocks)
        self._sequence = sequence + 1
        _SEQUENCE.pack_into(self._map, _SEQUENCE_OFFSET, self._sequence)

    def close(self) -> None:
        """Withdraw the file: the reader stops reporting this engine."""
        try:
            os.unlink(self._path)
        except OSError:
            pass


class _MappedFile:
    __slots__ = ("map", "engine_index", "model_name", "pid", "layout")

    def __init__(self, path: str) -> None:
        with open(path, "rb") as handle:
            self.map = mmap.mmap(handle.fileno(), _FILE_SIZE, access=mmap.ACCESS_READ)
        (magic, version, name_length, self.engine_index, self.pid, num_blocks, block_size,
         num_groups, _, name) = _HEADER.unpack_from(self.map, 0)
        if magic != _MAGIC or version != _FORMAT_VERSION:
            self.map.close()
            raise ValueError(f"{path} is not a version {_FORMAT_VERSION} relay file")
        self.model_name = name[:name_length].decode("utf-8", "replace")
        self.layout = PoolLayout(num_blocks, block_size, num_groups)

    def read_free_blocks(self) -> int | None:
        """Read a consistent record, or None if nothing was published yet."""
        for _ in range(_READ_ATTEMPTS):
            (before,) = _SEQUENCE.unpack_from(self.map, _SEQUENCE_OFFSET)
            if before & 1:
                continue
            (free_blocks,) = _VALUES.unpack_from(self.map, _VALUES_OFFSET)
            (after,) = _SEQUENCE.unpack_from(self.map, _SEQUENCE_OFFSET)
            if before == after:
                return free_blocks if before else None
        return None


def _creation_order(name: str) -> tuple[int, int]:
    """Files are named ``engine-<index>-<pid>-<time_ns>-<counter>``."""
    try:
        _, _, _, created_ns, counter = name.split("-")
        return int(created_ns), int(counter)
    except ValueError:
        return 0, 0


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


class SnapshotReader:
    """Exporter side: maps every engine file of one relay directory and reads the latest records."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._files: dict[str, _MappedFile] = {}

    def read(self) -> list[EngineSnapshot]:
        """One snapshot per live engine; the newest file wins where an engine index repeats."""
        try:
            names = sorted(
                (name for name in os.listdir(self.directory) if name.startswith(_FILE_PREFIX)),
                key=_creation_order,
            )
        except OSError:
            names = []
        self._forget_missing(set(names))
        newest: dict[tuple[int, str], EngineSnapshot] = {}
        for name in names:
            mapped = self._open(name)
            if mapped is None:
                continue
            if not is_alive(mapped.pid):
                self._discard(name, unlink=True)
                continue
            free_blocks = mapped.read_free_blocks()
            if free_blocks is None:
                continue
            key = (mapped.engine_index, mapped.model_name)
            newest[key] = EngineSnapshot(
                mapped.engine_index, mapped.model_name, mapped.pid, mapped.layout, free_blocks
            )
        return list(newest.values())

    def close(self) -> None:
        for name in list(self._files):
            self._discard(name, unlink=False)

    def _open(self, name: str) -> _MappedFile | None:
        mapped = self._files.get(name)
        if mapped is None:
            try:
                mapped = self._files[name] = _MappedFile(os.path.join(self.directory, name))
            except (OSError, ValueError):
                return None
        return mapped

    def _forget_missing(self, present: set[str]) -> None:
        for name in [name for name in self._files if name not in present]:
            self._discard(name, unlink=False)

    def _discard(self, name: str, unlink: bool) -> None:
        mapped = self._files.pop(name, None)
        if mapped is not None:
            mapped.map.close()
        if unlink:
            try:
                os.unlink(os.path.join(self.directory, name))
            except OSError:
                pass
