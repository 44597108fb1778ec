"""The main job on its embedded default: a simulated sensor learned and scored live.

Reads the simulated source, learns every chunk with the soma learner (each byte scored
before it is learned from), turns per-byte loss into a per-record surprise, and prints a
status line every ``status_every`` seconds plus one line per surprising record.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass

import torch

from adapters.simulate import Fault, SimulateConfig, SimulatedSensor

from .learner import LearnerConfig, SomaLearner
from .model import preset
from .records import RecordSurprise, RunningStats

# Faults injected by the embedded default so that surprises show up without any hardware.
DEFAULT_FAULTS = (
    Fault("spike", at_line=3000),
    Fault("stuck", at_line=4500, length=40),
    Fault("noise", at_line=6000, length=60),
    Fault("shift", at_line=8000, length=200, magnitude=2.0),
)


@dataclass
class RunOptions:
    seconds: float | None = None  # stop after this long (None: until SIGINT/SIGTERM)
    preset: str = "small"
    rate: float = 200.0  # simulated lines per second
    realtime: bool = True
    status_every: float = 2.0
    surprise_z: float = 4.0  # records above this many running std devs are reported
    grace_records: int = 500  # records before any surprise is reported (warm-up)


class _StopFlag:
    """Signal handlers only set a flag; the loop checks it."""

    def __init__(self) -> None:
        self.stop = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.stop:  # second signal: exit now
            raise SystemExit(130)
        self.stop = True


def run_embedded(opts: RunOptions, out=sys.stdout) -> dict:
    torch.set_num_threads(1)
    source = SimulatedSensor(SimulateConfig(rate=opts.rate, realtime=opts.realtime, faults=DEFAULT_FAULTS))
    learner = SomaLearner(preset(opts.preset), LearnerConfig())
    records = RecordSurprise()
    stats = RunningStats(tau=2000)
    flag = _StopFlag()
    start = last_status = time.monotonic()
    total_bits, n_records, n_surprises = 0.0, 0, 0
    print(f"somad: embedded default: simulated sensor at {opts.rate:g} lines/s, preset {opts.preset}", file=out, flush=True)
    while not flag.stop:
        now = time.monotonic()
        if opts.seconds is not None and now - start >= opts.seconds:
            break
        data = source.read(4096)
        if not data:
            continue
        bits = learner.learn(data)
        total_bits += float(bits.double().sum())
        for score, record in records.feed(data, bits.tolist()):
            n_records += 1
            z = stats.zscore(score)
            if n_records > opts.grace_records and z > opts.surprise_z:
                n_surprises += 1
                print(f"surprise record={n_records} z={z:.1f} bits/byte={score:.2f} {record!r}", file=out, flush=True)
            stats.update(score)
        if now - last_status >= opts.status_every:
            last_status = now
            _print_status(out, learner, total_bits, n_records, n_surprises, now - start)
    summary = _print_status(out, learner, total_bits, n_records, n_surprises, time.monotonic() - start)
    return summary


def _print_status(out, learner: SomaLearner, total_bits: float, n_records: int, n_surprises: int, elapsed: float) -> dict:
    m = learner.metabolism
    n = learner.bytes_seen
    summary = {
        "bytes": n,
        "records": n_records,
        "surprises": n_surprises,
        "bits_per_byte": total_bits / max(1, n),
        "bytes_per_second": n / max(elapsed, 1e-9),
        "decimation_band": m.d,
        "observations": m.observations,
    }
    print(
        f"status bytes={n} records={n_records} bits/byte={summary['bits_per_byte']:.3f} "
        f"d={m.d:.2f} observations={m.observations} surprises={n_surprises} "
        f"rate={summary['bytes_per_second']:.0f}B/s",
        file=out,
        flush=True,
    )
    return summary
