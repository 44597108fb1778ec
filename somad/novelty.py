"""Record novelty: how rare a record's leading bytes are in all of its stream's history.

soma learns online and forgets (SGD with a fixed rate): a reading outside everything the stream
has ever shown costs it about as much as an ordinary surprise, and a level it saw an hour ago
is as new to it as one it never saw. A stream's all-time memory of its records' *leading
bytes* sees both, without reading the bytes as numbers: each field's first ``depth`` bytes
(the sign, the leading digits, the decimal point) under a count model with all-time counts.
A record whose field starts the stream has never produced after thousands of records is
improbable; one it produces every day is not.

Two parts, each O(1) time per record and fixed memory per stream:

1. ``PrefixCounts``: counts of field prefixes (first 1..``depth`` bytes of each of the first
   ``MAX_FIELDS`` fields; fields end at ``FIELD_SEPARATORS``), hashed into a fixed table,
   with a PPM-style escape: a byte seen before after prefix q has probability
   ``c(qb) / (N + u + a)``, a new one ``(u + a) / (N + u + a) / (A - u)`` (N = c(q), u =
   distinct bytes seen after q, a = ``PRIOR``, A = byte values the stream has used). A
   prefix that keeps producing new bytes (the noisy last digits) expects novelty; a settled
   one does not. Record score: -log2 P(every field's prefix), in bits.
2. ``EmpiricalTail``: where a score falls in the stream's own history of scores, all time,
   in bins of ``bin_bits``: -log10 P(an earlier score >= this one), so rarity is judged
   against what this stream does (noisy streams produce rare prefixes often) and reads the
   same in every stream.

The table: each prefix lives in one of ``PROBES`` neighbouring slots of its 32-bit FNV-1a
hash, tagged with the full hash, so another prefix's count is never taken for its own. When
the probes are all taken, a prefix seen at most once is evicted (deep prefixes of noisy
readings mostly are); otherwise the new prefix is not stored and stays novel: a full table
errs towards novelty, never hides it.

>>> counts, tail = PrefixCounts(), EmpiricalTail()
>>> usual = [tail.judge(counts.observe(b"%d.5\\n" % (20 + i % 7))) for i in range(300)]
>>> max(usual[100:]) < 1.0, tail.judge(counts.observe(b"95.5\\n")) > 2.0
(True, True)
"""

from __future__ import annotations

import math
import re
import zlib
from array import array

import numpy as np

FNV_OFFSET, FNV_PRIME, MASK32 = 0x811C9DC5, 0x01000193, 0xFFFFFFFF
FIELD_SEPARATORS = b",;\t |"  # a field's prefix restarts after these (a CSV line's columns)
MAX_FIELDS = 8  # fields modelled per record; later ones are ignored
_FIELD_SPLIT = re.compile(b"[" + re.escape(FIELD_SEPARATORS) + b"]")
MAX_RUN = 4096  # repeat runs longer than this share the last bin of their tail
PRIOR = 0.5  # escape pseudo-count a (bench/nab_novelty: 0.5 and 1.0 within 0.1 NAB points)
PROBES = 4  # slots a prefix may live in
ONE_WAY_CHANGES = 1  # prefix changes (without returns to a known prefix) that mark a field as a clock (_one_way)
EMPTY = -1  # tag of a free slot


