"""``somad score``: per-byte or per-record losses and anomaly scores of a recorded stream.

The stream is processed as the daemon would: each byte scored, then learned from (unless
``--no-learn``; learning slows while an alert is open, per the alert policy), records cut by
the framing, each record scored by ``somad.scoring.StreamScorer``. Output: CSV (one row per
record: index, bits, anomaly, alert, record) or JSON lines (the daemon's events: one
``score`` object per record, plus ``alert_open``/``alert_close`` objects), chosen by the
``--out`` extension. ``--plot`` draws the surprise with alerts marked (needs matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint import CheckpointError, save_checkpoint
from ..events import escape_record
from ..framing import Framer, FramingConfig
from ..learner import NumericalFault
from ..scoring import AlertConfig, ScoringConfig, StreamScorer
from ..stream import score_and_learn
from .common import (
    CommandError,
    StopFlag,
    UsageError,
    add_preset_argument,
    check_inputs,
    check_output,
    fresh_or_resumed,
    read_blocks,
    total_size,
)
from .progress import Progress

BLOCK_BYTES = 4096  # bytes per learner call: the learning policy follows alerts at this grain
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
MAX_RECORD_BYTES = 4096  # longer lines are cut (their rest is scored, not written)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "score",
        help="write per-byte or per-record losses and anomaly scores of a recorded stream",
        description="Score a recorded stream as the daemon would (score, then learn) and write the scores "
        "to CSV or JSON lines. Ctrl-C stops early and keeps what was written.",
    )
    p.add_argument("--input", "-i", required=True, metavar="FILE", help="the recorded stream, '-' for stdin")
    p.add_argument("--out", "-o", required=True, metavar="FILE", help="scores file: .csv or .jsonl")
    p.add_argument("--resume", metavar="CKPT", help="start from this checkpoint (default: a new model)")
    add_preset_argument(p, "default: small")
    p.add_argument("--frame", choices=("bytes", "lines"), default="bytes", help="one score per byte (default) or per line")
    p.add_argument("--no-learn", action="store_true", help="score only: the model does not learn from the input")
    p.add_argument("--save", metavar="CKPT", help="save the model (and the scorer's statistics) at the end")
    p.add_argument("--plot", metavar="PNG", help="draw the surprise with alerts marked (needs matplotlib: pip install 'somad[plot]')")
    p.add_argument("--grace-period", type=_count, default=None, metavar="N", help="records scored 0 while the model warms up (default: the scorer's)")
    p.add_argument("--threshold", type=_fraction, default=None, metavar="P", help="anomaly score that opens an alert (default: the scorer's)")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--json", action="store_true", help="no progress; print one JSON summary on stdout")
    p.set_defaults(handler=run)


# --------------------------------------------------------------------------- outputs


class CsvScores:
    """One row per record: index, bits (record score), anomaly, alert (open/close), record."""

    def __init__(self, stream):
        self.writer = csv.writer(stream, lineterminator="\n")
        self.writer.writerow(["index", "bits", "anomaly", "alert", "record"])

    def write(self, scored, alerts) -> None:
        kinds = "+".join(a.kind for a in alerts)
        self.writer.writerow([scored.index, f"{scored.bits:.6g}", f"{scored.anomaly:.6g}", kinds, escape_record(scored.record)])


class JsonlScores:
    """The daemon's events, one JSON object per line: ``score`` per record, then its alerts."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, scored, alerts) -> None:
        self.stream.write(json.dumps(scored.to_dict()) + "\n")
        for alert in alerts:
            self.stream.write(json.dumps(alert.to_dict()) + "\n")


