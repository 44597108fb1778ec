"""Every Prometheus metric somad exports, defined in one place.

Conventions (client_python's): namespace ``somad``, base units in the name (``_seconds``,
``_bytes``), counters end in ``_total`` (the client adds the suffix), and the only label is
``stream`` (the build-info metric carries version labels; reload counters have none).
The names in ``FIXED_NAMES`` are a contract: dashboards and alert rules use them.

The daemon never touches a metric object. It holds one ``StreamMetrics`` per stream and
calls it once per processed batch and whenever it polls a source, learner or sink:

- ``observe_batch`` adds what the batch brought (bytes, records, per-byte losses, ...);
- ``set_source`` / ``set_learner`` / ``set_sink`` take the *cumulative* figures those
  components keep and add only the increase since the last call, so counters stay
  monotonic across polls, source restarts and model rollbacks;
- ``remove_stream`` drops every series of a stream (a reload that removes it).

>>> m = Metrics()
>>> s = m.stream("uart0")
>>> s.observe_batch(bytes=12, records=2, bits=[1.0] * 12, anomaly=0.25)
>>> m.registry.get_sample_value("somad_bytes_total", {"stream": "uart0"})
12.0
>>> m.registry.get_sample_value("somad_bits_per_byte_count", {"stream": "uart0"})
12.0
>>> m.remove_stream("uart0")
>>> m.registry.get_sample_value("somad_bytes_total", {"stream": "uart0"}) is None
True
"""

from __future__ import annotations

import numbers
import platform
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from . import __version__

if TYPE_CHECKING:
    from adapters.base import SourceStatus

NAMESPACE = "somad"
STREAM = ("stream",)

# Per-byte loss in bits: 0 is a certain prediction, 8 is a uniform guess over 256 byte values,
# and a confidently wrong prediction costs more than 8 (the tail buckets catch it).
BITS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 16.0)
# Byte-to-score latency: from a byte's arrival to its score, milliseconds when keeping up,
# seconds when the queue is backed up.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Names fixed by issue 5: dashboards and alert rules (deploy/) depend on them. promtool's lint
# asks for "bytes" instead of "bits" in somad_bits_per_byte; these are bits of information (a
# loss per byte of input), not a data size, so the name stays.
FIXED_NAMES = (
    "somad_bytes_total",
    "somad_records_total",
    "somad_dropped_bytes_total",
    "somad_bits_per_byte",
    "somad_anomaly_score",
    "somad_alerts_open",
    "somad_alerts_total",
    "somad_decimation_band",
    "somad_observations_total",
    "somad_source_connected",
    "somad_checkpoint_age_seconds",
    "somad_build_info",
)