class PrefixCounts:
    """All-time counts of each field's leading bytes in a fixed table; see the module docstring."""

    def __init__(self, depth: int = 6, slots: int = 1 << 16):
        if not 1 <= depth <= 64:
            raise ValueError(f"novelty depth must be in 1..64, got {depth}")
        if slots < PROBES or slots & (slots - 1):
            raise ValueError(f"novelty slots must be a power of two >= {PROBES}, got {slots}")
        self.depth = depth  # leading bytes of each field that are modelled
        self.mask = slots - 1
        self.tag = array("q", [EMPTY]) * slots  # full hash of the prefix in each slot
        self.count = array("q", [0]) * slots  # records with that prefix
        self.kids = array("q", [0]) * slots  # distinct bytes seen after that prefix
        self.root = array("q", [0]) * (2 * MAX_FIELDS)  # per field: records that reached it, distinct first bytes
        self.used = bytearray(256)  # byte values seen in modelled prefixes
        self.n_used = 0
        cells = MAX_FIELDS * depth  # per (field, prefix length): is it a clock?
        self.last = array("q", [EMPTY]) * cells  # the previous record's prefix (hash)
        self.changes = array("q", [0]) * cells  # records whose prefix differed from the previous one's
        self.returns = array("q", [0]) * cells  # ... and had been seen before

    @property
    def slots(self) -> int:
        return self.mask + 1

    def observe(self, record: bytes) -> float:
        """-log2 P(the record's field prefixes) under the counts so far; then count them."""
        return self.observe_fields(split_fields(record))

    def observe_fields(self, fields: list[bytes]) -> float:
        """``observe`` for a record already split (``split_fields``)."""
        prefixes = [field[: self.depth] for field in fields]
        # In a one-field record the field is the reading itself: one that trends into new
        # ranges is just what NAB's anomalies are made of (skipping clocks there: -2.5 points).
        clocks = len(prefixes) > 1
        return sum(self._observe_field(field, prefix, clocks) for field, prefix in enumerate(prefixes))

    def _observe_field(self, field: int, prefix: bytes, skip_clocks: bool) -> float:
        n, u = self.root[2 * field], self.root[2 * field + 1]
        alphabet = max(self.n_used, 2)
        h = (FNV_OFFSET ^ field) * FNV_PRIME & MASK32  # the field's index seeds its prefixes' hashes
        bits, path = 0.0, []
        for cell, byte in enumerate(prefix, start=field * self.depth):
            h = ((h ^ byte) * FNV_PRIME) & MASK32
            slot = self._find(h)
            c = self.count[slot] if slot >= 0 else 0
            if not (skip_clocks and self._one_way(cell)):
                p = c / (n + u + PRIOR) if c > 0 else (u + PRIOR) / (n + u + PRIOR) / max(alphabet - u, 1)
                bits -= math.log2(p)
            self._track(cell, h, c > 0)
            path.append((h, slot))
            n, u = c, (self.kids[slot] if slot >= 0 else 0)
        self._count(field, prefix, path)
        return bits

    def _one_way(self, cell: int) -> bool:
        """Whether this field's prefix of this length, once left, (almost) never comes back: a
        clock, a counter or a sequence number. Its novelty tells the time, not the state, so
        it scores nothing (while it is counted as usual, and scores again once it returns)."""
        changes = self.changes[cell]
        return changes >= ONE_WAY_CHANGES and self.returns[cell] * 5 < changes

    def _track(self, cell: int, h: int, seen: bool) -> None:
        if h != self.last[cell]:
            self.changes[cell] += 1
            self.returns[cell] += seen
            self.last[cell] = h

    def _count(self, field: int, prefix: bytes, path: list[tuple[int, int]]) -> None:
        for byte in prefix:
            if not self.used[byte]:
                self.used[byte] = 1
                self.n_used += 1
        self.root[2 * field] += 1
        parent = -1  # slot of the previous prefix (-1: the field's empty prefix)
        for h, slot in path:
            if slot < 0:  # a new prefix: its parent gains a distinct next byte
                if parent < 0:
                    self.root[2 * field + 1] += 1
                else:
                    self.kids[parent] += 1
                slot = self._place(h)
                if slot < 0:
                    return  # not stored: its longer prefixes stay novel too
            self.count[slot] += 1
            parent = slot

    def _find(self, h: int) -> int:
        """The slot holding hash ``h``, or -1."""
        for i in range(PROBES):
            slot = (h + i) & self.mask
            if self.tag[slot] == h:
                return slot
        return -1

    def _place(self, h: int) -> int:
        """A slot for the new hash ``h`` (emptied), or -1 when its probes hold prefixes seen more than once."""
        best, best_count = -1, 2
        for i in range(PROBES):
            slot = (h + i) & self.mask
            if self.tag[slot] == EMPTY:
                best = slot
                break
            if self.count[slot] < best_count:
                best, best_count = slot, self.count[slot]
        if best >= 0:
            self.tag[best], self.count[best], self.kids[best] = h, 0, 0
        return best

    def state_dict(self) -> dict:
        """Numpy int64 arrays (a checkpoint stores them as tensors) and numbers. Only occupied
        slots are saved: a stream's file grows with the prefixes it has shown, up to 32 bytes a slot."""
        tag = np.frombuffer(self.tag, dtype=np.int64)
        occupied = np.flatnonzero(tag != EMPTY)
        def as_array(values):
            return np.frombuffer(values, dtype=np.int64).copy()
        return {
            "depth": self.depth,
            "slots": self.slots,
            "occupied": occupied.astype(np.int64),
            "tag": tag[occupied].copy(),
            "count": as_array(self.count)[occupied],
            "kids": as_array(self.kids)[occupied],
            "root": as_array(self.root),
            "used": np.frombuffer(bytes(self.used), dtype=np.uint8).astype(np.int64),
            "clocks": np.stack([as_array(self.last), as_array(self.changes), as_array(self.returns)]),
        }

    def load_state_dict(self, d: dict) -> None:
        """Resume from ``state_dict()`` of a table of the same depth and size (else ValueError)."""
        if int(d["depth"]) != self.depth or int(d["slots"]) != self.slots:
            raise ValueError(f"novelty table: depth {int(d['depth'])} x {int(d['slots'])} slots, expected {self.depth} x {self.slots}")
        a = {name: np.asarray(d[name], dtype=np.int64) for name in ("occupied", "tag", "count", "kids", "root", "used", "clocks")}
        n = a["occupied"].size
        shapes = {"occupied": (n,), "tag": (n,), "count": (n,), "kids": (n,), "root": (2 * MAX_FIELDS,), "used": (256,), "clocks": (3, MAX_FIELDS * self.depth)}
        wrong = [f"{name} has shape {a[name].shape}, expected {shape}" for name, shape in shapes.items() if a[name].shape != shape]
        if not wrong and (n and (a["occupied"].min() < 0 or a["occupied"].max() >= self.slots)):
            wrong.append("slot index out of range")
        if not wrong and min(a["count"].min(initial=0), a["kids"].min(initial=0), a["root"].min(), a["clocks"][1:].min()) < 0:
            wrong.append("negative counts")
        if wrong:
            raise ValueError("novelty table: " + "; ".join(wrong))
        tag, count, kids = np.full(self.slots, EMPTY, np.int64), np.zeros(self.slots, np.int64), np.zeros(self.slots, np.int64)
        tag[a["occupied"]], count[a["occupied"]], kids[a["occupied"]] = a["tag"], a["count"], a["kids"]
        self.tag, self.count, self.kids = array("q", tag.tobytes()), array("q", count.tobytes()), array("q", kids.tobytes())
        self.root = array("q", a["root"].tobytes())
        self.used = bytearray((a["used"] != 0).astype(np.uint8).tobytes())
        self.n_used = sum(self.used)
        self.last, self.changes, self.returns = (array("q", row.tobytes()) for row in a["clocks"])


