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

from otel_vllm_kv.kv_cache import GroupLayout, KVCacheOccupancy, PoolLayout, occupancy

_MAGIC = b"OVKV"
_FORMAT_VERSION = 2
_MODEL_NAME_BYTES = 256
_GROUPS_BYTES = 512
# magic, format version, model name length, engine index, writer pid, N, limit tokens (-1: unknown),
# watermark blocks, groups text length, number of groups, model name, groups ("kind:block_size;...")
_HEADER = struct.Struct(f"<4sHHiIQqQII{_MODEL_NAME_BYTES}s{_GROUPS_BYTES}s")
# The seqlock's sequence number, then the values that change: free blocks, evictable blocks per group.
_SEQUENCE = struct.Struct("<Q")
_SEQUENCE_OFFSET = _HEADER.size
_VALUES_OFFSET = _SEQUENCE_OFFSET + _SEQUENCE.size
_FILE_PREFIX = "engine-"
_READ_ATTEMPTS = 64

_file_counter = itertools.count()


def _values_struct(num_groups: int) -> struct.Struct:
    return struct.Struct(f"<q{max(num_groups, 1)}q")


def _encode_groups(layout: PoolLayout) -> bytes:
    encoded = ";".join(f"{group.kind}:{group.block_size}" for group in layout.groups).encode("ascii")
    if len(encoded) > _GROUPS_BYTES:
        raise ValueError(f"{len(layout.groups)} KV-cache groups do not fit in a relay header")
    return encoded


def _decode_groups(text: str) -> tuple[GroupLayout, ...]:
    if not text:
        return ()
    return tuple(GroupLayout(kind, int(size)) for kind, _, size in (item.rpartition(":") for item in text.split(";")))


@dataclass(frozen=True)
class EngineSnapshot:
    """The latest published state of one engine's KV-cache pool."""

    engine_index: int
    model_name: str
    pid: int
    layout: PoolLayout
    free_blocks: int
    evictable_blocks: tuple[int, ...]
    """Evictable prefix-cache blocks per KV-cache group (part of the free blocks)."""

    def occupancy(self) -> KVCacheOccupancy:
        return occupancy(self.layout, self.free_blocks, sum(self.evictable_blocks))


class SnapshotWriter:
    """Engine-core side: owns one relay file and rewrites its record in place."""

    __slots__ = ("_map", "_path", "_sequence", "_values")

    def __init__(self, directory: str, engine_index: int, model_name: str, layout: PoolLayout) -> None:
        pid = os.getpid()
        name = f"{_FILE_PREFIX}{engine_index}-{pid}-{time.time_ns()}-{next(_file_counter)}"
        temporary = os.path.join(directory, f".{name}")
        self._path = os.path.join(directory, name)
        encoded = model_name.encode("utf-8")[:_MODEL_NAME_BYTES]
        groups = _encode_groups(layout)
        self._values = _values_struct(len(layout.groups))
        size = _VALUES_OFFSET + self._values.size
        descriptor = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(descriptor, size)
            self._map = mmap.mmap(descriptor, size)
        finally:
            os.close(descriptor)
        limit = -1 if layout.limit_tokens is None else layout.limit_tokens
        _HEADER.pack_into(
            self._map, 0, _MAGIC, _FORMAT_VERSION, len(encoded), engine_index, pid, layout.num_blocks,
            limit, layout.watermark_blocks, len(groups), len(layout.groups), encoded, groups,
        )
        self._sequence = 0
        os.rename(temporary, self._path)

    def write(self, free_blocks: int, evictable_blocks: list[int]) -> None:
        """Publish one record; the odd sequence number marks it as being rewritten."""
        sequence = self._sequence + 1
        _SEQUENCE.pack_into(self._map, _SEQUENCE_OFFSET, sequence)
        self._values.pack_into(self._map, _VALUES_OFFSET, free_blocks, *evictable_blocks)
        self._sequence = sequence + 1
        _SEQUENCE.pack_into(self._map, _SEQUENCE_OFFSET, self._sequence)

    def close(self) -> None:
        """Withdraw the file: the reader stops reporting this engine."""
        try:
            os.unlink(self._path)
        except OSError:
            pass


class _MappedFile:
    __slots__ = ("map", "engine_index", "model_name", "pid", "layout", "_values")

    def __init__(self, path: str) -> None:
        with open(path, "rb") as handle:
            self.map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            (magic, version, name_length, self.engine_index, self.pid, num_blocks, limit, watermark,
             groups_length, num_groups, name, groups) = _HEADER.unpack_from(self.map, 0)
            if magic != _MAGIC or version != _FORMAT_VERSION:
                raise ValueError(f"{path} is not a version {_FORMAT_VERSION} relay file")
            self._values = _values_struct(num_groups)
            if len(self.map) < _VALUES_OFFSET + self._values.size:
                raise ValueError(f"{path} is truncated")
        except (ValueError, struct.error) as error:
            self.map.close()
            raise ValueError(f"{path} is not a readable relay file") from error
        self.model_name = name[:name_length].decode("utf-8", "replace")
        layout_groups = _decode_groups(groups[:groups_length].decode("ascii", "replace"))
        self.layout = PoolLayout(num_blocks, None if limit < 0 else limit, watermark, layout_groups)

    def read_values(self) -> tuple[int, ...] | None:
        """Read a consistent record (free blocks, evictable per group), or None if nothing was published yet."""
        for _ in range(_READ_ATTEMPTS):
            (before,) = _SEQUENCE.unpack_from(self.map, _SEQUENCE_OFFSET)
            if before & 1:
                continue
            values = self._values.unpack_from(self.map, _VALUES_OFFSET)
            (after,) = _SEQUENCE.unpack_from(self.map, _SEQUENCE_OFFSET)
            if before == after:
                return values if before else None
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
            values = mapped.read_values()
            if values is None:
                continue
            key = (mapped.engine_index, mapped.model_name)
            newest[key] = EngineSnapshot(
                mapped.engine_index, mapped.model_name, mapped.pid, mapped.layout, values[0], values[1:]
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