class PlotData:
    """Record scores and alert spans for the plot, in bounded memory: past ``max_points``,
    neighbouring points merge (keeping the larger value, so spikes stay visible)."""

    def __init__(self, max_points: int = 100_000):
        self.max_points = max_points
        self.step = 1  # records per point
        self.bits = array("d")
        self.anomaly = array("d")
        self._pending: list[tuple[float, float]] = []
        self.alerts: list[list[int | None]] = []  # [first record, last record or None while open]

    def add(self, index: int, bits: float, anomaly: float, alerts) -> None:
        self._pending.append((bits, anomaly))
        if len(self._pending) == self.step:
            self._flush()
        for alert in alerts:
            if alert.kind == "open":
                self.alerts.append([index, None])
            elif self.alerts and self.alerts[-1][1] is None:
                self.alerts[-1][1] = index

    def _flush(self) -> None:
        if self._pending:
            self.bits.append(max(b for b, _ in self._pending))
            self.anomaly.append(max(a for _, a in self._pending))
            self._pending = []
        if len(self.bits) > self.max_points:
            self.bits = array("d", (max(self.bits[i : i + 2]) for i in range(0, len(self.bits), 2)))
            self.anomaly = array("d", (max(self.anomaly[i : i + 2]) for i in range(0, len(self.anomaly), 2)))
            self.step *= 2

    def draw(self, path: Path, title: str, threshold: float, records: int) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self._flush()
        x = np.arange(len(self.bits)) * self.step
        fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(12, 6))
        top.plot(x, self.bits, linewidth=0.6, color="tab:blue")
        top.set_ylabel("surprise (bits)")
        top.set_title(title)
        bottom.plot(x, self.anomaly, linewidth=0.6, color="tab:purple")
        bottom.axhline(threshold, color="tab:red", linestyle="--", linewidth=0.8, label=f"threshold {threshold:g}")
        bottom.set_ylabel("anomaly score")
        bottom.set_xlabel("record" + (f" (max over {self.step})" if self.step > 1 else ""))
        bottom.set_ylim(-0.02, 1.02)
        for first, last in self.alerts:
            for axis in (top, bottom):
                axis.axvspan(first, last if last is not None else records, color="tab:red", alpha=0.2)
        bottom.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


# --------------------------------------------------------------------------- the verb


def _output_format(name: str) -> str:
    fmt = FORMATS.get(Path(name).suffix.lower())
    if fmt is None:
        raise UsageError(f"--out {name}: unknown format; name it .csv or .jsonl")
    return fmt


def _scorer(name: str, base: float, args, resumed) -> StreamScorer:
    scoring, alerts = ScoringConfig(base=base), AlertConfig()
    try:
        if args.grace_period is not None:
            scoring = ScoringConfig(base=base, grace_period=args.grace_period)
        if args.threshold is not None:
            alerts = AlertConfig(threshold=args.threshold, close_below=min(alerts.close_below, args.threshold))
    except ValueError as err:
        raise UsageError(str(err)) from None
    scorer = StreamScorer(name, scoring, alerts)
    saved = resumed.extra.get("scorer") if resumed is not None else None
    if saved is not None:
        try:
            scorer.load_state_dict(saved)
        except ValueError as err:
            print(f"somad score: the checkpoint's scorer statistics are unusable ({err}); starting them afresh", file=sys.stderr)
            scorer = StreamScorer(name, scoring, alerts)
    return scorer


@dataclass
class Tally:
    """What a scoring run has done so far."""

    bytes: int = 0
    bits: float = 0.0
    records: int = 0
    alerts: int = 0  # alerts opened


class ScoringRun:
    """Learner, framer, scorer and outputs for one ``somad score``: ``feed`` each block of
    input, ``flush`` at the end."""

    def __init__(self, learner, scorer: StreamScorer, framer: Framer, writer, plot: PlotData | None, learn: bool):
        self.learner, self.scorer, self.framer, self.writer, self.plot = learner, scorer, framer, writer, plot
        self.learn = learn
        self.tally = Tally()

    def feed(self, block: bytes) -> None:
        """Score the block's bytes, then learn from them (slower or not at all while an alert
        is open, per the alert policy), and score and write the records they complete."""
        bits, entropy = score_and_learn(self.learner, block, self.scorer, learn=self.learn)
        self.learner.eta_scale = 1.0
        bits_np = bits.numpy().astype(np.float64)
        self.tally.bytes += len(block)
        self.tally.bits += float(bits_np.sum())
        self._emit(self.framer.push(block, bits_np, entropy=None if entropy is None else entropy.numpy()))

    def flush(self) -> None:
        """The last record, even without its terminator."""
        self._emit(self.framer.flush())

    def _emit(self, records) -> None:
        band_power = self.learner.metabolism.band_power.numpy()
        for record in records:
            scored, alerts = self.scorer.score_record(record.data, record.bits, band_power=band_power, entropy=record.entropy, now=time.time())
            self.writer.write(scored, alerts)
            self.tally.records += 1
            self.tally.alerts += sum(a.kind == "open" for a in alerts)
            if self.plot is not None:
                self.plot.add(scored.index, scored.bits, scored.anomaly, alerts)


