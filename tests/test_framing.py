"""Framing: records from scored bytes, whatever the chunking, with bounded memory."""

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from somad.framing import Framer, FramingConfig, Record, parse_escapes


def reference_records(cfg: FramingConfig, data: bytes, bits: np.ndarray) -> list[tuple[bytes, list[float], bool]]:
    """The records of the whole stream at once, written plainly: split at every end (or every
    ``length`` bytes), keep at most ``max_record_bytes`` of each; an unfinished record shows up
    only when it already overflowed."""
    limit = cfg.max_record_bytes
    records, start = [], 0
    if cfg.type == "fixed":
        ends = list(range(cfg.length, len(data) + 1, cfg.length))
    else:
        end, ends, pos = cfg.end_bytes, [], 0
        while (hit := data.find(end, pos)) >= 0:
            ends.append(hit + len(end))
            pos = hit + len(end)
    for stop in ends:
        records.append((data[start:stop][:limit], list(bits[start:stop][:limit]), stop - start > limit))
        start = stop
    if len(data) - start > limit:
        records.append((data[start : start + limit], list(bits[start : start + limit]), True))
    return records


def push_in_pieces(framer: Framer, data: bytes, bits: np.ndarray, cuts: list[int]) -> list[Record]:
    out, prev = [], 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out += framer.push(data[prev:cut], bits[prev:cut])
        prev = cut
    return out


def as_tuples(records: list[Record]) -> list[tuple[bytes, list[float], bool]]:
    return [(r.data, list(r.bits), r.cut) for r in records]


