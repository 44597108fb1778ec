"""The bounded queue between a source and its learner.

Holds at most ``max_bytes`` bytes of chunks. When full, the policy decides:

- ``block``: the producer waits (files, stdin: the source can be paused without loss);
- ``drop_oldest``: the oldest chunks are dropped to make room (live feeds: the newest data
  matters most), and every dropped byte is counted.

A chunk larger than the whole queue is cut to its last ``max_bytes`` bytes under
``drop_oldest`` (and counted), and admitted alone under ``block``. Memory never grows with
input.

>>> from adapters.base import Chunk
>>> q = ChunkQueue(max_bytes=8, policy="drop_oldest")
>>> for part in (b"abcd", b"efgh", b"ij"):
...     q.put(Chunk(part))
True
True
True
>>> [c.data for c in q.get(timeout=0)], q.dropped_bytes
([b'efgh', b'ij'], 4)
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import replace

from adapters.base import Chunk

POLICIES = ("block", "drop_oldest")


class ChunkQueue:
    def __init__(self, max_bytes: int = 1 << 20, policy: str = "drop_oldest"):
        if policy not in POLICIES:
            raise ValueError(f"queue policy must be one of {POLICIES}, got {policy!r}")
        if max_bytes < 1:
            raise ValueError(f"queue max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self.policy = policy
        self._chunks: collections.deque[Chunk] = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._closed = False
        self.dropped_bytes = 0
        self.dropped_chunks = 0
        self.high_water_bytes = 0  # the most bytes ever queued at once

    def __len__(self) -> int:
        return len(self._chunks)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def put(self, chunk: Chunk, timeout: float | None = None) -> bool:
        """Queue ``chunk``. Under ``block`` waits for room (False on timeout: try again).
        After ``close`` the chunk is refused and its bytes are counted as dropped."""
        with self._cond:
            if self._closed:
                self.dropped_bytes += len(chunk.data)  # read from the source but never queued
                return False
            if self.policy == "block":
                deadline = None if timeout is None else time.monotonic() + timeout
                while self._bytes and self._bytes + len(chunk.data) > self.max_bytes and not self._closed:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining if remaining is not None else 0.5)
                if self._closed:
                    self.dropped_bytes += len(chunk.data)
                    return False
            else:
                chunk = self._make_room(chunk)
            self._chunks.append(chunk)
            self._bytes += len(chunk.data)
            self.high_water_bytes = max(self.high_water_bytes, self._bytes)
            self._cond.notify_all()
            return True

    def _make_room(self, chunk: Chunk) -> Chunk:
        if len(chunk.data) > self.max_bytes:  # keep the newest bytes of an oversized chunk
            cut = len(chunk.data) - self.max_bytes
            self.dropped_bytes += cut
            chunk = replace(chunk, data=chunk.data[cut:])
        while self._bytes + len(chunk.data) > self.max_bytes:
            old = self._chunks.popleft()
            self._bytes -= len(old.data)
            self.dropped_bytes += len(old.data)
            self.dropped_chunks += 1
        return chunk

    def get(self, timeout: float | None = None, max_bytes: int | None = None) -> list[Chunk]:
        """Chunks in order, up to ``max_bytes`` in total (at least one if any); [] on timeout."""
        with self._cond:
            if not self._chunks and not self._closed:
                self._cond.wait(timeout)
            out: list[Chunk] = []
            taken = 0
            while self._chunks and (max_bytes is None or not out or taken + len(self._chunks[0].data) <= max_bytes):
                chunk = self._chunks.popleft()
                taken += len(chunk.data)
                out.append(chunk)
            self._bytes -= taken
            if out:
                self._cond.notify_all()
            return out

    def close(self) -> None:
        """Wake every waiter; later puts are refused, gets drain what is left."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
