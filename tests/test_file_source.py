"""File source against real files: start positions, saved offsets, rotation, truncation, absence."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from adapters.file_source import FileOptions, FileSource, FileSourceStatus
from adapters.registry import make_source

POLL = 0.02  # a short poll interval keeps the file fast


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def follow(path: Path, **options) -> FileSource:
    source = FileSource(FileOptions(path=str(path), poll_interval=POLL, **options), name="log")
    return source


def read_for(source: FileSource, seconds: float = 0.15) -> list:
    """Everything the source gives within ``seconds`` (it has nothing more once idle)."""
    chunks, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        chunks += source.read(0.02)
    return chunks


def read_exactly(source: FileSource, n: int, timeout: float = 5.0) -> bytes:
    got, deadline = bytearray(), time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for chunk in source.read(0.05):
            got += chunk.data
    assert len(got) == n, f"read {len(got)} of {n} bytes: {bytes(got[-80:])!r}"
    return bytes(got)


def joined(chunks) -> bytes:
    return b"".join(c.data for c in chunks)


@pytest.fixture
def log_path(tmp_path):
    return tmp_path / "sensor.log"


# ---------------------------------------------------------------- start positions and offsets


def test_beginning_reads_all_then_follows_with_exact_offsets(log_path):
    log_path.write_bytes(b"old 1\nold 2\n")
    source = follow(log_path, start="beginning")
    source.start()
    append(log_path, b"new 3\n")
    chunks = read_for(source)
    assert joined(chunks) == b"old 1\nold 2\nnew 3\n"
    ends = [c.offset for c in chunks]
    assert ends == sorted(ends) and ends[-1] == 18
    assert all(c.received_at > 0 and c.key == "" and not c.is_record for c in chunks)
    assert source.status().connected
    source.stop()


def test_end_skips_what_was_there(log_path):
    log_path.write_bytes(b"history\n")
    source = follow(log_path, start="end")
    source.start()
    assert read_for(source) == []
    append(log_path, b"live\n")
    (chunk,) = read_for(source)
    assert (chunk.data, chunk.offset) == (b"live\n", 13)
    source.stop()


def test_saved_offset_resumes_without_skipping_or_repeating(log_path):
    lines = b"".join(b"reading %05d\n" % i for i in range(20000))  # 280 kB: several chunks
    log_path.write_bytes(lines)
    first = follow(log_path, start="saved")
    first.start()
    taken = first.read(0.1) + first.read(0.1)  # the daemon learned these, then stopped
    first.stop()
    saved = taken[-1].offset
    assert saved == sum(len(c.data) for c in taken) < len(lines)
    append(log_path, b"while down\n")
    second = make_source("file", {"path": str(log_path), "start": "saved", "poll_interval": POLL})
    second.restore(saved)
    second.start()
    rest = read_exactly(second, len(lines) + 11 - saved)
    assert joined(taken) + rest == lines + b"while down\n"
    second.stop()


def test_saved_without_an_offset_starts_at_the_beginning(log_path):
    log_path.write_bytes(b"all of it\n")
    source = follow(log_path)  # start: saved is the default
    source.start()
    assert joined(read_for(source)) == b"all of it\n"
    source.stop()


def test_saved_offset_past_the_end_means_the_file_was_replaced(log_path):
    log_path.write_bytes(b"short\n")
    source = follow(log_path, start="saved")
    source.restore(1000)
    source.start()
    assert joined(read_for(source)) == b"short\n"
    assert source.status().truncations == 1
    source.stop()


def test_restore_after_start_is_refused(log_path):
    source = follow(log_path)
    source.start()
    with pytest.raises(RuntimeError, match="before start"):
        source.restore(5)
    source.stop()


# ---------------------------------------------------------------- absence, rotation, truncation


def test_absent_file_is_waited_for_then_read_from_its_start(log_path):
    with capture_logs() as logs:
        source = follow(log_path, start="end")  # "end" concerns a file present at start only
        source.start()
        assert read_for(source, 0.1) == [] and not source.status().connected
        log_path.write_bytes(b"first line\n")
        assert read_exactly(source, 11) == b"first line\n"
    assert [e["event"] for e in logs].count("file_waiting") == 1
    assert source.status().errors == 0 and source.status().connected
    source.stop()


def test_rename_rotation_finishes_the_old_file_then_follows_the_new(log_path):
    log_path.write_bytes(b"a1\n")
    source = follow(log_path, start="beginning")
    source.start()
    assert joined(read_for(source)) == b"a1\n"
    rotated = log_path.with_name("sensor.log.1")
    os.rename(log_path, rotated)
    log_path.touch()  # logrotate "create": the new file exists, empty, before the writer reopens
    assert read_for(source) == []
    append(rotated, b"a2 late\n")  # the writer has not reopened yet
    assert joined(read_for(source)) == b"a2 late\n"
    append(log_path, b"b1\n")
    chunks = read_for(source)
    assert joined(chunks) == b"b1\n" and chunks[-1].offset == 3
    status = source.status()
    assert isinstance(status, FileSourceStatus) and (status.rotations, status.truncations) == (1, 0)
    source.stop()


def test_copytruncate_starts_again_from_zero(log_path):
    log_path.write_bytes(b"0123456789\n" * 10)
    source = follow(log_path, start="beginning")
    source.start()
    assert len(joined(read_for(source))) == 110
    shutil.copy(log_path, log_path.with_name("sensor.log.1"))
    with open(log_path, "r+b") as f:
        f.truncate(0)
    append(log_path, b"fresh\n")
    chunks = read_for(source)
    assert joined(chunks) == b"fresh\n" and chunks[-1].offset == 6
    assert source.status().truncations == 1 and source.status().rotations == 0
    source.stop()


def test_deleted_and_recreated(log_path):
    log_path.write_bytes(b"one\n")
    source = follow(log_path, start="beginning")
    source.start()
    assert joined(read_for(source)) == b"one\n"
    log_path.unlink()
    assert read_for(source, 0.06) == []
    log_path.write_bytes(b"two\n")
    assert joined(read_for(source)) == b"two\n"
    source.stop()


def rotate(path: Path, keep: int = 3) -> None:
    """logrotate's default scheme: path.1 -> path.2 ... (the oldest dropped), path -> path.1."""
    for k in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{k}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{k + 1}"))
    os.rename(path, path.with_name(f"{path.name}.1"))


