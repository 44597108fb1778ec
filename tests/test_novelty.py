"""The novelty detector: record-prefix counts, the empirical tail, and the scorer built on them."""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import pytest
import torch

from somad.checkpoint import load_checkpoint, save_checkpoint
from somad.learner import SomaLearner
from somad.model import preset
from somad.novelty import (
    MAX_FIELDS,
    EmpiricalTail,
    PrefixCounts,
    RepeatRuns,
    field_prefixes,
    split_fields,
)
from somad.scoring import AlertConfig, ScoringConfig, StreamScorer

ONE = np.ones(1)  # the novelty detector ignores soma's bits; the scorer still checks them


def readings(n: int, seed: int = 0, level: float = 20.0) -> list[bytes]:
    """A noisy sensor as value lines: the leading digits repeat, the last ones are noise."""
    rng = random.Random(seed)
    return [b"%.2f\n" % (level + 3.0 * np.sin(i / 10.0) + rng.gauss(0.0, 0.3)) for i in range(n)]


def test_a_prefix_seen_often_costs_little_and_a_new_leading_digit_much():
    counts = PrefixCounts(depth=4)
    for line in readings(2000):
        counts.observe(line)
    usual = counts.observe(b"21.37\n")
    assert usual < 8.0
    assert counts.observe(b"95.00\n") > usual + 10.0  # a leading digit never seen in 2000 records


def test_counts_are_all_time_a_level_seen_long_ago_is_not_new():
    counts = PrefixCounts(depth=4)
    for line in readings(500, level=80.0) + readings(3000, seed=1):
        counts.observe(line)
    assert counts.observe(b"80.12\n") < counts.observe(b"50.12\n")  # seen 3000 records ago vs never