def scored(data: bytes, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(len(data)) * 8


# ---------------------------------------------------------------- each type


def test_lines_keep_their_newline_and_their_own_bits():
    framer = Framer(FramingConfig(type="lines"))
    records = framer.push(b"1.0\r\n22\n", np.arange(8.0))
    assert [r.data for r in records] == [b"1.0\r\n", b"22\n"]
    assert list(records[1].bits) == [5.0, 6.0, 7.0]
    assert [r.cut for r in records] == [False, False]
    assert framer.pending_bytes == 0 and framer.records == 2


def test_lines_across_chunks():
    framer = Framer(FramingConfig())
    assert framer.push(b"abc", np.ones(3)) == []
    assert framer.push(b"de", np.ones(2)) == []
    (record,) = framer.push(b"f\ng", np.full(3, 2.0))
    assert record.data == b"abcdef\n" and list(record.bits) == [1, 1, 1, 1, 1, 2, 2]
    assert framer.pending_bytes == 1


@pytest.mark.parametrize(
    "delimiter, stream, expected",
    [
        ("\\r\\n", b"a\r\nb\nc\r\n", [b"a\r\n", b"b\nc\r\n"]),
        ("\\x00", b"x\x00\x00yz\x00", [b"x\x00", b"\x00", b"yz\x00"]),
        ("END", b"oneENDtwoEN", [b"oneEND"]),
        ("||", b"a|||b||", [b"a||", b"|b||"]),
    ],
)
def test_delimiter(delimiter, stream, expected):
    framer = Framer(FramingConfig(type="delimiter", delimiter=delimiter))
    assert [r.data for r in framer.push(stream, scored(stream))] == expected


def test_multibyte_delimiter_split_at_every_point_across_chunks():
    cfg = FramingConfig(type="delimiter", delimiter="\\r\\n")
    stream = b"12.5\r\n13.0\r\n\r\n14\r\n"
    bits = scored(stream)
    whole = as_tuples(Framer(cfg).push(stream, bits))
    assert [r[0] for r in whole] == [b"12.5\r\n", b"13.0\r\n", b"\r\n", b"14\r\n"]
    for cut in range(len(stream) + 1):
        assert as_tuples(push_in_pieces(Framer(cfg), stream, bits, [cut])) == whole, cut
    one_by_one = push_in_pieces(Framer(cfg), stream, bits, list(range(len(stream))))
    assert as_tuples(one_by_one) == whole


def test_three_byte_delimiter_fed_one_byte_at_a_time():
    cfg = FramingConfig(type="delimiter", delimiter="<E>")
    stream = b"<<E><E<E>>x<E>"
    bits = scored(stream)
    records = push_in_pieces(Framer(cfg), stream, bits, list(range(len(stream))))
    assert as_tuples(records) == reference_records(cfg, stream, bits)
    assert [r.data for r in records] == [b"<<E>", b"<E<E>", b">x<E>"]


def test_fixed_across_chunks():
    framer = Framer(FramingConfig(type="fixed", length=4))
    assert [r.data for r in framer.push(b"abcdef", np.zeros(6))] == [b"abcd"]
    assert [r.data for r in framer.push(b"ghijklmnop", np.zeros(10))] == [b"efgh", b"ijkl", b"mnop"]
    assert framer.pending_bytes == 0 and framer.cut_records == 0


def test_message_appends_separator_and_is_one_record_per_push():
    framer = Framer(FramingConfig(type="message"))
    data = framer.learner_input(b"21.5 C", is_record=True)
    assert data == b"21.5 C\n"
    (record,) = framer.push(data, np.arange(7.0), is_record=True)
    assert record.data == b"21.5 C\n" and list(record.bits) == list(range(7)) and not record.cut
    assert [r.data for r in framer.push(b"no\nsplit\n", np.zeros(9), is_record=True)] == [b"no\nsplit\n"]


@pytest.mark.parametrize("separator, expected", [("", b"m"), ("\\x1e", b"m\x1e"), ("\\r\\n", b"m\r\n")])
def test_message_separator_choices(separator, expected):
    assert Framer(FramingConfig(type="message", separator=separator)).learner_input(b"m", True) == expected


def test_stream_framings_feed_the_learner_the_chunk_itself():
    for cfg in (FramingConfig(), FramingConfig(type="fixed", length=2), FramingConfig(type="delimiter", delimiter=";")):
        assert Framer(cfg).learner_input(b"abc", is_record=True) == b"abc"


def test_flush_gives_the_unfinished_record():
    framer = Framer(FramingConfig())
    framer.push(b"a\nlast", np.ones(6))
    (record,) = framer.flush()
    assert record.data == b"last" and not record.cut
    assert framer.flush() == [] and framer.pending_bytes == 0


# ---------------------------------------------------------------- cutting


def test_record_of_exactly_max_bytes_is_not_cut():
    framer = Framer(FramingConfig(max_record_bytes=4))
    assert [(r.data, r.cut) for r in framer.push(b"abc\n", np.zeros(4))] == [(b"abc\n", False)]
    assert framer.cut_records == 0 and framer.cut_bytes == 0


def test_long_record_is_cut_at_once_rest_counted_next_record_intact():
    framer = Framer(FramingConfig(max_record_bytes=4))
    first = framer.push(b"abcdef", np.arange(6.0))
    assert [(r.data, list(r.bits), r.cut) for r in first] == [(b"abcd", [0, 1, 2, 3], True)]
    assert framer.push(b"gh", np.zeros(2)) == []
    assert [r.data for r in framer.push(b"i\nok\n", np.zeros(5))] == [b"ok\n"]
    assert framer.stats() == {"bytes": 13, "records": 2, "cut_records": 1, "cut_bytes": 6}  # e f g h i \n


def test_cut_record_whose_delimiter_straddles_chunks():
    cfg = FramingConfig(type="delimiter", delimiter="\\r\\n", max_record_bytes=4)
    framer = Framer(cfg)
    records = framer.push(b"abcde\r", np.zeros(6)) + framer.push(b"\nxy\r\n", np.zeros(5))
    assert [(r.data, r.cut) for r in records] == [(b"abcd", True), (b"xy\r\n", False)]
    assert framer.cut_bytes == 3  # e \r \n


def test_long_message_is_cut():
    framer = Framer(FramingConfig(type="message", max_record_bytes=3))
    (record,) = framer.push(b"hello\n", np.arange(6.0), is_record=True)
    assert (record.data, list(record.bits), record.cut) == (b"hel", [0, 1, 2], True)
    assert (framer.cut_records, framer.cut_bytes) == (1, 3)


def test_ten_megabyte_line_uses_bounded_memory():
    framer = Framer(FramingConfig(max_record_bytes=4096))
    chunk = b"x" * 65536
    bits = np.ones(len(chunk))
    n_chunks = 160  # 10 MiB without a newline
    tracemalloc.start()
    try:
        records = []
        for _ in range(n_chunks):
            records += framer.push(chunk, bits)
        records += framer.push(b"\nnext\n", np.zeros(6))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(len(r.data), r.cut) for r in records] == [(4096, True), (5, False)]
    assert framer.cut_bytes == n_chunks * len(chunk) + 1 - 4096
    assert framer.pending_bytes == 0
    # A push holds its chunk's [bits, entropy] rows (16 B a byte: 1 MiB for 64 KiB); a line
    # buffered whole would take more than 10 MiB.
    assert peak < 2 << 20, f"framer allocated {peak} bytes at peak for 10 MiB of input"


