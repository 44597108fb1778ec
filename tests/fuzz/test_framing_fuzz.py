"""Fuzz the framers: for every framing type, any configuration, any bytes and any chunking, a
``Framer`` never raises and accounts for every byte it was given.

Invariants checked on each input:

- conservation: bytes in records + ``cut_bytes`` + ``pending_bytes`` == bytes pushed, before
  and after ``flush``;
- alignment: each record is a contiguous slice of the stream, in order, carrying the bits of
  exactly its own bytes (the bits given are the bytes' positions, so a shifted or reordered
  record shows);
- bounds: no record and no pending buffer longer than ``max_record_bytes`` (``length`` for
  fixed), ``cut`` set exactly on records that were longer;
- stream framings give the records of the whole stream at once, whatever the chunking
  (``tests.test_framing.reference_records``, the plain definition).

Two input sources: small documents drawn by hypothesis (shrinkable, alphabets biased towards
the delimiter so records end often), and large seeded streams (up to 1 MiB, records far over
the limit, NUL floods, long runs of one byte) for the paths that only long inputs reach.
``SOMAD_FUZZ_EXAMPLES=5000`` raises the number of inputs for a deeper run.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from somad.framing import Framer, FramingConfig, Record
from tests.faults.figures import record
from tests.test_framing import reference_records

FUZZ = settings(
    max_examples=int(os.environ.get("SOMAD_FUZZ_EXAMPLES", "300")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TRIED = {"inputs": 0, "bytes": 0, "records": 0, "failures": 0}  # this module's totals, recorded at the end


def escaped(raw: bytes) -> str:
    """A config string that means exactly ``raw`` (every byte written as ``\\xHH``)."""
    return "".join(f"\\x{b:02x}" for b in raw)


@st.composite
def configs(draw) -> FramingConfig:
    kind = draw(st.sampled_from(["lines", "delimiter", "fixed", "message"]))
    limit = draw(st.integers(1, 64) | st.sampled_from([4096, 65536]))
    if kind == "delimiter":
        # Short alphabets make self-overlapping delimiters ("aa", "aba") that straddle chunks.
        delimiter = draw(st.binary(min_size=1, max_size=4) | st.lists(st.sampled_from(b"ab"), min_size=1, max_size=4).map(bytes))
        return FramingConfig(type="delimiter", delimiter=escaped(delimiter), max_record_bytes=limit)
    if kind == "fixed":
        return FramingConfig(type="fixed", length=draw(st.integers(1, limit)), max_record_bytes=limit)
    if kind == "message":
        return FramingConfig(type="message", separator=escaped(draw(st.binary(max_size=3))), max_record_bytes=limit)
    return FramingConfig(type="lines", max_record_bytes=limit)


@st.composite
def streams(draw, cfg: FramingConfig) -> bytes:
    """Random bytes, or bytes from an alphabet holding the record ends (so records end often)."""
    ends = cfg.end_bytes or cfg.separator_bytes or b"\n"
    alphabet = sorted(set(ends) | set(draw(st.binary(min_size=1, max_size=4))))
    biased = st.lists(st.sampled_from(alphabet), max_size=600).map(bytes)
    return draw(st.binary(max_size=600) | biased)


def chunkings(n: int):
    """Cut points, duplicates allowed (empty chunks are pushed too)."""
    return st.lists(st.integers(0, n), max_size=40).map(sorted)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def push_all(framer: Framer, chunks: list[bytes], message: bool) -> tuple[bytes, list[Record]]:
    """Push every chunk (as the pipeline does: learner input first); returns the bytes the
    framer saw, in order, and the records it gave."""
    stream = bytearray()
    out: list[Record] = []
    for chunk in chunks:
        data = framer.learner_input(chunk, is_record=message)
        positions = np.arange(len(stream), len(stream) + len(data), dtype=np.float64)
        stream += data
        out += framer.push(data, positions, is_record=message)
        assert_conserved(framer, out, len(stream))
    return bytes(stream), out


def assert_conserved(framer: Framer, records: list[Record], pushed: int) -> None:
    kept = sum(len(r.data) for r in records)
    assert framer.bytes == pushed
    assert kept + framer.cut_bytes + framer.pending_bytes == pushed, (kept, framer.cut_bytes, framer.pending_bytes, pushed)
    assert framer.records == len(records)
    assert framer.cut_records == sum(r.cut for r in records)


def assert_aligned(cfg: FramingConfig, stream: bytes, records: list[Record]) -> None:
    limit = cfg.length if cfg.type == "fixed" else cfg.max_record_bytes
    previous_end = 0
    for r in records:
        assert len(r.data) == len(r.bits) and len(r.data) <= limit
        if not len(r.data):
            continue  # an empty message (no separator): nothing to place
        start = int(r.bits[0])
        assert start >= previous_end, "records overlap or come out of order"
        assert list(r.bits) == list(range(start, start + len(r.data))), "bits are not the record's own"
        assert stream[start : start + len(r.data)] == r.data
        previous_end = start + len(r.data)


def check(cfg: FramingConfig, chunks: list[bytes]) -> None:
    """Run one input through a fresh framer and check every invariant (counted in ``TRIED``)."""
    TRIED["inputs"] += 1
    try:
        framer = Framer(cfg)
        message = cfg.type == "message"
        stream, records = push_all(framer, chunks, message)
        assert framer.pending_bytes <= (cfg.length if cfg.type == "fixed" else cfg.max_record_bytes)
        if message:
            assert len(records) == len(chunks)  # one record per message, whatever it holds
            assert [r.cut for r in records] == [len(framer.learner_input(c, True)) > cfg.max_record_bytes for c in chunks]
        else:
            positions = np.arange(len(stream), dtype=np.float64)
            expected = reference_records(cfg, stream, positions)
            assert [(r.data, list(r.bits), r.cut) for r in records] == expected
        assert_aligned(cfg, stream, records)
        records += framer.flush()
        assert framer.pending_bytes == 0
        assert_conserved(framer, records, len(stream))
        assert_aligned(cfg, stream, records)
        TRIED["bytes"] += len(stream)
        TRIED["records"] += len(records)
    except Exception:
        TRIED["failures"] += 1
        raise


@pytest.fixture(scope="module", autouse=True)
def _record_inputs_tried():
    yield
    record("fuzz_framing", {**TRIED, "max_examples_per_test": FUZZ.max_examples})


@FUZZ
@given(st.data())
def test_any_config_any_bytes_any_chunking(draw):
    cfg = draw.draw(configs(), label="config")
    data = draw.draw(streams(cfg), label="data")
    check(cfg, pieces(data, draw.draw(chunkings(len(data)), label="cuts")))


@FUZZ
@given(cfg=configs(), messages=st.lists(st.binary(max_size=200), max_size=30))
def test_messages_of_any_content_under_every_framing(cfg, messages):
    """Whole messages (MQTT payloads, datagrams) as chunks, empty ones included."""
    check(cfg, messages)


LARGE_SHAPES = ("random", "nul_flood", "one_byte_run", "long_records", "ends_only")


def large_stream(shape: str, size: int, ends: bytes, rng: np.random.Generator) -> bytes:
    if shape == "random":
        return rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    if shape == "nul_flood":
        return bytes(size)
    if shape == "one_byte_run":
        return bytes([int(rng.integers(0, 256))]) * size
    if shape == "ends_only":
        return (ends * (size // len(ends) + 1))[:size]
    # long_records: records of random lengths around and far over the limit
    out = bytearray()
    while len(out) < size:
        out += rng.integers(32, 127, int(rng.integers(0, 20000)), dtype=np.uint8).tobytes() + ends
    return bytes(out[:size])


@settings(FUZZ, max_examples=max(10, FUZZ.max_examples // 10))
@given(cfg=configs(), shape=st.sampled_from(LARGE_SHAPES), size_log2=st.integers(8, 20), seed=st.integers(0, 2**32 - 1), n_chunks=st.integers(1, 64))
def test_large_streams_in_large_chunks(cfg, shape, size_log2, seed, n_chunks):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1 << (size_log2 - 1), (1 << size_log2) + 1))  # 128 B .. 1 MiB, every scale alike
    data = large_stream(shape, size, cfg.end_bytes or b"\n", rng)
    cuts = sorted(int(c) for c in rng.integers(0, len(data) + 1, n_chunks - 1))
    chunks = pieces(data, cuts)
    if cfg.type == "message":
        chunks = chunks[:200]  # each message is a record; keep the reference check cheap
    check(cfg, chunks)
