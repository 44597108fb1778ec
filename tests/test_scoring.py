"""Scoring: record scores, the anomaly score, the alert state machine, timescales and
persistence on hand-made sequences, then the whole path on a real learner with injected faults."""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from somad.events import AlertEvent, RecordScored
from somad.learner import LearnerConfig, SomaLearner
from somad.model import PHI, preset
from somad.scoring import (
    AlertConfig,
    AlertState,
    RunningMoments,
    ScoringConfig,
    StreamScorer,
    anomaly_from_tail,
    band_taus,
    band_timescales,
    gaussian_tail,
    record_score,
)

# ---------------------------------------------------------------------------- helpers



def surprise(**fields) -> ScoringConfig:
    """The surprise detector (soma's loss against its running statistics), every record judged
    (no onset filter): the machinery these tests pin down. The novelty detector: test_novelty."""
    return ScoringConfig(detector="surprise", onset_records=0, **fields)

def steady_bits(rng: np.random.Generator, n_bytes: int = 6, level: float = 2.0, noise: float = 0.2) -> np.ndarray:
    """Per-byte losses of an ordinary record: a level plus Gaussian noise."""
    return level + noise * rng.standard_normal(n_bytes)


def feed(scorer: StreamScorer, bits_list, start: float = 0.0, record: bytes = b"12.5\n", **kw) -> list[tuple[RecordScored, list[AlertEvent]]]:
    """Score a list of per-byte loss arrays, one record each, one second apart."""
    return [scorer.score_record(record, bits, now=start + i, **kw) for i, bits in enumerate(bits_list)]


def opened(results) -> list[int]:
    return [scored.index for scored, events in results for e in events if e.kind == "open"]


def fast_scorer(**scoring) -> StreamScorer:
    """A scorer with a short warm-up, for hand-made sequences."""
    return StreamScorer("s", surprise(grace_period=50, **scoring), AlertConfig(close_after=1, cooldown_records=0))


# ---------------------------------------------------------------------------- record scores


@pytest.mark.parametrize(
    "how, bits, entropy, expected",
    [
        ("mean", [1.0, 2.0, 6.0], None, 3.0),
        ("max", [1.0, 2.0, 6.0], None, 6.0),
        ("sum", [1.0, 2.0, 6.0], None, 9.0),
        ("mean_excess", [1.0, 2.0, 6.0], [2.0, 2.0, 1.0], 4.0 / 3.0),  # -1, 0, 5
        ("max_excess", [1.0, 2.0, 6.0], [2.0, 2.0, 1.0], 5.0),
        ("sum_excess", [1.0, 2.0, 6.0], [2.0, 2.0, 1.0], 5.0),  # only the positive excess counts
    ],
)
def test_record_score_modes(how, bits, entropy, expected):
    ent = np.array(entropy) if entropy is not None else None
    assert record_score(np.array(bits), how, ent) == pytest.approx(expected)
    scorer = StreamScorer("s", surprise(record_score=how))
    assert scorer.record_score(np.array(bits), ent) == pytest.approx(expected)
    scored, _ = scorer.score_record(b"abc", np.array(bits), entropy=ent)
    assert scored.bits == pytest.approx(expected)


def test_record_score_accepts_the_learners_tensor():
    assert record_score(torch.tensor([1.0, 3.0])) == pytest.approx(2.0)


def test_excess_without_entropy_is_a_clear_error():
    scorer = StreamScorer("uart0", surprise(record_score="mean_excess"))
    with pytest.raises(ValueError, match=r"uart0.*record 0.*entropy"):
        scorer.score_record(b"1\n", np.array([1.0, 2.0]))


