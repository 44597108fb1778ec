"""Serial source against real pseudo-terminals: data flows, unplug and replug, backoff, locking."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from adapters.base import SourceStatus
from adapters.registry import make_source
from adapters.serial_source import ByteBuffer, SerialOptions, SerialSource

FAST = {"timeout": 0.05, "reconnect_initial": 0.02, "reconnect_max": 0.2}  # quick retries keep the file short


class PtyDevice:
    """A serial device stand-in: a pty pair whose slave is reachable through a fixed link path
    (as /dev/serial/by-id/... is), which can be unplugged (link gone, master closed) and
    plugged back in (a new pty behind the same path)."""

    def __init__(self, link: Path):
        self.link = link
        self.master: int | None = None

    def plug(self) -> None:
        master, slave = os.openpty()
        tmp = self.link.with_suffix(".new")
        os.symlink(os.ttyname(slave), tmp)
        os.replace(tmp, self.link)  # the path appears at once, complete
        os.close(slave)  # the source opens it by path, as it would a real device
        self.master = master

    def unplug(self) -> None:
        self.link.unlink()
        os.close(self.master)
        self.master = None

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view[:1024]) :]


def wait_for(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_exactly(source, n: int, timeout: float = 5.0) -> bytes:
    got = bytearray()
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for chunk in source.read(0.05):
            got += chunk.data
    assert len(got) == n, f"read {len(got)} of {n} bytes within {timeout}s"
    return bytes(got)


@pytest.fixture
def device(tmp_path):
    dev = PtyDevice(tmp_path / "usb-somad-test-if00")
    yield dev
    if dev.master is not None:
        dev.unplug()


@pytest.fixture
def started():
    sources = []

    def start(port: str, **options) -> SerialSource:
        source = SerialSource(SerialOptions(port=port, **{**FAST, **options}), name="uart-test")
        sources.append(source)
        source.start()
        return source

    yield start
    for source in sources:
        source.stop()


def test_every_byte_value_arrives_in_order(device, started):
    device.plug()
    source = started(str(device.link))
    wait_for(lambda: source.status().connected, what="connected")
    payload = bytes(range(256)) * 64  # control characters, XON/XOFF, NUL, 0xff: nothing translated
    device.send(payload)
    assert read_exactly(source, len(payload)) == payload
    status = source.status()
    assert (status.errors, status.reconnects, status.dropped_bytes) == (0, 0, 0)


def test_chunks_carry_arrival_time():
    source = make_source("serial", {"port": "/nonexistent/tty", **FAST})
    assert isinstance(source, SerialSource) and source.read(0.01) == []
    source._buffer.put(b"x")
    before = time.monotonic()
    (chunk,) = source.read(0.01)
    assert chunk.data == b"x" and 0 < chunk.received_at <= before and chunk.offset is None


def test_absent_at_start_waits_logs_once_then_connects(device, started):
    with capture_logs() as logs:
        source = started(str(device.link))
        wait_for(lambda: source.status().errors == 1, what="first open failure counted")
        time.sleep(0.6)  # several retries at the 0.2 s cap
        status = source.status()
        assert not status.connected and status.errors == 1 and "open_failed" in status.last_error
        device.plug()
        wait_for(lambda: source.status().connected, what="connected after the device appeared")
        device.send(b"hello\n")
        assert read_exactly(source, 6) == b"hello\n"
    events = [e["event"] for e in logs]
    assert events.count("serial_open_failed") == 1, events
    assert events.count("serial_connected") == 1 and source.status().reconnects == 0


def test_unplug_and_replug_resumes_each_time(device, started):
    device.plug()
    with capture_logs() as logs:
        source = started(str(device.link))
        wait_for(lambda: source.status().connected, what="connected")
        for round_ in range(1, 6):
            device.send(b"before %d\n" % round_)
            assert read_exactly(source, 9) == b"before %d\n" % round_
            device.unplug()
            wait_for(lambda: not source.status().connected, what="unplug noticed")
            time.sleep(0.3)  # the source retries while the device is away
            device.plug()
            wait_for(lambda n=round_: source.status().reconnects == n, what=f"reconnect {round_}")
            device.send(b"after %d\n" % round_)
            assert read_exactly(source, 8) == b"after %d\n" % round_
            assert source.status().errors == round_  # one per unplug, not one per retry
    events = [e["event"] for e in logs]
    assert events.count("serial_lost") == 5, events
    assert events.count("serial_reconnected") == 5
    assert "serial_open_failed" not in events  # retries during a fault are not logged again


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed")
def test_socat_pty_killed_and_restarted_under_the_same_path(tmp_path, started):
    link = tmp_path / "ttyV0"

    def run_socat() -> subprocess.Popen:
        proc = subprocess.Popen(
            ["socat", "-u", "STDIN", f"PTY,link={link},raw,echo=0"],
            stdin=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        wait_for(link.exists, what="socat link")
        return proc

    proc = run_socat()
    try:
        source = started(str(link))
        for round_ in range(3):
            wait_for(lambda: source.status().connected, what="connected")
            proc.stdin.write(b"line %d\n" % round_)
            proc.stdin.flush()
            assert read_exactly(source, 7) == b"line %d\n" % round_
            proc.send_signal(signal.SIGTERM)
            proc.wait(5)
            wait_for(lambda: not source.status().connected, what="socat exit noticed")
            proc = run_socat()
        wait_for(lambda: source.status().reconnects == 3, what="third reconnect")
    finally:
        proc.kill()
        proc.wait(5)


def test_second_reader_is_locked_out(device, started):
    device.plug()
    first = started(str(device.link))
    wait_for(lambda: first.status().connected, what="first connected")
    second = started(str(device.link))
    wait_for(lambda: second.status().errors == 1, what="second refused")
    assert not second.status().connected
    device.send(b"only one\n")
    assert read_exactly(first, 9) == b"only one\n"


def test_full_buffer_drops_oldest_and_counts(device, started):
    device.plug()
    source = started(str(device.link), buffer_bytes=100)
    wait_for(lambda: source.status().connected, what="connected")
    payload = bytes(i % 251 for i in range(1000))
    device.send(payload)
    wait_for(lambda: source.status().dropped_bytes == 900, what="900 bytes dropped")
    assert b"".join(c.data for c in source.read(0.1)) == payload[-100:]


def test_stop_is_prompt_idempotent_and_keeps_what_was_read(device, started):
    device.plug()
    source = started(str(device.link), timeout=30.0)  # a long port timeout: stop must not wait for it
    wait_for(lambda: source.status().connected, what="connected")
    device.send(b"last words\n")
    wait_for(lambda: source._buffer._size == 11, what="bytes buffered")
    source.stop()
    source.stop()
    assert not source._thread.is_alive()
    assert b"".join(c.data for c in source.read(1.0)) == b"last words\n"
    assert source.read(1.0) == []


def test_byte_buffer_keeps_the_newest_bytes():
    buf = ByteBuffer(max_bytes=5)
    assert [buf.put(b"abc"), buf.put(b"defg"), buf.put(b"0123456789")] == [0, 2, 10]
    assert b"".join(d for d, _ in buf.take(0)) == b"56789"
    assert buf.take(0.01) == []


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "port: required"),
        ({"port": "/dev/x", "baudrate": 0}, "baudrate: must be > 0"),
        ({"port": "/dev/x", "bytesize": 9}, "bytesize: expected 5, 6, 7 or 8"),
        ({"port": "/dev/x", "parity": "Q"}, "parity: expected N, E, O, M or S"),
        ({"port": "/dev/x", "stopbits": 3}, "stopbits: expected 1, 1.5 or 2"),
        ({"port": "/dev/x", "timeout": 0}, "timeout: must be > 0"),
        ({"port": "/dev/x", "reconnect_initial": 2, "reconnect_max": 1}, "need 0 < initial <= max"),
        ({"port": "/dev/x", "buffer_bytes": 0}, "buffer_bytes: must be >= 1"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        SerialOptions(**options)


def test_status_starts_disconnected():
    source = SerialSource(SerialOptions(port="/dev/none"))
    assert source.status() == SourceStatus()
