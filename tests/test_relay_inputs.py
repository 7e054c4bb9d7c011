"""Hostile files in the relay: each spoils only itself, with one warning, and never hangs, faults or
overflows the exporter (or the user's own metrics exported beside the gauges)."""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import time
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics

from otel_vllm_kv import holdings, names
from otel_vllm_kv.exporter import collection, gauges, holder_metrics
from otel_vllm_kv.holdings import OVERFLOW, HoldersPass, Holding
from otel_vllm_kv.kv_cache import GroupLayout, PoolLayout
from otel_vllm_kv.relay import (
    _CHECKSUM,
    _FORMAT_VERSION,
    _HEADER,
    _HOLDERS_HEADER,
    HOLDERS_BYTES,
    RECORD_OFFSET,
    STATS_RECORD,
    SnapshotWriter,
    StatsSnapshotWriter,
    holders_offset,
    probe_record,
)
from otel_vllm_kv.relay_reader import SnapshotReader

LAYOUT = PoolLayout(num_blocks=64, limit_tokens=63 * 16, groups=(GroupLayout("full_attention", 16),))
INT64 = (-(2**63), 2**63 - 1)
#: The header's fields in order, as ``relay._HEADER`` packs them.
HEADER_FIELDS = (
    "magic",
    "version",
    "name_length",
    "engine_index",
    "pid",
    "num_blocks",
    "limit",
    "watermark",
    "groups_length",
    "num_groups",
    "name",
    "groups",
)


def _relay_warnings(caplog) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name in ("otel_vllm_kv.relay", "otel_vllm_kv.relay_reader")
    ]


def _patch_header(path, **fields) -> None:
    """Rewrite some header fields of a relay file in place (its writer keeps its lock)."""
    values = dict(zip(HEADER_FIELDS, _HEADER.unpack_from(path.read_bytes())))
    values.update(fields)
    with open(path, "r+b") as relay_file:
        relay_file.write(_HEADER.pack(*values.values()))


def _overwrite(path, offset: int, data: bytes) -> None:
    """Change a relay file behind its writer's back (as another process of the same user could)."""
    with open(path, "r+b") as relay_file:
        relay_file.seek(offset)
        relay_file.write(data)


def _only_file(directory, prefix="engine-"):
    (name,) = [name for name in os.listdir(directory) if name.startswith(prefix)]
    return directory / name


@pytest.fixture
def good_engine(tmp_path):
    """A live writer beside which each hostile file is planted: it must stay reported."""
    writer = SnapshotWriter(str(tmp_path), engine_index=0, model_name="good", layout=LAYOUT)
    writer.write(40, [2])
    yield writer
    writer.close()


def _reported(directory) -> dict[int, int]:
    return {snapshot.engine_index: snapshot.free_blocks for snapshot in SnapshotReader(str(directory)).read()}


@pytest.mark.timeout(30)
def test_a_fifo_named_like_a_relay_file_neither_hangs_nor_hides_the_others(tmp_path, good_engine, caplog):
    os.mkfifo(tmp_path / "engine-7-1-1-0")
    assert _reported(tmp_path) == {0: 40}
    (warning,) = _relay_warnings(caplog)
    assert "engine-7-1-1-0" in warning and "not a regular file" in warning


def test_a_symlink_or_directory_named_like_a_relay_file_is_not_followed(tmp_path, good_engine, caplog):
    os.symlink(_only_file(tmp_path), tmp_path / "engine-8-1-1-0")
    (tmp_path / "stats-9-1-1-0").mkdir()
    assert _reported(tmp_path) == {0: 40}
    assert len(_relay_warnings(caplog)) == 2


def test_a_writer_pid_beyond_any_pid_costs_nothing(tmp_path, good_engine):
    """Liveness is the writer's lock: the header's pid (here 2^31, once an OverflowError that emptied
    every callback) is never given to the kernel."""
    other = SnapshotWriter(str(tmp_path), engine_index=1, model_name="good", layout=LAYOUT)
    other.write(30, [0])
    _patch_header(tmp_path / os.path.basename(other._path), pid=2**31)
    assert _reported(tmp_path) == {0: 40, 1: 30}
    other.close()


