"""Shared-memory relay, its file format: each engine publishes its pool snapshot into one file.

One small file per engine (per scheduler) in the exporter's private relay directory, on a
memory-backed file system (``/dev/shm``). The header is written once, before the file
appears under its final name; the record after it is replaced by one ``pwrite`` per publish
and carries a checksum, so a reader that catches it mid-write sees the mismatch and reads
again: neither side ever blocks on the other, and neither maps the file (a mapping faults
where a file shrank or a full tmpfs has no page). A writer whose reader died keeps writing
into a file nobody reads; a reader drops files whose writer died (the writer held the
file's lock: ``liveness``).

Two kinds of file: ``engine-*``, written by an engine's probe (exact, with evictable
blocks per group), and ``stats-*``, written by a frontend for an engine that runs no
probe, from vLLM's own scheduler statistics (``unprobed_engines``): free blocks and the
time they arrived, nothing else. Several frontends (API servers) may write one each for
the same engine. Which file wins for an engine is the reader's rule (``relay_reader``).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import struct
import time
from dataclasses import dataclass
from typing import Any
from zlib import crc32

from otel_vllm_kv import holdings
from otel_vllm_kv.environment_variables import OTEL_PYTHON_VLLM_KV_RELAY_DIR
from otel_vllm_kv.holdings import HoldersPass
from otel_vllm_kv.kv_cache import GroupLayout, KVCacheOccupancy, PoolLayout, occupancy
from otel_vllm_kv.liveness import HeldLock, is_held

_logger = logging.getLogger(__name__)

_MAGIC = b"OVKV"
_FORMAT_VERSION = 5
_MODEL_NAME_BYTES = 256
_GROUPS_BYTES = 512
# magic, format version, model name length, engine index, writer pid, N, limit tokens (-1: unknown),
# watermark blocks (-1: unknown), groups text length, number of groups, model name,
# groups ("kind:block_size;...")
_HEADER = struct.Struct(f"<4sHHiIQqqII{_MODEL_NAME_BYTES}s{_GROUPS_BYTES}s")
#: Where the record starts: after the header, 8-byte aligned.
RECORD_OFFSET = _HEADER.size
_CHECKSUM = struct.Struct("<I")
#: A probe file's holders section (``holdings``), after its record: sequence and length, the JSON
#: payload, and a CRC-32 of the three, in a fixed reserve; replaced by one ``pwrite`` per pass.
_HOLDERS_HEADER = struct.Struct("<QI")
HOLDERS_BYTES = 65536
PROBE_PREFIX = "engine-"
STATS_PREFIX = "stats-"
_READ_ATTEMPTS = 64
#: A first read that finds only torn records waits this long at most, in pauses of the second.
_FIRST_READ_WAIT_SECONDS = 0.2
_FIRST_READ_PAUSE_SECONDS = 0.0005
#: What an attempt returns when the writer rewrote the record during every try.
_BUSY = object()
#: Bounds of what a relay file may say, far beyond any real pool, so that every gauge derived from
#: it fits an int64 (OTLP's integer): tokens(x) <= limit <= 2^53.
_MAX_BLOCKS = 2**40
_MAX_TOKENS = 2**53
_MAX_BLOCK_SIZE = 2**24
_MAX_GROUPS = 64

_file_counter = itertools.count()


class RecordFormat:
    """The record: a sequence number (0: nothing published yet), the values, and a CRC-32 of both.

    The writer replaces it with one ``pwrite``; a read that overlaps that write may see old and
    new bytes mixed, and the checksum tells. The values: free blocks and evictable blocks per
    group from a probe; free blocks and the statistics' arrival time (``time.time_ns()``) from
    statistics.
    """

    __slots__ = ("body", "size")

    def __init__(self, num_values: int) -> None:
        self.body = struct.Struct(f"<Q{num_values}q")
        self.size = self.body.size + _CHECKSUM.size

    def encode(self, sequence: int, *values: int) -> bytes:
        body = self.body.pack(sequence, *values)
        return body + _CHECKSUM.pack(crc32(body))


def probe_record(num_groups: int) -> RecordFormat:
    return RecordFormat(1 + max(num_groups, 1))


def holders_offset(record: RecordFormat) -> int:
    """Where a probe file's holders section starts: after its record, 8-byte aligned."""
    return -(-(RECORD_OFFSET + record.size) // 8) * 8


STATS_RECORD = RecordFormat(2)


def _encode_groups(layout: PoolLayout) -> bytes:
    encoded = ";".join(f"{group.kind}:{group.block_size}" for group in layout.groups).encode("ascii")
    if len(encoded) > _GROUPS_BYTES:
        raise ValueError(f"{len(layout.groups)} KV-cache groups do not fit in a relay header")
    return encoded


def _decode_groups(text: str) -> tuple[GroupLayout, ...]:
    """The groups of ``_encode_groups``; raises ValueError on anything else."""
    if not text:
        return ()
    groups = []
    for kind, _, size in (item.rpartition(":") for item in text.split(";")):
        if not kind.isprintable() or not size.isdigit() or not 1 <= int(size) <= _MAX_BLOCK_SIZE:
            raise ValueError(f"a KV-cache group {kind!r}:{size!r} out of range")
        groups.append(GroupLayout(kind, int(size)))
    return tuple(groups)


class NoSpace(OSError):
    """The relay's file system is full: this engine is not reported (the caller warns: ``warn_no_space``)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        super().__init__(
            errno.ENOSPC,
            f"otel-vllm-kv: no space left in {directory} ({OTEL_PYTHON_VLLM_KV_RELAY_DIR}) for a relay file: "
            f"this engine's KV cache is not reported; vLLM is unaffected. Free space there, or set "
            f"{OTEL_PYTHON_VLLM_KV_RELAY_DIR} to a directory with room (65 KiB per engine)",
        )


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
    holders: HoldersPass | None = None
    """Its last holders pass; None from statistics, before the first pass, or from a bad section."""

    def occupancy(self) -> KVCacheOccupancy:
        evictable = None if self.evictable_blocks is None else sum(self.evictable_blocks)
        return occupancy(self.layout, self.free_blocks, evictable)


#: Made in a relay by the first process that finds it full, so that only that one warns.
_NO_SPACE_MARK = ".no-space-warned"


def warn_no_space(error: NoSpace) -> None:
    """Log ``error`` once per relay: an engine's probe, then a frontend reporting that engine from
    statistics instead, meet the same full directory. The mark is an empty file: a full tmpfs
    still has inodes for it (without one, each process warns)."""
    mark = os.path.join(error.directory, _NO_SPACE_MARK)
    try:
        os.close(os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        return
    except OSError:
        pass
    _logger.warning("%s", error.strerror)


class _RelayFile:
    """One relay file: the header written once, then a record replaced in place by each publish.

    Its pages are reserved before anything is written: a full tmpfs then refuses the file
    (``NoSpace``) instead of failing a later write. It is written with ``pwrite``, never
    through a mapping: a store into a mapped page that a full tmpfs cannot give, or past the
    end of a file something shrank, raises SIGBUS, which no ``except`` catches. The writer
    holds the file's lock (``liveness``) for as long as it lives, from before the file appears
    under its name.
    """

    __slots__ = ("_descriptor", "_path", "_sequence", "_record", "_pack", "_lock")

    def __init__(
        self,
        directory: str,
        prefix: str,
        engine_index: int,
        model_name: str,
        layout: PoolLayout,
        record: RecordFormat,
        size: int,
    ) -> None:
        pid = os.getpid()
        name = f"{prefix}{engine_index}-{pid}-{time.time_ns()}-{next(_file_counter)}"
        temporary = os.path.join(directory, f".{name}")
        self._path = os.path.join(directory, name)
        encoded = model_name.encode("utf-8")[:_MODEL_NAME_BYTES]
        groups = _encode_groups(layout)
        self._record = record
        self._pack = record.body.pack  # for the probe's inlined publish
        limit = -1 if layout.limit_tokens is None else layout.limit_tokens
        watermark = -1 if layout.watermark_blocks is None else layout.watermark_blocks
        header = _HEADER.pack(
            _MAGIC,
            _FORMAT_VERSION,
            len(encoded),
            engine_index,
            pid,
            layout.num_blocks,
            limit,
            watermark,
            len(groups),
            len(layout.groups),
            encoded,
            groups,
        )
        self._descriptor = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(self._descriptor, 0, size)
            os.pwrite(self._descriptor, header, 0)
            # Locked through a descriptor of its own: a forked child closes that one (``liveness``)
            # but keeps its copy of the writing one.
            self._lock = HeldLock(os.open(temporary, os.O_RDONLY | os.O_CLOEXEC))
            os.rename(temporary, self._path)
        except OSError as error:
            os.close(self._descriptor)
            os.unlink(temporary)
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(directory) from error
            raise
        self._sequence = 0

    def close(self) -> None:
        """Withdraw the file: the reader stops reporting this engine."""
        try:
            os.unlink(self._path)
        except OSError:
            pass
        self._lock.release()
        descriptor, self._descriptor = self._descriptor, -1
        if descriptor >= 0:
            os.close(descriptor)


class SnapshotWriter(_RelayFile):
    """Engine side: the probe's file, free blocks and evictable blocks per group, and its holders."""

    __slots__ = ("_holders_offset", "_holders_sequence")

    def __init__(self, directory: str, engine_index: int, model_name: str, layout: PoolLayout) -> None:
        record = probe_record(len(layout.groups))
        self._holders_offset = holders_offset(record)
        self._holders_sequence = 0
        super().__init__(
            directory, PROBE_PREFIX, engine_index, model_name, layout, record, self._holders_offset + HOLDERS_BYTES
        )

    def write_holders(self, payload: bytes) -> None:
        """Publish a pass (``holdings.encode``); ValueError if it does not fit the section."""
        if _HOLDERS_HEADER.size + len(payload) + _CHECKSUM.size > HOLDERS_BYTES:
            raise ValueError(f"holders of {len(payload)} bytes do not fit a relay file's {HOLDERS_BYTES}")
        self._holders_sequence += 1
        body = _HOLDERS_HEADER.pack(self._holders_sequence, len(payload)) + payload
        _pwrite(self._descriptor, body + _pack_checksum(crc32(body)), self._holders_offset)

    def write(self, free_blocks: int, evictable_blocks: list[int]) -> None:
        """Publish (after an engine step that changed the pool): one record, one system call.
        ``RecordFormat.encode`` inlined: this runs at every engine step that changed the pool."""
        self._sequence = sequence = self._sequence + 1
        body = self._pack(sequence, free_blocks, *evictable_blocks)
        _pwrite(self._descriptor, body + _pack_checksum(crc32(body)), RECORD_OFFSET)


class StatsSnapshotWriter(_RelayFile):
    """Frontend: an unprobed engine's free blocks, from vLLM's scheduler statistics."""

    __slots__ = ()

    def __init__(self, directory: str, engine_index: int, model_name: str, layout: PoolLayout) -> None:
        super().__init__(
            directory, STATS_PREFIX, engine_index, model_name, layout, STATS_RECORD, RECORD_OFFSET + STATS_RECORD.size
        )

    def write(self, free_blocks: int) -> None:
        self._sequence += 1
        _pwrite(self._descriptor, self._record.encode(self._sequence, free_blocks, time.time_ns()), RECORD_OFFSET)


_pwrite = os.pwrite
_pack_checksum = _CHECKSUM.pack


class BadRelayFile(ValueError):
    """A file in the relay that no writer of this package made, or that changed under the reader."""


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise BadRelayFile(what)


class OpenedRelayFile:
    """The reader's side of one relay file: read with ``pread``, never mapped.

    A mapping faults (SIGBUS) where its file shrank; a read returns short, and the file is
    dropped. The file is opened without following a symlink, without blocking on a FIFO, and
    only if regular; every value is checked against its range before it reaches a gauge.
    """

    __slots__ = ("descriptor", "engine_index", "model_name", "pid", "layout", "from_stats", "_record", "_last")

    def __init__(self, path: str, from_stats: bool) -> None:
        self.from_stats = from_stats
        self._last: tuple[int, ...] | None = None
        self.descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._read_header()
        except BaseException:
            os.close(self.descriptor)
            raise

    def _read_header(self) -> None:
        _check(stat.S_ISREG(os.fstat(self.descriptor).st_mode), "not a regular file")
        header = os.pread(self.descriptor, _HEADER.size, 0)
        _check(len(header) == _HEADER.size, "shorter than a header")
        (
            magic,
            version,
            name_length,
            self.engine_index,
            self.pid,
            num_blocks,
            limit,
            watermark,
            groups_length,
            num_groups,
            name,
            groups,
        ) = _HEADER.unpack(header)
        _check(magic == _MAGIC and version == _FORMAT_VERSION, f"not a version {_FORMAT_VERSION} relay file")
        _check(self.engine_index >= 0, f"engine index {self.engine_index}")
        _check(2 <= num_blocks <= _MAX_BLOCKS, f"{num_blocks} blocks")
        _check(limit == -1 or 0 <= limit <= _MAX_TOKENS, f"a limit of {limit} tokens")
        _check(watermark == -1 or 0 <= watermark <= num_blocks, f"a watermark of {watermark} blocks")
        _check(name_length <= _MODEL_NAME_BYTES and groups_length <= _GROUPS_BYTES, "a header field's length")
        _check(num_groups <= _MAX_GROUPS, f"{num_groups} groups")
        try:
            layout_groups = _decode_groups(groups[:groups_length].decode("ascii"))
        except ValueError as error:  # UnicodeDecodeError included
            raise BadRelayFile(f"its KV-cache groups: {error}") from None
        _check(len(layout_groups) == num_groups, f"{len(layout_groups)} groups where {num_groups} were announced")
        self._record = STATS_RECORD if self.from_stats else probe_record(num_groups)
        self.model_name = name[:name_length].decode("utf-8", "replace")
        self.layout = PoolLayout(
            num_blocks, None if limit < 0 else limit, None if watermark < 0 else watermark, layout_groups
        )

    def close(self) -> None:
        os.close(self.descriptor)

    def writer_lives(self) -> bool:
        return is_held(self.descriptor)

    def read_values(self) -> tuple[int, ...] | None:
        """Read a consistent record, or None if nothing was published yet: (free blocks, evictable
        per group) from a probe, (free blocks, arrival time) from statistics. Raises BadRelayFile
        for a record out of range or a file that shrank.

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
        """A whole record (also kept as the last one), None (nothing published), or ``_BUSY``
        (every read overlapped a write: its checksum did not match)."""
        record_format = self._record
        body_size = record_format.body.size
        for _ in range(_READ_ATTEMPTS):
            record = os.pread(self.descriptor, record_format.size, RECORD_OFFSET)
            _check(len(record) == record_format.size, "shorter than its record")
            body = record[:body_size]
            sequence, *values = record_format.body.unpack(body)
            if not sequence:
                return None
            if crc32(body) != _CHECKSUM.unpack_from(record, body_size)[0]:
                continue
            self._check_values(values)
            self._last = tuple(values)
            return self._last
        return _BUSY

    def _check_values(self, values: list[int]) -> None:
        free_blocks = values[0]
        _check(0 <= free_blocks < self.layout.num_blocks, f"{free_blocks} free blocks")
        if not self.from_stats:
            evictable = values[1:]
            _check(min(evictable) >= 0 and sum(evictable) <= free_blocks, f"{evictable} evictable blocks")

    def read_holders(self) -> HoldersPass | None:
        """The engine's last holders pass, or None (none yet, a statistics file, or every attempt
        overlapped a write). Raises BadRelayFile for a section out of range or a file that shrank."""
        if self.from_stats:
            return None
        offset = holders_offset(self._record)
        for _ in range(_READ_ATTEMPTS):
            section = os.pread(self.descriptor, HOLDERS_BYTES, offset)
            _check(len(section) == HOLDERS_BYTES, "shorter than its holders section")
            sequence, length = _HOLDERS_HEADER.unpack_from(section)
            if not sequence:
                return None
            end = _HOLDERS_HEADER.size + length
            _check(end + _CHECKSUM.size <= HOLDERS_BYTES, f"holders of {length} bytes")
            if crc32(section[:end]) != _CHECKSUM.unpack_from(section, end)[0]:
                continue
            try:
                return holdings.decode(section[_HOLDERS_HEADER.size : end], self.layout.num_blocks)
            except ValueError as error:  # UnicodeDecodeError and JSON errors included
                raise BadRelayFile(str(error)) from None
        return None
