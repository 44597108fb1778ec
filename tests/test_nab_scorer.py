"""NAB scoring: reproduction of the published scoreboard from the reference detectors' rows,
agreement with a plain transcription of NAB's sweeper, and hand-computed cases."""

from __future__ import annotations

import doctest
import json
import math
import random

import numpy as np
import pytest

import bench.nab_scorer as nab
from bench.nab_scorer import CostMatrix, LabelledFile

STANDARD = CostMatrix(tp=1.0, fp=0.11, fn=1.0)
LOW_FN = CostMatrix(tp=1.0, fp=0.11, fn=2.0)

# Normalised scores with thresholds optimised by NAB's sweep (issue 5). NAB's own
# published_final_results.json has 63.12 for numenta/low-FP: NAB scored that profile at a stale
# threshold from config/thresholds.json (0.5752); the optimum (0.5431) gives 63.21. The
# recorded-threshold test below reproduces 63.12 as well.
OPTIMISED = {
    ("numenta", "standard"): 70.10,
    ("numenta", "reward_low_FP_rate"): 63.21,
    ("numenta", "reward_low_FN_rate"): 74.32,
    ("windowedGaussian", "standard"): 39.65,
    ("windowedGaussian", "reward_low_FP_rate"): 20.87,
    ("windowedGaussian", "reward_low_FN_rate"): 47.41,
}


@pytest.fixture(scope="module")
def corpus():
    root = nab.default_nab_dir()
    if not (root / "labels" / "combined_windows.json").is_file():
        pytest.skip(f"NAB data not found at {root}")
    files = nab.load_corpus(root)
    refs = {d: nab.load_reference_scores(root, d, files) for d in ("numenta", "windowedGaussian")}
    return root, files, refs


# ------------------------------------------------------------------ the published scoreboard


def test_corpus_shape(corpus):
    _, files, _ = corpus
    assert len(files) == 58
    assert sum(len(f.windows) for f in files) == 116
    assert sum(f.n_rows for f in files) == 365558


@pytest.mark.parametrize("detector", ["numenta", "windowedGaussian"])
def test_reproduces_published_scores_with_optimised_thresholds(corpus, detector):
    root, files, refs = corpus
    results = nab.score_detector(files, refs[detector], nab.load_profiles(root))
    for profile, result in results.items():
        assert result.score == pytest.approx(OPTIMISED[detector, profile], abs=0.05), profile
        assert result.null == -116 * nab.load_profiles(root)[profile].fn
        assert result.perfect == 116


@pytest.mark.parametrize("detector", ["numenta", "windowedGaussian"])
def test_reproduces_published_final_results_at_nabs_recorded_thresholds(corpus, detector):
    """At the thresholds NAB recorded, per-file scoring gives NAB's final results to 1e-6."""
    root, files, refs = corpus
    recorded = json.loads((root / "config" / "thresholds.json").read_text())[detector]
    published = nab.load_published(root)[detector]
    sweeps = [nab.sweep(f) for f in files]
    for profile, cost in nab.load_profiles(root).items():
        threshold = recorded[profile]["threshold"]
        raw = sum(nab.score_file(s, refs[detector][f.name], threshold, cost).score for f, s in zip(files, sweeps))
        assert nab.normalised(raw, -116 * cost.fn, 116 * cost.tp) == pytest.approx(published[profile], abs=1e-6), profile


def test_optimised_threshold_is_the_best_per_file_total(corpus):
    """The curve's maximum equals the sum of per-file scores at its threshold, and no
    other candidate threshold does better when scored file by file."""
    _, files, refs = corpus
    sweeps = [nab.sweep(f) for f in files]
    scores = [refs["numenta"][f.name] for f in files]
    curve = nab.threshold_curve(sweeps, scores, STANDARD)
    best_t, best = curve.best()
    for t in [best_t, *np.quantile(curve.thresholds[1:], [0.0, 0.5, 0.99, 0.999], method="lower")]:
        total = sum(nab.score_file(s, sc, t, STANDARD).score for s, sc in zip(sweeps, scores))
        i = int(np.flatnonzero(curve.thresholds == t)[0])
        assert total == pytest.approx(curve.scores[i], rel=1e-9, abs=1e-9)
        assert total <= best + 1e-9


# ------------------------------------------------------------------ against NAB's sweeper, transcribed