def test_fields_are_counted_apart_so_a_timestamp_does_not_hide_the_value():
    counts = PrefixCounts(depth=4)
    lines = [b"2026-11-25T01:%02d:%02d," % (i // 60 % 60, i % 60) + line for i, line in enumerate(readings(3000))]
    for line in lines:
        counts.observe(line)
    assert counts.observe(b"2026-11-25T02:00:00,21.37\n") < 10.0
    assert counts.observe(b"2026-11-25T02:00:01,95.00\n") > 20.0


def test_field_prefixes_stop_at_max_fields():
    record = b",".join(b"%d" % i for i in range(MAX_FIELDS + 5)) + b"\n"
    assert field_prefixes(record, 3) == [b"%d" % i for i in range(MAX_FIELDS)]
    assert field_prefixes(b"", 3) == [b""]


def test_memory_is_fixed_whatever_the_stream_shows():
    counts = PrefixCounts(depth=6, slots=1 << 10)
    rng = random.Random(3)
    tracemalloc.start()
    try:
        for _ in range(20000):  # 20,000 random records: far more prefixes than slots
            counts.observe(rng.randbytes(12))
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(counts.tag) == len(counts.count) == len(counts.kids) == 1 << 10
    assert current < 64 << 10, current


def test_a_full_table_errs_towards_novelty():
    full = PrefixCounts(depth=6, slots=16)
    roomy = PrefixCounts(depth=6, slots=1 << 16)
    for i in range(200):
        line = b"%06d\n" % (i * 7919 % 1000000)
        full.observe(line)
        roomy.observe(line)
    probe = b"%06d\n" % (3 * 7919)
    assert full.observe(probe) >= roomy.observe(probe) - 1e-9


def test_counts_state_round_trips_and_refuses_another_shape():
    a = PrefixCounts(depth=4, slots=1 << 8)
    for line in readings(300):
        a.observe(line)
    b = PrefixCounts(depth=4, slots=1 << 8)
    b.load_state_dict(a.state_dict())
    for line in readings(50, seed=9):
        assert a.observe(line) == b.observe(line)
    with pytest.raises(ValueError, match="4 x 256 slots, expected 4 x 512"):
        PrefixCounts(depth=4, slots=1 << 9).load_state_dict(a.state_dict())
    state = a.state_dict()
    assert state["occupied"].size == int((np.frombuffer(a.tag, dtype=np.int64) != -1).sum()) < 256  # only what is used
    bad = a.state_dict()
    bad["count"][0] = -1
    with pytest.raises(ValueError, match="negative counts"):
        PrefixCounts(depth=4, slots=1 << 8).load_state_dict(bad)


def test_empirical_tail_says_how_rare_a_score_is_in_the_streams_history():
    tail = EmpiricalTail(warmup=10)
    rng = np.random.default_rng(0)
    for x in rng.normal(5.0, 1.0, 999):
        tail.judge(float(x))
    assert tail.judge(100.0) == pytest.approx(3.0, abs=0.01)  # none of 999 earlier: p = 1/1000
    assert tail.judge(5.0) < 0.5
    restored = EmpiricalTail(warmup=10)
    restored.load_state_dict(tail.state_dict())
    assert restored.judge(7.0) == tail.judge(7.0)
    with pytest.raises(ValueError, match="does not fit"):
        EmpiricalTail(bin_bits=0.5).load_state_dict(tail.state_dict())


def novelty_scorer(**alerts) -> StreamScorer:
    return StreamScorer("sensor", ScoringConfig(grace_period=100), AlertConfig(**alerts))


def test_the_default_detector_is_novelty_with_onsets():
    scoring = ScoringConfig()
    assert scoring.detector == "novelty" and scoring.onset_records == 200 and not scoring.needs_entropy


def test_a_spike_opens_one_alert_and_ordinary_readings_none():
    scorer = novelty_scorer()
    opened = []
    lines = readings(3000)
    lines[2000] = b"95.00\n"
    for i, line in enumerate(lines):
        _, events = scorer.score_record(line, ONE, now=float(i))
        opened += [i for e in events if e.kind == "open"]
    assert opened == [2000]


def test_a_new_level_alerts_at_its_onset_then_holds_back():
    scorer = novelty_scorer()
    lines = readings(2000) + readings(600, seed=2, level=60.0)  # the level jumps and stays
    triggers = []
    for i, line in enumerate(lines):
        _, events = scorer.score_record(line, ONE, now=float(i))
        triggers.append(scorer.last_trigger)
        if any(e.kind == "open" for e in events):
            assert 2000 <= i <= 2003, i
    assert scorer.alerts_total == 1
    assert max(triggers[2000:2004]) > 0.99
    assert sum(t > 0.99 for t in triggers[2100:]) == 0  # the new level, once seen, is no news


def test_novelty_scorer_resumes_exactly_from_a_checkpoint(tmp_path):
    a = novelty_scorer()
    lines = readings(800)
    for i, line in enumerate(lines[:500]):
        a.score_record(line, ONE, now=float(i))
    save_checkpoint(tmp_path / "m.pt", SomaLearner(preset("tiny")), extra={"scorer": a.state_dict()})
    saved = load_checkpoint(tmp_path / "m.pt").extra["scorer"]
    assert isinstance(saved["novelty"]["counts"]["tag"], torch.Tensor)  # arrays travel as tensors
    b = novelty_scorer()
    b.load_state_dict(saved)
    for i, line in enumerate(lines[500:], start=500):
        sa, _ = a.score_record(line, ONE, now=float(i))
        sb, _ = b.score_record(line, ONE, now=float(i))
        assert (sa.bits, sa.anomaly, a.last_trigger) == (sb.bits, sb.anomaly, b.last_trigger)


def test_a_state_without_novelty_or_of_another_size_starts_the_tables_fresh():
    a = novelty_scorer()
    for i, line in enumerate(readings(300)):
        a.score_record(line, ONE, now=float(i))
    old = {k: v for k, v in a.state_dict().items() if k not in ("novelty", "recent")} | {"version": 1}
    b = novelty_scorer()
    b.load_state_dict(old)
    assert b.records == 300 and b.tail.total == 0
    resized = StreamScorer("sensor", ScoringConfig(grace_period=100, novelty_slots=1 << 10))
    resized.load_state_dict(a.state_dict())
    assert resized.records == 300 and resized.tail.total == 0


def test_a_value_stuck_longer_than_its_usual_runs_is_rare_and_a_constant_field_never_judged():
    runs = RepeatRuns(warmup=50)
    lines = readings(1000)
    rarities = [runs.observe(split_fields(b"OK," + line)) for line in lines]  # field 0 never changes
    stuck = [runs.observe(split_fields(b"OK," + lines[-1])) for _ in range(5)]  # the reading freezes
    assert stuck == sorted(stuck) and stuck[-1] > 2.99  # rarer with every record it lasts: longer than every run before
    assert max(rarities) < stuck[-1] - 0.5  # (a reading repeated by chance once is rare-ish too: why this is an option)


def test_a_clock_that_stops_is_a_rare_run_too():
    runs = RepeatRuns(warmup=50)
    for i in range(2000):
        runs.observe(split_fields(b"%.1f,x\n" % (i // 20 / 10)))  # each clock value lasts 20 records
    assert runs.observe(split_fields(b"99.9,x\n")) < 0.5
    stopped = [runs.observe(split_fields(b"99.9,x\n")) for _ in range(25)]
    assert max(stopped[:18]) < 0.5 < stopped[-1]  # only past its usual 20 records


def test_with_repeats_a_stuck_sensor_alerts_at_the_start_of_the_run():
    scorer = StreamScorer("sensor", ScoringConfig(grace_period=100, novelty_repeats=True), AlertConfig())
    lines = readings(3000)
    lines[2000:2040] = [lines[1999]] * 40
    opened = []
    for i, line in enumerate(lines):
        _, events = scorer.score_record(line, ONE, now=float(i))
        opened += [i for e in events if e.kind == "open"]
    assert opened == [2001]  # the second record of the run is already longer than any run before
    restored = StreamScorer("sensor", ScoringConfig(grace_period=100, novelty_repeats=True), AlertConfig())
    restored.load_state_dict(scorer.state_dict())
    assert restored.runs.run.tolist() == scorer.runs.run.tolist()
