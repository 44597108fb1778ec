"""Serial source: bytes from a UART (USB-serial adapter, on-board UART, pty) with pyserial.

A reader thread owns the port. It opens it, reads whatever arrives into a bounded buffer
that ``read()`` empties, and when the port fails (the adapter was unplugged, the pty closed,
the path vanished) it closes it and reopens it with capped exponential backoff until the
device returns: pyserial never reopens a port by itself. Each fault is logged and counted
once, not once per retry. Prefer a ``/dev/serial/by-id/...`` path: it names the device, not
the order in which devices were plugged in, so it comes back under the same name.

>>> SerialSource.Options(port="/dev/ttyUSB0", parity="even").parity
'even'
>>> SerialSource.Options(port="/dev/ttyUSB0", stopbits=3)
Traceback (most recent call last):
...
ValueError: stopbits: expected 1, 1.5 or 2, got 3
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import serial
import structlog

from .base import Chunk, Source

log = structlog.get_logger("somad.adapters.serial")

PARITIES = {
    "n": serial.PARITY_NONE,
    "none": serial.PARITY_NONE,
    "e": serial.PARITY_EVEN,
    "even": serial.PARITY_EVEN,
    "o": serial.PARITY_ODD,
    "odd": serial.PARITY_ODD,
    "m": serial.PARITY_MARK,
    "mark": serial.PARITY_MARK,
    "s": serial.PARITY_SPACE,
    "space": serial.PARITY_SPACE,
}
STOPBITS = {1: serial.STOPBITS_ONE, 1.5: serial.STOPBITS_ONE_POINT_FIVE, 2: serial.STOPBITS_TWO}
READ_MAX = 65536  # most bytes taken from the port in one read call
PATH_POLL = 0.05  # seconds between looks for a vanished port's path while waiting to reopen


@dataclass(frozen=True)
class SerialOptions:
    port: str = ""  # device path, e.g. /dev/serial/by-id/usb-FTDI_..-if00-port0 (stable across replugs)
    baudrate: int = 115200  # bits per second
    bytesize: int = 8  # data bits: 5, 6, 7 or 8
    parity: str = "N"  # N/none, E/even, O/odd, M/mark, S/space
    stopbits: float = 1  # 1, 1.5 or 2
    timeout: float = 0.1  # seconds one port read waits for a first byte (bounds how soon stop and faults are seen)
    exclusive: bool = True  # lock the port so that a second reader cannot silently split the bytes
    reconnect_initial: float = 0.1  # seconds before the first reopen after a fault
    reconnect_max: float = 1.0  # cap of the doubling reopen delay: the device is back within this after it returns
    buffer_bytes: int = 1 << 20  # bytes held between the reader thread and read(); the oldest are dropped beyond

    def __post_init__(self) -> None:
        if not self.port:
            raise ValueError("port: required (a device path such as /dev/serial/by-id/...)")
        if self.baudrate <= 0:
            raise ValueError(f"baudrate: must be > 0, got {self.baudrate}")
        if self.bytesize not in (5, 6, 7, 8):
            raise ValueError(f"bytesize: expected 5, 6, 7 or 8, got {self.bytesize}")
        if str(self.parity).lower() not in PARITIES:
            raise ValueError(f"parity: expected N, E, O, M or S (or none, even, odd, mark, space), got {self.parity!r}")
        if self.stopbits not in STOPBITS:
            raise ValueError(f"stopbits: expected 1, 1.5 or 2, got {self.stopbits}")
        if self.timeout <= 0:
            raise ValueError(f"timeout: must be > 0 seconds, got {self.timeout}")
        if not 0 < self.reconnect_initial <= self.reconnect_max:
            raise ValueError(
                f"reconnect_initial, reconnect_max: need 0 < initial <= max, got {self.reconnect_initial}, {self.reconnect_max}"
            )
        if self.buffer_bytes < 1:
            raise ValueError(f"buffer_bytes: must be >= 1, got {self.buffer_bytes}")


class ByteBuffer:
    """A bounded FIFO of byte chunks between a producer thread and ``take``; over ``max_bytes``
    the oldest bytes go first, and ``put`` says how many it dropped.

    >>> buf = ByteBuffer(max_bytes=4)
    >>> buf.put(b"abc"), buf.put(b"de")
    (0, 1)
    >>> [data for data, _ in buf.take(timeout=0)]
    [b'bc', b'de']
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._chunks: deque[tuple[bytes, float]] = deque()  # (data, time.monotonic() of arrival)
        self._size = 0
        self._ready = threading.Condition()

    def put(self, data: bytes) -> int:
        with self._ready:
            self._chunks.append((data, time.monotonic()))
            self._size += len(data)
            dropped = self._drop_oldest(self._size - self.max_bytes)
            self._ready.notify_all()
            return dropped

    def take(self, timeout: float) -> list[tuple[bytes, float]]:
        """Everything buffered, waiting up to ``timeout`` seconds for something to arrive."""
        with self._ready:
            if not self._chunks:
                self._ready.wait(timeout)
            out = list(self._chunks)
            self._chunks.clear()
            self._size = 0
            return out

    def wake(self) -> None:
        with self._ready:
            self._ready.notify_all()

    def _drop_oldest(self, excess: int) -> int:
        dropped = 0
        while excess > 0:
            data, at = self._chunks[0]
            n = min(excess, len(data))
            if n == len(data):
                self._chunks.popleft()
            else:
                self._chunks[0] = (data[n:], at)
            excess -= n
            dropped += n
            self._size -= n
        return dropped