def test_reader_behind_by_several_rotations_reads_every_file_in_order(log_path):
    log_path.write_bytes(b"A" * 200_000)  # a backlog of several chunks
    source = follow(log_path, start="beginning")
    source.start()
    got = joined(source.read(0.1))
    assert 0 < len(got) < 200_000
    for name in b"BCDE":  # each lives at the path for a poll interval while A is still being read
        rotate(log_path)
        log_path.write_bytes(bytes([name]) * 1000)
        time.sleep(POLL * 1.5)
        got += joined(source.read(0.1))
    got += read_exactly(source, 204_000 - len(got))
    assert got == b"A" * 200_000 + b"B" * 1000 + b"C" * 1000 + b"D" * 1000 + b"E" * 1000
    assert source.status().rotations == 4
    assert not log_path.with_name("sensor.log.4").exists()  # A and B were gone from disk when read
    source.stop()


def test_a_writer_rotating_while_writing_loses_and_repeats_nothing(log_path):
    """A logger that writes steadily and renames its file every 100 lines (keeping 3)."""
    total, per_file = 600, 100
    log_path.touch()
    source = follow(log_path, start="beginning")
    source.start()

    def writer():
        for first in range(0, total, per_file):
            if first:
                rotate(log_path)  # then reopen by name, as a logger does on SIGHUP
            with open(log_path, "ab", buffering=0) as f:
                for i in range(first, first + per_file):
                    f.write(b"line %06d\n" % i)
                    time.sleep(0.002)

    thread = threading.Thread(target=writer)
    thread.start()
    expected = b"".join(b"line %06d\n" % i for i in range(total))
    got = read_exactly(source, len(expected), timeout=20)
    thread.join(10)
    assert got == expected
    assert source.status().rotations == total // per_file - 1
    source.stop()


def test_not_a_regular_file_is_a_fault_logged_once_until_fixed(log_path):
    log_path.mkdir()
    with capture_logs() as logs:
        source = follow(log_path)
        source.start()
        assert read_for(source, 0.1) == []
        status = source.status()
        assert status.errors == 1 and not status.connected and "not a regular file" in status.last_error
        log_path.rmdir()
        log_path.write_bytes(b"ok\n")
        assert read_exactly(source, 3) == b"ok\n"
    assert [e["event"] for e in logs].count("file_open_failed") == 1
    source.stop()


def test_unreadable_file_is_retried(log_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    log_path.write_bytes(b"secret\n")
    log_path.chmod(0)
    source = follow(log_path, start="beginning")
    source.start()
    assert read_for(source, 0.06) == [] and source.status().errors == 1
    log_path.chmod(0o600)
    assert read_exactly(source, 7) == b"secret\n"
    source.stop()


# ---------------------------------------------------------------- lifecycle and options


def test_stop_is_idempotent_and_ends_reading(log_path):
    log_path.write_bytes(b"x\n")
    source = follow(log_path)
    source.start()
    source.stop()
    source.stop()
    assert source.read(0.05) == [] and not source.status().connected


def test_stop_wakes_a_waiting_read(log_path):
    source = FileSource(FileOptions(path=str(log_path), poll_interval=30.0))
    source.start()
    result = []
    reader = threading.Thread(target=lambda: result.append(source.read(60.0)))
    reader.start()
    time.sleep(0.05)
    source.stop()
    reader.join(5)
    assert not reader.is_alive() and result == [[]]


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "path: required"),
        ({"path": "/x", "start": "middle"}, "start: expected one of beginning, end, saved"),
        ({"path": "/x", "poll_interval": 0}, "poll_interval: must be > 0"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        FileOptions(**options)


def test_negative_offset_refused(log_path):
    with pytest.raises(ValueError, match="offset must be >= 0"):
        follow(log_path).restore(-1)
