"""Per-record surprise: split per-byte losses at a delimiter and keep running statistics.

A small, pure helper for the embedded run loop; the full scoring module (likelihood,
alert state machine) builds on it.

>>> r = RecordSurprise()
>>> [round(s, 1) for s, _ in r.feed(b"ab\\ncd\\n", [1.0, 3.0, 2.0, 4.0, 4.0, 4.0])]
[2.0, 4.0]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator


class RunningStats:
    """Exponentially weighted mean and variance with a warm-up count."""

    def __init__(self, tau: float):
        self.a = 1.0 - 1.0 / tau
        self.mean = 0.0
        self.var = 0.0
        self.count = 0

    def update(self, x: float) -> None:
        if self.count == 0:
            self.mean = x
        else:
            diff = x - self.mean
            self.mean += (1.0 - self.a) * diff
            self.var = self.a * (self.var + (1.0 - self.a) * diff * diff)
        self.count += 1

    def zscore(self, x: float) -> float:
        return (x - self.mean) / math.sqrt(self.var + 1e-6)


class RecordSurprise:
    """Mean bits per record (bytes up to and including ``delimiter``)."""

    def __init__(self, delimiter: bytes = b"\n", max_record: int = 4096):
        self.delimiter = delimiter[0]
        self.max_record = max_record
        self._bits = 0.0
        self._record = bytearray()

    def feed(self, data: bytes, bits: Iterable[float]) -> Iterator[tuple[float, bytes]]:
        """Yield (mean bits, record bytes) for each record completed by ``data``."""
        for byte, b in zip(data, bits):
            self._bits += b
            if len(self._record) < self.max_record:
                self._record.append(byte)
            if byte == self.delimiter:
                n = max(1, len(self._record))
                yield self._bits / n, bytes(self._record)
                self._bits = 0.0
                self._record.clear()