class SerialSource(Source):
    type_name = "serial"
    Options = SerialOptions

    def __init__(self, options: SerialOptions, name: str = ""):
        super().__init__(options, name)
        self.log = log.bind(stream=self.name, port=options.port)
        self._buffer = ByteBuffer(options.buffer_bytes)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._port: serial.Serial | None = None  # the open port, for stop() to cancel a pending read

    # ------------------------------------------------------------------ contract

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-serial", daemon=True)
        self._thread.start()

    def read(self, timeout: float) -> list[Chunk]:
        """The bytes that arrived, as one chunk stamped with the arrival of its first byte."""
        pieces = self._buffer.take(0 if self._stop.is_set() else timeout)
        if not pieces:
            return []
        return [Chunk(b"".join(data for data, _ in pieces), received_at=pieces[0][1])]

    def stop(self) -> None:
        self._stop.set()
        port = self._port
        if port is not None:
            # Wakes a read blocked in select at once; the port may be closing under us, and
            # then the read timeout bounds the wait anyway.
            with contextlib.suppress(Exception):
                port.cancel_read()
        if self._thread is not None:
            self._thread.join(1.0)
        self._buffer.wake()

    # ------------------------------------------------------------------ reader thread

    def _run(self) -> None:
        opts = self.options
        delay = opts.reconnect_initial
        connected_before = False
        in_fault = False  # inside one fault (logged and counted once, however many retries)
        down_since = time.monotonic()
        while not self._stop.is_set():
            try:
                port = self._open()
            except (serial.SerialException, OSError) as err:
                if not in_fault:
                    self._fault("serial_open_failed", err)
                    in_fault = True
                self._wait_to_reopen(delay)
                delay = min(2 * delay, opts.reconnect_max)
                continue
            in_fault = False
            self._connected(connected_before, time.monotonic() - down_since)
            connected_before = True
            up_since = time.monotonic()
            try:
                self._pump(port)
            except (serial.SerialException, OSError) as err:
                self._fault("serial_lost", err)
                in_fault = True
            finally:
                self._close(port)
                down_since = time.monotonic()
            # A port that failed right after opening (a device still settling) keeps the
            # delay growing instead of being reopened as fast as it fails.
            if time.monotonic() - up_since >= opts.reconnect_max:
                delay = opts.reconnect_initial
            elif in_fault:
                self._wait_to_reopen(delay)
                delay = min(2 * delay, opts.reconnect_max)

    def _wait_to_reopen(self, delay: float) -> None:
        """Wait ``delay`` seconds before the next open, but no longer than it takes a vanished
        port's path to reappear: a device plugged back in is opened at once (a UART keeps
        nothing for a reader that is not there, so every moment closed is data lost), while a
        port that exists and fails to open still backs off."""
        port = self.options.port
        absent = not os.path.exists(port)
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0 and not self._stop.wait(min(left, PATH_POLL)):
            if absent and os.path.exists(port):
                return

    def _open(self) -> serial.Serial:
        opts = self.options
        port = serial.Serial(
            port=None,  # configured first, opened below, so that a failed open leaves nothing behind
            baudrate=opts.baudrate,
            bytesize=opts.bytesize,
            parity=PARITIES[str(opts.parity).lower()],
            stopbits=STOPBITS[opts.stopbits],
            timeout=opts.timeout,
            exclusive=opts.exclusive,
        )
        port.port = opts.port
        port.open()
        self._port = port
        return port

    def _pump(self, port: serial.Serial) -> None:
        """Move bytes from the port to the buffer until stopped or the port fails."""
        while not self._stop.is_set():
            data = port.read(max(1, min(port.in_waiting, READ_MAX)))
            if data:
                dropped = self._buffer.put(data)
                if dropped:
                    self._count("dropped_bytes", dropped)
            elif not os.path.exists(self.options.port):
                # Some drivers leave a vanished device's descriptor quietly idle: trust the path.
                raise serial.SerialException(f"{self.options.port} no longer exists")

    def _close(self, port: serial.Serial) -> None:
        self._port = None
        self._update_status(connected=False)
        with contextlib.suppress(Exception):  # closing a vanished device may fail; it is gone either way
            port.close()

    def _connected(self, connected_before: bool, down_seconds: float) -> None:
        self._update_status(connected=True)
        if connected_before:
            self._count("reconnects")
            self.log.info("serial_reconnected", down_seconds=round(down_seconds, 3))
        else:
            self.log.info("serial_connected", baudrate=self.options.baudrate)

    def _fault(self, event: str, err: Exception) -> None:
        self._count("errors")
        self._update_status(connected=False, last_error=f"{event}: {err}")
        self.log.warning(event, error=str(err), retry_max_seconds=self.options.reconnect_max)
