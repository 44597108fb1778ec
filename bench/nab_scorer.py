"""The Numenta Anomaly Benchmark's scoring, reproduced with numpy.

NAB (numenta/NAB, MIT) scores a detector's per-row anomaly scores against labelled anomaly
windows. This module follows its final scoring path (``nab/sweeper.py``, ``nab/optimizer.py``,
``nab/scorer.py``, ``nab/runner.py`` ``normalize``), vectorised so that optimising a threshold
over the whole corpus (365k rows) takes well under a second:

1. Probation. The first ``min(floor(0.15 n), 0.15 * 5000)`` rows of a file are not scored.
2. Sweep score of each row, as if it were a detection. Inside window [s, e] (w = e - s + 1
   rows): ``tp * S(-(e - i + 1) / w) / S(-1)``, where S is the scaled sigmoid
   ``2 / (1 + exp(5 x)) - 1`` (-1 beyond x = 3): earlier is better, the first row of a window
   is worth exactly ``tp``. Outside windows, after window [s, e]: ``fp * S((i - e) / (w - 1))``,
   a false positive right after a window costs little, far after it costs ``fp``. Before any
   window: ``-fp``.
3. Score at a threshold t (a row detects when its anomaly score >= t): the sum of the sweep
   scores of detecting rows outside windows, plus per window the sweep score of its *earliest*
   detecting row, or ``-fn`` when none detects (later detections in a window add nothing).
4. Threshold optimisation: one threshold per detector and profile for the whole corpus, the
   best of every distinct anomaly score (and 1.1: detect nothing), ties to the highest.
5. Normalisation: ``100 * (raw - null) / (perfect - null)``, null = every window missed
   (``-fn`` each), perfect = every window caught at its first row (``tp`` each).

Profiles (``config/profiles.json``): standard (tp 1, fp 0.11, fn 1), reward_low_FP_rate
(fp 0.22), reward_low_FN_rate (fn 2).

>>> round(float(scaled_sigmoid(-1.0)), 5), round(float(scaled_sigmoid(0.0)), 5), float(scaled_sigmoid(3.5))
(0.98661, 0.0, -1.0)
>>> f = LabelledFile("demo.csv", n_rows=100, windows=((40, 49),))
>>> cost = CostMatrix(tp=1.0, fp=0.11, fn=1.0)
>>> scores = np.zeros(100); scores[40] = 1.0            # caught at the window's first row
>>> round(score_file(sweep(f), scores, 0.5, cost).score, 6)
1.0
>>> scores[20] = 1.0                                    # plus a false positive before any window
>>> round(score_file(sweep(f), scores, 0.5, cost).score, 6)
0.89
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PROBATION_FRACTION = 0.15  # NAB's probationary share of each file (capped, see probationary_rows)
PROBATION_CAP_ROWS = 5000  # NAB caps probation at fraction * 5000 rows
NO_DETECTION_THRESHOLD = 1.1  # NAB's sweep starts above every score in [0, 1]: detect nothing
PROFILE_NAMES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")

# Row kinds in a Sweep's ``window`` array (window numbers are >= 0).
OUTSIDE = -1  # not in any window: a detection here is a false positive
PROBATIONARY = -2  # in the probationary period: never scored

# ------------------------------------------------------------------ data layout


def default_nab_dir() -> Path:
    """``../shared/data/nab`` next to the repository root (never inside it)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nab"


def nab_dir(override: str | os.PathLike | None = None) -> Path:
    """NAB's directory: ``--nab`` beats ``$SOMAD_NAB`` beats the default location."""
    path = Path(override) if override else Path(os.environ["SOMAD_NAB"]) if os.environ.get("SOMAD_NAB") else default_nab_dir()
    if not (path / "labels" / "combined_windows.json").is_file():
        raise SystemExit(f"NAB not found at {path} (expected labels/combined_windows.json; set --nab or SOMAD_NAB)")
    return path


@dataclass(frozen=True)
class CostMatrix:
    """One NAB application profile's weights."""

    tp: float  # reward for a window caught at its first row (less later in the window)
    fp: float  # cost of a false positive far from any window
    fn: float  # cost of a missed window