@pytest.mark.parametrize(
    "cfg, expected_records",
    [
        (FramingConfig(max_record_bytes=512), 1),  # lines: one cut record, the flood skipped to its end
        (FramingConfig(type="delimiter", delimiter="\\x00"), 20000),  # each NUL ends an empty record
        (FramingConfig(type="fixed", length=100), 200),
    ],
)
def test_nul_flood(cfg, expected_records):
    flood = b"\x00" * 20000
    framer = Framer(cfg)
    records = push_in_pieces(framer, flood, np.zeros(len(flood)), list(range(0, 20000, 777)))
    assert len(records) == expected_records
    assert framer.pending_bytes <= cfg.max_record_bytes
    assert all(set(r.data) == {0} for r in records)


# ---------------------------------------------------------------- any chunking, any stream

CONFIGS = [
    FramingConfig(max_record_bytes=8),
    FramingConfig(type="delimiter", delimiter="\\r\\n", max_record_bytes=6),
    FramingConfig(type="delimiter", delimiter="aba", max_record_bytes=7),
    FramingConfig(type="fixed", length=3, max_record_bytes=8),
]


STREAM_BYTES = st.lists(st.sampled_from(b"ab\r\n"), max_size=100).map(bytes)  # few symbols: many delimiters


@settings(max_examples=200, deadline=None)
@given(cfg=st.sampled_from(CONFIGS), data=STREAM_BYTES, draw=st.data())
def test_any_chunking_gives_the_records_of_the_whole_stream(cfg, data, draw):
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=30))
    bits = scored(data, seed=len(data))
    framer = Framer(cfg)
    records = push_in_pieces(framer, data, bits, cuts)
    expected = reference_records(cfg, data, bits)
    assert as_tuples(records) == expected
    assert framer.cut_records == sum(cut for _, _, cut in expected)
    assert framer.pending_bytes <= cfg.max_record_bytes


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"type": "json"}, "type: expected one of"),
        ({"type": "delimiter"}, "delimiter: required"),
        ({"type": "lines", "delimiter": ";"}, 'delimiter: only used by type "delimiter"'),
        ({"type": "fixed"}, "length: type fixed needs"),
        ({"type": "fixed", "length": 5000}, "length: type fixed needs"),
        ({"type": "lines", "length": 3}, 'length: only used by type "fixed"'),
        ({"max_record_bytes": 0}, "max_record_bytes: must be >= 1"),
        ({"type": "delimiter", "delimiter": "\\xZZ"}, "delimiter: unknown escape"),
        ({"type": "message", "separator": "\\"}, "separator: unknown escape"),
    ],
)
def test_bad_config_is_rejected_with_the_option_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        FramingConfig(**kwargs)


def test_bits_must_match_the_bytes():
    with pytest.raises(ValueError, match="3 bytes but 2 bits"):
        Framer(FramingConfig()).push(b"ab\n", np.zeros(2))


def test_escapes():
    assert parse_escapes("\\t\\\\\\0\\xff é") == b"\t\\\x00\xff \xc3\xa9"
    assert parse_escapes("\r\n") == b"\r\n"  # real control characters (YAML double quotes) pass through


@pytest.mark.parametrize("cfg", [FramingConfig(), FramingConfig(type="fixed", length=4), FramingConfig(type="message")])
def test_entropy_travels_with_each_byte_across_chunks(cfg):
    framer = Framer(cfg)
    data = b"12.5\n13.1\n"
    bits, entropy = np.arange(10.0), 100.0 + np.arange(10.0)
    records = framer.push(data[:3], bits[:3], entropy=entropy[:3]) + framer.push(data[3:], bits[3:], entropy=entropy[3:])
    assert records
    for record in records:
        np.testing.assert_array_equal(record.entropy, record.bits + 100.0)


def test_records_have_no_entropy_unless_every_byte_had_one():
    framer = Framer(FramingConfig())
    assert framer.push(b"12.5\n", np.ones(5))[0].entropy is None
    records = framer.push(b"12", np.ones(2)) + framer.push(b".5\n", np.ones(3), entropy=np.ones(3))
    assert records[0].entropy is None
    with pytest.raises(ValueError, match="5 bytes but 4 entropy values"):
        framer.push(b"12.5\n", np.ones(5), entropy=np.ones(4))