def split_fields(record: bytes) -> list[bytes]:
    """The record's first ``MAX_FIELDS`` fields (separators dropped; the last keeps the record's end).

    >>> split_fields(b"2026-11-25T01:00:00,21.5\\n")
    [b'2026-11-25T01:00:00', b'21.5\\n']
    """
    return _FIELD_SPLIT.split(record, MAX_FIELDS)[:MAX_FIELDS]


def field_prefixes(record: bytes, depth: int) -> list[bytes]:
    """The first ``depth`` bytes of each of the record's first ``MAX_FIELDS`` fields.

    >>> field_prefixes(b"2026-11-25T01:00:00,21.5\\n", 4)
    [b'2026', b'21.5']
    >>> field_prefixes(b"12345.678\\n", 6)
    [b'12345.']
    """
    return [field[:depth] for field in split_fields(record)]


class RepeatRuns:
    """How unusually long each field's current run of identical values is, against the runs it
    has completed so far: a sensor stuck on one reading shows nothing new, only too much of the
    same. A field that never changes has completed no run and so is never judged; a clock that
    repeats each value 20 times is judged when one lasts longer (it stopped)."""

    def __init__(self, warmup: int = 100):
        self.last = array("q", [EMPTY]) * MAX_FIELDS  # CRC-32 of each field's previous value
        self.run = array("q", [0]) * MAX_FIELDS  # records its current value has lasted
        self.tails = [EmpiricalTail(bin_bits=1.0, max_bits=MAX_RUN, warmup=warmup) for _ in range(MAX_FIELDS)]

    def observe(self, fields: list[bytes]) -> float:
        """-log10 P(a completed run >= the current one), the rarest over the fields; then count."""
        rarity = 0.0
        for i, field in enumerate(fields):
            crc = zlib.crc32(field)
            if crc == self.last[i]:
                self.run[i] += 1
            else:
                if self.run[i]:
                    self.tails[i].add(self.run[i])  # the run that just ended
                self.last[i], self.run[i] = crc, 1
            rarity = max(rarity, self.tails[i].rarity(self.run[i]))
        return rarity

    def state_dict(self) -> dict:
        return {"last": np.frombuffer(self.last, dtype=np.int64).copy(), "run": np.frombuffer(self.run, dtype=np.int64).copy(),
                "tails": [tail.state_dict() for tail in self.tails]}  # fmt: skip

    def load_state_dict(self, d: dict) -> None:
        last, run = np.asarray(d["last"], dtype=np.int64), np.asarray(d["run"], dtype=np.int64)
        if last.shape != (MAX_FIELDS,) or run.shape != (MAX_FIELDS,) or (run < 0).any() or len(d["tails"]) != MAX_FIELDS:
            raise ValueError(f"repeat runs: state does not fit {MAX_FIELDS} fields")
        for tail, saved in zip(self.tails, d["tails"]):
            tail.load_state_dict(saved)
        self.last, self.run = array("q", last.tobytes()), array("q", run.tobytes())


