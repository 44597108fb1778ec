"""Soak: ``--bytes`` of sensor data through a running ``somad run --config`` process, with
snapshots every few seconds, watched from outside for what a months-long run would show.

The daemon reads a ``tcp`` (default) or ``file`` source under the ``block`` queue policy, so
every byte is learned (TCP flow control, or the file, holds the rest back): the run measures
the daemon at its own full speed. This process only feeds it (simulated sensor CSV lines, the
``simulate`` source's) and samples, every ``--sample-seconds``:

- bytes learned and records scored (``/metrics``), snapshots written and failed;
- RSS (``/proc/<pid>/status`` VmRSS) and open file descriptors (``/proc/<pid>/fd``).

Reported: RSS slope after warm-up (a least-squares fit of RSS against bytes learned, in KB
per 10^6 bytes: the goal is zero), RSS at the end of warm-up and at the end, fds at start and
end, throughput per tenth of the run (flat?), snapshots, and how long the full 10^8 bytes
would take at the measured rate.

    ./dev bench soak --bytes 1e8                 # the issue's soak (about 45 min for tiny here)
    ./dev bench soak --bytes 1e7                 # about 5 minutes
    ./dev bench soak --bytes 2e6 --preset small  # a quick look

Units: 1 KB = 1000 bytes, 1 MB = 10^6 bytes. Table on stdout, progress on stderr, JSON in
``bench/out/soak.json`` (all samples) and a summary section ``soak`` in
``bench/out/faults-part2.json`` (the fault suite's figures).
"""

from __future__ import annotations

import argparse
import ast
import fcntl
import itertools
import json
import signal
import socket
import sys
import tempfile
import threading
import time
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

OUT_DIR = Path(__file__).resolve().parent / "out"
FULL_SOAK_BYTES = 10**8  # the soak


# ------------------------------------------------------------------ input


def sensor_blocks(block_bytes: int = 1 << 16, seed: int = 3):
    """Endless blocks of whole simulated-sensor CSV lines (``<seconds>,<value>\\n``)."""
    sensor = SimulatedSensor(SimulateConfig(rate=10.0, seed=seed))
    while True:
        parts, size = [], 0
        while size < block_bytes:
            line = sensor.next_line()
            parts.append(line)
            size += len(line)
        yield b"".join(parts)


def write_file(path: Path, n_bytes: int) -> int:
    written = 0
    with path.open("wb") as f:
        for block in sensor_blocks():
            if written >= n_bytes:
                break
            f.write(block)
            written += len(block)
    return written


class TcpFeeder:
    """Sends whole sensor lines to the daemon until ``n_bytes`` have gone out; blocks whenever
    the daemon pushes back (TCP flow control), so the daemon sets the pace."""

    def __init__(self, address: tuple[str, int], n_bytes: int):
        self.address = address
        self.n_bytes = n_bytes
        self.sent = 0
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-feeder", daemon=True)

    def start(self) -> TcpFeeder:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with socket.create_connection(self.address, timeout=600) as sock:
                for block in sensor_blocks():
                    if self.sent >= self.n_bytes:
                        break
                    sock.sendall(block)
                    self.sent += len(block)
        except BaseException as err:  # noqa: BLE001 - reported by the main loop
            self.error = err
        finally:
            self.done.set()


# ------------------------------------------------------------------ the daemon


def config_text(workdir: Path, source: str, preset: str, snapshot_seconds: float) -> str:
    return f"""
state_dir: "{workdir / 'state'}"
metrics: {{listen: "127.0.0.1:0"}}
log: {{level: info, format: json}}
shutdown_timeout: 60
streams:
  - name: soak
    source: {source}
    framing: {{type: lines}}
    queue: {{policy: block}}
    model: {{preset: {preset}}}
    snapshot: {{every_seconds: {snapshot_seconds}, keep: 3}}
    sinks:
      - {{type: jsonl, path: "{workdir / 'alerts.jsonl'}", events: alerts, max_bytes: 10000000, keep: 1}}
"""


def soak_metrics(daemon: SomadProcess) -> dict[str, float]:
    """Samples of the ``soak`` stream (and process-wide ones) by name, summed over other labels."""
    out: dict[str, float] = {}
    for (name, labels), value in daemon.samples().items():
        if dict(labels).get("stream", "soak") == "soak" and not name.endswith(("_bucket", "_created")):
            out[name] = out.get(name, 0.0) + value
    return out


# ------------------------------------------------------------------ the run


