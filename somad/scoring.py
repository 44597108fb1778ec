"""Scoring: a record -> a record score -> anomaly score in [0, 1] -> alerts.

Pure: no I/O and no clocks (the caller passes ``now``, unix seconds), bounded memory. One
``StreamScorer`` per stream (or sub-stream), called once per completed record, after the
learner has scored (and then learned from) the record's bytes.

Two detectors (``ScoringConfig.detector``); both stay at byte level (no field is read as a
number):

1. **novelty** (the default; bench/nab: NAB standard 57, soma's surprise 43 at best): how
   rare the record's field prefixes (each field's first ``novelty_depth`` bytes: sign,
   leading digits, decimal point) are in *all* of the stream's history (``somad.novelty``):
   their -log2 probability under all-time prefix counts is the record score, and where it
   falls among every earlier record's is the tail probability p; the anomaly score is
   ``1 - p``. soma forgets by design (a level it left an hour ago is new to it again); these
   counts do not, and NAB's anomalies are mostly values outside what the stream has shown.
2. **surprise**: soma's per-byte loss. The record score (``record_score``) is the bits of
   the record's bytes as one number, their mean, max or sum; or the same over the *excess*
   surprise, loss minus the entropy of the predicted distribution (what the model was sure
   of and got wrong; the noisy last digit of a reading costs bits but carries no excess).
   In the spirit of HTM's anomaly likelihood, the mean of the last ``fast_records`` record
   scores is judged against the running mean and variance of that same short mean at a
   slow time constant of ``slow_records`` records. Its standard score z gives a Gaussian
   tail probability p (one-sided, or two-sided when a stream that turns far *more*
   predictable, a frozen sensor, is an anomaly too), and the anomaly score is
   ``(1 - p) ** slow_records``: the probability that a whole slow window of ordinary
   records held nothing as extreme. A record moves the statistics at most ``clip_z``
   standard deviations' worth (one spike must not blind the detector to the next one), and
   during an alert only at the learning policy's rate (not at all when ``frozen``). They
   start afresh halfway through the warm-up, so they describe the trained model rather than
   its first, clueless bytes.

``last_tail`` keeps p itself (finer rankings than the anomaly score near 1.0). An alert can
open only at an *onset*: a record whose anomaly score is the highest of the last
``onset_records`` (``last_trigger``: the anomaly there, else 0), so an incident that goes
on, or a new level, alerts once at its start rather than at every record.

3. **Alerts**, per stream: open when ``n`` of the last ``m`` records reach ``threshold``;
   close once fewer than ``n`` of the last ``m`` reach ``close_below`` (hysteresis) for
   ``close_after`` records in a row (so one incident's bursts make one alert); after a
   close, ``cooldown_records`` records may not open a new alert. Each alert says which
   timescales the surprise came from: the learner's gradient power per band of the trace
   bank (band k remembers about r^k bytes), as shares of the power that went to each band
   *beyond its usual share* for this stream (the bands that always dominate explain
   nothing), the top ``top_timescales`` bands.
4. **Learning policy** while an alert is open (``learning_factor``): ``normal`` (1.0),
   ``reduced`` (``reduced_factor``), or ``frozen`` (0.0: a persistent fault keeps alerting
   instead of being learned as the new normal).

No anomaly score other than 0 and no alert during the first ``grace_period`` records: the
model and the statistics are still warming up.

>>> import numpy as np
>>> scorer = StreamScorer("demo")  # novelty
>>> for i in range(1200):  # an alert needs p <= 0.001: a history of 1000 records at least
...     scored, alerts = scorer.score_record(b"21.%d\\n" % (i % 7), np.ones(5), now=i)
>>> scored.anomaly < 0.9, alerts
(True, [])
>>> scored, alerts = scorer.score_record(b"99.9\\n", np.ones(5), now=1200.0)
>>> scored.anomaly > 0.99, [a.kind for a in alerts], scorer.alert_open
(True, ['open'], True)
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from .events import AlertEvent, RecordScored, Timescale
from .novelty import EmpiricalTail, PrefixCounts, RepeatRuns, split_fields

PHI = (1.0 + math.sqrt(5.0)) / 2.0  # the model's default base r (kept here: scoring imports no torch)

RECORD_SCORES = ("mean", "max", "sum", "mean_excess", "max_excess", "sum_excess")
DETECTORS = ("novelty", "surprise")
# Warm-up per detector: novelty judges against its own history (100 records, bench/nab_novelty:
# 300 costs 0.7 NAB points, 1000 costs 6); surprise waits for soma to learn the stream.
GRACE_PERIODS = {"novelty": 100, "surprise": 500}
DIRECTIONS = ("high", "both")
LEARNING_POLICIES = ("normal", "reduced", "frozen")
MIN_RECORDS_TO_CLIP = 10  # records in the statistics before their std is trusted to clip outliers


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ScoringConfig:
    """How per-byte loss becomes a record score and an anomaly score (YAML ``scoring:``)."""

    detector: str = "novelty"  # novelty: how rare the record's field prefixes are in all the stream's history; surprise: soma's loss judged against its running statistics (NAB: bench/nab)
    novelty_depth: int = 6  # novelty: leading bytes of each field that are counted
    novelty_slots: int = 65536  # novelty: prefix table size, a power of two (24 bytes a slot, fixed)
    novelty_repeats: bool = False  # novelty: also judge how long each field's value has stayed the same against its usual runs (a stuck sensor; NAB 57.04 -> 37.49: real series repeat values often)
    onset_records: int = 200  # an alert opens only at a record whose anomaly is the highest of the last this many (0: at any record)
    record_score: str = "mean"  # surprise: mean | max | sum of the record's bits; *_excess: the same over loss - entropy
    grace_period: int | None = None  # records scored 0 (never alerting) while warming up; None: the detector's own (GRACE_PERIODS)
    fast_records: int = 3  # surprise: the mean of this many latest record scores is what gets judged
    slow_records: float = 500.0  # surprise: time constant (records) of the long-run mean and variance it is judged against
    direction: str = "both"  # surprise: "high": only more surprise than usual; "both": far less too (a frozen sensor)
    clip_z: float = 6.0  # surprise: a record moves the statistics as if at most this many std devs from the mean
    min_std: float = 0.05  # surprise: bits, floor on the long-run std, so a steady stream is not alarmed by rounding
    base: float = PHI  # r of the model: band k of the trace bank remembers about r^k bytes
    top_timescales: int = 3  # bands named in an alert (the largest shares of unusual gradient power)

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ValueError(f"scoring.detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")
        if not 1 <= self.novelty_depth <= 64:
            raise ValueError(f"scoring.novelty_depth must be in 1..64, got {self.novelty_depth}")
        if not (16 <= self.novelty_slots <= 1 << 24 and self.novelty_slots & (self.novelty_slots - 1) == 0):
            raise ValueError(f"scoring.novelty_slots must be a power of two in 16..16777216, got {self.novelty_slots}")
        if not 0 <= self.onset_records <= 10_000:
            raise ValueError(f"scoring.onset_records must be in 0..10000, got {self.onset_records}")
        if self.record_score not in RECORD_SCORES:
            raise ValueError(f"scoring.record_score must be one of {', '.join(RECORD_SCORES)}, got {self.record_score!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"scoring.direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")
        if self.grace_period is not None and self.grace_period < 0:
            raise ValueError(f"scoring.grace_period must be >= 0, got {self.grace_period}")
        if not 1 <= self.fast_records <= 1000:
            raise ValueError(f"scoring.fast_records must be in 1..1000, got {self.fast_records}")
        if not self.slow_records >= 2 * self.fast_records:
            raise ValueError(f"scoring.slow_records ({self.slow_records}) must be >= 2 * fast_records ({self.fast_records})")
        if not self.clip_z > 0:
            raise ValueError(f"scoring.clip_z must be > 0, got {self.clip_z}")
        if not self.min_std > 0:
            raise ValueError(f"scoring.min_std must be > 0, got {self.min_std}")
        if not 1.0 < self.base <= 16.0:
            raise ValueError(f"scoring.base must be in (1, 16], got {self.base}")
        if self.top_timescales < 0:
            raise ValueError(f"scoring.top_timescales must be >= 0, got {self.top_timescales}")

    @property
    def grace(self) -> int:
        """Records scored 0 at the start: ``grace_period``, or the detector's own."""
        return GRACE_PERIODS[self.detector] if self.grace_period is None else self.grace_period

    @property
    def needs_entropy(self) -> bool:
        return self.detector == "surprise" and self.record_score.endswith("_excess")