def sweep_points_transcribed(file_name, n_rows, windows, scores, cost, fraction=0.15):
    """NAB's Sweeper.calcSweepScore, loop for loop, with row numbers as timestamps:
    [(anomaly score, sweep score, window name or None or 'probationary')]."""
    probation = min(math.floor(fraction * n_rows), fraction * 5000)
    max_tp = 2 / (1 + math.exp(-5)) - 1

    def s(x):
        return -1.0 if x > 3.0 else 2 / (1 + math.exp(5 * x)) - 1

    limits = list(windows)
    points = []
    cur = name = width = right = prev_width = prev_right = None
    for i in range(n_rows):
        if limits and i == limits[0][0]:
            cur = limits.pop(0)
            name, right, width = f"{file_name}|{cur[0]}", cur[1], float(cur[1] - cur[0] + 1)
        if cur is not None:
            weighted = s(-(right - i + 1) / width) * cost.tp / max_tp
        else:
            weighted = (-1.0 if prev_right is None else s(abs(prev_right - i) / float(prev_width - 1))) * cost.fp
        points.append((scores[i], weighted, name if i >= probation else "probationary"))
        if cur is not None and i == cur[1]:
            prev_right, prev_width, cur, name = i, width, None, None
    return points


def score_by_threshold_transcribed(points, cost):
    """NAB's Sweeper.calcScoreByThreshold: [(threshold, score)], highest threshold first."""
    scorable = sorted([p for p in points if p[2] != "probationary"], key=lambda p: p[0], reverse=True)
    parts = {"fp": 0.0, **{p[2]: -cost.fn for p in scorable if p[2] is not None}}
    out, threshold = [], 1.1
    for score, weighted, name in scorable:
        if score != threshold:
            out.append((threshold, sum(parts.values())))
            threshold = score
        if name is None:
            parts["fp"] += weighted
        else:
            parts[name] = max(parts[name], weighted)
    out.append((threshold, sum(parts.values())))
    return out


def lookup_transcribed(curve, threshold):
    """NAB's Sweeper.scoreDataSet lookup: the row at ``threshold``, else the one above it."""
    return [v for t, v in curve if t >= threshold][-1]