def run(args) -> int:
    specs = check_inputs([args.input])
    fmt = _output_format(args.out)
    out = check_output(args.out, "--out", force=args.force)
    plot_path = check_output(args.plot, "--plot", force=args.force) if args.plot else None
    if plot_path is not None and importlib.util.find_spec("matplotlib") is None:
        raise CommandError("--plot needs matplotlib, which is not installed (pip install 'somad[plot]')")
    save = check_output(args.save, "--save", force=args.force, may_replace=(args.resume,) if args.resume else ()) if args.save else None
    learner, resumed, preset_name = fresh_or_resumed(args.resume, args.preset)
    stream_name = "stdin" if args.input == "-" else Path(args.input).name
    scorer = _scorer(stream_name, learner.cfg.base, args, resumed)
    framing = FramingConfig(type="lines", max_record_bytes=MAX_RECORD_BYTES) if args.frame == "lines" else FramingConfig(type="fixed", length=1)
    plot = PlotData() if plot_path is not None else None
    progress = Progress.for_stream(sys.stderr, total_size(specs), enabled=not args.json)
    start = time.monotonic()
    try:
        with open(out, "w", newline="", encoding="utf-8") as handle, StopFlag() as flag:
            writer = CsvScores(handle) if fmt == "csv" else JsonlScores(handle)
            scoring = ScoringRun(learner, scorer, Framer(framing), writer, plot, learn=not args.no_learn)
            _score_stream(scoring, read_blocks(specs, BLOCK_BYTES, flag), progress)
    except OSError as err:
        raise CommandError(f"--out {out}: cannot write: {err.strerror or err}") from None
    tally, elapsed = scoring.tally, time.monotonic() - start
    if tally.bytes == 0:
        out.unlink(missing_ok=True)  # an empty scores file would only mislead
        raise CommandError(f"no input bytes ({args.input} is empty)")
    if flag.stop:
        print(f"somad score: interrupted after {tally.bytes} bytes; {out} holds {tally.records} records", file=sys.stderr)
    checkpoint_id = resumed.checkpoint_id if resumed is not None else None
    if save is not None:
        extra = {"scorer": scorer.state_dict(), "stream": stream_name}
        checkpoint_id = _save(save, learner, resumed.lineage if resumed is not None else (), preset_name, extra)
    if plot is not None:
        try:
            plot.draw(plot_path, f"{stream_name}: {tally.records} records, {tally.alerts} alert(s)", scorer.alerts.threshold, tally.records)
        except (OSError, ValueError, RuntimeError) as err:
            raise CommandError(f"--plot {plot_path}: cannot draw: {err}") from None
    _report(args, out, save, tally, elapsed, checkpoint_id)
    return 0


def _score_stream(scoring: ScoringRun, blocks, progress: Progress) -> None:
    try:
        for block in blocks:  # after Ctrl-C, read_blocks reads no more but hands over what it holds
            scoring.feed(block)
            progress.update(scoring.tally.bytes, scoring.tally.bits)
        scoring.flush()
    except NumericalFault:
        raise CommandError(f"the model diverged (non-finite loss) after {scoring.tally.bytes} bytes; nothing saved") from None
    finally:
        progress.update(scoring.tally.bytes, scoring.tally.bits, force=True)
        progress.finish()


def _save(path: Path, learner, history, preset_name, extra) -> str:
    try:
        return save_checkpoint(path, learner, history=history, preset=preset_name, extra=extra)
    except KeyboardInterrupt:
        raise CommandError(f"interrupted while saving; {path} is as it was before") from None
    except CheckpointError as err:
        raise CommandError(str(err)) from None


def _report(args, out: Path, save: Path | None, tally: Tally, elapsed: float, checkpoint_id: str | None) -> None:
    summary = {
        "bytes": tally.bytes,
        "bits_per_byte": tally.bits / tally.bytes,
        "bytes_per_second": tally.bytes / max(elapsed, 1e-9),
        "checkpoint_id": checkpoint_id,
        "records": tally.records,
        "alerts": tally.alerts,
    }
    if args.json:
        print(json.dumps(summary))
        return
    saved = f"; saved {save} (id {checkpoint_id[:16]})" if save is not None else ""
    print(
        f"scored {tally.bytes} bytes ({tally.records} records, {tally.alerts} alerts) at {summary['bytes_per_second']:.0f} B/s, "
        f"{summary['bits_per_byte']:.3f} bits/byte; wrote {out}{saved}"
    )