def sample(daemon: SomadProcess, started: float) -> dict:
    m = soak_metrics(daemon)
    return {
        "t": round(time.monotonic() - started, 3),
        "bytes": int(m.get("somad_bytes_total", 0)),
        "records": int(m.get("somad_records_total", 0)),
        "snapshots": int(m.get("somad_snapshots_total", 0)),
        "snapshot_failures": int(m.get("somad_snapshot_failures_total", 0)),
        "dropped_bytes": int(m.get("somad_dropped_bytes_total", 0)),
        "rss": daemon.memory()["VmRSS"],
        "fds": daemon.fds(),
        "cpu": daemon.cpu_seconds(),
    }


def run(args, workdir: Path) -> dict:
    target = int(args.bytes)
    if args.source == "file":
        data = workdir / "soak.csv"
        log(f"soak: writing {fmt_bytes(target)} of sensor lines to {data}")
        target = write_file(data, target)
        source = f'{{type: file, path: "{data}", start: beginning, poll_interval: 0.2}}'
    else:
        source = '{type: tcp, listen: "127.0.0.1:0", idle_timeout: 0}'
    daemon = SomadProcess(workdir, config_text(workdir, source, args.preset, args.snapshot_seconds))
    try:
        daemon.wait_event("ready")
        feeder = None
        if args.source == "tcp":
            address = ast.literal_eval(daemon.wait_event("tcp source listening")["address"])[:2]
            feeder = TcpFeeder(address, target).start()
        started = time.monotonic()
        samples = [sample(daemon, started)]
        log(f"soak: {args.preset} preset, {args.source} source, {fmt_bytes(target)} to learn, snapshots every {args.snapshot_seconds:g} s (daemon pid {daemon.pid})")
        while True:
            time.sleep(args.sample_seconds)
            if daemon.proc.poll() is not None:
                raise SystemExit(f"soak: the daemon died ({daemon.proc.returncode}); log tail:\n{daemon.tail()}")
            if feeder is not None and feeder.error is not None:
                raise SystemExit(f"soak: feeding the daemon failed: {feeder.error!r}")
            samples.append(sample(daemon, started))
            s = samples[-1]
            goal = feeder.sent if feeder is not None and feeder.done.is_set() else target
            log(f"  [soak] {fmt_bytes(s['bytes'])}/{fmt_bytes(target)} ({100 * s['bytes'] / target:.0f}%) "
                f"{fmt_rate(s['bytes'] / max(s['t'], 1e-9))} rss {s['rss'] / 1e6:.1f} MB fds {s['fds']} snapshots {s['snapshots']}")
            if s["bytes"] >= goal and (feeder is None or feeder.done.is_set()):
                break
            if time.monotonic() - started > args.max_seconds:
                log(f"soak: stopping at --max-seconds {args.max_seconds:g} (the run is reported as partial)")
                break
        rc = daemon.stop()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)
    return analyse(samples, target, args, rc)