@pytest.mark.parametrize(
    ("header", "values"),
    [
        ({"num_blocks": 2**64 - 1}, (40, 0)),
        ({}, (-(2**63), 0)),
        ({}, (40, 41)),  # more evictable blocks than free ones
        ({"limit": 2**62}, (40, 0)),
        ({"groups": b"full_attention:0", "groups_length": 16}, (40, 0)),
    ],
)
def test_values_out_of_range_spoil_only_their_engine_and_never_the_users_metrics(
    tmp_path, good_engine, caplog, header, values
):
    """A value out of int64 range once failed the OTLP export of the whole batch, the user's own
    metrics with it. Every value is checked against its range before it reaches a gauge."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    bad = SnapshotWriter(str(tmp_path), engine_index=1, model_name="bad", layout=LAYOUT)
    bad_path = tmp_path / os.path.basename(bad._path)
    _patch_header(bad_path, **header)
    _overwrite(bad_path, RECORD_OFFSET, probe_record(1).encode(2, *values))
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("the user's")
    meter.create_counter("requests").add(3)
    gauges.create_instruments(meter)
    holder_metrics.create_instruments(meter)
    collection.set_source(SnapshotReader(str(tmp_path)))
    try:
        data = reader.get_metrics_data()
    finally:
        collection.set_source(None)
        bad.close()
    exported = encode_metrics(data)  # raises on an int64 overflow
    exported_names = {
        metric.name
        for resource in exported.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }
    assert {"requests", names.KV_CACHE_USAGE} <= exported_names
    models = {
        point.attributes[names.MODEL_NAME]
        for metric in _metrics(data, names.KV_CACHE_LIMIT)
        for point in metric.data.data_points
    }
    assert models == {"good"}
    (warning,) = _relay_warnings(caplog)
    assert os.path.basename(bad._path) in warning


def _metrics(data, name):
    return [
        metric
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
    ]


def test_a_file_shrunk_under_the_reader_is_dropped_not_a_fault(tmp_path, good_engine):
    """A mapped file that shrinks raises SIGBUS on the next read of the lost page, which kills the
    process: the reader reads with ``pread`` instead. Run in a forked child so that a fault shows."""
    shrunk = SnapshotWriter(str(tmp_path), engine_index=1, model_name="good", layout=LAYOUT)
    shrunk.write(30, [0])
    pid = os.fork()
    if pid == 0:
        reader = SnapshotReader(str(tmp_path))
        first = {s.engine_index for s in reader.read()}
        os.truncate(shrunk._path, 0)  # every mapped page now lies past the end
        second = {s.engine_index for s in reader.read()}
        os._exit(0 if (first, second) == ({0, 1}, {0}) else 1)
    _, status = os.waitpid(pid, 0)
    shrunk.close()
    assert not os.WIFSIGNALED(status), f"the reader died of {signal.Signals(os.WTERMSIG(status)).name}"
    assert os.WEXITSTATUS(status) == 0


def test_a_writer_survives_its_file_being_shrunk(tmp_path):
    """The engine writes with ``pwrite``: a shrunk file grows again where a mapping would fault."""
    writer = SnapshotWriter(str(tmp_path), engine_index=0, model_name="good", layout=LAYOUT)
    pid = os.fork()
    if pid == 0:
        os.truncate(writer._path, 0)
        writer.write(30, [0])
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    writer.close()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_a_statistics_record_too_old_is_not_reported(tmp_path):
    """A frontend outlives the remote engine it reported from statistics: that engine's last values age out."""
    from otel_vllm_kv.relay_reader import STATS_MAX_AGE_SECONDS

    layout = PoolLayout(num_blocks=64, limit_tokens=63 * 16, watermark_blocks=None)
    writer = StatsSnapshotWriter(str(tmp_path), 3, "remote", layout)
    writer.write(20)
    assert _reported(tmp_path) == {3: 20}
    arrived = time.time_ns() - int((STATS_MAX_AGE_SECONDS + 1) * 1e9)
    _overwrite(writer._path, RECORD_OFFSET, STATS_RECORD.encode(4, 20, arrived))
    assert _reported(tmp_path) == {}
    writer.write(21)
    assert _reported(tmp_path) == {3: 21}, "a new record reports it again"
    writer.close()


