"""Stdin source: bytes piped into the daemon (``sensor-reader | somad run ...``).

``read(timeout)`` waits for the descriptor with ``poll`` (which also works when stdin is a
regular file, unlike epoll), so it never blocks the pipeline longer than ``timeout``. At end
of input it delivers what it read and raises ``SourceEnded`` on the next call. The
descriptor is not closed on ``stop()``: the process owns its standard input.

>>> StdinSource.Options().fd
0
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from dataclasses import dataclass

import structlog

from .base import Chunk, Source, SourceEnded

log = structlog.get_logger("somad.adapters.stdin")

READ_SIZE = 65536  # bytes per chunk


@dataclass(frozen=True)
class StdinOptions:
    fd: int = 0  # file descriptor to read: 0 is standard input (another, e.g. one passed by a supervisor)

    def __post_init__(self) -> None:
        if self.fd < 0:
            raise ValueError(f"fd: must be >= 0, got {self.fd}")


class StdinSource(Source):
    type_name = "stdin"
    Options = StdinOptions

    def __init__(self, options: StdinOptions | None = None, name: str = ""):
        super().__init__(options or StdinOptions(), name)
        self.log = log.bind(stream=self.name, fd=self.options.fd)
        self._poller = select.poll()
        self._ended = False  # end of input seen; SourceEnded once nothing is left to deliver
        self._stopped = threading.Event()
        self.bytes_read = 0

    def start(self) -> None:
        try:
            os.fstat(self.options.fd)
        except OSError as err:
            raise ValueError(f"fd: {self.options.fd} is not an open descriptor ({err})") from None
        self._poller.register(self.options.fd, select.POLLIN)
        self._update_status(connected=True)

    def read(self, timeout: float) -> list[Chunk]:
        if self._ended:
            raise SourceEnded(f"end of input on fd {self.options.fd} after {self.bytes_read} bytes")
        deadline = time.monotonic() + timeout
        # Poll in short slices so that stop() is seen within a fraction of a second.
        while not self._stopped.is_set():
            remaining = deadline - time.monotonic()
            if not self._poller.poll(max(0, min(remaining, 0.1)) * 1000):
                if remaining <= 0.1:
                    return []
                continue
            data = self._read_available()
            if data is None:
                continue  # woken without bytes (EAGAIN): wait on
            if not data:
                self._end()
                raise SourceEnded(f"end of input on fd {self.options.fd} after {self.bytes_read} bytes")
            self.bytes_read += len(data)
            return [Chunk(data, received_at=time.monotonic())]
        return []

    def stop(self) -> None:
        self._stopped.set()

    def _read_available(self) -> bytes | None:
        """The bytes that are there (b"" at end of input, None when there were none after all)."""
        try:
            return os.read(self.options.fd, READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as err:
            if err.errno == errno.EINTR:
                return None
            # A hung-up terminal (EIO) or a closed descriptor: nothing more will come.
            self._count("errors")
            self._update_status(last_error=f"read failed: {err}")
            self.log.warning("stdin_read_failed", error=str(err))
            return b""

    def _end(self) -> None:
        self._ended = True
        self._update_status(connected=False)
        self.log.info("stdin_ended", bytes=self.bytes_read)