@dataclass(frozen=True)
class LabelledFile:
    """One data file's length and anomaly windows as row ranges."""

    name: str  # path relative to NAB's data/, e.g. "realKnownCause/nyc_taxi.csv"
    n_rows: int  # rows of data (header excluded)
    windows: tuple[tuple[int, int], ...] = ()  # (first row, last row) of each window, inclusive, in order

    def __post_init__(self) -> None:
        last = -1
        for k, (start, end) in enumerate(self.windows):
            if not last < start <= end < self.n_rows:
                raise ValueError(f"{self.name}: window {k} rows [{start}, {end}] is out of order, overlaps, or lies outside 0..{self.n_rows - 1}")
            if end == start:
                raise ValueError(f"{self.name}: window {k} has one row; NAB's sweep divides by (width - 1)")
            last = end

    def labels(self) -> np.ndarray:
        """1 for rows inside a window, else 0 (NAB's ``label`` column)."""
        out = np.zeros(self.n_rows, dtype=np.int8)
        for start, end in self.windows:
            out[start : end + 1] = 1
        return out


def parse_time(text: str) -> _dt.datetime:
    """NAB's timestamps: rows say ``2014-04-10 07:15:00``, labels add ``.000000``."""
    return _dt.datetime.fromisoformat(text.strip())


def read_csv_column(path: str | os.PathLike, column: str) -> tuple[list[str], np.ndarray | list[str]]:
    """Timestamps and one column of a NAB csv (data or results file). Numbers become float64."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or "timestamp" not in header or column not in header:
            raise ValueError(f"{path}: expected a header with 'timestamp' and {column!r}, got {header}")
        t_col, v_col = header.index("timestamp"), header.index(column)
        rows = [(r[t_col], r[v_col]) for r in reader if r]
    timestamps = [t for t, _ in rows]
    texts = [v for _, v in rows]
    if column == "value":
        return timestamps, texts  # the sensor's own text: the runner feeds it verbatim
    try:
        return timestamps, np.array([float(v) for v in texts], dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{path}: column {column!r} is not numeric ({exc})") from None


def window_rows(name: str, timestamps: Sequence[str], limits: Sequence[Sequence[str]]) -> tuple[tuple[int, int], ...]:
    """Map each window's (start, end) timestamps to row numbers; both must be rows of the file,
    as NAB's sweep enters and leaves windows on exact timestamp matches."""
    by_text = {t.strip(): i for i, t in enumerate(timestamps)}
    by_time: dict[_dt.datetime, int] = {}  # parsed only when a limit is written differently

    def row(limit: str) -> int:
        moment = parse_time(limit)
        found = by_text.get(moment.isoformat(" ", timespec="seconds" if not moment.microsecond else "microseconds"))
        if found is None:
            if not by_time:
                by_time.update((parse_time(t), i) for i, t in enumerate(timestamps))
            found = by_time.get(moment)
        if found is None:
            raise KeyError(limit)
        return found

    out = []
    for k, (start, end) in enumerate(limits):
        try:
            out.append((row(start), row(end)))
        except KeyError as exc:
            raise ValueError(f"{name}: window {k} limit {exc.args[0]} is not a timestamp of the file") from None
    return tuple(out)


def load_windows(root: Path) -> dict[str, list[list[str]]]:
    """``labels/combined_windows.json``: file name -> list of [start, end] timestamps."""
    with open(root / "labels" / "combined_windows.json") as f:
        return json.load(f)


def load_profiles(root: Path) -> dict[str, CostMatrix]:
    with open(root / "config" / "profiles.json") as f:
        raw = json.load(f)
    return {name: CostMatrix(tp=m["CostMatrix"]["tpWeight"], fp=m["CostMatrix"]["fpWeight"], fn=m["CostMatrix"]["fnWeight"]) for name, m in raw.items()}


def load_published(root: Path) -> dict[str, dict[str, float]]:
    """``config/published_final_results.json``: detector -> profile -> normalised score."""
    with open(root / "config" / "published_final_results.json") as f:
        return json.load(f)


def load_corpus(root: Path, names: Sequence[str] | None = None) -> list[LabelledFile]:
    """The labelled files (all, sorted, or the named subset), rows counted from data/."""
    all_windows = load_windows(root)
    if names:
        unknown = [n for n in names if n not in all_windows]
        if unknown:
            raise SystemExit(f"unknown NAB file(s) {unknown}; names look like 'realKnownCause/nyc_taxi.csv'")
    files = []
    for name in names or sorted(all_windows):
        timestamps, _ = read_csv_column(root / "data" / name, "value")
        files.append(LabelledFile(name, len(timestamps), window_rows(name, timestamps, all_windows[name])))
    return files


def load_reference_scores(root: Path, detector: str, files: Sequence[LabelledFile]) -> dict[str, np.ndarray]:
    """A published detector's per-row anomaly scores from ``reference/<detector>/``."""
    out = {}
    for f in files:
        _, scores = read_csv_column(root / "reference" / detector / f.name, "anomaly_score")
        if len(scores) != f.n_rows:
            raise ValueError(f"reference/{detector}/{f.name}: {len(scores)} rows, data has {f.n_rows}")
        out[f.name] = scores
    return out


