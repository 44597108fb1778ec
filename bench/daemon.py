"""The daemon end to end: ``somad run --config`` as a real process, fed as a device would feed it.

For each ``--presets`` entry (default: small, tiny):

1. **115200 baud**: a simulated sensor's CSV lines written into a real pty at 11,520 bytes/s
   (a 115200-baud UART's byte rate, 8N1 = 10 bits a byte), read by the ``serial`` source, for
   ``--seconds``. Byte-to-score latency is measured from the outside: each line's write time
   against the ``time`` of its score event in a JSONL sink (the same clock, ``time.time()``);
   the daemon's own ``somad_score_latency_seconds`` histogram is kept beside it in the JSON.
2. **max rate**: the same kind of data in a file, ``file`` source with the ``block`` policy, as
   fast as the daemon takes it: bytes/s over ``--seconds`` after a short warm-up (from
   ``somad_bytes_total`` on /metrics); latency from the daemon's histogram (it is the queue's
   depth over the rate here: the source is always ahead).

Then **RSS** over an hour-equivalent of 115200-baud input (3600 s x 11,520 B = 41.47 MB), fed
at max rate with ``--rss-preset``, sampled every ``--rss-every`` seconds, for at most
``--rss-seconds`` (the run says how much of the hour it reached).

Both rows write every record's score and alerts to a JSONL file (``events: both``), as the
log-file example does; the RSS run writes alerts only (an hour of scores is ~0.4 GB of JSON).
The daemon runs with one torch thread (as it always does) in its own process; this process
only paces the input and reads /metrics and /proc.

    ./dev bench daemon                 # ~15 minutes: both presets, then 10 minutes of RSS
    ./dev bench daemon --quick         # ~3 minutes, same shape, shorter windows

Units: 1 KB = 1000 bytes, 1 MB = 10^6 bytes. Tables on stdout, progress on stderr, JSON in
``bench/out/daemon.json`` (``daemon_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapters.simulate import SimulateConfig, SimulatedSensor

from .common import (
    fmt_bytes,
    fmt_duration,
    fmt_rate,
    log,
    machine_info,
    table,
    write_json,
)
from .somad_process import SomadProcess

BAUD_BYTES_PER_S = 115200 // 10  # 8N1: a start bit, 8 data bits, a stop bit per byte
HOUR_BYTES = BAUD_BYTES_PER_S * 3600  # an hour of input at 115200 baud: 41.47 MB
OUT_DIR = Path(__file__).resolve().parent / "out"
START_TIMEOUT = 120.0  # seconds for a fresh daemon to import torch and open its streams (loaded machine)
STOP_TIMEOUT = 60.0  # seconds for SIGTERM to end it (then it is killed)


# ------------------------------------------------------------------ input


def sensor_lines(seed: int = 1):
    """An endless simulated sensor (``<seconds>,<value>`` CSV lines, 10 readings a second of
    sensor time, ~12 bytes a line), as the ``simulate`` source produces them."""
    sensor = SimulatedSensor(SimulateConfig(rate=10.0, seed=seed))
    while True:
        yield sensor.next_line()


def write_sensor_file(path: Path, n_bytes: int, seed: int = 1) -> int:
    """Whole sensor lines, at least ``n_bytes`` of them; returns the size written."""
    written = 0
    lines = sensor_lines(seed)
    with path.open("wb") as f:
        while written < n_bytes:
            block = b"".join(next(lines) for _ in range(10_000))
            f.write(block)
            written += len(block)
    return written


# ------------------------------------------------------------------ the daemon process


def config_text(state_dir: Path, stream: str) -> str:
    return f"""