@pytest.mark.parametrize(
    "bits, kwargs, message",
    [
        ([], {}, "empty record"),
        ([1.0, float("nan")], {}, "finite"),
        ([1.0, float("inf")], {}, "finite"),
        ([1.0, 2.0], {"entropy": np.array([1.0])}, "one value per byte"),
        ([1.0, 2.0], {"band_power": np.ones(5)}, "band_power has 5 bands, band_taus 3"),
        ([1.0, 2.0], {"now": float("nan")}, "now must be finite"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(bits, kwargs, message):
    scorer = StreamScorer("s", surprise(grace_period=5), band_taus=[1.0, 2.0, 4.0])
    rng = np.random.default_rng(0)
    feed(scorer, [steady_bits(rng) for _ in range(20)])
    before = json.dumps(scorer.state_dict())
    with pytest.raises(ValueError, match=message):
        scorer.score_record(b"x\n", np.array(bits), **kwargs)
    assert json.dumps(scorer.state_dict()) == before


# ---------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "cls, field, value, message",
    [
        (ScoringConfig, "record_score", "median", "scoring.record_score"),
        (ScoringConfig, "detector", "htm", "scoring.detector"),
        (ScoringConfig, "novelty_depth", 0, "scoring.novelty_depth"),
        (ScoringConfig, "novelty_slots", 1000, "scoring.novelty_slots"),
        (ScoringConfig, "onset_records", -1, "scoring.onset_records"),
        (ScoringConfig, "direction", "low", "scoring.direction"),
        (ScoringConfig, "grace_period", -1, "scoring.grace_period"),
        (ScoringConfig, "fast_records", 0, "scoring.fast_records"),
        (ScoringConfig, "slow_records", 4.0, "scoring.slow_records"),
        (ScoringConfig, "clip_z", 0.0, "scoring.clip_z"),
        (ScoringConfig, "min_std", 0.0, "scoring.min_std"),
        (ScoringConfig, "base", 1.0, "scoring.base"),
        (AlertConfig, "threshold", 1.5, "alerts.threshold"),
        (AlertConfig, "n_of_m", (3, 2), "alerts.n_of_m"),
        (AlertConfig, "n_of_m", 2, "alerts.n_of_m"),
        (AlertConfig, "n_of_m", (1.0, 2), "alerts.n_of_m"),
        (AlertConfig, "close_below", 0.9995, "alerts.close_below"),
        (AlertConfig, "close_after", 0, "alerts.close_after"),
        (AlertConfig, "cooldown_records", -1, "alerts.cooldown_records"),
        (AlertConfig, "learn_while_open", "slow", "alerts.learn_while_open"),
        (AlertConfig, "reduced_factor", 0.0, "alerts.reduced_factor"),
    ],
)
def test_bad_options_name_the_key(cls, field, value, message):
    with pytest.raises(ValueError, match=message):
        cls(**{field: value})


def test_n_of_m_from_yaml_list_becomes_a_tuple():
    cfg = AlertConfig(n_of_m=[2, 3])
    assert cfg.n_of_m == (2, 3)
    hash(cfg)  # frozen options stay hashable


# ---------------------------------------------------------------------------- statistics


def test_running_moments_are_exact_before_tau_then_forget():
    rng = np.random.default_rng(1)
    xs = rng.normal(5.0, 2.0, size=80)
    m = RunningMoments(tau=100)
    for x in xs:
        m.update(float(x))
    assert m.mean == pytest.approx(xs.mean())
    assert m.var == pytest.approx(xs.var())
    for _ in range(300):  # three time constants at a new level: the old one is mostly forgotten
        m.update(10.0)
    assert 9.5 < m.mean < 10.0
    frozen = dict(m.state_dict())
    m.update(1000.0, weight=0.0)
    assert m.state_dict() == frozen


def test_tail_and_anomaly_calibration():
    assert gaussian_tail(0.0, two_sided=False) == pytest.approx(0.5)
    assert gaussian_tail(0.0, two_sided=True) == pytest.approx(1.0)
    assert gaussian_tail(-3.0, two_sided=True) == pytest.approx(gaussian_tail(3.0, two_sided=True))
    assert 0.0 < gaussian_tail(30.0, two_sided=False) < 1e-190  # no rounding to 0 far in the tail
    # the anomaly score is the chance that a slow window of ordinary records holds nothing as extreme
    assert anomaly_from_tail(1e-5, 500.0) == pytest.approx((1 - 1e-5) ** 500)
    assert anomaly_from_tail(1.0, 500.0) == 0.0
    assert anomaly_from_tail(0.0, 500.0) == 1.0


# ---------------------------------------------------------------------------- anomaly score


def test_grace_period_scores_zero_and_never_alerts():
    scorer = StreamScorer("s", surprise(grace_period=100))
    rng = np.random.default_rng(2)
    bits = [steady_bits(rng) for _ in range(100)]
    bits[80] = np.full(6, 12.0)  # a huge surprise late in the warm-up (clipped like any other)
    results = feed(scorer, bits)
    assert all(scored.anomaly == 0.0 and not events for scored, events in results)
    assert scorer.alerts_total == 0
    scored, events = scorer.score_record(b"99\n", np.full(6, 12.0), now=100.0)  # the first record after it
    assert scored.index == 100 and scored.anomaly > 0.99 and [e.kind for e in events] == ["open"]


def test_ordinary_noise_does_not_alert():
    """Independent Gaussian record scores: at threshold 0.99 an alert is a once-in-100-slow-windows
    event. Judged per record instead (1 - p), the same stream would cross 0.99 over and over."""
    scorer = StreamScorer("s", surprise())
    rng = np.random.default_rng(3)
    zs, tails, anomalies = [], [], []
    for i in range(10_000):
        scored, events = scorer.score_record(b"12.5\n", steady_bits(rng), now=float(i))
        assert not events, f"alert at record {i}"
        zs.append(scorer.last_z)
        tails.append(scorer.last_tail)
        anomalies.append(scored.anomaly)
    warm = slice(scorer.scoring.grace_period, None)
    assert max(anomalies[warm]) < 0.9
    assert 0.7 < np.std(zs[warm]) < 1.3 and abs(np.mean(zs[warm])) < 0.3  # standard scores, not inflated by the warm-up
    assert sum(1.0 - p >= 0.99 for p in tails[warm]) > 20


@pytest.mark.parametrize("direction, alerts", [("both", True), ("high", False)])
def test_a_stream_turning_predictable_alerts_only_when_both_directions_count(direction, alerts):
    scorer = fast_scorer(direction=direction)
    rng = np.random.default_rng(4)
    results = feed(scorer, [steady_bits(rng, level=3.0, noise=0.3) for _ in range(300)] + [np.full(6, 0.01)] * 10)
    assert bool(opened(results)) is alerts
    if alerts:
        assert opened(results)[0] in range(300, 303)
        assert scorer.last_z < -4


@pytest.mark.parametrize("policy, closes_during_shift", [("frozen", False), ("normal", True)])
def test_statistics_learn_the_new_normal_only_as_the_policy_allows(policy, closes_during_shift):
    """A persistent level shift: frozen keeps alerting for its whole length; normal learns it."""
    scorer = StreamScorer("s", surprise(grace_period=50, slow_records=100.0), AlertConfig(learn_while_open=policy))
    rng = np.random.default_rng(5)
    bits = [steady_bits(rng) for _ in range(300)] + [steady_bits(rng, level=4.0) for _ in range(400)]
    results = feed(scorer, bits)
    closes = [scored.index for scored, events in results for e in events if e.kind == "close"]
    assert opened(results)[0] in range(300, 303)
    assert bool(closes) is closes_during_shift
    assert scorer.alert_open is not closes_during_shift


def test_one_spike_does_not_blind_the_detector_to_the_next():
    """A 40-bit spike is folded into the statistics as a 6-sigma one, so a later, modest
    anomaly still stands out (even when the statistics learn at full rate)."""
    scorer = StreamScorer("s", surprise(grace_period=50, slow_records=100.0), AlertConfig(learn_while_open="normal", close_after=1))
    rng = np.random.default_rng(6)
    bits = [steady_bits(rng) for _ in range(400)]
    bits[200] = np.full(6, 40.0)
    bits[300] = np.full(6, 8.0)
    assert opened(feed(scorer, bits)) == [200, 300]


def test_the_warm_up_does_not_blind_the_first_records_after_it():
    """A fresh model's loss falls from 8 bits to 2 during the warm-up: the statistics must
    describe the trained model, or the first anomalies after the warm-up go unnoticed."""
    scorer = StreamScorer("s", surprise(grace_period=500))
    rng = np.random.default_rng(12)
    bits = [steady_bits(rng, level=2.0 + 6.0 * math.exp(-i / 60)) for i in range(700)]
    bits[600] = np.full(6, 5.0)
    assert opened(feed(scorer, bits)) == [600]


# ---------------------------------------------------------------------------- the alert state machine


def run_states(cfg: AlertConfig, anomalies) -> str:
    """The transitions as a string: o = open, c = close, . = none."""
    state = AlertState(cfg)
    return "".join({"open": "o", "close": "c", None: "."}[state.step(a)] for a in anomalies)


@pytest.mark.parametrize(
    "cfg, anomalies, expected",
    [
        # 1 of 1: open at the first crossing, close at the first quiet record
        ({"close_after": 1, "cooldown_records": 0}, [0.1, 0.9995, 0.5, 0.9995], ".oco"),
        # close_after: quiet records in a row; a loud one in between resets the count
        ({"close_after": 3, "cooldown_records": 0}, [0.9995, 0.1, 0.1, 0.95, 0.1, 0.1, 0.1], "o.....c"),
        # hysteresis: between close_below and threshold the alert stays open
        ({"close_below": 0.5, "close_after": 1, "cooldown_records": 0}, [0.9995, 0.6, 0.7, 0.4], "o..c"),
        # n of m: one crossing alone never opens; two within three records do
        ({"n_of_m": (2, 3), "close_after": 1, "cooldown_records": 0}, [0.9995, 0.1, 0.1, 0.9995, 0.1, 0.9995], ".....o"),
        # n of m closes when fewer than n of the last m are still loud
        ({"n_of_m": (2, 3), "close_after": 1, "cooldown_records": 0}, [0.9995, 0.9995, 0.9995, 0.1, 0.1], ".o..c"),
        # cooldown: no reopening for 2 records after a close, then it may
        ({"close_after": 1, "cooldown_records": 2}, [0.9995, 0.1, 0.9995, 0.9995, 0.9995], "oc..o"),
    ],
)
def test_alert_state_machine(cfg, anomalies, expected):
    assert run_states(AlertConfig(**cfg), anomalies) == expected


def test_an_alert_opens_on_a_trigger_and_stays_open_while_the_anomaly_does():
    """The scorer passes the anomaly at an onset as the trigger, 0 elsewhere: a high that
    goes on keeps the alert open without being a new trigger."""
    state = AlertState(AlertConfig(close_after=2, cooldown_records=0))
    steps = [(0.9995, 0.0), (0.9995, 0.9995), (0.9995, 0.0), (0.9995, 0.0), (0.1, 0.0), (0.1, 0.0), (0.9995, 0.0)]
    assert "".join({"open": "o", "close": "c", None: "."}[state.step(a, t)] for a, t in steps) == ".o...c."


@pytest.mark.parametrize("policy, factor", [("normal", 1.0), ("reduced", 0.25), ("frozen", 0.0)])
def test_learning_factor_follows_the_policy_while_open(policy, factor):
    scorer = StreamScorer("s", surprise(grace_period=50), AlertConfig(learn_while_open=policy, reduced_factor=0.25, close_after=2))
    rng = np.random.default_rng(7)
    feed(scorer, [steady_bits(rng) for _ in range(200)])
    assert scorer.learning_factor() == 1.0 and not scorer.alert_open
    scorer.score_record(b"999\n", np.full(6, 12.0), now=200.0)
    assert scorer.alert_open and scorer.learning_factor() == factor
    feed(scorer, [steady_bits(rng) for _ in range(5)], start=201.0)
    assert not scorer.alert_open and scorer.learning_factor() == 1.0


def test_alert_events_carry_what_happened():
    scorer = StreamScorer("uart0", surprise(grace_period=50), AlertConfig(close_after=3))
    rng = np.random.default_rng(8)
    feed(scorer, [steady_bits(rng) for _ in range(200)], start=1000.0)
    _, events = scorer.score_record(b"61.0\n", np.full(5, 6.0), now=1200.0)  # opens
    (open_event,) = events
    assert (open_event.kind, open_event.stream, open_event.records, open_event.record) == ("open", "uart0", 1, b"61.0\n")
    assert open_event.started_at == open_event.time == 1200.0
    assert open_event.peak_bits == pytest.approx(6.0) and open_event.peak_anomaly > 0.99
    _, events = scorer.score_record(b"999.9\n", np.full(6, 11.0), now=1201.0)  # the peak, still open
    assert events == []
    results = feed(scorer, [steady_bits(rng) for _ in range(10)], start=1202.0)
    closes = [(scored.index, e) for scored, events in results for e in events]
    ((close_index, close_event),) = closes
    assert close_event.kind == "close" and close_event.alert_id == open_event.alert_id
    assert close_event.started_at == 1200.0 and close_event.time == 1202.0 + (close_index - 202)
    assert close_event.record == b"999.9\n" and close_event.peak_bits == pytest.approx(11.0)  # the peak record
    assert close_event.records == close_index - 200 + 1  # the opening record up to the closing one
    assert scorer.alerts_total == 1
    d = close_event.to_dict()
    assert d["event"] == "alert_close" and d["record"] == "999.9\\n"


# ---------------------------------------------------------------------------- timescales


def test_band_timescales_are_the_top_bands_with_their_shares():
    taus = band_taus(16)
    assert taus[0] == pytest.approx(PHI) and taus[15] == pytest.approx(PHI**16)
    power = np.zeros(16)
    power[[1, 5, 9, 12]] = [5.0, 3.0, 1.0, 1.0]
    top = band_timescales(power, taus, top=3)
    assert [t.band for t in top] == [2, 6, 10]
    assert [t.share for t in top] == pytest.approx([0.5, 0.3, 0.1])
    assert top[0].tau_bytes == pytest.approx(PHI**2)
    assert sum(t.share for t in top) <= 1.0
    assert band_timescales(np.zeros(16), taus) == ()
    assert band_timescales(power, taus, top=0) == ()


def test_alert_names_the_bands_whose_power_rose_not_the_usual_ones():
    """Band 16 always takes most of the power; the anomaly's extra power is in band 2."""
    scorer = StreamScorer("s", surprise(grace_period=50))
    rng = np.random.default_rng(9)
    usual = np.full(16, 0.01)
    usual[15] = 0.8
    for i in range(200):
        scorer.score_record(b"1\n", steady_bits(rng), band_power=usual * (1 + 0.05 * rng.random(16)), now=float(i))
    unusual = usual.copy()
    unusual[1] = 0.5
    _, (event,) = scorer.score_record(b"9\n", np.full(6, 12.0), band_power=unusual, now=200.0)
    assert event.timescales[0].band == 2
    assert event.timescales[0].tau_bytes == pytest.approx(PHI**2)
    assert sum(t.share for t in event.timescales) <= 1.0 + 1e-12


def test_band_taus_override_and_no_power_means_no_timescales():
    scorer = StreamScorer("s", surprise(grace_period=50), band_taus=[2.0, 4.0, 8.0])
    rng = np.random.default_rng(10)
    feed(scorer, [steady_bits(rng) for _ in range(100)])
    _, (event,) = scorer.score_record(b"9\n", np.full(6, 12.0), band_power=np.array([0.0, 0.0, 3.0]), now=100.0)
    assert [(t.band, t.tau_bytes) for t in event.timescales] == [(3, 8.0)]
    fresh = StreamScorer("s", surprise(grace_period=50))
    feed(fresh, [steady_bits(rng) for _ in range(100)])
    _, (event,) = fresh.score_record(b"9\n", np.full(6, 12.0), now=100.0)
    assert event.timescales == ()


# ---------------------------------------------------------------------------- persistence


def test_state_dict_round_trips_through_a_weights_only_checkpoint():
    rng = np.random.default_rng(11)

    history = [steady_bits(rng) for _ in range(300)] + [np.full(6, 12.0)] + [steady_bits(rng, level=5.0) for _ in range(3)]
    rest = [steady_bits(rng, level=5.0) for _ in range(5)] + [steady_bits(rng) for _ in range(100)] + [np.full(6, 9.0)]
    powers = [rng.random(16) for _ in history + rest]
    cfg = (surprise(grace_period=100), AlertConfig(close_after=5))
    a = StreamScorer("s", *cfg)
    for i, bits in enumerate(history):
        a.score_record(b"r\xff\n", bits, band_power=powers[i], now=float(i))
    assert a.alert_open  # saved mid-alert
    buffer = io.BytesIO()
    torch.save({"scorer": a.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["scorer"]
    json.dumps(state)  # plain types only
    b = StreamScorer("s", *cfg)
    b.load_state_dict(state)
    assert (b.records, b.alerts_total, b.alert_open) == (a.records, a.alerts_total, True)
    for i, bits in enumerate(rest, start=len(history)):
        out_a = a.score_record(b"r\n", bits, band_power=powers[i], now=float(i))
        out_b = b.score_record(b"r\n", bits, band_power=powers[i], now=float(i))
        assert out_a == out_b
    assert a.state_dict() == b.state_dict()
    assert a.alerts_total == 2  # the continuation closed the saved alert and opened another


def test_load_state_dict_refuses_what_it_cannot_use():
    scorer = StreamScorer("uart0", surprise())
    good = scorer.state_dict()
    with pytest.raises(ValueError, match=r"uart0.*version 99"):
        scorer.load_state_dict({**good, "version": 99})
    with pytest.raises(ValueError, match=r"uart0.*lacks slow"):
        scorer.load_state_dict({k: v for k, v in good.items() if k != "slow"})
    with pytest.raises(ValueError, match=r"uart0.*malformed"):
        scorer.load_state_dict({**good, "fast": ["x"]})
    with pytest.raises(ValueError, match=r"uart0.*alert open=True"):
        scorer.load_state_dict({**good, "alerts": {**good["alerts"], "open": True}})
    assert scorer.state_dict() == good


def test_a_resized_window_keeps_the_latest_values():
    a = StreamScorer("s", surprise(fast_records=5))
    feed(a, [np.array([float(i)]) for i in range(10)])
    b = StreamScorer("s", surprise(fast_records=3))
    b.load_state_dict(a.state_dict())
    assert list(b.fast.values) == [7.0, 8.0, 9.0]


# ---------------------------------------------------------------------------- a real learner, real faults

PERIOD = 12  # readings per cycle: short enough for the tiny model to learn the cycle byte by byte
FAULTS = {"spike": (3000, 1), "shift": (3600, 100), "stuck": (4200, 40), "noise": (4800, 60)}  # first line, length
N_LINES = 5400


def sensor_lines(seed: int = 0):
    """A clean periodic reading as CSV-like text lines, with one fault of each kind injected.

    (adapters/simulate.py adds noise at every line; a clean signal is what lets a noise burst
    and a frozen sensor be surprising, so the faults are injected here with the same meaning.)
    """
    rng = random.Random(seed)
    last = 0.0
    for i in range(N_LINES):
        phase = 2 * math.pi * i / PERIOD
        value = 50.0 + 10.0 * math.sin(phase) + 3.0 * math.sin(3 * phase + 1.0)
        fault = next((kind for kind, (at, n) in FAULTS.items() if at <= i < at + n), None)
        if fault == "spike":
            value += 50.0  # one reading far outside the range
        elif fault == "shift":
            value += 20.0  # the level jumps and stays
        elif fault == "noise":
            value += rng.gauss(0.0, 2.0)  # the sensor turns noisy
        elif fault == "stuck":
            value = last  # the reading freezes
        last = value
        yield f"{value:.1f}\n".encode()


def learn_record(learner: SomaLearner, line: bytes) -> tuple[torch.Tensor, np.ndarray | None]:
    """Learn one record as its own update (as the learner did before gradient windows spanned
    calls), returning its bits and that update's gradient power per band."""
    updates = learner.updates
    bits = learner.learn(line)
    learner.apply_pending()
    return bits, learner.last_update_power.numpy() if learner.updates > updates else None


@pytest.mark.parametrize("policy", ["reduced", "frozen"])
def test_each_fault_on_a_real_learner_opens_exactly_one_alert(policy):
    learner = SomaLearner(preset("tiny"), LearnerConfig())
    scorer = StreamScorer("sensor", surprise(), replace(AlertConfig(), learn_while_open=policy))
    opens = []
    for i, line in enumerate(sensor_lines()):
        factor = scorer.learning_factor()  # the daemon's loop: learn at the policy's rate, or only score
        if factor > 0:
            learner.eta_scale = factor
            bits, power = learn_record(learner, line)
        else:
            bits, power = learner.score(line), None
        _, events = scorer.score_record(line, bits.numpy(), band_power=power, now=1.7e9 + i)
        opens += [(i, e) for e in events if e.kind == "open"]
    assert len(opens) == len(FAULTS), [(i, e.record) for i, e in opens]
    for (i, event), (kind, (at, _)) in zip(opens, FAULTS.items()):
        assert at <= i <= at + 3, f"{kind} at line {at} opened at {i}"
        assert event.timescales and sum(t.share for t in event.timescales) <= 1.0 + 1e-9
    spike = opens[0][1]
    assert spike.record == b"102.5\n"
    assert spike.timescales[0].tau_bytes < 5.0  # a one-reading spike lives at the scale of a few bytes
