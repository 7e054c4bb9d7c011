"""The shared-memory relay between engine processes and the exporting process."""

from __future__ import annotations

import multiprocessing
import os
import stat
import struct
import threading
import time

from otel_vllm_kv.kv_cache import GroupLayout, PoolLayout
from otel_vllm_kv.relay import SnapshotWriter
from otel_vllm_kv.relay_reader import SnapshotReader

LAYOUT = PoolLayout(num_blocks=64, limit_tokens=63 * 128, groups=(GroupLayout("full_attention", 128),))


def test_reader_sees_the_latest_record(tmp_path):
    writer = SnapshotWriter(str(tmp_path), engine_index=0, model_name="tiny", layout=LAYOUT)
    reader = SnapshotReader(str(tmp_path))
    assert reader.read() == [], "nothing published yet"
    writer.write(63, [0])
    writer.write(40, [0])
    (snapshot,) = reader.read()
    assert (snapshot.engine_index, snapshot.model_name, snapshot.pid) == (0, "tiny", os.getpid())
    assert (snapshot.layout, snapshot.free_blocks) == (LAYOUT, 40)


def _tear(writer) -> bytes:
    """Make the writer's record read as torn (its checksum off), as a read overlapping a write sees it;
    returns the whole record to put back."""
    from otel_vllm_kv.relay import RECORD_OFFSET

    whole = os.pread(writer._descriptor, 64, RECORD_OFFSET)
    os.pwrite(writer._descriptor, b"\xff", RECORD_OFFSET + 8)  # a value's first byte, the checksum unchanged
    return whole


def test_a_torn_record_is_not_read(tmp_path):
    writer = SnapshotWriter(str(tmp_path), engine_index=0, model_name="tiny", layout=LAYOUT)
    writer.write(40, [0])
    _tear(writer)
    assert SnapshotReader(str(tmp_path)).read() == []


def test_a_first_read_waits_for_a_writer_descheduled_mid_write(tmp_path):
    """On a busy machine the writer can lose the CPU inside its write; a reader that has seen no
    record yet must wait for it (the tight-loop race test below lost up to 878 reads of 1 M this
    way, under load, with the seqlock this relay once used), not report the engine absent."""
    from otel_vllm_kv.relay import RECORD_OFFSET

    writer = SnapshotWriter(str(tmp_path), engine_index=0, model_name="tiny", layout=LAYOUT)
    writer.write(40, [0])
    whole = _tear(writer)
    finish = threading.Timer(0.03, lambda: os.pwrite(writer._descriptor, whole, RECORD_OFFSET))
    finish.start()
    try:
        (snapshot,) = SnapshotReader(str(tmp_path)).read()
    finally:
        finish.join()
    assert snapshot.free_blocks == 40


def test_closed_writer_disappears(tmp_path):
    writer = SnapshotWriter(str(tmp_path), engine_index=0, model_name="tiny", layout=LAYOUT)
    writer.write(1, [0])
    reader = SnapshotReader(str(tmp_path))
    assert len(reader.read()) == 1
    writer.close()
    assert reader.read() == []
    assert os.listdir(tmp_path) == []


def _write_and_exit(directory: str) -> None:
    SnapshotWriter(directory, engine_index=5, model_name="gone", layout=LAYOUT).write(3, [0])


def test_files_of_dead_writers_are_dropped_and_removed(tmp_path):
    child = multiprocessing.get_context("spawn").Process(target=_write_and_exit, args=(str(tmp_path),))
    child.start()
    child.join()
    assert len(os.listdir(tmp_path)) == 1, "a crashed engine core leaves its file behind"
    assert SnapshotReader(str(tmp_path)).read() == []
    assert os.listdir(tmp_path) == []


def _publish_then_wait(directory: str, done) -> None:
    """A writer that publishes, then waits for ``done`` (a pipe's end) to close."""
    writer = SnapshotWriter(directory, engine_index=5, model_name="gone", layout=LAYOUT)
    writer.write(3, [0])
    os.read(done, 1)