state_dir: "{state_dir}"
metrics: {{listen: "127.0.0.1:0"}}
log: {{level: info, format: json}}
shutdown_timeout: 30
streams:
{stream}
"""


def rss_now_and_peak(daemon: SomadProcess) -> tuple[int, int]:
    """(VmRSS, VmHWM) of the daemon in bytes: resident now, and the peak."""
    memory = daemon.memory()
    return memory["VmRSS"], memory["VmHWM"]


def sample(metrics: dict, name: str, stream: str, **labels) -> float:
    return metrics.get((name, tuple(sorted({"stream": stream, **labels}.items()))), 0.0)


@dataclass
class Window:
    """Counters at the start and the end of a measured window, from /metrics and /proc."""

    t: float  # monotonic seconds
    metrics: dict
    cpu: float  # daemon CPU seconds

    @classmethod
    def take(cls, daemon: SomadProcess) -> Window:
        return cls(time.monotonic(), daemon.samples(), daemon.cpu_seconds())


def latency_histogram(start: Window, end: Window, stream: str) -> dict:
    """Byte-to-score latency from the daemon's histogram over the window: count, mean (exact,
    from the sum) and p50 / p99 interpolated inside their buckets as Prometheus does."""
    name = "somad_score_latency_seconds"
    labels_of = {float(dict(labels)["le"]): dict(labels)["le"] for (n, labels) in end.metrics if n == f"{name}_bucket" and dict(labels).get("stream") == stream}
    bounds = sorted(labels_of)
    cumulative = [sample(end.metrics, f"{name}_bucket", stream, le=labels_of[b]) - sample(start.metrics, f"{name}_bucket", stream, le=labels_of[b]) for b in bounds]
    count = sample(end.metrics, f"{name}_count", stream) - sample(start.metrics, f"{name}_count", stream)
    total = sample(end.metrics, f"{name}_sum", stream) - sample(start.metrics, f"{name}_sum", stream)
    return {
        "count": count,
        "mean_s": total / count if count else None,
        "p50_at_most_s": bucket_bound(0.5, bounds, cumulative),
        "p99_at_most_s": bucket_bound(0.99, bounds, cumulative),
    }


def bucket_bound(q: float, bounds: list[float], cumulative: list[float]) -> float | None:
    """The upper bound of the bucket that holds quantile ``q``: the quantile is at most this
    (inf when it lies past the last finite bucket). Buckets are too coarse to say more.

    >>> bucket_bound(0.5, [1.0, 2.0, float("inf")], [0, 10, 10]), bucket_bound(0.99, [1.0, float("inf")], [5, 10])
    (2.0, inf)
    """
    if not cumulative or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    return next(bound for bound, cum in zip(bounds, cumulative) if cum >= rank)


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


# ------------------------------------------------------------------ 1. 115200 baud over a pty


class Pty:
    """A serial device stand-in: a pty whose slave is reached through a fixed link path."""

    def __init__(self, link: Path):
        self.master, slave = os.openpty()
        self.link = link
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.ttyname(slave), link)
        os.close(slave)  # the daemon opens it by path, as it would a USB adapter

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view) :]

    def close(self) -> None:
        os.close(self.master)
        self.link.unlink(missing_ok=True)


def pace(pty: Pty, seconds: float, rate: float) -> tuple[list[float], int, float]:
    """Write sensor lines at ``rate`` bytes/s for ``seconds`` (each line when its last byte is
    due; late lines go at once). Returns each line's write time (time.time()), the bytes
    written and the wall time it took."""
    sent_at: list[float] = []
    written = 0
    lines = sensor_lines(seed=2)
    start = time.monotonic()
    while True:
        line = next(lines)
        due = start + (written + len(line)) / rate
        if due - start > seconds:
            break
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        pty.write(line)
        sent_at.append(time.time())
        written += len(line)
    return sent_at, written, time.monotonic() - start


def percentiles(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"p50_s": None, "p99_s": None, "max_s": None, "mean_s": None}
    return {
        "p50_s": float(np.percentile(values, 50)),
        "p99_s": float(np.percentile(values, 99)),
        "max_s": float(values.max()),
        "mean_s": float(values.mean()),
    }


def run_paced(preset: str, seconds: float, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    pty = Pty(workdir / "ttyUSB-bench")
    scores = workdir / "scores.jsonl"
    stream = f"""  - name: uart0
    source: {{type: serial, port: "{pty.link}", baudrate: 115200}}
    framing: {{type: lines}}
    model: {{preset: {preset}}}
    sinks: [{{type: jsonl, path: "{scores}", events: both, max_bytes: 0}}]"""
    daemon = SomadProcess(workdir, config_text(workdir / "state", stream), START_TIMEOUT)
    try:
        daemon.wait_event("serial_connected")
        time.sleep(1.0)  # let the start-up's own work settle before the clock starts
        before = Window.take(daemon)
        log(f"  [{preset} @115200] pacing {BAUD_BYTES_PER_S} bytes/s into {pty.link} for {seconds:.0f} s")
        sent_at, written, took = pace(pty, seconds, BAUD_BYTES_PER_S)
        sent_done = time.monotonic()
        records = lambda: sample(daemon.samples(), "somad_records_total", "uart0")
        wait_until(lambda: records() >= len(sent_at), timeout=max(120.0, 2 * seconds), what="every line scored")
        after = Window.take(daemon)
        caught_up_s = after.t - sent_done
        rss, peak = rss_now_and_peak(daemon)
    finally:
        rc = daemon.stop(STOP_TIMEOUT)
        pty.close()
    events = [json.loads(line) for line in scores.read_text().splitlines() if line.strip()]
    scored_at = {e["index"]: e["time"] for e in events if e.get("event") == "score"}
    lat = np.array([scored_at[i] - sent for i, sent in enumerate(sent_at) if i in scored_at])
    learned = sample(after.metrics, "somad_bytes_total", "uart0") - sample(before.metrics, "somad_bytes_total", "uart0")
    return {
        "preset": preset,
        "input": "pty serial @115200",
        "seconds": took,
        "bytes_sent": written,
        "lines_sent": len(sent_at),
        "lines_scored": len(lat),
        "send_bytes_per_s": written / took,
        "bytes_per_s": learned / (after.t - before.t),
        "caught_up_after_s": caught_up_s,
        "latency": percentiles(lat),
        "latency_histogram": latency_histogram(before, after, "uart0"),
        "cpu_share": (after.cpu - before.cpu) / (after.t - before.t),
        "bytes_per_cpu_s": learned / max(after.cpu - before.cpu, 1e-9),
        "dropped_bytes": sample(after.metrics, "somad_dropped_bytes_total", "uart0"),
        "rss_bytes": rss,
        "peak_rss_bytes": peak,
        "exit_code": rc,
    }


# ------------------------------------------------------------------ 2. max rate from a file


def run_max(preset: str, seconds: float, workdir: Path, warmup: float = 3.0) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "sensor.csv"
    size = write_sensor_file(data, int((seconds + warmup + 30) * 150_000))  # more than any preset reads here
    stream = f"""  - name: file0
    source: {{type: file, path: "{data}", start: beginning}}
    queue: {{policy: block}}
    framing: {{type: lines}}
    model: {{preset: {preset}}}
    sinks: [{{type: jsonl, path: "{workdir / 'scores.jsonl'}", events: both, max_bytes: 0}}]"""
    daemon = SomadProcess(workdir, config_text(workdir / "state", stream), START_TIMEOUT)
    try:
        daemon.wait_event("ready")
        learned = lambda w: sample(w.metrics, "somad_bytes_total", "file0")
        wait_until(lambda: learned(Window.take(daemon)) > 0, timeout=START_TIMEOUT, what="the first bytes learned")
        time.sleep(warmup)
        before = Window.take(daemon)
        log(f"  [{preset} max] reading {fmt_bytes(size)} as fast as the daemon takes it, {seconds:.0f} s window")
        end = before.t + seconds
        after = before
        while time.monotonic() < end and learned(after) < size:
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            after = Window.take(daemon)
        rss, peak = rss_now_and_peak(daemon)
    finally:
        rc = daemon.stop(STOP_TIMEOUT)
    elapsed = after.t - before.t
    return {
        "preset": preset,
        "input": "file, block policy",
        "seconds": elapsed,
        "file_bytes": size,
        "bytes": learned(after) - learned(before),
        "bytes_per_s": (learned(after) - learned(before)) / elapsed,
        "ran_out_of_input": learned(after) >= size,
        "latency_histogram": latency_histogram(before, after, "file0"),
        "cpu_share": (after.cpu - before.cpu) / elapsed,
        "bytes_per_cpu_s": (learned(after) - learned(before)) / max(after.cpu - before.cpu, 1e-9),
        "rss_bytes": rss,
        "peak_rss_bytes": peak,
        "exit_code": rc,
    }


# ------------------------------------------------------------------ 3. RSS over an hour-equivalent


def run_rss(preset: str, seconds: float, target_bytes: int, every: float, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "hour.csv"
    log(f"  [rss {preset}] writing {fmt_bytes(target_bytes)} of sensor lines")
    size = write_sensor_file(data, target_bytes)
    stream = f"""  - name: hour
    source: {{type: file, path: "{data}", start: beginning}}
    queue: {{policy: block}}
    framing: {{type: lines}}
    model: {{preset: {preset}}}
    sinks: [{{type: jsonl, path: "{workdir / 'alerts.jsonl'}", events: alerts}}]"""
    daemon = SomadProcess(workdir, config_text(workdir / "state", stream), START_TIMEOUT)
    samples = []
    try:
        daemon.wait_event("ready")
        started = time.monotonic()
        log(f"  [rss {preset}] up to {fmt_duration(seconds)} or {fmt_bytes(size)}, RSS every {every:.0f} s")
        while True:
            now = time.monotonic()
            learned = sample(daemon.samples(), "somad_bytes_total", "hour")
            rss, peak = rss_now_and_peak(daemon)
            samples.append({"elapsed_s": now - started, "learned_bytes": learned, "rss_bytes": rss, "peak_rss_bytes": peak})
            log(f"  [rss {preset}] {fmt_duration(now - started)}: learned {fmt_bytes(learned)}, RSS {rss / 1e6:.1f} MB")
            if learned >= size or now - started >= seconds:
                break
            time.sleep(min(every, max(0.1, seconds - (now - started))))
    finally:
        rc = daemon.stop(STOP_TIMEOUT)
    # Growth is counted from the first sample past 1 MB (the model, its buffers and torch's
    # caches have settled by then); a run that never got there has no growth figure.
    after_1mb = next((s for s in samples if s["learned_bytes"] >= 1_000_000), None)
    last = samples[-1]
    return {
        "preset": preset,
        "target_bytes": size,
        "learned_bytes": last["learned_bytes"],
        "hour_fraction": last["learned_bytes"] / HOUR_BYTES,
        "seconds": last["elapsed_s"],
        "rss_after_1mb_bytes": after_1mb["rss_bytes"] if after_1mb else None,
        "rss_end_bytes": last["rss_bytes"],
        "rss_growth_bytes": last["rss_bytes"] - after_1mb["rss_bytes"] if after_1mb else None,
        "peak_rss_bytes": last["peak_rss_bytes"],
        "samples": samples,
        "exit_code": rc,
    }


# ------------------------------------------------------------------ report


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds == float("inf"):
        return "inf"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def results_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if "latency" in r:  # measured line by line from the outside
            p50, p99 = fmt_s(r["latency"]["p50_s"]), fmt_s(r["latency"]["p99_s"])
        else:  # the daemon's histogram: only the bucket is known
            hist = r["latency_histogram"]
            p50, p99 = (f"<= {fmt_s(hist[k])} (h)" for k in ("p50_at_most_s", "p99_at_most_s"))
        out.append([
            r["preset"],
            r["input"],
            fmt_rate(r["bytes_per_s"]),
            p50,
            p99,
            f"{100 * r['cpu_share']:.0f}%",
            fmt_rate(r["bytes_per_cpu_s"]),
            f"{r['rss_bytes'] / 1e6:.0f} MB",
        ])
    headers = ["preset", "input", "bytes/s", "p50 latency", "p99 latency", "daemon CPU", "per CPU-second", "RSS"]
    return table(headers, out)


def rss_table(rss: dict) -> str:
    rows = [[fmt_duration(s["elapsed_s"]), fmt_bytes(s["learned_bytes"]), f"{s['rss_bytes'] / 1e6:.1f} MB"] for s in rss["samples"]]
    return table(["elapsed", "learned", "RSS"], rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.daemon", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="small,tiny", help="comma-separated presets, one pair of rows each (default: small,tiny)")
    p.add_argument("--seconds", type=float, default=60.0, help="measured window of each row (default 60)")
    p.add_argument("--rss-preset", default="small", help="preset of the RSS run (default small)")
    p.add_argument("--rss-seconds", type=float, default=600.0, help="RSS run's time limit (default 600)")
    p.add_argument("--rss-mb", type=float, default=HOUR_BYTES / 1e6, help=f"RSS run's input in MB (default {HOUR_BYTES / 1e6:.2f}: an hour at 115200 baud)")
    p.add_argument("--rss-every", type=float, default=30.0, help="seconds between RSS samples (default 30)")
    p.add_argument("--quick", action="store_true", help="short windows (15 s rows, 60 s of RSS): a smoke test of the whole run")
    p.add_argument("--json", default=None, help="output file (default bench/out/daemon.json, or daemon_quick.json with --quick)")
    p.add_argument("--workdir", default=None, help="where configs, state and input files go (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.rss_seconds, args.rss_every = 15.0, 60.0, 10.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    out_path = Path(args.json) if args.json else OUT_DIR / ("daemon_quick.json" if args.quick else "daemon.json")
    meta = {**machine_info(), "loadavg_start": os.getloadavg(), "presets": presets, "seconds": args.seconds,
            "baud_bytes_per_s": BAUD_BYTES_PER_S, "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="somad-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        rows = []
        for preset in presets:
            rows.append(run_paced(preset, args.seconds, work / f"paced-{preset}"))
            rows.append(run_max(preset, args.seconds, work / f"max-{preset}"))
        rss = run_rss(args.rss_preset, args.rss_seconds, int(args.rss_mb * 1e6), args.rss_every, work / "rss")
    meta["loadavg_end"] = os.getloadavg()
    write_json(out_path, {"meta": meta, "rows": rows, "rss": rss})
    print(f"somad run --config, end to end ({meta['cpu']}, {meta['cpu_count']} cores, load {meta['loadavg_start'][0]:.1f}):")
    print("latency: line written -> its score event; (h) = bucket of the daemon's own histogram (at max rate: the queue's wait)")
    print("per CPU-second: bytes learned per second of the daemon's CPU time (what one free core would do)\n")
    print(results_table(rows))
    print(f"\nRSS, preset {rss['preset']}, fed at max rate: {fmt_bytes(rss['learned_bytes'])} learned in "
          f"{fmt_duration(rss['seconds'])} = {100 * rss['hour_fraction']:.0f}% of an hour at 115200 baud; "
          + (f"growth after the first MB {rss['rss_growth_bytes'] / 1e6:+.1f} MB\n" if rss["rss_growth_bytes"] is not None else "the first MB was not reached\n"))
    print(rss_table(rss))
    print(f"\nJSON: {out_path}")
    failed = [r for r in [*rows, rss] if r["exit_code"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