# Fuzzing: files a writer of this package never makes, held locked as a live writer holds its own.


VALID_HOLDERS = holdings.encode(
    HoldersPass((Holding(("adapter", "tenant"), 120.5, 10.5), Holding(OVERFLOW, 3.0, 2.5)), 23, 300.0)
)


def _holders_section(payload: bytes, sequence: int = 1) -> bytes:
    body = _HOLDERS_HEADER.pack(sequence, len(payload)) + payload
    section = body + _CHECKSUM.pack(zlib.crc32(body))
    return section + bytes(HOLDERS_BYTES - len(section))


def _valid_file(num_groups: int = 1, holders: bytes = VALID_HOLDERS) -> bytearray:
    groups = ";".join(["full_attention:16"] * num_groups).encode()
    header = _HEADER.pack(b"OVKV", _FORMAT_VERSION, 4, 0, 1, 64, 63 * 16, 0, len(groups), num_groups, b"fuzz", groups)
    record = probe_record(num_groups)
    content = header + record.encode(2, 40, *([1] * num_groups))
    content += bytes(holders_offset(record) - len(content))
    return bytearray(content + _holders_section(holders))


def _read_planted(directory, name: str, content: bytes):
    path = directory / name
    path.write_bytes(content)
    with open(path, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a live writer
        try:
            return SnapshotReader(str(directory)).read(holders=True)
        finally:
            path.unlink()


def _assert_in_range(snapshots) -> None:
    for snapshot in snapshots:
        if snapshot.holders is not None:
            allocatable = snapshot.layout.num_blocks - 1
            assert 0 <= snapshot.holders.used_blocks <= allocatable
            assert sum(holding.held_blocks for holding in snapshot.holders.holdings) <= allocatable * (1 + 1e-9)
            for holding in snapshot.holders.holdings:
                assert math.isfinite(holding.block_seconds) and holding.block_seconds >= 0
        occupancy = snapshot.occupancy()
        assert 0 <= snapshot.free_blocks < snapshot.layout.num_blocks
        for value in (
            occupancy.used_tokens,
            occupancy.free_tokens,
            occupancy.limit_tokens,
            occupancy.evictable_tokens,
            occupancy.headroom_tokens,
            occupancy.used_blocks,
            occupancy.limit_blocks,
        ):
            assert value is None or INT64[0] <= value <= INT64[1]
        assert math.isfinite(occupancy.utilization)


@pytest.fixture(scope="module")
def fuzz_directory(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzzed-relay")


@given(content=st.binary(max_size=2 * RECORD_OFFSET), stats=st.booleans())
def test_random_bytes_never_escape_the_reader(fuzz_directory, content, stats):
    _assert_in_range(_read_planted(fuzz_directory, ("stats-" if stats else "engine-") + "0-1-1-0", content))


@given(st.data())
def test_truncated_or_mutated_files_never_escape_the_reader(fuzz_directory, data):
    content = _valid_file(data.draw(st.integers(1, 3)))
    if data.draw(st.booleans()):
        content = content[: data.draw(st.integers(0, len(content)))]
    else:
        # The header and the record, or the holders section (most of the file).
        start = data.draw(st.sampled_from([0, holders_offset(probe_record(1))]))
        offset = data.draw(st.integers(start, min(start + 4096, len(content) - 1)))
        width = data.draw(st.sampled_from([1, 2, 4, 8]))
        boundary = st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**53, 2**63 - 1, 2**63, 2**64 - 1])
        value = data.draw(boundary | st.integers(0, 2**64 - 1))
        content[offset : offset + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    _assert_in_range(_read_planted(fuzz_directory, "engine-0-1-1-0", bytes(content)))


@given(values=st.lists(st.integers(*INT64), min_size=2, max_size=2))
def test_any_published_values_are_reported_in_range_or_skipped(fuzz_directory, values):
    content = _valid_file()
    record = probe_record(1).encode(2, *values)
    content[RECORD_OFFSET : RECORD_OFFSET + len(record)] = record
    snapshots = _read_planted(fuzz_directory, "engine-0-1-1-0", bytes(content))
    _assert_in_range(snapshots)
    assert bool(snapshots) == (0 <= values[1] <= values[0] < 64)


@pytest.fixture
def full_tmpfs(tmp_path):
    """A real tmpfs of 8 KiB, filled: what a crowded ``/dev/shm`` is to the relay."""
    import subprocess

    mount = tmp_path / "shm"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a tmpfs needs root (or CAP_SYS_ADMIN)")
    try:
        filler = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError):
                while True:
                    os.write(filler, b"\0" * 1024)
        finally:
            os.close(filler)
        (mount / "relay").mkdir()  # a directory takes no page of a tmpfs
        yield mount / "relay"
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_tmpfs_refuses_a_relay_file_with_the_setting_named_and_leaves_nothing(full_tmpfs, caplog):
    """Once the first store into the sparse mapping faulted (SIGBUS, exit 135): the pages are reserved first.
    The engine's probe and a frontend reporting that engine from statistics both meet it: one warning."""
    from otel_vllm_kv.relay import NoSpace, warn_no_space

    for writer_class in (SnapshotWriter, StatsSnapshotWriter):
        with pytest.raises(
            NoSpace, match=f"no space left in {full_tmpfs} \\(OTEL_PYTHON_VLLM_KV_RELAY_DIR\\)"
        ) as error:
            writer_class(str(full_tmpfs), 0, "tiny", LAYOUT)
        warn_no_space(error.value)
    assert [name for name in os.listdir(full_tmpfs) if not name.startswith(".no-space")] == []
    assert len(_relay_warnings(caplog)) == 1