class EmpiricalTail:
    """The upper tail of a stream's record scores over all its history, in fixed bins."""

    def __init__(self, bin_bits: float = 0.125, max_bits: float = 256.0, warmup: int = 100):
        if not bin_bits > 0 or not max_bits > bin_bits or warmup < 0:
            raise ValueError(f"empirical tail: need bin_bits > 0, max_bits > bin_bits, warmup >= 0, got {bin_bits}, {max_bits}, {warmup}")
        self.bin_bits = bin_bits  # resolution (scores in one bin tie)
        self.bins = array("q", [0]) * (int(max_bits / bin_bits) + 1)  # scores above max_bits share the last bin
        self.total = 0
        self.warmup = warmup  # records before any judgement (0 until then)

    def judge(self, score: float) -> float:
        """``rarity(score)``, then count the score.

        >>> tail = EmpiricalTail(warmup=3)
        >>> [round(tail.judge(s), 3) for s in (1.0, 1.0, 1.0, 1.0, 5.0, 1.0)]
        [0.0, 0.0, 0.0, 0.0, 0.699, 0.0]
        """
        out = self.rarity(score)
        self.add(score)
        return out

    def rarity(self, score: float) -> float:
        """-log10 P(a score counted so far >= ``score``), one pseudo-observation added (0 during the warm-up)."""
        if self.total < self.warmup:
            return 0.0
        at_least = sum(self.bins[self._bin(score) :])
        return -math.log10((at_least + 1.0) / (self.total + 1.0)) + 0.0  # + 0.0: no -0.0

    def add(self, score: float) -> None:
        self.bins[self._bin(score)] += 1
        self.total += 1

    def _bin(self, score: float) -> int:
        return min(max(int(score / self.bin_bits), 0), len(self.bins) - 1)

    def state_dict(self) -> dict:
        return {"bin_bits": self.bin_bits, "bins": np.frombuffer(self.bins, dtype=np.int64).copy(), "total": self.total}

    def load_state_dict(self, d: dict) -> None:
        bins = np.asarray(d["bins"])
        if float(d["bin_bits"]) != self.bin_bits or bins.shape != (len(self.bins),) or (bins < 0).any() or int(d["total"]) != int(bins.sum()):
            raise ValueError(f"empirical tail: state does not fit {len(self.bins)} bins of {self.bin_bits} bits")
        self.bins = array("q", bins.astype(np.int64).tobytes())
        self.total = int(d["total"])