@dataclass(frozen=True)
class AlertConfig:
    """When an alert opens and closes, and how the model learns meanwhile (YAML ``alerts:``)."""

    threshold: float = 0.999  # anomaly score at or above which a record counts towards opening (novelty: rarer than 99.9 % of the stream's records so far; NAB's own optimum is 0.9966, but a months-long stream pays more for alert fatigue)
    n_of_m: tuple[int, int] = (1, 1)  # open when n of the last m records reach the threshold
    close_below: float = 0.9  # hysteresis: an open alert is quiet while fewer than n of the last m reach this
    close_after: int = 10  # quiet records in a row that close an alert (bursts of one incident stay one alert)
    cooldown_records: int = 10  # after a close, this many records cannot open a new alert
    learn_while_open: str = "normal"  # normal | reduced | frozen while an alert is open; normal won on NAB (23.2 vs 0.0 standard: bench/nab)
    reduced_factor: float = 0.1  # share of the normal learning rate under "reduced"

    def __post_init__(self) -> None:
        n_of_m = tuple(self.n_of_m) if isinstance(self.n_of_m, (list, tuple)) else ()
        if len(n_of_m) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in n_of_m):
            raise ValueError(f"alerts.n_of_m must be two integers [n, m], got {self.n_of_m!r}")
        object.__setattr__(self, "n_of_m", n_of_m)  # YAML gives a list; keep it hashable
        n, m = n_of_m
        if not 1 <= n <= m <= 10_000:
            raise ValueError(f"alerts.n_of_m needs 1 <= n <= m <= 10000, got [{n}, {m}]")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"alerts.threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.close_below <= self.threshold:
            raise ValueError(f"alerts.close_below must be in [0, threshold={self.threshold}], got {self.close_below}")
        if self.close_after < 1:
            raise ValueError(f"alerts.close_after must be >= 1, got {self.close_after}")
        if self.cooldown_records < 0:
            raise ValueError(f"alerts.cooldown_records must be >= 0, got {self.cooldown_records}")
        if self.learn_while_open not in LEARNING_POLICIES:
            raise ValueError(f"alerts.learn_while_open must be one of {', '.join(LEARNING_POLICIES)}, got {self.learn_while_open!r}")
        if not 0.0 < self.reduced_factor <= 1.0:
            raise ValueError(f"alerts.reduced_factor must be in (0, 1], got {self.reduced_factor}")

    def learning_factor(self, alert_open: bool) -> float:
        """Share of the normal learning rate, given whether an alert is open."""
        if not alert_open or self.learn_while_open == "normal":
            return 1.0
        return self.reduced_factor if self.learn_while_open == "reduced" else 0.0


