"""Shared-memory relay: each engine publishes its pool snapshot, the exporter process reads it.

One small file per engine (per scheduler) in the exporter's private relay directory,
mapped into memory on both sides. The header is written once, before the file
appears under its final name; the record after it is a seqlock (an odd sequence
number while the writer is mid-update), so the reader never sees a torn record
and neither side ever blocks on the other. A writer whose reader died keeps
writing into memory nobody reads; a reader drops files whose writer died.

Two kinds of file: ``engine-*``, written by an engine's probe (exact, with evictable
blocks per group), and ``stats-*``, written by a frontend for an engine that runs no
probe, from vLLM's own scheduler statistics (``unprobed_engines``): free blocks and the
time they arrived, nothing else. Several frontends (API servers) may write one each for
the same engine; the newest record wins. A probe's file always wins over them.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

from otel_vllm_kv.kv_cache import GroupLayout, KVCacheOccupancy, PoolLayout, occupancy
from otel_vllm_kv.processes import is_alive

_MAGIC = b"OVKV"
_FORMAT_VERSION = 3
_MODEL_NAME_BYTES = 256
_GROUPS_BYTES = 512
# magic, format version, model name length, engine index, writer pid, N, limit tokens (-1: unknown),
# watermark blocks (-1: unknown), groups text length, number of groups, model name,
# groups ("kind:block_size;...")
_HEADER = struct.Struct(f"<4sHHiIQqqII{_MODEL_NAME_BYTES}s{_GROUPS_BYTES}s")
# The seqlock's sequence number, then the values that change: free blocks, evictable blocks per group.
_SEQUENCE = struct.Struct("<Q")
_SEQUENCE_OFFSET = _HEADER.size  # a multiple of 8: the sequence number is one aligned store
_VALUES_OFFSET = _SEQUENCE_OFFSET + _SEQUENCE.size
_PROBE_PREFIX = "engine-"
_STATS_PREFIX = "stats-"
#: A stats file's record: free blocks, and when the statistics arrived (time.time_ns()).
_STATS_VALUES = struct.Struct("<qq")
_READ_ATTEMPTS = 64
#: A first read that finds the writer mid-write waits this long at most, in pauses of the second.
_FIRST_READ_WAIT_SECONDS = 0.2
_FIRST_READ_PAUSE_SECONDS = 0.0005
#: What an attempt returns when the writer rewrote the record during every try.
_BUSY = object()

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
    evictable_blocks: tuple[int, ...] | None
    """Evictable prefix-cache blocks per KV-cache group (part of the free blocks); None where
    unknown (an engine reported from vLLM's statistics)."""

    def occupancy(self) -> KVCacheOccupancy:
        evictable = None if self.evictable_blocks is None else sum(self.evictable_blocks)
        return occupancy(self.layout, self.free_blocks, evictable)


class _RelayFile:
    """One relay file: the header written once, then a record rewritten in place under a seqlock."""

    __slots__ = ("_map", "_path", "_sequence", "_values")

    def __init__(self, directory: str, prefix: str, engine_index: int, model_name: str, layout: PoolLayout,
                 values: struct.Struct) -> None:
        pid = os.getpid()
        name = f"{prefix}{engine_index}-{pid}-{time.time_ns()}-{next(_file_counter)}"
        temporary = os.path.join(directory, f".{name}")
        self._path = os.path.join(directory, name)
        encoded = model_name.encode("utf-8")[:_MODEL_NAME_BYTES]
        groups = _encode_groups(layout)
        self._values = values
        size = _VALUES_OFFSET + self._values.size
        descriptor = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(descriptor, size)
            self._map = mmap.mmap(descriptor, size)
        finally:
            os.close(descriptor)
        limit = -1 if layout.limit_tokens is None else layout.limit_tokens
        watermark = -1 if layout.watermark_blocks is None else layout.watermark_blocks
        _HEADER.pack_into(
            self._map, 0, _MAGIC, _FORMAT_VERSION, len(encoded), engine_index, pid, layout.num_blocks,
            limit, watermark, len(groups), len(layout.groups), encoded, groups,
        )
        self._sequence = 0
        os.rename(temporary, self._path)

    def _write_values(self, *values: int) -> None:
        """Publish one record; the odd sequence number marks it as being rewritten.

        The sequence number is copied in whole (slice assignment, one aligned 8-byte store):
        ``struct.pack_into`` zeroes its target before it packs, and a reader that saw that 0
        would take the engine for one that published nothing yet. The values may be packed in
        place: the odd sequence number guards them.
        """
        sequence = self._sequence + 1
        self._map[_SEQUENCE_OFFSET:_VALUES_OFFSET] = _SEQUENCE.pack(sequence)
        self._values.pack_into(self._map, _VALUES_OFFSET, *values)
        self._sequence = sequence + 1
        self._map[_SEQUENCE_OFFSET:_VALUES_OFFSET] = _SEQUENCE.pack(self._sequence)

    def close(self) -> None:
        """Withdraw the file: the reader stops reporting this engine."""
        try:
            os.unlink(self._path)
        except OSError:
            pass


class SnapshotWriter(_RelayFile):
    """Engine side: the probe's file, free blocks and evictable blocks per group."""

    __slots__ = ()

    def __init__(self, directory: str, engine_index: int, model_name: str, layout: PoolLayout) -> None:
        super().__init__(directory, _PROBE_PREFIX, engine_index, model_name, layout,
                         _values_struct(len(layout.groups)))

    def write(self, free_blocks: int, evictable_blocks: list[int]) -> None:
        self._write_values(free_blocks, *evictable_blocks)


class StatsSnapshotWriter(_RelayFile):
    """Frontend: an unprobed engine's free blocks, from vLLM's scheduler statistics."""

    __slots__ = ()

    def __init__(self, directory: str, engine_index: int, model_name: str, layout: PoolLayout) -> None:
        super().__init__(directory, _STATS_PREFIX, engine_index, model_name, layout, _STATS_VALUES)

    def write(self, free_blocks: int) -> None:
        self._write_values(free_blocks, time.time_ns())


class _MappedFile:
    __slots__ = ("map", "engine_index", "model_name", "pid", "layout", "from_stats", "_values", "_last")

    def __init__(self, path: str, from_stats: bool) -> None:
        self.from_stats = from_stats
        self._last: tuple[int, ...] | None = None
        with open(path, "rb") as handle:
            self.map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            (magic, version, name_length, self.engine_index, self.pid, num_blocks, limit, watermark,
             groups_length, num_groups, name, groups) = _HEADER.unpack_from(self.map, 0)
            if magic != _MAGIC or version != _FORMAT_VERSION:
                raise ValueError(f"{path} is not a version {_FORMAT_VERSION} relay file")
            self._values = _STATS_VALUES if from_stats else _values_struct(num_groups)
            if len(self.map) < _VALUES_OFFSET + self._values.size:
                raise ValueError(f"{path} is truncated")
        except (ValueError, struct.error) as error:
            self.map.close()
            raise ValueError(f"{path} is not a readable relay file") from error
        self.model_name = name[:name_length].decode("utf-8", "replace")
        layout_groups = _decode_groups(groups[:groups_length].decode("ascii", "replace"))
        self.layout = PoolLayout(
            num_blocks, None if limit < 0 else limit, None if watermark < 0 else watermark, layout_groups
        )

    def read_values(self) -> tuple[int, ...] | None:
        """Read a consistent record, or None if nothing was published yet: (free blocks, evictable
        per group) from a probe, (free blocks, arrival time) from statistics.

        A writer that rewrites the record during every attempt leaves the last consistent
        record this reader saw (at most the writes of those attempts old): an engine that
        published is never reported as absent. A reader that has seen none yet waits for the
        writer to finish its write (on a busy machine the writer can be descheduled inside it
        for a time slice or more), up to ``_FIRST_READ_WAIT_SECONDS``: only a writer that died
        mid-write gets its engine left out, and the reader drops files of dead writers.
        """
        values = self._attempt()
        if values is not _BUSY or self._last is not None:
            return self._last if values is _BUSY else values
        deadline = time.monotonic() + _FIRST_READ_WAIT_SECONDS
        while values is _BUSY and time.monotonic() < deadline:
            time.sleep(_FIRST_READ_PAUSE_SECONDS)  # gives the writer the CPU
            values = self._attempt()
        return None if values is _BUSY else values

    def _attempt(self) -> Any:
        """A consistent record (also kept as the last one), None (nothing published), or ``_BUSY``."""
        for _ in range(_READ_ATTEMPTS):
            (before,) = _SEQUENCE.unpack_from(self.map, _SEQUENCE_OFFSET)
            if before & 1:
                continue
            values = self._values.unpack_from(self.map, _VALUES_OFFSET)
            (after,) = _SEQUENCE.unpack_from(self.map, _SEQUENCE_OFFSET)
            if before == after:
                if before:
                    self._last = values
                    return values
                return None
        return _BUSY


def _creation_order(name: str) -> tuple[int, int]:
    """Files are named ``<kind>-<index>-<pid>-<time_ns>-<counter>``."""
    try:
        _, _, _, created_ns, counter = name.split("-")
        return int(created_ns), int(counter)
    except ValueError:
        return 0, 0


class SnapshotReader:
    """Exporter: maps every engine file of one relay directory and reads the latest records."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._files: dict[str, _MappedFile] = {}

    def read(self) -> list[EngineSnapshot]:
        """One snapshot per live engine: the newest probe file where an engine index repeats, else
        the newest record of statistics."""
        try:
            names = sorted(
                (name for name in os.listdir(self.directory) if name.startswith((_PROBE_PREFIX, _STATS_PREFIX))),
                key=_creation_order,
            )
        except OSError:
            names = []
        self._forget_missing(set(names))
        probed: dict[tuple[int, str], EngineSnapshot] = {}
        from_stats: dict[tuple[int, str], tuple[int, EngineSnapshot]] = {}
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
            if mapped.from_stats:
                free_blocks, arrived_ns = values
                if key not in from_stats or arrived_ns > from_stats[key][0]:
                    snapshot = EngineSnapshot(*key, mapped.pid, mapped.layout, free_blocks, None)
                    from_stats[key] = (arrived_ns, snapshot)
            else:
                probed[key] = EngineSnapshot(*key, mapped.pid, mapped.layout, values[0], values[1:])
        unprobed = [snapshot for key, (_, snapshot) in from_stats.items() if key not in probed]
        return [*probed.values(), *unprobed]

    def close(self) -> None:
        for name in list(self._files):
            self._discard(name, unlink=False)

    def _open(self, name: str) -> _MappedFile | None:
        mapped = self._files.get(name)
        if mapped is None:
            try:
                path = os.path.join(self.directory, name)
                mapped = self._files[name] = _MappedFile(path, from_stats=name.startswith(_STATS_PREFIX))
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