def test_an_unreaped_dead_writer_counts_as_dead(tmp_path):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write_end)
        _publish_then_wait(str(tmp_path), read_end)
        os._exit(0)
    reader = SnapshotReader(str(tmp_path))
    try:
        while not reader.read():
            time.sleep(0.01)
        os.close(write_end)
        for _ in range(200):  # until the child is a zombie: exited, not yet waited for
            with open(f"/proc/{pid}/stat", "rb") as stat_file:
                if stat_file.read().rpartition(b")")[2].split()[0] == b"Z":
                    break
            time.sleep(0.01)
        assert reader.read() == []
    finally:
        os.waitpid(pid, 0)


def test_a_live_pid_in_a_dead_writers_file_proves_nothing(tmp_path):
    """A pid is reused, and means nothing in another pid namespace: only the writer's lock counts."""
    from otel_vllm_kv.relay import _HEADER

    child = multiprocessing.get_context("spawn").Process(target=_write_and_exit, args=(str(tmp_path),))
    child.start()
    child.join()
    (name,) = os.listdir(tmp_path)
    pid_offset = struct.calcsize("<4sHHi")  # the header's writer pid follows magic, version, name length, index
    with open(tmp_path / name, "r+b") as relay_file:
        relay_file.seek(pid_offset)
        relay_file.write(struct.pack("<I", os.getpid()))  # a live process now has the dead writer's pid
    assert _HEADER.unpack_from((tmp_path / name).read_bytes())[4] == os.getpid()
    assert SnapshotReader(str(tmp_path)).read() == []
    assert os.listdir(tmp_path) == []


def test_a_forked_child_does_not_keep_a_dead_writer_alive(tmp_path):
    """A child forked from an engine shares its descriptors; it closes its copy of the lock at fork."""
    read_end, write_end = os.pipe()
    forked_read, forked_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the engine: publishes, forks a long-lived child of its own, and dies
        os.close(write_end)
        writer = SnapshotWriter(str(tmp_path), engine_index=5, model_name="gone", layout=LAYOUT)
        writer.write(3, [0])
        if os.fork() == 0:  # the at-fork handlers have run when fork returns here
            os.write(forked_write, b"x")
            os.read(read_end, 1)
            os._exit(0)
        os.read(forked_read, 1)  # not before the child is past its at-fork handlers
        os._exit(0)
    os.close(read_end)
    try:
        os.waitpid(pid, 0)
        assert SnapshotReader(str(tmp_path)).read() == [], "the engine died; its forked child must not hold its lock"
    finally:
        os.close(write_end)


def test_one_series_per_engine_and_newest_file_wins(tmp_path):
    directory = str(tmp_path)
    old = SnapshotWriter(directory, engine_index=0, model_name="tiny", layout=LAYOUT)
    old.write(10, [0])
    new = SnapshotWriter(directory, engine_index=0, model_name="tiny", layout=LAYOUT)
    new.write(20, [0])
    other = SnapshotWriter(directory, engine_index=1, model_name="tiny", layout=LAYOUT)
    other.write(30, [0])
    snapshots = {s.engine_index: s.free_blocks for s in SnapshotReader(directory).read()}
    assert snapshots == {0: 20, 1: 30}