# ------------------------------------------------------------------ the sweep


def scaled_sigmoid(x: np.ndarray | float) -> np.ndarray:
    """NAB's S(x) = 2 / (1 + exp(5x)) - 1, and -1 for x > 3 (far past a window)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):  # exp(5x) overflows only where the x > 3 branch wins
        s = 2.0 / (1.0 + np.exp(5.0 * x)) - 1.0
    return np.where(x > 3.0, -1.0, s)


MAX_TP = float(scaled_sigmoid(-1.0))  # S at a window's first row; NAB divides TP scores by it


def probationary_rows(n_rows: int, fraction: float = PROBATION_FRACTION) -> int:
    """Rows at the start of a file that are not scored (NAB: 15 %, at most 750).

    >>> probationary_rows(4032), probationary_rows(22695)
    (604, 750)
    """
    return int(min(np.floor(fraction * n_rows), fraction * PROBATION_CAP_ROWS))


@dataclass(frozen=True)
class Sweep:
    """What NAB's sweep knows of each row, before any cost matrix is applied."""

    window: np.ndarray  # (n,) int: window number, OUTSIDE, or PROBATIONARY
    unweighted: np.ndarray  # (n,) float64: S(relative position), -1 before the first window
    n_windows: int  # windows in the file (including any that probation hides)

    def weighted(self, cost: CostMatrix) -> np.ndarray:
        """Each row's score if it were a detection: tp * S / S(-1) inside, fp * S outside."""
        return np.where(self.window >= 0, self.unweighted * (cost.tp / MAX_TP), self.unweighted * cost.fp)


def sweep(f: LabelledFile, probation_fraction: float = PROBATION_FRACTION) -> Sweep:
    """NAB's ``Sweeper.calcSweepScore`` for one file, vectorised."""
    rows = np.arange(f.n_rows)
    window = np.full(f.n_rows, OUTSIDE, dtype=np.int64)
    unweighted = np.full(f.n_rows, -1.0)  # before any window: a far false positive
    for k, (start, end) in enumerate(f.windows):
        width = end - start + 1
        inside = rows[start : end + 1]
        window[start : end + 1] = k
        unweighted[start : end + 1] = scaled_sigmoid(-(end - inside + 1) / width)
        next_start = f.windows[k + 1][0] if k + 1 < len(f.windows) else f.n_rows
        after = rows[end + 1 : next_start]
        unweighted[end + 1 : next_start] = scaled_sigmoid((after - end) / (width - 1))
    window[: probationary_rows(f.n_rows, probation_fraction)] = PROBATIONARY
    return Sweep(window=window, unweighted=unweighted, n_windows=len(f.windows))


# ------------------------------------------------------------------ scores


@dataclass(frozen=True)
class FileScore:
    """A file's raw NAB score at one threshold, and NAB's row counts (probation excluded)."""

    score: float
    tp: int  # detecting rows inside windows
    tn: int  # quiet rows outside windows
    fp: int  # detecting rows outside windows
    fn: int  # quiet rows inside windows


def score_file(s: Sweep, scores: np.ndarray, threshold: float, cost: CostMatrix) -> FileScore:
    """NAB's score of one file when rows with anomaly score >= ``threshold`` detect."""
    scores = _checked_scores(scores, s.window.size)
    scored = s.window != PROBATIONARY
    detect = scored & (scores >= threshold)
    inside = s.window >= 0
    value = s.weighted(cost)
    total = float(value[detect & ~inside].sum())
    for k in np.unique(s.window[inside & scored]):
        hits = np.flatnonzero(detect & (s.window == k))
        total += float(value[hits[0]]) if hits.size else -cost.fn  # only the earliest detection counts
    return FileScore(
        score=total,
        tp=int((detect & inside).sum()),
        tn=int((scored & ~detect & ~inside).sum()),
        fp=int((detect & ~inside).sum()),
        fn=int((scored & ~detect & inside).sum()),
    )


@dataclass(frozen=True)
class ThresholdCurve:
    """The corpus score at every candidate threshold, highest threshold first."""

    thresholds: np.ndarray  # (m,) NO_DETECTION_THRESHOLD, then each distinct score, descending
    scores: np.ndarray  # (m,) raw corpus score when rows >= threshold detect

    def best(self) -> tuple[float, float]:
        """(threshold, score) of the maximum; ties go to the highest threshold, as in NAB."""
        i = int(np.argmax(self.scores))
        return float(self.thresholds[i]), float(self.scores[i])


