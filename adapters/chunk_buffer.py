"""A bounded hand-over of chunks from a source's I/O thread to ``Source.read(timeout)``.

The I/O thread (a paho network loop, a selector loop) must never grow memory without bound
when the pipeline falls behind. The buffer holds at most ``max_bytes`` bytes of data and at
most ``max_chunks`` chunks (the second bound keeps empty messages bounded too). What happens
when it is full is the producer's choice, because it depends on the transport:

- ``offer`` refuses, so a stream socket stops reading and TCP flow control pushes back on the
  sender: nothing is lost;
- ``push_evicting`` drops the oldest chunks to make room (live feeds that cannot push back,
  such as MQTT deliveries and UDP datagrams) and returns how many bytes it dropped, so the
  caller can count them.

>>> from adapters.base import Chunk
>>> buf = ChunkBuffer(max_bytes=8, max_chunks=4)
>>> buf.offer(Chunk(b"abcdef")), buf.offer(Chunk(b"ghi"))
(True, False)
>>> buf.push_evicting(Chunk(b"ghi"))
6
>>> [c.data for c in buf.take(timeout=0)]
[b'ghi']
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from adapters.base import Chunk


class ChunkBuffer:
    def __init__(self, max_bytes: int, max_chunks: int, on_space: Callable[[], None] | None = None):
        if max_bytes < 1 or max_chunks < 1:
            raise ValueError(f"buffer bounds must be >= 1, got max_bytes={max_bytes}, max_chunks={max_chunks}")
        self.max_bytes = max_bytes
        self.max_chunks = max_chunks
        self._on_space = on_space  # called (outside the lock) when a take frees a refused producer
        self._chunks: deque[Chunk] = deque()
        self._bytes = 0
        self._refused = False  # a producer was turned away; tell it when room appears
        self._closed = False
        self._cond = threading.Condition()

    @property
    def queued_bytes(self) -> int:
        with self._cond:
            return self._bytes

    def room(self) -> int:
        """Bytes that the next chunk may carry (0 when the buffer is full in bytes or chunks).

        A producer that finds no room is remembered, and ``on_space`` is called once a reader
        frees some, so it can resume without polling.
        """
        with self._cond:
            free = 0 if len(self._chunks) >= self.max_chunks else self.max_bytes - self._bytes
            if free <= 0:
                self._refused = True
            return max(free, 0)

    def offer(self, chunk: Chunk) -> bool:
        """Append ``chunk`` if it fits; otherwise leave the buffer as it is and return False."""
        with self._cond:
            if len(self._chunks) >= self.max_chunks or self._bytes + len(chunk.data) > self.max_bytes:
                self._refused = True
                return False
            self._append(chunk)
            return True

    def push_evicting(self, chunk: Chunk) -> int:
        """Append ``chunk``, dropping the oldest chunks until it fits; returns the bytes dropped.

        A chunk larger than ``max_bytes`` on its own is dropped itself (its size is returned).
        """
        if len(chunk.data) > self.max_bytes:
            return len(chunk.data)
        dropped = 0
        with self._cond:
            while self._chunks and (
                len(self._chunks) >= self.max_chunks or self._bytes + len(chunk.data) > self.max_bytes
            ):
                old = self._chunks.popleft()
                self._bytes -= len(old.data)
                dropped += len(old.data)
            self._append(chunk)
        return dropped

    def take(self, timeout: float) -> list[Chunk]:
        """Everything queued, waiting up to ``timeout`` seconds for the first chunk."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            while not self._chunks and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            out = list(self._chunks)
            self._chunks.clear()
            self._bytes = 0
            notify = self._refused and bool(out)
            if notify:
                self._refused = False
        if notify and self._on_space is not None:
            self._on_space()
        return out

    def close(self) -> None:
        """Wake any reader now; later ``take`` calls return what is left without waiting."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _append(self, chunk: Chunk) -> None:
        self._chunks.append(chunk)
        self._bytes += len(chunk.data)
        self._cond.notify_all()
