"""Framing: cut a stream of scored bytes into records.

The learner sees bytes, the scorer and the sinks see records. The framer sits after the
learner: it is pushed each chunk's bytes *with* their per-byte loss (bits) and, when the
scorer needs it, each prediction's entropy; it carries partial records across chunks and
yields each finished ``Record`` with the bits (and entropy) of its own bytes.

Types:

- ``lines``: a record ends with ``\\n`` (included in the record, so ``\\r\\n`` lines keep
  their ``\\r``);
- ``delimiter``: a record ends with ``delimiter`` (one or more bytes, written with escapes
  such as ``"\\r\\n"``, ``"\\x00"``), found even when it is split across chunks;
- ``fixed``: every record is ``length`` bytes;
- ``message``: each chunk is one record (an MQTT message, a datagram). ``separator`` is
  appended to each message before learning (``learner_input``) so that the model sees where
  one message ends and the next begins; the record holds the message and its separator.

Memory never grows with input: a record longer than ``max_record_bytes`` is emitted cut
(its first ``max_record_bytes`` bytes, ``cut=True``) as soon as it overflows, and the rest
of it, up to its end, is counted in ``cut_bytes`` but not kept.

>>> import numpy as np
>>> framer = Framer(FramingConfig(type="lines"))
>>> [r.data for r in framer.push(b"12.5\\n13", np.ones(7))]
[b'12.5\\n']
>>> [(r.data, float(r.bits.sum())) for r in framer.push(b".1\\n", np.full(3, 2.0))]
[(b'13.1\\n', 8.0)]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAMING_TYPES = ("lines", "delimiter", "fixed", "message")
_SIMPLE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "0": "\0", "\\": "\\"}


def parse_escapes(text: str, what: str = "delimiter") -> bytes:
    """Bytes of a config string written with escapes (``\\n \\r \\t \\0 \\\\ \\xHH``); other
    characters are taken as UTF-8. ``what`` names the option in error messages.

    >>> parse_escapes("\\\\r\\\\n"), parse_escapes("\\\\x00"), parse_escapes("|")
    (b'\\r\\n', b'\\x00', b'|')
    >>> parse_escapes("\\\\q")
    Traceback (most recent call last):
    ...
    ValueError: delimiter: unknown escape '\\\\q' at position 0 in '\\\\q' (known: \\n \\r \\t \\0 \\\\ \\xHH)
    """
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out += ch.encode("utf-8")
            i += 1
            continue
        nxt = text[i + 1 : i + 2]
        if nxt in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[nxt].encode()
            i += 2
        elif nxt == "x" and _is_hex(text[i + 2 : i + 4]):
            out.append(int(text[i + 2 : i + 4], 16))  # one byte, even above 0x7f
            i += 4
        else:
            raise ValueError(
                f"{what}: unknown escape {text[i : i + 2]!r} at position {i} in {text!r} "
                "(known: \\n \\r \\t \\0 \\\\ \\xHH)"
            )
    return bytes(out)


def _is_hex(two: str) -> bool:
    return len(two) == 2 and all(c in "0123456789abcdefABCDEF" for c in two)


@dataclass(frozen=True)
class FramingConfig:
    type: str = "lines"  # lines | delimiter | fixed | message
    delimiter: str = ""  # "delimiter" only: the bytes that end a record, with escapes ("\\r\\n", "\\x00")
    length: int = 0  # "fixed" only: bytes per record
    max_record_bytes: int = 4096  # longer records are cut to this many bytes (the rest counted, not kept)
    separator: str = "\\n"  # "message" only: appended to each message before learning ("" for none)

    def __post_init__(self) -> None:
        if self.type not in FRAMING_TYPES:
            raise ValueError(f"type: expected one of {', '.join(FRAMING_TYPES)}, got {self.type!r}")
        if self.max_record_bytes < 1:
            raise ValueError(f"max_record_bytes: must be >= 1, got {self.max_record_bytes}")
        if self.type == "delimiter" and not self.delimiter:
            raise ValueError('delimiter: required for type "delimiter" (for example "\\r\\n" or "\\x00")')
        if self.type != "delimiter" and self.delimiter:
            raise ValueError(f'delimiter: only used by type "delimiter", not {self.type!r}')
        if self.type == "fixed" and not 1 <= self.length <= self.max_record_bytes:
            raise ValueError(f"length: type fixed needs 1 <= length <= max_record_bytes ({self.max_record_bytes}), got {self.length}")
        if self.type != "fixed" and self.length:
            raise ValueError(f'length: only used by type "fixed", not {self.type!r}')
        parse_escapes(self.delimiter, "delimiter")  # fail here, at load time, not on the first byte
        parse_escapes(self.separator, "separator")

    @property
    def end_bytes(self) -> bytes:
        """The bytes that end a record for ``lines`` and ``delimiter`` framing (else b"")."""
        if self.type == "lines":
            return b"\n"
        return parse_escapes(self.delimiter) if self.type == "delimiter" else b""

    @property
    def separator_bytes(self) -> bytes:
        return parse_escapes(self.separator, "separator")


@dataclass(frozen=True, eq=False)
class Record:
    data: bytes  # the record's bytes, its terminator included (cut records: the first max_record_bytes)
    bits: np.ndarray  # float64 loss of each byte of ``data``, in bits
    cut: bool = False  # the record was longer than max_record_bytes and was cut
    entropy: np.ndarray | None = None  # float64 entropy of each byte's prediction (bits), if the learner gave it


def _record(data: bytes, per_byte: np.ndarray, cut: bool) -> Record:
    """A Record from its bytes and their (n, 2) [bits, entropy] rows (entropy NaN: not given)."""
    entropy = per_byte[:, 1]
    return Record(data, per_byte[:, 0].copy(), cut, None if np.isnan(entropy).any() else entropy.copy())


class Framer:
    """Turns ``(bytes, bits[, entropy])`` chunks into ``Record``s; see the module docstring.

    >>> import numpy as np
    >>> framer = Framer(FramingConfig(type="fixed", length=3))
    >>> [r.data for r in framer.push(b"abcdefg", np.zeros(7))], framer.pending_bytes
    ([b'abc', b'def'], 1)
    """

    def __init__(self, cfg: FramingConfig):
        self.cfg = cfg
        self._end = cfg.end_bytes
        self._separator = cfg.separator_bytes
        self._limit = cfg.length if cfg.type == "fixed" else cfg.max_record_bytes
        self._data = bytearray(self._limit)  # the record being built (preallocated: no growth)
        self._per_byte = np.zeros((self._limit, 2), dtype=np.float64)  # [bits, entropy] of its bytes
        self._len = 0
        self._skipping = False  # inside an over-long record already emitted cut: drop until its end
        self._tail = b""  # the last len(delimiter)-1 bytes of the current record, to find split delimiters
        self.bytes = 0  # bytes pushed
        self.records = 0  # records emitted, cut ones included
        self.cut_records = 0  # records longer than max_record_bytes
        self.cut_bytes = 0  # bytes beyond max_record_bytes in cut records (scored, never emitted)

    @property
    def pending_bytes(self) -> int:
        """Bytes of the unfinished record held in the buffer."""
        return self._len

    def stats(self) -> dict:
        return {"bytes": self.bytes, "records": self.records, "cut_records": self.cut_records, "cut_bytes": self.cut_bytes}

    def learner_input(self, data: bytes, is_record: bool = False) -> bytes:
        """The bytes the learner should see for a chunk: the chunk itself, or for ``message``
        framing the message followed by the separator.

        >>> Framer(FramingConfig(type="message")).learner_input(b"21.5", is_record=True)
        b'21.5\\n'
        >>> Framer(FramingConfig()).learner_input(b"21.5", is_record=True)
        b'21.5'
        """
        return data + self._separator if self.cfg.type == "message" else data

    def push(self, data: bytes, bits, is_record: bool = False, entropy=None) -> list[Record]:
        """Records finished by ``data`` (the bytes given to the learner) and its per-byte ``bits``
        (and ``entropy`` of each byte's prediction, carried to ``Record.entropy`` when given).

        ``is_record`` is informational for stream framings (they cut by their own rule); with
        ``message`` framing every push is one record, whatever the source said.
        """
        per_byte = np.empty((len(data), 2), dtype=np.float64)
        for column, (name, values) in enumerate((("bits", bits), ("entropy", entropy))):
            if values is None:
                per_byte[:, column] = np.nan
                continue
            values = np.asarray(values, dtype=np.float64).reshape(-1)
            if len(values) != len(data):
                raise ValueError(f"push: {len(data)} bytes but {len(values)} {name} values")
            per_byte[:, column] = values
        self.bytes += len(data)
        if self.cfg.type == "message":
            return self._message(bytes(data), per_byte)
        if self.cfg.type == "fixed":
            return self._fixed(bytes(data), per_byte)
        return self._delimited(bytes(data), per_byte)

    def flush(self) -> list[Record]:
        """The unfinished record, if any (at the end of a finite source)."""
        if self._len == 0:
            self._tail, self._skipping = b"", False
            return []
        record = self._emit(cut=False)
        self._tail = b""
        self._skipping = False
        return [record]

    # ------------------------------------------------------------------ per type

    def _message(self, data: bytes, per_byte: np.ndarray) -> list[Record]:  # per_byte: (n, 2) rows of [bits, entropy]
        limit = self.cfg.max_record_bytes
        cut = len(data) > limit
        if cut:
            self.cut_records += 1
            self.cut_bytes += len(data) - limit
        self.records += 1
        return [_record(data[:limit], per_byte[:limit], cut)]

    def _fixed(self, data: bytes, per_byte: np.ndarray) -> list[Record]:
        out = []
        pos = 0
        if self._len == 0:  # whole records straight from the chunk
            whole = len(data) - len(data) % self._limit
            out = [self._whole(data, per_byte, p, p + self._limit) for p in range(0, whole, self._limit)]
            pos = whole
        while pos < len(data):
            take = min(self._limit - self._len, len(data) - pos)
            self._append(data[pos : pos + take], per_byte[pos : pos + take])
            pos += take
            if self._len == self._limit:
                out.append(self._emit(cut=False))
        return out

    def _delimited(self, data: bytes, per_byte: np.ndarray) -> list[Record]:
        end = self._end
        # Search the carried tail too, so that a delimiter split across two chunks is found.
        window = self._tail + data
        shift = len(self._tail)
        out: list[Record] = []
        start = 0  # where the current record's bytes begin in ``data``
        search_from = 0  # in ``window``
        while (hit := window.find(end, search_from)) >= 0:
            stop = hit + len(end) - shift  # just past the delimiter, in ``data`` (>= 1: the tail is shorter than ``end``)
            if self._len == 0 and not self._skipping and stop - start <= self._limit:
                out.append(self._whole(data, per_byte, start, stop))  # the common case, without the buffer
            else:
                out += self._take(data[start:stop], per_byte[start:stop], complete=True)
            start = stop
            search_from = hit + len(end)
        out += self._take(data[start:], per_byte[start:], complete=False)
        keep = len(end) - 1
        current = data[start:] if start > 0 else window
        self._tail = current[-keep:] if keep else b""
        return out

    # ------------------------------------------------------------------ buffer

    def _take(self, piece: bytes, per_byte: np.ndarray, complete: bool) -> list[Record]:
        """Add ``piece`` to the current record; ``complete``: it ends the record."""
        if self._skipping:
            self.cut_bytes += len(piece)
            self._skipping = not complete
            return []
        room = self._limit - self._len
        take = min(room, len(piece))
        self._append(piece[:take], per_byte[:take])
        excess = len(piece) - take
        if excess:
            # Over the limit: emit what fits now (an alert should not wait for the record's end).
            self.cut_records += 1
            self.cut_bytes += excess
            self._skipping = not complete
            return [self._emit(cut=True)]
        return [self._emit(cut=False)] if complete else []

    def _whole(self, data: bytes, per_byte: np.ndarray, start: int, stop: int) -> Record:
        self.records += 1
        return _record(data[start:stop], per_byte[start:stop], False)

    def _append(self, piece: bytes, per_byte: np.ndarray) -> None:
        n = len(piece)
        self._data[self._len : self._len + n] = piece
        self._per_byte[self._len : self._len + n] = per_byte
        self._len += n

    def _emit(self, cut: bool) -> Record:
        record = _record(bytes(self._data[: self._len]), self._per_byte[: self._len], cut)
        self._len = 0
        self.records += 1
        return record