class _BulkHistogram(Collector):
    """A per-stream histogram fed a whole array at a time.

    The client's ``Histogram.observe`` takes one value under a lock; per-byte losses arrive
    by the thousand per batch, so they are binned with numpy instead (one call per batch).
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]):
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)  # upper bounds, +Inf implied
        self._lock = threading.Lock()
        self._counts: dict[str, np.ndarray] = {}  # stream -> non-cumulative counts, len(bounds) + 1
        self._sums: dict[str, float] = {}

    def add_stream(self, stream: str) -> None:
        with self._lock:
            self._counts.setdefault(stream, np.zeros(len(self.bounds) + 1, dtype=np.int64))
            self._sums.setdefault(stream, 0.0)

    def remove_stream(self, stream: str) -> None:
        with self._lock:
            self._counts.pop(stream, None)
            self._sums.pop(stream, None)

    def observe_many(self, stream: str, values) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]  # a NaN is a numerical fault, counted elsewhere
        if values.size == 0:
            return
        # side="left": a value equal to a bound belongs to that bound's bucket (le = "<=").
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self.bounds) + 1)
        total = float(values.sum())
        with self._lock:
            if stream in self._counts:  # a removed stream stays removed
                self._counts[stream] += counts
                self._sums[stream] += total

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation, labels=STREAM)]

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=STREAM)
        with self._lock:
            rows = [(stream, np.cumsum(counts), self._sums[stream]) for stream, counts in self._counts.items()]
        for stream, cumulative, total in rows:
            bounds = [repr(float(b)) for b in self.bounds] + ["+Inf"]
            family.add_metric([stream], list(zip(bounds, (float(c) for c in cumulative))), total)
        yield family


class _Increases:
    """Turns cumulative figures (a source's error count, the learner's observations) into the
    increases a counter must be given.

    ``on_decrease="count"``: the figure restarted from zero (a new source object), so all of
    the new value is new. ``"skip"``: the figure went back to an older state (the model rolled
    back to a checkpoint), so nothing is new until it passes its new baseline.

    >>> inc = _Increases(on_decrease="count")
    >>> inc.step("errors", 3), inc.step("errors", 5), inc.step("errors", 1)
    (3, 2, 1)
    >>> inc = _Increases(on_decrease="skip")
    >>> inc.step("obs", 100), inc.step("obs", 40), inc.step("obs", 50)
    (100, 0, 10)
    """

    def __init__(self, on_decrease: str):
        if on_decrease not in ("count", "skip"):
            raise ValueError(f"on_decrease must be 'count' or 'skip', got {on_decrease!r}")
        self.on_decrease = on_decrease
        self._last: dict[str, float] = {}

    def step(self, key: str, total: float) -> float:
        last = self._last.get(key, 0)
        self._last[key] = total
        if total >= last:
            return total - last
        return total if self.on_decrease == "count" else 0

    def rebase(self, key: str, total: float) -> None:
        self._last[key] = total

    def forget(self, prefix: str) -> None:
        for key in [k for k in self._last if k.startswith(prefix)]:
            del self._last[key]


class Metrics:
    """All of somad's metrics on one registry (a fresh one per instance unless given).

    ``clock`` gives unix seconds; it is only used for the checkpoint age, computed at scrape
    time from the last snapshot (tests pass a fake clock).
    """

    def __init__(self, registry: CollectorRegistry | None = None, build_version: str = __version__, clock: Callable[[], float] = time.time):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock
        self._streams: dict[str, StreamMetrics] = {}
        self._lock = threading.Lock()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu, fds (Linux /proc)
        PlatformCollector(registry=self.registry)  # python_info
        self._define(self.registry)
        self.build_info.info({"version": build_version, "python": platform.python_version(), "torch": _package_version("torch")})

    def _define(self, r: CollectorRegistry) -> None:
        ns = {"namespace": NAMESPACE, "registry": r}
        per_stream = {"labelnames": STREAM, **ns}
        # --- ingestion
        self.bytes = Counter("bytes", "Bytes read from the stream's source and scored.", **per_stream)
        self.records = Counter("records", "Records (lines, messages, frames) scored.", **per_stream)
        self.dropped_bytes = Counter("dropped_bytes", "Bytes not learned: dropped by the source or by a full queue, or read by a model that was then rolled back.", **per_stream)
        self.cut_records = Counter("cut_records", "Records cut short at the framing's max_record_bytes.", **per_stream)
        self.latency = Histogram("score_latency_seconds", "Seconds from a chunk's arrival to its bytes being scored.", buckets=LATENCY_BUCKETS, **per_stream)
        # --- model and scores
        self.bits = _BulkHistogram("somad_bits_per_byte", "Loss of each scored byte in bits (scored before it is learned from).", BITS_BUCKETS)
        r.register(self.bits)
        self.anomaly = Gauge("anomaly_score", "Anomaly score of the latest record, 0..1, relative to the stream's own history.", **per_stream)
        self.alerts_open = Gauge("alerts_open", "Alerts open now.", **per_stream)
        self.alerts = Counter("alerts", "Alerts opened.", **per_stream)
        self.decimation_band = Gauge("decimation_band", "Decimation band d of the metabolism: one observation per r^d bytes.", **per_stream)
        self.observations = Counter("observations", "Observations (bytes learned from) made by the learner.", **per_stream)
        self.cost = Gauge("observations_per_byte", "Metabolic cost: observations per byte at the current band, r^-d.", **per_stream)
        self.efficiency = Gauge("spectral_efficiency", "Spectral efficiency r^d I(d): useful gradient power per unit of metabolic cost.", **per_stream)
        self.learning_rate = Gauge("learning_rate", "Learning rate (eta) in effect.", **per_stream)
        self.faults = Counter("numerical_faults", "Numerical faults (NaN/Inf) detected in the model.", **per_stream)
        self.rollbacks = Counter("rollbacks", "Model rollbacks to the last good checkpoint.", **per_stream)
        # --- source
        self.source_connected = Gauge("source_connected", "1 while the stream's source is connected, else 0.", **per_stream)
        self.source_reconnects = Counter("source_reconnects", "Source re-connections after a loss.", **per_stream)
        self.source_errors = Counter("source_errors", "Source faults: open failures, read errors, unplugs, broker losses.", **per_stream)
        self.source_refused = Counter("source_refused_connections", "Connections a listening source refused: over max_clients.", **per_stream)
        self.stream_restarts = Counter("stream_restarts", "Restarts of the stream's pipeline after a failure.", **per_stream)
        # --- checkpoints
        self.checkpoint_age = Gauge("checkpoint_age_seconds", "Seconds since the last checkpoint that holds the stream's model (since start if none).", **per_stream)
        self.snapshot_duration = Gauge("snapshot_duration_seconds", "Seconds the last snapshot attempt took.", **per_stream)
        self.snapshots = Counter("snapshots", "Snapshots written.", **per_stream)
        self.snapshot_failures = Counter("snapshot_failures", "Snapshots that failed.", **per_stream)
        # --- sinks (summed over the stream's sinks)
        self.sink_sent = Counter("sink_sent", "Events delivered by the stream's sinks.", **per_stream)
        self.sink_dropped = Counter("sink_dropped", "Events the stream's sinks had to drop.", **per_stream)
        self.sink_errors = Counter("sink_errors", "Faults seen by the stream's sinks.", **per_stream)
        # --- process-wide
        self.config_reloads = Counter("config_reloads", "Configuration reloads attempted (SIGHUP or remote).", **ns)
        self.config_reload_failures = Counter("config_reload_failures", "Configuration reloads rejected or rolled back.", **ns)
        self.build_info = Info("build", "somad build: version of somad, Python and torch.", **ns)
        self._per_stream = [
            self.bytes, self.records, self.dropped_bytes, self.cut_records, self.latency, self.anomaly,
            self.alerts_open, self.alerts, self.decimation_band, self.observations, self.cost,
            self.efficiency, self.learning_rate, self.faults, self.rollbacks, self.source_connected,
            self.source_reconnects, self.source_errors, self.source_refused, self.stream_restarts, self.checkpoint_age,
            self.snapshot_duration, self.snapshots, self.snapshot_failures, self.sink_sent,
            self.sink_dropped, self.sink_errors,
        ]  # fmt: skip

    # ------------------------------------------------------------------ streams

    def stream(self, name: str) -> StreamMetrics:
        """The handle for stream ``name`` (created on first use, with every series at zero)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"stream name must be a non-empty string, got {name!r}")
        with self._lock:
            handle = self._streams.get(name)
            if handle is None:
                handle = self._streams[name] = StreamMetrics(self, name)
            return handle

    def remove_stream(self, name: str) -> None:
        """Drop every series labelled ``stream=name`` (the stream was removed by a reload)."""
        with self._lock:
            self._streams.pop(name, None)
        for metric in self._per_stream:
            try:
                metric.remove(name)
            except KeyError:  # never created: nothing to remove
                pass
        self.bits.remove_stream(name)

    def stream_names(self) -> list[str]:
        with self._lock:
            return sorted(self._streams)

    # ------------------------------------------------------------------ process-wide

    def config_reloaded(self, ok: bool) -> None:
        """One reload attempt; ``ok=False`` when it was rejected or rolled back."""
        self.config_reloads.inc()
        if not ok:
            self.config_reload_failures.inc()


