"""Stdin source on real pipes, files, ptys and a child process's standard input."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from adapters.base import SourceEnded
from adapters.registry import make_source
from adapters.stdin_source import StdinOptions, StdinSource

ROOT = Path(__file__).resolve().parent.parent


def drain(source: StdinSource, timeout: float = 5.0) -> bytes:
    """Everything up to the end of input (SourceEnded), within ``timeout``."""
    got, deadline = bytearray(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for chunk in source.read(0.1):
                got += chunk.data
        except SourceEnded:
            return bytes(got)
    raise AssertionError(f"no end of input within {timeout}s after {len(got)} bytes")


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def test_pipe_delivers_everything_then_ends(pipe):
    r, w = pipe
    source = StdinSource(StdinOptions(fd=r), name="piped")
    source.start()
    assert source.read(0.05) == []
    os.write(w, b"1.5\n2.5\n")
    (chunk,) = source.read(1.0)
    assert chunk.data == b"1.5\n2.5\n" and chunk.received_at > 0 and chunk.offset is None
    os.write(w, b"tail without newline")
    os.close(w)
    assert drain(source) == b"tail without newline"
    with pytest.raises(SourceEnded):
        source.read(0.1)  # stays ended
    assert not source.status().connected and source.bytes_read == 28


def test_large_input_arrives_whole_and_in_order(pipe):
    r, w = pipe
    payload = os.urandom(1 << 20)
    source = StdinSource(StdinOptions(fd=r))
    source.start()

    def feed():
        with os.fdopen(w, "wb", closefd=True) as f:
            f.write(payload)

    thread = threading.Thread(target=feed)
    thread.start()
    assert drain(source) == payload
    thread.join(5)


def test_read_waits_at_most_its_timeout(pipe):
    r, _ = pipe
    source = StdinSource(StdinOptions(fd=r))
    source.start()
    started = time.monotonic()
    assert source.read(0.3) == []
    assert time.monotonic() - started < 3.0  # bounded, not blocked until input arrives


def test_stop_wakes_a_long_read(pipe):
    r, _ = pipe
    source = StdinSource(StdinOptions(fd=r))
    source.start()
    result = []
    reader = threading.Thread(target=lambda: result.append(source.read(60.0)))
    reader.start()
    time.sleep(0.05)
    source.stop()
    reader.join(5)
    assert not reader.is_alive() and result == [[]]


def test_regular_file_as_stdin(tmp_path):
    path = tmp_path / "input.csv"
    path.write_bytes(b"a,1\nb,2\n" * 20000)
    fd = os.open(path, os.O_RDONLY)
    try:
        source = StdinSource(StdinOptions(fd=fd))
        source.start()
        assert drain(source) == path.read_bytes()
    finally:
        os.close(fd)


def test_hung_up_terminal_ends():
    master, slave = os.openpty()
    try:
        source = StdinSource(StdinOptions(fd=slave))
        source.start()
        os.write(master, b"typed line\n")
        (chunk,) = source.read(1.0)
        assert chunk.data == b"typed line\n"
        os.close(master)
        assert drain(source) == b""
        assert source.status().errors == 0
    finally:
        os.close(slave)


def test_descriptor_closed_under_it_ends_with_the_error_counted(pipe):
    r, _ = pipe
    source = StdinSource(StdinOptions(fd=r))
    source.start()
    os.close(r)
    assert drain(source) == b""
    status = source.status()
    assert status.errors == 1 and "Bad file descriptor" in status.last_error and not status.connected


def test_the_real_standard_input_of_a_process():
    script = (
        "import sys\n"
        "from adapters.registry import make_source\n"
        "from adapters.base import SourceEnded\n"
        "source = make_source('stdin')\n"
        "source.start()\n"
        "got = b''\n"
        "while True:\n"
        "    try:\n"
        "        got += b''.join(c.data for c in source.read(0.5))\n"
        "    except SourceEnded:\n"
        "        break\n"
        "sys.stderr.write(got.hex())  # stdout carries the log lines\n"
    )
    payload = bytes(range(256)) * 100
    done = subprocess.run(
        [sys.executable, "-c", script], input=payload, capture_output=True, cwd=ROOT, timeout=30, check=True
    )
    assert bytes.fromhex(done.stderr.decode()) == payload


def test_bad_descriptor_is_refused_at_start():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(ValueError, match=f"fd: {r} is not an open descriptor"):
        StdinSource(StdinOptions(fd=r)).start()
    with pytest.raises(ValueError, match="fd: must be >= 0"):
        StdinOptions(fd=-1)


def test_registry_builds_it_with_defaults():
    source = make_source("stdin")
    assert isinstance(source, StdinSource) and source.options.fd == 0