def test_files_are_private(tmp_path):
    writer = SnapshotWriter(str(tmp_path), engine_index=0, model_name="tiny", layout=LAYOUT)
    (name,) = os.listdir(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    writer.close()


def test_missing_directory_reads_as_no_engines(tmp_path):
    assert SnapshotReader(str(tmp_path / "gone")).read() == []


def test_writer_survives_its_reader_and_directory(tmp_path):
    directory = tmp_path / "relay"
    directory.mkdir()
    writer = SnapshotWriter(str(directory), engine_index=0, model_name="tiny", layout=LAYOUT)
    for name in os.listdir(directory):
        os.unlink(directory / name)
    directory.rmdir()
    writer.write(5, [0])  # the exporter is gone: the write lands in memory nobody reads
    writer.close()


def test_long_model_names_are_truncated_not_rejected(tmp_path):
    writer = SnapshotWriter(str(tmp_path), 0, "m" * 1000, LAYOUT)
    writer.write(1, [0])
    (snapshot,) = SnapshotReader(str(tmp_path)).read()
    assert snapshot.model_name == "m" * 256


def test_a_hybrid_layout_and_its_per_group_counts_round_trip(tmp_path):
    layout = PoolLayout(
        num_blocks=64,
        limit_tokens=3971,
        watermark_blocks=6,
        groups=(GroupLayout("sliding_window", 128), GroupLayout("full_attention", 128)),
    )
    writer = SnapshotWriter(str(tmp_path), engine_index=1, model_name="gemma", layout=layout)
    writer.write(40, [3, 9])
    (snapshot,) = SnapshotReader(str(tmp_path)).read()
    assert (snapshot.layout, snapshot.free_blocks, snapshot.evictable_blocks) == (layout, 40, (3, 9))
    occupancy = snapshot.occupancy()
    assert (occupancy.evictable_blocks, occupancy.headroom_blocks) == (12, 34)
    assert occupancy.limit_tokens == 3971 and occupancy.used_tokens == 23 * 3971 // 63


def test_an_unknown_capacity_travels_as_none(tmp_path):
    layout = PoolLayout(num_blocks=11, limit_tokens=None, groups=(GroupLayout("mamba", 2048), GroupLayout("x", 16)))
    writer = SnapshotWriter(str(tmp_path), engine_index=0, model_name="m", layout=layout)
    writer.write(4, [0, 0])
    (snapshot,) = SnapshotReader(str(tmp_path)).read()
    assert snapshot.layout == layout and snapshot.occupancy().used_tokens is None


def test_statistics_files_newest_arrival_wins_and_a_probe_wins_over_them(tmp_path):
    from otel_vllm_kv.relay import StatsSnapshotWriter

    directory = str(tmp_path)
    layout = PoolLayout(num_blocks=64, limit_tokens=63 * 128, watermark_blocks=None)
    first, second = (StatsSnapshotWriter(directory, 1, "tiny", layout) for _ in range(2))
    second.write(50)
    first.write(20)  # arrived last, in the older file: several API servers each get some steps
    (snapshot,) = SnapshotReader(directory).read()
    assert (snapshot.engine_index, snapshot.free_blocks, snapshot.evictable_blocks) == (1, 20, None)
    assert (snapshot.layout.watermark_blocks, snapshot.occupancy().headroom_tokens) == (None, None)
    probed = SnapshotWriter(directory, engine_index=1, model_name="tiny", layout=LAYOUT)
    probed.write(7, [0])
    (snapshot,) = SnapshotReader(directory).read()
    assert (snapshot.free_blocks, snapshot.evictable_blocks) == (7, (0,)), "the probe's file wins"


def _write_forever(directory: str, ready) -> None:
    writer = SnapshotWriter(directory, engine_index=0, model_name="tiny", layout=LAYOUT)
    writer.write(1, [0])
    ready.set()
    free = 0
    while True:
        free = (free + 1) % 63
        writer.write(free, [0])


def test_a_reader_never_loses_a_published_engine_to_a_concurrent_write(tmp_path):
    """A reader racing a writer in a tight loop sees torn records; it must never report the engine
    absent (nor a torn value: the checksum tells)."""
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    writer = context.Process(target=_write_forever, args=(str(tmp_path), ready), daemon=True)
    writer.start()
    try:
        assert ready.wait(60)
        reader = SnapshotReader(str(tmp_path))
        reader.read()
        (mapped,) = reader._files.values()
        reads = 100_000  # about 2 s: each read is two pread calls racing the writer's stores
        lost = sum(mapped.read_values() is None for _ in range(reads))
    finally:
        writer.kill()
        writer.join()
    assert lost == 0, f"{lost} of {reads} reads lost the engine"