_NAME = st.none() | st.text(max_size=120)
_NUMBER = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**70), 2**70)
_ROW = st.lists(st.booleans() | _NAME | _NUMBER, min_size=4, max_size=6) | st.tuples(
    st.booleans(), _NAME, _NAME, _NUMBER, _NUMBER
).map(list)


@given(
    used=_NUMBER | st.none(),
    written=_NUMBER | st.none(),
    rows=st.lists(_ROW, max_size=5),
    extra=st.booleans(),
)
def test_any_holders_section_is_reported_in_range_or_left_out(fuzz_directory, used, written, rows, extra):
    """A holders section of any JSON spoils only the holders: the pool is still reported."""
    document = {"used": used, "written": written, "holders": rows} | ({"more": 1} if extra else {})
    payload = json.dumps(document).encode()
    snapshots = _read_planted(fuzz_directory, "engine-0-1-1-0", bytes(_valid_file(holders=payload)))
    _assert_in_range(snapshots)
    (snapshot,) = snapshots
    assert snapshot.free_blocks == 40


def test_a_bad_holders_section_is_left_out_with_one_warning(tmp_path, caplog):
    writer = SnapshotWriter(str(tmp_path), engine_index=0, model_name="m", layout=LAYOUT)
    try:
        writer.write(40, [1])
        writer.write_holders(b'{"used": 80, "written": null, "holders": []}')  # more than the pool's 63
        reader = SnapshotReader(str(tmp_path))
        for _ in range(3):
            (snapshot,) = reader.read(holders=True)
            assert snapshot.free_blocks == 40 and snapshot.holders is None
        assert len([r for r in caplog.records if "leaving out the holders" in r.getMessage()]) == 1
        writer.write_holders(holdings.encode(HoldersPass((Holding((None, None), 5.0, 23.0),), 23, None)))
        (snapshot,) = reader.read(holders=True)
        assert snapshot.holders.holdings == (Holding((None, None), 5.0, 23.0),)
    finally:
        writer.close()
