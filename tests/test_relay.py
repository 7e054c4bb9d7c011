"""The shared-memory relay between engine processes and the exporting process."""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
import time

from otel_vllm_kv.kv_cache import GroupLayout, PoolLayout
from otel_vllm_kv.processes import is_alive
from otel_vllm_kv.relay import SnapshotReader, SnapshotWriter

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


def test_a_record_being_rewritten_is_not_read(tmp_path):
    writer = SnapshotWriter(str(tmp_path), engine_index=0, model_name="tiny", layout=LAYOUT)
    writer.write(40, [0])
    reader = SnapshotReader(str(tmp_path))
    writer._sequence += 1  # as if the writer were between its two sequence stores
    from otel_vllm_kv.relay import _SEQUENCE, _SEQUENCE_OFFSET

    _SEQUENCE.pack_into(writer._map, _SEQUENCE_OFFSET, writer._sequence)
    assert reader.read() == []


def test_a_first_read_waits_for_a_writer_descheduled_mid_write(tmp_path):
    """On a busy machine the writer can lose the CPU between its two sequence stores; a reader that
    has seen no record yet must wait for it (the tight-loop race test below lost up to 878 reads of
    1 M this way, under load), not report the engine absent."""
    writer = SnapshotWriter(str(tmp_path), engine_index=0, model_name="tiny", layout=LAYOUT)
    writer.write(40, [0])
    from otel_vllm_kv.relay import _SEQUENCE, _SEQUENCE_OFFSET

    stuck = writer._sequence + 1
    writer._map[_SEQUENCE_OFFSET:_SEQUENCE_OFFSET + _SEQUENCE.size] = _SEQUENCE.pack(stuck)
    finish = threading.Timer(0.03, lambda: writer._map.__setitem__(
        slice(_SEQUENCE_OFFSET, _SEQUENCE_OFFSET + _SEQUENCE.size), _SEQUENCE.pack(stuck + 1)))
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


def test_an_unreaped_dead_writer_counts_as_dead(tmp_path):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        for _ in range(200):  # until the child is a zombie: exited, not yet waited for
            with open(f"/proc/{pid}/stat", "rb") as stat:
                if stat.read().rpartition(b")")[2].split()[0] == b"Z":
                    break
            time.sleep(0.01)
        assert not is_alive(pid)
    finally:
        os.waitpid(pid, 0)
    assert is_alive(os.getpid())


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
    SnapshotWriter(str(tmp_path), 0, "m" * 1000, LAYOUT).write(1, [0])
    (snapshot,) = SnapshotReader(str(tmp_path)).read()
    assert snapshot.model_name == "m" * 256


def test_a_hybrid_layout_and_its_per_group_counts_round_trip(tmp_path):
    layout = PoolLayout(num_blocks=64, limit_tokens=3971, watermark_blocks=6,
                        groups=(GroupLayout("sliding_window", 128), GroupLayout("full_attention", 128)))
    writer = SnapshotWriter(str(tmp_path), engine_index=1, model_name="gemma", layout=layout)
    writer.write(40, [3, 9])
    (snapshot,) = SnapshotReader(str(tmp_path)).read()
    assert (snapshot.layout, snapshot.free_blocks, snapshot.evictable_blocks) == (layout, 40, (3, 9))
    occupancy = snapshot.occupancy()
    assert (occupancy.evictable_blocks, occupancy.headroom_blocks) == (12, 34)
    assert occupancy.limit_tokens == 3971 and occupancy.used_tokens == 23 * 3971 // 63


def test_an_unknown_capacity_travels_as_none(tmp_path):
    layout = PoolLayout(num_blocks=11, limit_tokens=None, groups=(GroupLayout("mamba", 2048), GroupLayout("x", 16)))
    SnapshotWriter(str(tmp_path), engine_index=0, model_name="m", layout=layout).write(4, [0, 0])
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
    SnapshotWriter(directory, engine_index=1, model_name="tiny", layout=LAYOUT).write(7, [0])
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
    """``struct.pack_into`` zeroes its target before it packs: a sequence number written with it
    reads as 0 ("nothing published yet") for an instant. A reader must never see that."""
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    writer = context.Process(target=_write_forever, args=(str(tmp_path), ready), daemon=True)
    writer.start()
    try:
        assert ready.wait(60)
        reader = SnapshotReader(str(tmp_path))
        reader.read()
        (mapped,) = reader._files.values()
        lost, reads, deadline = 0, 0, time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for _ in range(1000):
                lost += mapped.read_values() is None
            reads += 1000
    finally:
        writer.kill()
        writer.join()
    assert reads > 100_000 and lost == 0, f"{lost} of {reads} reads lost the engine"