def random_file(rng: random.Random, n_rows: int) -> tuple[LabelledFile, np.ndarray]:
    windows, row = [], rng.randrange(0, n_rows // 3)  # sometimes starts inside probation
    while row < n_rows - 3 and len(windows) < 4:
        end = min(n_rows - 1, row + rng.randrange(2, n_rows // 6 + 3))
        windows.append((row, end))
        row = end + 1 + rng.randrange(1, n_rows // 3)
    scores = np.round(np.array([rng.random() for _ in range(n_rows)]), rng.choice([1, 2, 6]))  # ties
    return LabelledFile(f"f{n_rows}.csv", n_rows, tuple(windows)), scores


@pytest.mark.parametrize("seed", range(12))
def test_threshold_curve_matches_transcribed_sweeper(seed):
    rng = random.Random(seed)
    cost = CostMatrix(tp=1.0, fp=rng.choice([0.11, 0.22]), fn=rng.choice([1.0, 2.0]))
    files = [random_file(rng, rng.randrange(20, 400)) for _ in range(rng.randrange(1, 4))]
    points = []  # NAB's optimiser pools the rows of every file
    for k, (f, sc) in enumerate(files):
        points += sweep_points_transcribed(f"{k}{f.name}", f.n_rows, f.windows, sc, cost)
    expected = score_by_threshold_transcribed(points, cost)
    curve = nab.threshold_curve([nab.sweep(f) for f, _ in files], [sc for _, sc in files], cost)
    assert curve.thresholds.tolist() == [t for t, _ in expected]
    np.testing.assert_allclose(curve.scores, [v for _, v in expected], atol=1e-9)
    best = max(expected, key=lambda row: row[1])  # max() keeps the first of equal maxima
    assert curve.best()[0] == best[0]


@pytest.mark.parametrize("seed", range(6))
def test_score_file_matches_transcribed_sweeper_lookup(seed):
    rng = random.Random(100 + seed)
    f, sc = random_file(rng, rng.randrange(30, 300))
    curve = score_by_threshold_transcribed(sweep_points_transcribed(f.name, f.n_rows, f.windows, sc, STANDARD), STANDARD)
    s = nab.sweep(f)
    for t in [0.0, 0.25, 0.5, 0.9, 1.0, 1.1, *rng.sample(sc.tolist(), 5)]:
        expected = lookup_transcribed(curve, t)
        assert nab.score_file(s, sc, t, STANDARD).score == pytest.approx(expected, abs=1e-9)


# ------------------------------------------------------------------ hand-computed cases


def one_window_file() -> LabelledFile:
    # 100 rows: probation 15 rows, window rows 40..49 (10 rows)
    return LabelledFile("hand.csv", 100, ((40, 49),))


def test_scaled_sigmoid_landmarks():
    assert nab.scaled_sigmoid(-1.0) == pytest.approx(0.98661, abs=1e-5)
    assert nab.scaled_sigmoid(-0.5) == pytest.approx(0.84828, abs=1e-5)
    assert nab.scaled_sigmoid(0.0) == 0.0
    assert nab.scaled_sigmoid(1.0) == pytest.approx(-0.98661, abs=1e-5)
    assert nab.scaled_sigmoid(3.0) == pytest.approx(2 / (1 + math.exp(15)) - 1)
    assert nab.scaled_sigmoid(3.01) == -1.0 and nab.scaled_sigmoid(1e6) == -1.0


def test_probation_is_fifteen_percent_capped_at_750_rows():
    assert nab.probationary_rows(100) == 15
    assert nab.probationary_rows(1001) == 150
    assert nab.probationary_rows(5000) == 750
    assert nab.probationary_rows(22695) == 750


def test_earlier_detection_in_a_window_scores_more_and_only_the_earliest_counts():
    s = nab.sweep(one_window_file())
    scores = np.zeros(100)
    scores[45] = 1.0  # halfway: position -(49 - 45 + 1) / 10 = -0.5
    half = nab.score_file(s, scores, 0.5, STANDARD)
    assert half.score == pytest.approx(0.84828 / 0.98661, abs=1e-5)
    assert (half.tp, half.fn, half.fp) == (1, 9, 0)
    scores[42] = 1.0  # earlier: position -0.8
    early = nab.score_file(s, scores, 0.5, STANDARD).score
    assert early == pytest.approx(float(nab.scaled_sigmoid(-0.8)) / nab.MAX_TP)
    scores[46:50] = 1.0  # later rows of the same window add nothing
    assert nab.score_file(s, scores, 0.5, STANDARD).score == pytest.approx(early)


def test_false_positives_cost_little_just_after_a_window_and_fp_weight_far_away():
    s = nab.sweep(one_window_file())
    scores = np.zeros(100)
    scores[50] = 1.0  # one row after the window: S(1/9) * 0.11, window missed
    assert nab.score_file(s, scores, 0.5, STANDARD).score == pytest.approx(-1.0 + float(nab.scaled_sigmoid(1 / 9)) * 0.11)
    scores[50] = 0.0
    scores[99] = 1.0  # 50 rows after: past x = 3, full cost
    assert nab.score_file(s, scores, 0.5, STANDARD).score == pytest.approx(-1.0 - 0.11)
    scores[99] = 0.0
    scores[20] = 1.0  # before any window: full cost
    result = nab.score_file(s, scores, 0.5, STANDARD)
    assert result.score == pytest.approx(-1.11) and result.fp == 1


def test_probationary_rows_are_never_scored():
    s = nab.sweep(one_window_file())
    scores = np.zeros(100)
    scores[:15] = 1.0
    result = nab.score_file(s, scores, 0.5, STANDARD)
    assert result.score == -1.0 and result.fp == 0 and result.tp + result.tn + result.fp + result.fn == 85


def test_a_window_hidden_by_probation_counts_for_perfect_but_not_for_null():
    f = LabelledFile("early.csv", 100, ((2, 10), (40, 49)))
    scores = {f.name: np.zeros(100)}
    result = nab.score_detector([f], scores, {"standard": STANDARD})["standard"]
    assert result.null == -1.0 and result.perfect == 2.0
    assert result.raw == -1.0 and result.score == 0.0


def test_ties_choose_the_highest_threshold():
    f = one_window_file()
    scores = np.zeros(100)
    scores[40], scores[47] = 0.9, 0.8  # 0.8 adds only a later in-window detection: same score
    curve = nab.threshold_curve([nab.sweep(f)], [scores], STANDARD)
    assert curve.thresholds.tolist() == [1.1, 0.9, 0.8, 0.0]
    assert curve.scores[1] == curve.scores[2]
    assert curve.best() == (0.9, pytest.approx(1.0))


def test_low_fn_profile_doubles_a_miss():
    s = nab.sweep(one_window_file())
    assert nab.score_file(s, np.zeros(100), 0.5, LOW_FN).score == -2.0


def test_perfect_detector_scores_100_and_null_0():
    f = LabelledFile("two.csv", 300, ((60, 79), (200, 239)))
    perfect = np.zeros(300)
    perfect[[60, 200]] = 1.0
    profiles = {"standard": STANDARD, "low_fn": LOW_FN}
    for name, result in nab.score_detector([f], {f.name: perfect}, profiles).items():
        assert result.score == pytest.approx(100.0), name
    for name, result in nab.score_detector([f], {f.name: np.full(300, 0.5)}, profiles).items():
        assert result.score == pytest.approx(0.0), name  # all-detecting loses to detecting nothing


# ------------------------------------------------------------------ bad input


def test_bad_windows_are_rejected_with_the_file_named():
    with pytest.raises(ValueError, match="bad.csv: window 1"):
        LabelledFile("bad.csv", 100, ((10, 20), (15, 30)))
    with pytest.raises(ValueError, match="bad.csv: window 0"):
        LabelledFile("bad.csv", 100, ((90, 120),))
    with pytest.raises(ValueError, match="one row"):
        LabelledFile("bad.csv", 100, ((50, 50),))


def test_window_limits_must_be_timestamps_of_the_file():
    stamps = ["2014-01-01 00:00:00", "2014-01-01 00:05:00", "2014-01-01 00:10:00"]
    assert nab.window_rows("x.csv", stamps, [["2014-01-01 00:05:00.000000", "2014-01-01 00:10:00.000000"]]) == ((1, 2),)
    with pytest.raises(ValueError, match="x.csv: window 0 limit"):
        nab.window_rows("x.csv", stamps, [["2014-01-01 00:06:00", "2014-01-01 00:10:00"]])


def test_scores_must_be_finite_and_one_per_row():
    s = nab.sweep(one_window_file())
    bad = np.zeros(100)
    bad[30] = np.nan
    with pytest.raises(ValueError, match="row 30"):
        nab.score_file(s, bad, 0.5, STANDARD)
    with pytest.raises(ValueError, match="expected 100"):
        nab.score_file(s, np.zeros(99), 0.5, STANDARD)


def test_docstring_examples():
    result = doctest.testmod(nab)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------ the runner (bench/nab.py)


def level_shift_rows(n_before: int = 600, n_after: int = 40) -> tuple[list[str], list[str]]:
    stamps = [f"2015-01-01 {h:02d}:{m:02d}:00" for h in range(24) for m in range(0, 60, 5)]
    stamps = [f"2015-01-{1 + i // 288:02d} {stamps[i % 288][11:]}" for i in range(n_before + n_after)]
    values = [f"{20 + (i % 12) * 0.5:.1f}" for i in range(n_before)] + ["95.0"] * n_after
    return stamps, values


def test_runner_feeds_value_text_lines_and_scores_every_row():
    from bench import nab as runner

    stamps, values = level_shift_rows(n_before=1200)  # the default alert threshold, 0.999, needs 1000 records of history
    run = runner.run_rows(runner.Variant(preset="tiny"), "synthetic.csv", stamps, values)
    assert run.n_bytes == sum(len(v) + 1 for v in values)
    assert run.anomaly.shape == run.bits.shape == run.tail.shape == (len(values),)
    assert ((run.anomaly >= 0) & (run.anomaly <= 1)).all()
    assert (run.anomaly[: runner.ScoringConfig().grace] == 0).all()  # the scorer's grace period
    assert run.anomaly[1200:1210].max() > 0.999 > run.anomaly[1100:1200].max()
    assert run.alerts >= 1 and run.seconds > 0


def test_runner_variants_and_their_validation():
    from bench import nab as runner

    assert runner.Variant().learn_while_open == runner.AlertConfig().learn_while_open  # the daemon's default
    assert runner.Variant(preset="tiny", metabolism="fixed").learner().metabolism.cfg.mode == "fixed"
    with pytest.raises(SystemExit, match="--learn-while-open"):
        runner.Variant(learn_while_open="sometimes")
    with pytest.raises(SystemExit, match="--preset"):
        runner.Variant(preset="huge")


def test_runner_command_line_on_one_file(tmp_path, capsys):
    from bench import nab as runner

    name = "realTraffic/speed_7578.csv"
    runner.main(["--preset", "tiny", "--files", name, "--jobs", "1", "--out", str(tmp_path), "--json", str(tmp_path / "s.json")])
    printed = capsys.readouterr().out
    assert "somad tiny-" in printed and "windowedGaussian" in printed and "subset: 1 of 58" in printed
    summary = json.loads((tmp_path / "s.json").read_text())["variants"][0]
    assert set(summary["scores"]) == set(nab.PROFILE_NAMES)
    assert summary["files"][name]["rows"] == 1127
    rows = (tmp_path / summary["tag"] / name).read_text().splitlines()
    assert rows[0].startswith("timestamp,value,anomaly_score,label") and len(rows) == 1128
    # the per-row file re-scores to the same result (exact numbers, ties kept)
    anomaly = np.array([float(r.split(",")[2]) for r in rows[1:]])
    root = nab.default_nab_dir()
    rescored = nab.score_detector(nab.load_corpus(root, [name]), {name: anomaly}, nab.load_profiles(root))
    assert {p: r.score for p, r in rescored.items()} == summary["scores"]


def test_window_limits_match_timestamps_written_differently():
    stamps = ["2014-01-01T00:00:00", "2014-01-01T00:05:00", "2014-01-01T00:10:00"]
    assert nab.window_rows("iso.csv", stamps, [["2014-01-01 00:00:00.000000", "2014-01-01 00:05:00"]]) == ((0, 1),)