def analyse(samples: list[dict], target: int, args, rc: int) -> dict:
    """Slope of RSS after warm-up, fds, throughput per tenth of the run."""
    learned = samples[-1]["bytes"]
    warm_bytes = args.warmup * learned
    after = [s for s in samples if s["bytes"] >= warm_bytes]
    slope = None
    if len(after) >= 3 and after[-1]["bytes"] > after[0]["bytes"]:
        x = np.array([s["bytes"] for s in after], dtype=np.float64) / 1e6  # 10^6 bytes
        y = np.array([s["rss"] for s in after], dtype=np.float64) / 1e3  # KB
        slope = float(np.polyfit(x, y, 1)[0])  # KB per 10^6 bytes
    tenths = []
    intervals = list(itertools.pairwise(samples))
    for i in range(10):
        lo, hi = learned * i / 10, learned * (i + 1) / 10
        inside = [(a, b) for a, b in intervals if lo < (a["bytes"] + b["bytes"]) / 2 <= hi]
        seconds = sum(b["t"] - a["t"] for a, b in inside)
        if inside and seconds > 0:
            learned_here = sum(b["bytes"] - a["bytes"] for a, b in inside)
            rate = learned_here / seconds
            cpu_here = sum(b["cpu"] - a["cpu"] for a, b in inside)
            ends = [b for _, b in inside]
            tenths.append({
                "tenth": i + 1, "bytes_at_end": ends[-1]["bytes"], "bytes_mid": (lo + hi) / 2, "rate": rate,
                "rate_per_cpu_s": learned_here / cpu_here if cpu_here > 0 else None,
                "rss_min": min(s["rss"] for s in ends), "rss_max": max(s["rss"] for s in ends), "fds_max": max(s["fds"] for s in ends),
            })  # fmt: skip
    post = [t["rate"] for t in tenths if t["bytes_at_end"] >= warm_bytes]
    post_cpu = [t["rate_per_cpu_s"] for t in tenths if t["bytes_at_end"] >= warm_bytes and t["rate_per_cpu_s"]]
    level_slopes = rss_level_slopes(after)
    seconds = samples[-1]["t"]
    rate = learned / seconds if seconds > 0 else 0.0
    cpu = samples[-1]["cpu"] - samples[0]["cpu"]
    cpu_rate = (learned - samples[0]["bytes"]) / cpu if cpu > 0 else 0.0  # the rate with a core of its own
    warm_sample = after[0] if after else samples[-1]
    return {
        "bytes_target": target,
        "bytes_learned": learned,
        "complete": learned >= target,
        "seconds": round(seconds, 1),
        "bytes_per_s": round(rate, 1),
        "daemon_cpu_share": round(cpu / seconds, 2) if seconds > 0 else None,
        "bytes_per_cpu_s": round(cpu_rate, 1),
        "records": samples[-1]["records"],
        "snapshots": samples[-1]["snapshots"],
        "snapshot_failures": samples[-1]["snapshot_failures"],
        "dropped_bytes": samples[-1]["dropped_bytes"],
        "rss_start_mb": round(samples[0]["rss"] / 1e6, 1),
        "rss_after_warmup_mb": round(warm_sample["rss"] / 1e6, 1),
        "rss_end_mb": round(samples[-1]["rss"] / 1e6, 1),
        "rss_max_mb": round(max(s["rss"] for s in samples) / 1e6, 1),
        "rss_slope_kb_per_1e6_bytes": None if slope is None else round(slope, 2),
        "rss_level_slopes_kb_per_1e6_bytes": level_slopes,
        "warmup_share": args.warmup,
        "fds_start": samples[0]["fds"],
        "fds_end": samples[-1]["fds"],
        "throughput_post_warmup": {
            "min": round(min(post), 1) if post else None,
            "max": round(max(post), 1) if post else None,
            "last_over_first": round(post[-1] / post[0], 3) if len(post) >= 2 and post[0] > 0 else None,
            "cv": round(float(np.std(post) / np.mean(post)), 3) if len(post) >= 2 else None,
        },
        "throughput_per_cpu_s_post_warmup": {  # what the daemon costs per byte, whatever else the machine runs
            "min": round(min(post_cpu), 1) if post_cpu else None,
            "max": round(max(post_cpu), 1) if post_cpu else None,
            "last_over_first": round(post_cpu[-1] / post_cpu[0], 3) if len(post_cpu) >= 2 else None,
            "cv": round(float(np.std(post_cpu) / np.mean(post_cpu)), 3) if len(post_cpu) >= 2 else None,
        },
        "full_soak_estimate_s": round(FULL_SOAK_BYTES / rate) if rate > 0 else None,
        "full_soak_estimate_own_core_s": round(FULL_SOAK_BYTES / cpu_rate) if cpu_rate > 0 else None,
        "exit_code": rc,
        "tenths": tenths,
        "samples": samples,
    }


def rss_level_slopes(samples: list[dict], gap: int = 500_000) -> list[float]:
    """Slopes (KB per 10^6 bytes) of RSS against bytes learned, one per level: RSS jumps
    between a low and a high level as snapshot buffers are taken and given back, so a single
    fit over the mixture measures when the jumps happened more than any growth. Samples are
    split at the midpoint when the levels lie more than ``gap`` bytes apart.

    >>> rows = [{"bytes": b * 10**6, "rss": (300_000_000 if b % 2 else 302_000_000) + 1000 * b} for b in range(10)]
    >>> rss_level_slopes(rows)
    [1.0, 1.0]
    """
    rss = np.array([s["rss"] for s in samples], dtype=np.float64)
    if len(samples) < 3:
        return []
    groups = [rss < (rss.min() + rss.max()) / 2, rss >= (rss.min() + rss.max()) / 2] if np.ptp(rss) > gap else [np.ones(len(rss), bool)]
    x = np.array([s["bytes"] for s in samples], dtype=np.float64) / 1e6
    slopes = []
    for mask in groups:
        if mask.sum() >= 3 and np.ptp(x[mask]) > 0:
            slopes.append(round(float(np.polyfit(x[mask], rss[mask] / 1e3, 1)[0]), 2))
    return slopes