def threshold_curve(sweeps: Sequence[Sweep], scores: Sequence[np.ndarray], cost: CostMatrix) -> ThresholdCurve:
    """NAB's ``calcScoreByThreshold`` over the rows of all files together, vectorised.

    Rows are visited from the highest anomaly score down; each visited row detects. A row
    outside windows adds its (negative) sweep score; a row inside a window lifts the window
    from -fn to the best sweep score detected so far (the earliest row), so its contribution
    is the increase of a running maximum per window.
    """
    window, value, anomaly = [], [], []
    offset = 0
    for s, sc in zip(sweeps, scores, strict=True):
        keep = s.window != PROBATIONARY
        window.append(np.where(s.window[keep] >= 0, s.window[keep] + offset, OUTSIDE))
        value.append(s.weighted(cost)[keep])
        anomaly.append(_checked_scores(sc, s.window.size)[keep])
        offset += s.n_windows
    window, value, anomaly = np.concatenate(window), np.concatenate(value), np.concatenate(anomaly)

    order = np.argsort(-anomaly, kind="stable")
    window, value, anomaly = window[order], value[order], anomaly[order]
    change = np.where(window == OUTSIDE, value, 0.0)
    inside = np.flatnonzero(window >= 0)
    by_window = inside[np.argsort(window[inside], kind="stable")]  # grouped by window, in visit order
    bounds = np.flatnonzero(np.diff(window[by_window])) + 1
    for rows in np.split(by_window, bounds) if by_window.size else []:
        best = np.maximum.accumulate(np.concatenate(([-cost.fn], value[rows])))
        change[rows] = np.diff(best)

    n_scorable_windows = np.unique(window[inside]).size
    start = -cost.fn * n_scorable_windows  # nothing detected: every scorable window missed
    running = start + np.cumsum(change)
    last_of_level = np.append(np.flatnonzero(np.diff(anomaly)), anomaly.size - 1) if anomaly.size else np.zeros(0, dtype=int)
    return ThresholdCurve(
        thresholds=np.concatenate(([NO_DETECTION_THRESHOLD], anomaly[last_of_level])),
        scores=np.concatenate(([start], running[last_of_level])),
    )


def normalised(raw: float, null: float, perfect: float) -> float:
    """NAB's final score: 0 for the null detector, 100 for the perfect one.

    >>> normalised(-116.0, -116.0, 116.0), normalised(116.0, -116.0, 116.0)
    (0.0, 100.0)
    """
    return 100.0 * (raw - null) / (perfect - null)


@dataclass(frozen=True)
class ProfileResult:
    """A detector's NAB result under one profile."""

    profile: str
    threshold: float  # optimised over the corpus
    raw: float  # sum of the files' raw scores at that threshold
    null: float  # raw score of detecting nothing
    perfect: float  # raw score of catching every window at its first row
    score: float  # normalised, as on NAB's scoreboard
    files: dict[str, FileScore] = field(default_factory=dict)


def score_detector(
    files: Sequence[LabelledFile],
    scores: Mapping[str, np.ndarray],
    profiles: Mapping[str, CostMatrix],
    probation_fraction: float = PROBATION_FRACTION,
) -> dict[str, ProfileResult]:
    """Optimise the threshold per profile on the whole corpus, score each file at it, normalise."""
    missing = [f.name for f in files if f.name not in scores]
    if missing:
        raise ValueError(f"no anomaly scores for {missing}")
    sweeps = [sweep(f, probation_fraction) for f in files]
    file_scores = [scores[f.name] for f in files]
    results = {}
    for name, cost in profiles.items():
        threshold, _ = threshold_curve(sweeps, file_scores, cost).best()
        per_file = {f.name: score_file(s, sc, threshold, cost) for f, s, sc in zip(files, sweeps, file_scores)}
        raw = sum(r.score for r in per_file.values())
        null = -cost.fn * sum(np.unique(s.window[s.window >= 0]).size for s in sweeps)
        perfect = cost.tp * sum(len(f.windows) for f in files)
        results[name] = ProfileResult(name, threshold, raw, null, perfect, normalised(raw, null, perfect) if perfect != null else 0.0, per_file)
    return results


def _checked_scores(scores: np.ndarray, n_rows: int) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (n_rows,):
        raise ValueError(f"expected {n_rows} anomaly scores, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError(f"anomaly scores must be finite; row {int(np.flatnonzero(~np.isfinite(scores))[0])} is not")
    return scores