# --------------------------------------------------------------------------- record score


def record_score(bits: np.ndarray, how: str = "mean", entropy: np.ndarray | None = None) -> float:
    """One number for a record from its bytes' losses (bits), per ``how`` (see RECORD_SCORES).

    >>> record_score(np.array([1.0, 3.0, 2.0]))
    2.0
    >>> record_score(np.array([1.0, 3.0, 2.0]), "max")
    3.0
    >>> record_score(np.array([1.0, 3.0]), "sum_excess", entropy=np.array([2.0, 1.0]))
    2.0
    """
    values = np.asarray(bits, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("a record score needs at least one byte's loss")
    if how.endswith("_excess"):
        if entropy is None:
            raise ValueError(f"record score {how!r} needs the entropy of each byte's prediction")
        entropy = np.asarray(entropy, dtype=np.float64).reshape(-1)
        if entropy.shape != values.shape:
            raise ValueError(f"entropy has {entropy.size} values for {values.size} bytes")
        values = values - entropy
        how = how.removesuffix("_excess")
        if how == "sum":  # only the bytes that beat the model count: the rest is noise it expected
            values = np.maximum(values, 0.0)
    if how == "mean":
        return float(values.mean())
    if how == "max":
        return float(values.max())
    if how == "sum":
        return float(values.sum())
    raise ValueError(f"unknown record score {how!r} (known: {', '.join(RECORD_SCORES)})")


# --------------------------------------------------------------------------- statistics


class RunningMoments:
    """Exponentially weighted mean and variance with time constant ``tau`` (observations).

    Until ``tau`` observations have been seen it is the plain running mean and variance, so
    the first values are not biased towards a starting point. ``update(x, weight)`` counts
    as ``weight`` observations (0 leaves it unchanged).

    >>> m = RunningMoments(tau=100)
    >>> for x in (1.0, 2.0, 3.0):
    ...     m.update(x)
    >>> m.mean, round(m.var, 4)
    (2.0, 0.6667)
    """

    def __init__(self, tau: float):
        self.tau = float(tau)
        self.count = 0.0  # observations seen (weighted), capped at tau
        self.mean = 0.0
        self.var = 0.0

    def update(self, x: float, weight: float = 1.0) -> None:
        if weight <= 0:
            return
        self.count = min(self.count + weight, self.tau)
        alpha = min(1.0, weight / self.count)
        diff = x - self.mean
        self.mean += alpha * diff
        self.var = (1.0 - alpha) * (self.var + alpha * diff * diff)

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def state_dict(self) -> dict:
        return {"count": float(self.count), "mean": float(self.mean), "var": float(self.var)}

    def load_state_dict(self, d: dict) -> None:
        self.count = min(float(d["count"]), self.tau)
        self.mean = float(d["mean"])
        self.var = float(d["var"])


class MovingMean:
    """Exact mean of the last ``size`` values (a fixed-size ring).

    >>> w = MovingMean(2)
    >>> for x in (1.0, 3.0, 5.0):
    ...     w.push(x)
    >>> w.mean
    4.0
    """

    def __init__(self, size: int):
        self.values: deque[float] = deque(maxlen=size)

    def push(self, x: float) -> None:
        self.values.append(x)

    @property
    def mean(self) -> float:
        # summed afresh (at most 1000 values): no drift from a running sum over months of records
        return math.fsum(self.values) / len(self.values) if self.values else 0.0


def gaussian_tail(z: float, two_sided: bool) -> float:
    """P(Z >= z), or P(|Z| >= |z|) when two-sided, for a standard normal Z (full precision
    far into the tail, where 1 - Phi(z) would round to 0).

    >>> round(gaussian_tail(1.6449, False), 4), round(gaussian_tail(-1.96, True), 4)
    (0.05, 0.05)
    """
    if two_sided:
        return math.erfc(abs(z) / math.sqrt(2.0))
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def anomaly_from_tail(p: float, window: float) -> float:
    """Probability that ``window`` independent ordinary records all stay below a record
    whose tail probability is ``p``: (1 - p) ** window, computed without underflow.

    >>> anomaly_from_tail(0.0, 1000.0), round(anomaly_from_tail(1e-5, 1000.0), 4)
    (1.0, 0.99)
    """
    return math.exp(window * math.log1p(-min(p, 1.0 - 1e-16)))


# --------------------------------------------------------------------------- timescales


def band_taus(n_bands: int, base: float = PHI) -> list[float]:
    """Memory of each band of the trace bank, in bytes: band k = 1..K remembers about r^k.

    >>> [round(t, 2) for t in band_taus(3)]
    [1.62, 2.62, 4.24]
    """
    return [base ** (k + 1) for k in range(n_bands)]


def power_shares(band_power: np.ndarray | None) -> np.ndarray | None:
    """Gradient power per band as shares of its total (None when there is no power).

    >>> power_shares(np.array([1.0, 3.0])).tolist(), power_shares(np.zeros(2))
    ([0.25, 0.75], None)
    """
    if band_power is None:
        return None
    power = np.asarray(band_power, dtype=np.float64).reshape(-1)
    power = np.where(np.isfinite(power) & (power > 0), power, 0.0)
    total = float(power.sum())
    return power / total if total > 0 else None


def band_timescales(band_power: np.ndarray, taus: list[float], top: int = 3) -> tuple[Timescale, ...]:
    """The bands holding the most gradient power, as ``Timescale(band, tau_bytes, share)``.

    ``band_power[i]`` is band k = i + 1, remembering about ``taus[i]`` bytes; shares are of
    the total power over all bands, so those returned sum to at most 1. Empty when there is
    no power (a record the model did not learn from).

    >>> power = np.array([1.0, 0.0, 3.0])
    >>> [(t.band, round(t.tau_bytes, 1), t.share) for t in band_timescales(power, band_taus(3), top=2)]
    [(3, 4.2, 0.75), (1, 1.6, 0.25)]
    """
    power = np.asarray(band_power, dtype=np.float64).reshape(-1)
    if power.size != len(taus):
        raise ValueError(f"band_power has {power.size} bands, the timescales {len(taus)}")
    power = np.where(np.isfinite(power) & (power > 0), power, 0.0)
    total = float(power.sum())
    if total <= 0.0 or top <= 0:
        return ()
    order = np.argsort(-power, kind="stable")[:top]
    return tuple(Timescale(band=int(i) + 1, tau_bytes=float(taus[i]), share=float(power[i] / total)) for i in order if power[i] > 0)


# --------------------------------------------------------------------------- alert state machine


class AlertState:
    """Open / close decisions on a sequence of anomaly scores (n of m, hysteresis, cooldown).

    >>> state = AlertState(AlertConfig(threshold=0.9, n_of_m=(2, 3), close_below=0.5, close_after=1, cooldown_records=1))
    >>> [state.step(a) for a in (0.95, 0.1, 0.97, 0.8, 0.2, 0.3, 0.99, 0.99, 0.99)]
    [None, None, 'open', None, None, 'close', None, 'open', None]
    """

    def __init__(self, cfg: AlertConfig):
        self.cfg = cfg
        self.recent: deque[float] = deque(maxlen=cfg.n_of_m[1])  # anomaly scores of the last m records (closing)
        self.triggers: deque[float] = deque(maxlen=cfg.n_of_m[1])  # what may open an alert, last m records
        self.open = False
        self.quiet = 0  # records in a row an open alert has been quiet
        self.cooldown = 0  # records left during which no alert may open

    def step(self, anomaly: float, trigger: float | None = None) -> str | None:
        """Account one record's anomaly score; return "open", "close" or None. ``trigger``:
        what may open an alert (default: the anomaly; the scorer passes the anomaly at an
        onset, else 0), while an open alert stays open as long as the anomaly stays high."""
        self.recent.append(anomaly)
        self.triggers.append(anomaly if trigger is None else trigger)
        n = self.cfg.n_of_m[0]
        if self.open:
            quiet = sum(a >= self.cfg.close_below for a in self.recent) < n
            self.quiet = self.quiet + 1 if quiet else 0
            if self.quiet >= self.cfg.close_after:
                self.open = False
                self.quiet = 0
                self.cooldown = self.cfg.cooldown_records
                return "close"
            return None
        if self.cooldown > 0:
            self.cooldown -= 1
            return None
        if sum(a >= self.cfg.threshold for a in self.triggers) >= n:
            self.open = True
            return "open"
        return None

    def state_dict(self) -> dict:
        return {"recent": [float(a) for a in self.recent], "triggers": [float(a) for a in self.triggers], "open": self.open, "quiet": self.quiet, "cooldown": self.cooldown}

    def load_state_dict(self, d: dict) -> None:
        self.recent.clear()
        self.recent.extend(float(a) for a in d["recent"])
        self.triggers.clear()
        self.triggers.extend(float(a) for a in d.get("triggers", d["recent"]))  # a version 1 state: as before, the anomalies
        self.open = bool(d["open"])
        self.quiet = int(d["quiet"])
        self.cooldown = int(d["cooldown"])


@dataclass
class _OpenAlert:
    """What an open alert has gathered so far (the close event reports it)."""

    alert_id: str
    started_at: float
    records: int  # records seen while open, the opening one included
    peak_anomaly: float
    peak_z: float  # extremity of the peak record: z (high) or |z| (both)
    peak_bits: float  # record score of the peak record
    peak_record: bytes
    power: list[float]  # per-band shares of gradient power, summed over the alert's records that had any
    power_records: int  # records summed into ``power`` (none learn under the frozen policy)

    def state_dict(self) -> dict:
        d = {k: float(v) if isinstance(v, float) else v for k, v in vars(self).items()}  # numpy floats -> float
        d["peak_record"] = self.peak_record.decode("latin-1")  # plain str: checkpoints hold no bytes objects
        d["power"] = [float(p) for p in self.power]
        return d

    @classmethod
    def from_state_dict(cls, d: dict) -> _OpenAlert:
        fields = dict(d)
        fields["peak_record"] = str(d["peak_record"]).encode("latin-1")
        fields["power"] = [float(p) for p in d["power"]]
        fields["power_records"] = int(d["power_records"])
        return cls(**fields)


# --------------------------------------------------------------------------- the scorer


def _not_plain(value, where: str) -> str:
    """Where ``value`` holds something other than None, bool, int, float, str, list, tuple or
    dict ("" when nothing): a saved scorer state is plain data, and is read from a file.

    >>> _not_plain({"a": [1, 2.5, None]}, "state"), _not_plain({"a": [np.zeros(2)]}, "state")
    ('', 'state.a[0] is a ndarray')
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return ""
    if isinstance(value, dict):
        return next((p for k, v in value.items() if (p := _not_plain(v, f"{where}.{k}"))), "")
    if isinstance(value, (list, tuple)):
        return next((p for i, v in enumerate(value) if (p := _not_plain(v, f"{where}[{i}]"))), "")
    return f"{where} is a {type(value).__name__}"


class StreamScorer:
    """Record scores, anomaly scores and alerts for one stream; see the module docstring.

    ``band_taus`` (bytes remembered by each band) overrides r^k from ``scoring.base`` when
    the model's bands are spaced otherwise.
    """

    STATE_VERSION = 2  # 2 added "novelty" and "recent"; a version 1 state loads with both fresh
    _STATE_KEYS = ("records", "alerts_total", "fast", "slow", "alerts", "open_alert", "last", "usual_shares", "usual_count")

    def __init__(
        self,
        stream: str,
        scoring: ScoringConfig | None = None,
        alerts: AlertConfig | None = None,
        band_taus: list[float] | None = None,
    ):
        self.stream = stream
        self.scoring = scoring or ScoringConfig()
        self.alerts = alerts or AlertConfig()
        self.band_taus = list(band_taus) if band_taus is not None else None
        self.fast = MovingMean(self.scoring.fast_records)
        self.slow = RunningMoments(self.scoring.slow_records)
        self.novelty, self.tail, self.runs = self._fresh_novelty()
        self.recent: deque[float] = deque(maxlen=max(self.scoring.onset_records, 1))  # anomalies before this record (onsets)
        self.state = AlertState(self.alerts)
        self.records = 0  # records scored since the stream began (survives restarts via state_dict)
        self.alerts_total = 0  # alerts opened since the stream began
        self.last_score = 0.0  # latest record score (bits)
        self.last_z = 0.0  # latest standard score of the short mean (0 during grace)
        self.last_tail = 1.0  # its tail probability: the finest-grained ranking
        self.last_anomaly = 0.0
        self.last_trigger = 0.0  # what the alert machine judged: the anomaly at an onset, else 0 (NAB scores this)
        self._alert: _OpenAlert | None = None
        self._usual_shares: np.ndarray | None = None  # running mean of per-band power shares outside alerts
        self._usual_count = 0.0

    # ------------------------------------------------------------------ public API

    @property
    def alert_open(self) -> bool:
        return self.state.open

    def learning_factor(self) -> float:
        """Share of the normal learning rate for the next bytes (1.0 unless an alert is open)."""
        return self.alerts.learning_factor(self.state.open)

    def record_score(self, bits: np.ndarray, entropy: np.ndarray | None = None) -> float:
        """The record score of these per-byte losses under this stream's configuration."""
        return record_score(bits, self.scoring.record_score, entropy)

    def score_record(
        self,
        record: bytes,
        bits: np.ndarray,
        *,
        band_power: np.ndarray | None = None,
        entropy: np.ndarray | None = None,
        now: float = 0.0,
    ) -> tuple[RecordScored, list[AlertEvent]]:
        """Score one completed record from its bytes' losses (bits, scored before learning).

        ``band_power`` (K,): the learner's gradient power per band over the record, for the
        alert's timescales. ``entropy``: per-byte entropy of the predictions (bits), needed
        by the *_excess record scores. ``now``: unix seconds, stamped on the events.
        """
        bits, entropy, shares, now = self._checked(bits, entropy, band_power, now)
        index = self.records
        if self.novelty is not None:
            fields = split_fields(bytes(record))
            score = self.novelty.observe_fields(fields)
            z, tail, anomaly = self._judge_novelty(score, fields, index)
        else:
            score = record_score(bits, self.scoring.record_score, entropy)
            z, tail, anomaly = self._judge(score, index)
        trigger = self._onset(anomaly)
        transition = self.state.step(anomaly, trigger)
        if self.novelty is None:
            self._learn_statistics(index)  # after the step: at the rate its outcome allows
        self.records += 1
        self.last_score, self.last_z, self.last_tail, self.last_anomaly, self.last_trigger = score, z, tail, anomaly, trigger
        events = self._alert_events(transition, record, score, z, anomaly, shares, index, now)
        if not self.state.open:
            self._learn_usual_shares(shares)
        return RecordScored(self.stream, now, index, bytes(record), score, anomaly), events

    # ------------------------------------------------------------------ scoring

    def _checked(self, bits, entropy, band_power, now) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, float]:
        """Validate every input before any state changes: a bad record leaves the scorer as it was."""
        where = f"stream {self.stream!r}, record {self.records}"
        now = float(now)
        if not math.isfinite(now):
            raise ValueError(f"{where}: now must be finite unix seconds, got {now}")
        shares = power_shares(band_power)
        if shares is not None and self.band_taus is not None and shares.size != len(self.band_taus):
            raise ValueError(f"{where}: band_power has {shares.size} bands, band_taus {len(self.band_taus)}")
        bits = np.asarray(bits, dtype=np.float64).reshape(-1)
        if bits.size == 0:
            raise ValueError(f"{where}: no per-byte losses (an empty record has nothing to score)")
        if not np.isfinite(bits).all():
            raise ValueError(f"{where}: per-byte losses must be finite, got {bits[~np.isfinite(bits)][:3].tolist()}")
        if entropy is None:
            if self.scoring.needs_entropy:
                raise ValueError(f"{where}: record_score {self.scoring.record_score!r} needs the per-byte entropy")
            return bits, None, shares, now
        entropy = np.asarray(entropy, dtype=np.float64).reshape(-1)
        if entropy.shape != bits.shape or not np.isfinite(entropy).all():
            raise ValueError(f"{where}: entropy must be finite with one value per byte ({bits.size}), got shape {entropy.shape}")
        return bits, entropy, shares, now

    def _fresh_novelty(self) -> tuple[PrefixCounts | None, EmpiricalTail | None, RepeatRuns | None]:
        if self.scoring.detector != "novelty":
            return None, None, None
        runs = RepeatRuns(warmup=self.scoring.grace) if self.scoring.novelty_repeats else None
        return PrefixCounts(self.scoring.novelty_depth, self.scoring.novelty_slots), EmpiricalTail(warmup=self.scoring.grace), runs

    def _judge_novelty(self, score: float, fields: list[bytes], index: int) -> tuple[float, float, float]:
        """-log10 p, p and 1 - p: p the share of the stream's earlier records at least as novel,
        or of its completed runs of one value at least as long as a field's current one, the rarer."""
        rarity = self.tail.judge(score)
        if self.runs is not None:
            rarity = max(rarity, self.runs.observe(fields))
        if index < self.scoring.grace:
            return 0.0, 1.0, 0.0
        tail = 10.0 ** -rarity
        return rarity, tail, 1.0 - tail

    def _onset(self, anomaly: float) -> float:
        """``anomaly`` if it is the highest of the last ``onset_records`` (an incident's first
        or rising records), else 0: what the alert machine judges. A high that merely goes on
        is the same incident, and NAB counts every detection outside a window against us."""
        if not self.scoring.onset_records:
            return anomaly
        trigger = anomaly if not self.recent or anomaly >= max(self.recent) else 0.0
        self.recent.append(anomaly)
        return trigger

    def _judge(self, score: float, index: int) -> tuple[float, float, float]:
        """z, tail probability and anomaly score of the short mean after ``score``."""
        self.fast.push(score)
        if index < self.scoring.grace or self.slow.count < 2:
            return 0.0, 1.0, 0.0
        z = (self.fast.mean - self.slow.mean) / max(self.slow.std, self.scoring.min_std)
        tail = gaussian_tail(z, two_sided=self.scoring.direction == "both")
        return z, tail, anomaly_from_tail(tail, self.scoring.slow_records)

    def _learn_statistics(self, index: int) -> None:
        """Fold the short mean into the long-run statistics: clipped once warm, and at the
        learning policy's rate while an alert is open (frozen: the anomaly is not learned)."""
        if index == self.scoring.grace // 2:
            # a fresh model's loss falls fast: the statistics start afresh halfway through the
            # warm-up, to describe the trained model rather than its first bytes
            self.slow = RunningMoments(self.scoring.slow_records)
        x = self.fast.mean
        if self.slow.count >= MIN_RECORDS_TO_CLIP:
            reach = self.scoring.clip_z * max(self.slow.std, self.scoring.min_std)
            x = min(max(x, self.slow.mean - reach), self.slow.mean + reach)
        self.slow.update(x, weight=self.learning_factor())

    # ------------------------------------------------------------------ alerts

    def _alert_events(self, transition, record, score, z, anomaly, shares, index, now) -> list[AlertEvent]:
        extremity = z if self.scoring.direction == "high" else abs(z)
        if transition == "open":
            self.alerts_total += 1
            self._alert = _OpenAlert(
                alert_id=f"{self.stream}-{index}-{int(now)}",
                started_at=float(now),
                records=1,
                peak_anomaly=anomaly,
                peak_z=extremity,
                peak_bits=score,
                peak_record=bytes(record),
                power=shares.tolist() if shares is not None else [],
                power_records=int(shares is not None),
            )
            return [self._event("open", self._alert, record, score, now, shares)]
        alert = self._alert
        if alert is None:  # closed, or open in a state saved without one (cannot happen from state_dict)
            return []
        alert.records += 1
        alert.peak_anomaly = max(alert.peak_anomaly, anomaly)
        if extremity > alert.peak_z:
            alert.peak_z, alert.peak_bits, alert.peak_record = extremity, score, bytes(record)
        if shares is not None and (not alert.power or len(alert.power) == len(shares)):
            alert.power = shares.tolist() if not alert.power else [a + b for a, b in zip(alert.power, shares.tolist())]
            alert.power_records += 1
        if transition != "close":
            return []
        self._alert = None
        shares = np.array(alert.power) / alert.power_records if alert.power else None
        return [self._event("close", alert, alert.peak_record, alert.peak_bits, now, shares)]

    def _learn_usual_shares(self, shares: np.ndarray | None) -> None:
        """Running mean (slow time constant) of how the gradient power splits over the bands."""
        if shares is None:
            return
        if self._usual_shares is None or self._usual_shares.shape != shares.shape:
            self._usual_shares, self._usual_count = np.zeros_like(shares), 0.0
        self._usual_count = min(self._usual_count + 1.0, self.scoring.slow_records)
        self._usual_shares += (shares - self._usual_shares) / self._usual_count

    def _explain(self, shares: np.ndarray | None) -> tuple[Timescale, ...]:
        """Timescales of an alert: the bands whose share of the power rose above the usual
        (all of the power, when none rose or nothing is usual yet)."""
        if shares is None:
            return ()
        unusual = shares
        if self._usual_shares is not None and self._usual_shares.shape == shares.shape:
            excess = np.maximum(shares - self._usual_shares, 0.0)
            if excess.sum() > 1e-6:
                unusual = excess
        taus = self.band_taus if self.band_taus is not None else band_taus(len(shares), self.scoring.base)
        return band_timescales(unusual, taus, self.scoring.top_timescales)

    def _event(self, kind, alert: _OpenAlert, record, bits, now, shares) -> AlertEvent:
        timescales = self._explain(shares)
        return AlertEvent(
            kind=kind,
            stream=self.stream,
            alert_id=alert.alert_id,
            started_at=alert.started_at,
            time=float(now),
            peak_anomaly=alert.peak_anomaly,
            peak_bits=bits if kind == "open" else alert.peak_bits,
            records=alert.records,
            record=bytes(record),
            timescales=timescales,
        )

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict:
        """Everything needed to resume, as plain ints, floats, strs, lists and dicts (it is
        saved inside a torch checkpoint loaded with ``weights_only=True``)."""
        return {
            "version": self.STATE_VERSION,
            "records": self.records,
            "alerts_total": self.alerts_total,
            "fast": [float(x) for x in self.fast.values],
            "slow": self.slow.state_dict(),
            "alerts": self.state.state_dict(),
            "open_alert": self._alert.state_dict() if self._alert is not None else None,
            "last": [float(self.last_score), float(self.last_z), float(self.last_tail), float(self.last_anomaly)],
            "usual_shares": self._usual_shares.tolist() if self._usual_shares is not None else None,
            "usual_count": self._usual_count,
            "recent": [float(x) for x in self.recent],
            # numpy arrays (the checkpoint stores them as tensors): 24 bytes a slot as plain lists would be ~10x
            "novelty": {"counts": self.novelty.state_dict(), "tail": self.tail.state_dict(), "runs": self.runs.state_dict() if self.runs is not None else None}
            if self.novelty is not None else None,
        }

    def _loaded_novelty(self, saved: dict | None) -> tuple[PrefixCounts | None, EmpiricalTail | None, RepeatRuns | None]:
        """Novelty tables from a saved state; fresh ones when none was saved or its size differs."""
        novelty, tail, runs = self._fresh_novelty()
        if novelty is None or saved is None:
            return novelty, tail, runs
        if int(saved["counts"]["depth"]) != novelty.depth or int(saved["counts"]["slots"]) != novelty.slots:
            return novelty, tail, runs  # the config changed the table: counting starts afresh
        novelty.load_state_dict(saved["counts"])
        tail.load_state_dict(saved["tail"])
        if runs is not None and saved.get("runs") is not None:
            runs.load_state_dict(saved["runs"])
        return novelty, tail, runs

    def load_state_dict(self, d: dict) -> None:
        """Resume from ``state_dict()``. Windows resized in the config keep their latest values;
        novelty tables of another size or detector, or from a version 1 state, start fresh."""
        if not isinstance(d, dict) or type(d.get("version")) is not int or d["version"] not in (1, self.STATE_VERSION):
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"stream {self.stream!r}: scorer state version {got!r} is not {self.STATE_VERSION}")
        foreign = _not_plain({k: v for k, v in d.items() if k != "novelty"}, "state")
        if foreign:  # state_dict() writes only plain values (and the novelty arrays); a tensor here would fail much later
            raise ValueError(f"stream {self.stream!r}: malformed scorer state: {foreign}")
        missing = set(self._STATE_KEYS) - set(d)
        if missing:
            raise ValueError(f"stream {self.stream!r}: scorer state lacks {', '.join(sorted(missing))}")
        try:
            fast = MovingMean(self.scoring.fast_records)
            for x in d["fast"]:
                fast.push(float(x))
            slow = RunningMoments(self.scoring.slow_records)
            slow.load_state_dict(d["slow"])
            state = AlertState(self.alerts)
            state.load_state_dict(d["alerts"])
            alert = _OpenAlert.from_state_dict(d["open_alert"]) if d["open_alert"] is not None else None
            last = [float(v) for v in d["last"]]
            records, alerts_total = int(d["records"]), int(d["alerts_total"])
            usual = np.array([float(v) for v in d["usual_shares"]]) if d["usual_shares"] is not None else None
            usual_count = min(float(d["usual_count"]), self.scoring.slow_records)
            recent = deque((float(x) for x in d.get("recent", [])), maxlen=self.recent.maxlen)
            novelty, tail, runs = self._loaded_novelty(d.get("novelty"))
        except (KeyError, TypeError, ValueError, IndexError, ArithmeticError) as err:
            raise ValueError(f"stream {self.stream!r}: malformed scorer state: {err!r}") from err
        counts = {"records": records, "alerts_total": alerts_total, "slow.count": slow.count, "slow.var": slow.var,
                  "usual_count": usual_count, "alerts.quiet": state.quiet, "alerts.cooldown": state.cooldown}  # fmt: skip
        bad = [name for name, value in counts.items() if not 0 <= value < math.inf]
        if bad or not math.isfinite(slow.mean):
            raise ValueError(f"stream {self.stream!r}: malformed scorer state: {', '.join(bad or ['slow.mean'])} out of range")
        if state.open != (alert is not None):
            raise ValueError(f"stream {self.stream!r}: scorer state says alert open={state.open} but carries {alert is not None and 'an' or 'no'} open alert")
        self.fast, self.slow, self.state, self._alert = fast, slow, state, alert
        self.recent, self.novelty, self.tail, self.runs = recent, novelty, tail, runs
        self.records, self.alerts_total = records, alerts_total
        self.last_score, self.last_z, self.last_tail, self.last_anomaly = last
        self._usual_shares, self._usual_count = usual, usual_count