class StreamMetrics:
    """One stream's series. Thread-safe; get it from ``Metrics.stream(name)``."""

    def __init__(self, metrics: Metrics, name: str):
        self.name = name
        self._metrics = metrics
        self._lock = threading.Lock()
        self._source_totals = _Increases(on_decrease="count")  # a restarted source counts from 0
        self._sink_totals = _Increases(on_decrease="count")  # a rebuilt sink counts from 0
        self._learner_totals = _Increases(on_decrease="skip")  # a rolled-back model repeats history
        self._open_alerts = 0
        self._saved_at = metrics.clock()  # nothing saved yet: all learning since start is at stake
        m = metrics
        # Children are created now so that every series exists (at 0) from the stream's start:
        # a dashboard then sees "0 dropped", not "no data".
        self._bytes = m.bytes.labels(name)
        self._records = m.records.labels(name)
        self._dropped = m.dropped_bytes.labels(name)
        self._cut = m.cut_records.labels(name)
        self._latency = m.latency.labels(name)
        self._anomaly = m.anomaly.labels(name)
        self._alerts_open = m.alerts_open.labels(name)
        self._alerts = m.alerts.labels(name)
        self._band = m.decimation_band.labels(name)
        self._observations = m.observations.labels(name)
        self._cost = m.cost.labels(name)
        self._efficiency = m.efficiency.labels(name)
        self._learning_rate = m.learning_rate.labels(name)
        self._faults = m.faults.labels(name)
        self._rollbacks = m.rollbacks.labels(name)
        self._connected = m.source_connected.labels(name)
        self._reconnects = m.source_reconnects.labels(name)
        self._source_errors = m.source_errors.labels(name)
        self._refused = m.source_refused.labels(name)
        self._restarts = m.stream_restarts.labels(name)
        self._snapshot_duration = m.snapshot_duration.labels(name)
        self._snapshots = m.snapshots.labels(name)
        self._snapshot_failures = m.snapshot_failures.labels(name)
        self._sink_sent = m.sink_sent.labels(name)
        self._sink_dropped = m.sink_dropped.labels(name)
        self._sink_errors = m.sink_errors.labels(name)
        m.checkpoint_age.labels(name).set_function(self.checkpoint_age)
        m.bits.add_stream(name)

    # ------------------------------------------------------------------ per batch

    def observe_batch(
        self,
        bytes: int,  # named after the metric it feeds (somad_bytes_total)
        records: int = 0,
        bits=None,
        anomaly: float | None = None,
        latency_seconds: float | Iterable[float] | None = None,
        dropped_bytes: int = 0,
        cut_records: int = 0,
    ) -> None:
        """Account for one processed batch.

        ``bits``: the loss of each scored byte (a list, numpy array or CPU tensor), for the
        bits/byte histogram. ``anomaly``: the latest record's score. ``latency_seconds``: arrival
        to score, one value per chunk. ``dropped_bytes``: lost by the queue before scoring,
        or read by a model then rolled back (source drops come through ``set_source``). ``cut_records``: cut at max_record_bytes.
        """
        if bytes < 0 or records < 0 or dropped_bytes < 0 or cut_records < 0:
            raise ValueError(f"stream {self.name!r}: batch counts must be >= 0, got bytes={bytes} records={records} dropped_bytes={dropped_bytes} cut_records={cut_records}")
        if bytes:
            self._bytes.inc(bytes)
        if records:
            self._records.inc(records)
        if dropped_bytes:
            self._dropped.inc(dropped_bytes)
        if cut_records:
            self._cut.inc(cut_records)
        if bits is not None:
            self._metrics.bits.observe_many(self.name, bits)
        if anomaly is not None:
            self._anomaly.set(anomaly)
        if latency_seconds is not None:
            values = [latency_seconds] if isinstance(latency_seconds, numbers.Real) else latency_seconds
            for value in values:
                self._latency.observe(max(0.0, float(value)))  # clocks are monotonic; guard anyway

    # ------------------------------------------------------------------ polled state

    def set_source(self, status: SourceStatus) -> None:
        """Take a ``SourceStatus`` (cumulative counts): connected state, reconnects, errors, drops, refusals."""
        self._connected.set(1 if status.connected else 0)
        with self._lock:
            reconnects = self._source_totals.step("reconnects", status.reconnects)
            errors = self._source_totals.step("errors", status.errors)
            dropped = self._source_totals.step("dropped_bytes", status.dropped_bytes)
            refused = self._source_totals.step("refused", status.refused)
        _inc(self._reconnects, reconnects)
        _inc(self._refused, refused)
        _inc(self._source_errors, errors)
        _inc(self._dropped, dropped)

    def set_learner(self, stats: Mapping) -> None:
        """Take ``SomaLearner.stats()``: band d, observations, cost, efficiency, eta."""
        self._band.set(stats["d"])
        self._cost.set(stats["cost_per_byte"])
        self._efficiency.set(stats["efficiency"])
        self._learning_rate.set(stats["eta"])
        with self._lock:
            new = self._learner_totals.step("observations", stats["observations"])
        _inc(self._observations, new)

    def learner_restored(self, stats: Mapping) -> None:
        """The learner was loaded from a checkpoint: its past observations are not new ones."""
        with self._lock:
            self._learner_totals.rebase("observations", stats["observations"])
        self._band.set(stats["d"])

    def set_sink(self, key: str, stats: Mapping) -> None:
        """Take one sink's ``stats()`` (cumulative sent / dropped / errors). ``key`` names the sink
        within the stream (e.g. ``"0:mqtt"``) so that several sinks add up."""
        with self._lock:
            sent = self._sink_totals.step(f"{key}\0sent", stats.get("sent", 0))
            dropped = self._sink_totals.step(f"{key}\0dropped", stats.get("dropped", 0))
            errors = self._sink_totals.step(f"{key}\0errors", stats.get("errors", 0))
        _inc(self._sink_sent, sent)
        _inc(self._sink_dropped, dropped)
        _inc(self._sink_errors, errors)

    def forget_sink(self, key: str) -> None:
        """The sink was removed: a new sink under the same key counts from zero."""
        with self._lock:
            self._sink_totals.forget(f"{key}\0")

    # ------------------------------------------------------------------ events

    def alert_opened(self) -> None:
        with self._lock:
            self._open_alerts += 1
            self._alerts_open.set(self._open_alerts)
        self._alerts.inc()

    def alert_closed(self) -> None:
        with self._lock:
            self._open_alerts = max(0, self._open_alerts - 1)
            self._alerts_open.set(self._open_alerts)

    def snapshot(self, duration: float, ok: bool, at: float | None = None) -> None:
        """A snapshot attempt that took ``duration`` seconds; ``at``: unix time it was taken."""
        self._snapshot_duration.set(duration)
        if ok:
            self._snapshots.inc()
            with self._lock:
                self._saved_at = self._metrics.clock() if at is None else at
        else:
            self._snapshot_failures.inc()

    def checkpoint_loaded(self, saved_at: float) -> None:
        """The stream resumed from a checkpoint written at ``saved_at`` (unix seconds)."""
        with self._lock:
            self._saved_at = saved_at

    def checkpoint_age(self) -> float:
        """Seconds of learning not yet on disk (computed when /metrics is scraped)."""
        with self._lock:
            saved_at = self._saved_at
        return max(0.0, self._metrics.clock() - saved_at)

    def numerical_fault(self, rolled_back: bool) -> None:
        self._faults.inc()
        if rolled_back:
            self._rollbacks.inc()

    def restarted(self) -> None:
        """The stream's pipeline was restarted after a failure."""
        self._restarts.inc()


def _inc(counter, amount: float) -> None:
    if amount > 0:
        counter.inc(amount)


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