def report(result: dict, args) -> str:
    rows = [
        [t["tenth"], fmt_bytes(t["bytes_at_end"]), fmt_rate(t["rate"]), fmt_rate(t["rate_per_cpu_s"] or 0), f"{t['rss_min'] / 1e6:.2f} MB", f"{t['rss_max'] / 1e6:.2f} MB", t["fds_max"]]
        for t in result["tenths"]
    ]
    head = table(["tenth", "learned", "rate", "per CPU s", "RSS min", "RSS max", "fds max"], rows)
    thr = result["throughput_post_warmup"]
    slope = result["rss_slope_kb_per_1e6_bytes"]
    summary = table(["measure", "value"], [
        ["preset / source", f"{args.preset} / {args.source}"],
        ["bytes learned", f"{fmt_bytes(result['bytes_learned'])} of {fmt_bytes(result['bytes_target'])}" + ("" if result["complete"] else " (partial)")],
        ["time, mean rate", f"{fmt_duration(result['seconds'])}, {fmt_rate(result['bytes_per_s'])}"],
        ["daemon CPU share, rate per CPU second", f"{result['daemon_cpu_share']}, {fmt_rate(result['bytes_per_cpu_s'])}"],
        ["RSS start / after warm-up / end / max", f"{result['rss_start_mb']} / {result['rss_after_warmup_mb']} / {result['rss_end_mb']} / {result['rss_max_mb']} MB"],
        [f"RSS slope after {100 * args.warmup:.0f}% warm-up: all samples; per level", "n/a" if slope is None else
         f"{slope:+.2f}; " + ", ".join(f"{v:+.2f}" for v in result["rss_level_slopes_kb_per_1e6_bytes"]) + " KB per 10^6 bytes"],
        ["fds start / end", f"{result['fds_start']} / {result['fds_end']}"],
        ["throughput per tenth after warm-up", "n/a" if thr["min"] is None else f"{fmt_rate(thr['min'])} .. {fmt_rate(thr['max'])} (last/first {thr['last_over_first']}, cv {thr['cv']})"],
        ["throughput per CPU second, per tenth after warm-up", "n/a" if result["throughput_per_cpu_s_post_warmup"]["min"] is None else
         "{} .. {} (last/first {}, cv {})".format(fmt_rate(result["throughput_per_cpu_s_post_warmup"]["min"]), fmt_rate(result["throughput_per_cpu_s_post_warmup"]["max"]),
                                                  result["throughput_per_cpu_s_post_warmup"]["last_over_first"], result["throughput_per_cpu_s_post_warmup"]["cv"])],
        ["snapshots (failed)", f"{result['snapshots']} ({result['snapshot_failures']})"],
        ["dropped bytes", result["dropped_bytes"]],
        ["10^8 bytes at this rate (with a core of its own)", "n/a" if not result["full_soak_estimate_s"] else
         f"{fmt_duration(result['full_soak_estimate_s'])} ({fmt_duration(result['full_soak_estimate_own_core_s'] or 0)})"],
        ["daemon exit code", result["exit_code"]],
    ], align="ll")
    return f"{head}\n\n{summary}"


def record_part2(result: dict, args) -> None:
    """The summary (no samples) as section ``soak`` of the fault suite's figures file."""
    path = OUT_DIR / "faults-part2.json"
    summary = {k: v for k, v in result.items() if k not in ("samples", "tenths")}
    summary.update(preset=args.preset, source=args.source, snapshot_seconds=args.snapshot_seconds, command=" ".join(["./dev bench soak", *sys.argv[1:]]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the fault tests may write the same file
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            document = {}
        document["soak"] = summary
        write_json(path, document)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=float, default=1e7, help="bytes to push through the daemon (1e8 for the full soak; default 1e7)")
    parser.add_argument("--preset", default="tiny", help="model preset (tiny, small, ...)")
    parser.add_argument("--source", choices=("tcp", "file"), default="tcp", help="how the bytes reach the daemon")
    parser.add_argument("--snapshot-seconds", type=float, default=3.0, help="snapshot.every_seconds of the stream")
    parser.add_argument("--sample-seconds", type=float, default=2.0, help="seconds between samples of RSS, fds and counters")
    parser.add_argument("--warmup", type=float, default=0.2, help="share of the bytes treated as warm-up (excluded from the slope)")
    parser.add_argument("--max-seconds", type=float, default=4 * 3600, help="stop (and report a partial run) after this long")
    parser.add_argument("--out", default=str(OUT_DIR / "soak.json"), help="JSON output path")
    args = parser.parse_args(argv)
    if args.bytes < 1e4:
        parser.error("--bytes: at least 1e4")
    # A stopped benchmark (timeout, CI cancel) must not leave its daemon behind: SIGTERM
    # unwinds through run()'s clean-up like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="somad-soak-") as tmp:
        result = run(args, Path(tmp))
    print(report(result, args))
    write_json(args.out, {"machine": machine_info(), "args": vars(args), **result})
    record_part2(result, args)
    log(f"soak: JSON in {args.out}")
    return 0 if result["exit_code"] == 0 and result["snapshot_failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
