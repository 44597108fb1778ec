"""soma throughput per core, work per byte, and memory growth.

One torch thread throughout. For ``--preset`` (default small), on ``--input`` (default
nab_realKnownCause.csv from the corpus directory; cycled when more bytes are needed):

1. scoring only (``L.score``), d = 0 learning (every byte an observation) and adaptive learning
   on a familiar stream (the default metabolism, warmed up by learning the first
   ``--warm-bytes`` of the input, then timed on what follows): bytes/s over at least
   ``--seconds`` of measured work each, against the issue's targets;
2. MACs/byte from ``somad.model.macs_per_byte`` with the chunk length the learner actually
   used in that mode, the mean number of distinct byte values per chunk of that length in the
   input, and the measured observations/byte; the achieved GFLOP/s = 2 * MACs/byte * bytes/s;
   and how far that is from this machine's single-thread fp32 GEMM rate (256x384 @ 384x384);
3. RSS of an adaptive learner after 1 MB and after ``--rss-mb`` MB of input (default 50: at
   the adaptive speed this can take the better part of an hour; progress goes to stderr), and
   the growth between them (target < 1 MB).

    PYTHONPATH=. python -m bench.throughput --quick        # smoke test, a few minutes
    PYTHONPATH=. python -m bench.throughput --json bench/out/throughput.json

Units: 1 KB = 1000 bytes, 1 MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

from somad.model import macs_per_byte

from .common import (
    KB,
    Progress,
    fmt_bytes,
    fmt_duration,
    fmt_rate,
    log,
    machine_info,
    make_learner,
    resolve_input,
    rss_bytes,
    peak_rss_bytes,
    set_threads,
    table,
    write_json,
)

# Targets from the issue, bytes/s per core.
TARGETS = {"score": 250 * KB, "d0": 20 * KB, "adaptive": 200 * KB}
RSS_GROWTH_TARGET = 1_000_000  # bytes
MODE_LABELS = {"score": "scoring only (L.score)", "d0": "d=0 learning", "adaptive": "adaptive, familiar stream"}


class Cycle:
    """An endless stream over ``data``: take(n) returns the next n bytes, wrapping around."""

    def __init__(self, data: bytes, pos: int = 0):
        if not data:
            raise SystemExit("input is empty")
        self.data, self.pos = data, pos % len(data)

    def take(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            piece = self.data[self.pos : self.pos + n - len(out)]
            out += piece
            self.pos = (self.pos + len(piece)) % len(self.data)
        return bytes(out)


def distinct_per_chunk(data: bytes, chunk: int) -> float:
    """Mean number of distinct byte values per ``chunk``-byte chunk of ``data`` (whole chunks)."""
    n = len(data) // chunk
    if n == 0:
        return float(len(set(data)))
    rows = np.sort(np.frombuffer(data, dtype=np.uint8)[: n * chunk].reshape(n, chunk), axis=1)
    return float((1 + (np.diff(rows, axis=1) != 0).sum(axis=1)).mean())


def gemm_peak_gflops(seconds: float, m: int = 256, k: int = 384, n: int = 384, trials: int = 3) -> float:
    """Best-of-trials single-thread fp32 GEMM rate, GFLOP/s (2*m*k*n flops per product)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    for _ in range(10):
        torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(trials):
        reps, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds / trials:
            for _ in range(20):
                torch.mm(a, b, out=out)
            reps += 20
        best = max(best, 2.0 * m * k * n * reps / elapsed / 1e9)
    return best


def timed(fn, stream: Cycle, seconds: float, piece: int, on_piece=None) -> tuple[int, float, float]:
    """Call fn on successive pieces until ``seconds`` of fn (wall) time.

    Returns (bytes, wall seconds, process CPU seconds): CPU/wall well below 1 with one thread
    means the process was waiting for a core (a busy machine), so the rate is pessimistic.
    """
    done, spent, cpu = 0, 0.0, 0.0
    while spent < seconds:
        data = stream.take(piece)
        t0, c0 = time.perf_counter(), time.process_time()
        fn(data)
        spent += time.perf_counter() - t0
        cpu += time.process_time() - c0
        done += len(data)
        if on_piece:
            on_piece(done, spent)
    return done, spent, cpu


def measure_mode(mode: str, preset_name: str, data: bytes, args) -> dict:
    stream = Cycle(data)
    learner = make_learner(preset_name, "d0" if mode == "d0" else "adaptive")
    lc, m = learner.lcfg, learner.metabolism
    warm_d = None
    if mode == "score":
        learner.score(stream.take(args.score_piece))  # untimed warm-up (allocations, caches)
        fn, piece = learner.score, args.score_piece
    elif mode == "d0":
        learner.learn(stream.take(1024))
        fn, piece = learner.learn, args.learn_piece
    else:
        prog = Progress(f"adaptive warm-up on first {fmt_bytes(args.warm_bytes)}", args.warm_bytes)
        done = 0
        while done < args.warm_bytes:
            learner.learn(stream.take(min(args.learn_piece * 4, args.warm_bytes - done)))
            done = m.bytes
            prog.update(done, f"d={m.d:.2f} obs/byte so far {m.observations / max(1, m.bytes):.3f}")
        warm_d = m.d
        fn, piece = learner.learn, args.learn_piece
    obs0, bytes0 = m.observations, m.bytes
    d_samples = [m.d]
    chunk_samples = []

    prog = Progress(f"{MODE_LABELS[mode]} (timing {args.seconds:g}s)", None, every_s=1.0)

    def on_piece(done: int, spent: float) -> None:
        d_samples.append(m.d)
        if mode != "score":
            chunk_samples.append(m.bytes_per_observation_batch(lc.batch, lc.max_chunk))
        prog.update(done, f"d={m.d:.2f}")

    nbytes, secs, cpu = timed(fn, stream, args.seconds, piece, on_piece)

    observations = m.observations - obs0 if mode != "score" else 0
    obs_per_byte = observations / max(1, m.bytes - bytes0) if mode != "score" else 0.0
    chunk = float(np.mean(chunk_samples)) if chunk_samples else float(lc.max_chunk)
    if mode == "d0":
        chunk = float(m.bytes_per_observation_batch(lc.batch, lc.max_chunk))  # fixed at d = 0
    chunk_int = max(1, round(chunk))
    distinct = distinct_per_chunk(data, chunk_int)
    macs = macs_per_byte(learner.cfg, distinct, chunk_int, obs_per_byte)
    macs_max_chunk = macs_per_byte(learner.cfg, distinct_per_chunk(data, lc.max_chunk), lc.max_chunk, obs_per_byte)
    rate = nbytes / secs
    result = {
        "mode": mode,
        "bytes": nbytes,
        "seconds": secs,
        "cpu_seconds": cpu,
        "cpu_per_wall": cpu / secs if secs > 0 else None,
        "bytes_per_s": rate,
        "target_bytes_per_s": TARGETS[mode],
        "pass": rate >= TARGETS[mode],
        "d_after_warmup": warm_d,
        "d_start": d_samples[0],
        "d_end": m.d,
        "d_min": min(d_samples),
        "d_max": max(d_samples),
        "observations": observations,
        "obs_per_byte": obs_per_byte,
        "chunk": chunk,
        "distinct_per_chunk": distinct,
        "macs_per_byte": macs,
        "macs_per_byte_at_max_chunk": macs_max_chunk,
        "gflops": 2.0 * macs * rate / 1e9,
        "updates": learner.updates,
    }
    extra = f", d {result['d_start']:.2f} -> {result['d_end']:.2f}, obs/byte {obs_per_byte:.4f}" if mode != "score" else ""
    log(f"  {MODE_LABELS[mode]}: {fmt_rate(rate)} over {secs:.2f}s ({fmt_bytes(nbytes)}){extra}")
    return result


def measure_rss(preset_name: str, data: bytes, total_mb: float, piece: int) -> dict:
    """RSS of an adaptive learner after 1 MB and after ``total_mb`` MB of (cycled) input."""
    gc.collect()
    stream = Cycle(data)
    learner = make_learner(preset_name, "adaptive")
    total = int(total_mb * 1e6)
    first = min(1_000_000, total)
    prog = Progress(f"RSS run, adaptive {preset_name}, {fmt_bytes(total)}", total, every_s=10.0)
    fed, rss_first, t0 = 0, None, time.perf_counter()
    while fed < total:
        target = first if rss_first is None else total
        n = min(piece, target - fed)
        learner.learn(stream.take(n))
        fed += n
        m = learner.metabolism
        prog.update(fed, f"d={m.d:.2f} RSS {fmt_bytes(rss_bytes())}")
        if rss_first is None and fed >= first:
            gc.collect()
            rss_first = rss_bytes()
            log(f"  RSS after {fmt_bytes(fed)}: {fmt_bytes(rss_first)}")
    gc.collect()
    rss_last = rss_bytes()
    growth = rss_last - rss_first
    log(f"  RSS after {fmt_bytes(fed)}: {fmt_bytes(rss_last)} (growth {growth / 1e6:+.3f} MB) in {fmt_duration(time.perf_counter() - t0)}")
    return {
        "preset": preset_name,
        "mode": "adaptive",
        "first_bytes": first,
        "total_bytes": fed,
        "rss_after_first": rss_first,
        "rss_after_total": rss_last,
        "growth": growth,
        "target_growth": RSS_GROWTH_TARGET,
        "pass": growth < RSS_GROWTH_TARGET,
        "peak_rss": max(peak_rss_bytes(), rss_last),
        "seconds": time.perf_counter() - t0,
        "final_d": learner.metabolism.d,
        "obs_per_byte": learner.metabolism.observations / max(1, learner.metabolism.bytes),
    }


def render(meta: dict, modes: list[dict], peak: float, rss: dict | None) -> str:
    rows = []
    for r in modes:
        ok = "PASS" if r["pass"] else "MISS"
        dcol = "-" if r["mode"] != "adaptive" else f"{r['d_start']:.2f}->{r['d_end']:.2f}"
        bound = peak / r["gflops"] if r["gflops"] > 0 else float("inf")
        rows.append([
            MODE_LABELS[r["mode"]],
            fmt_rate(r["bytes_per_s"]),
            f">= {fmt_rate(r['target_bytes_per_s'])}",
            ok,
            dcol,
            f"{r['obs_per_byte']:.4f}",
            f"{r['chunk']:.0f}",
            f"{r['distinct_per_chunk']:.1f}",
            f"{r['macs_per_byte'] / 1e3:.1f}k",
            f"{r['gflops']:.2f}",
            f"{bound:.1f}x",
            f"{r['cpu_per_wall']:.2f}",
        ])
    out = [
        f"## soma throughput: preset {meta['preset']}, 1 thread, input {meta['input']} ({meta['cpu']})",
        "",
        table(
            ["mode", "bytes/s", "target", "result", "d (timed)", "obs/byte", "chunk", "distinct/chunk", "MACs/byte", "GFLOP/s", "within Nx of FLOP bound", "CPU/wall"],
            rows,
            "lrrlrrrrrrrr",
        ),
        "",
        f"FLOP bound: single-thread fp32 GEMM 256x384 @ 384x384 on this machine = {peak:.1f} GFLOP/s;"
        " 'within Nx' = that / (2 * MACs/byte * bytes/s).",
        "MACs/byte: somad.model.macs_per_byte(cfg, distinct/chunk, chunk, obs/byte), chunk = mean chunk length the learner used"
        " in that mode (max_chunk when scoring or at high d; batch at d = 0).",
        "CPU/wall: process CPU time / wall time while timed; well below 1.00 means the core was shared (busy machine) and bytes/s is pessimistic.",
    ]
    adaptive = next((r for r in modes if r["mode"] == "adaptive"), None)
    if adaptive:
        out.append(
            f"Adaptive: warmed up on the first {fmt_bytes(meta['warm_bytes'])} of the input (d reached {adaptive['d_after_warmup']:.2f}),"
            f" then timed on the following bytes: d {adaptive['d_min']:.2f}..{adaptive['d_max']:.2f}, {adaptive['obs_per_byte']:.4f} observations/byte."
        )
    times = ", ".join(f"{MODE_LABELS[r['mode']]} {r['seconds']:.2f}s/{fmt_bytes(r['bytes'])}" for r in modes)
    out.append(f"Measured work: {times}.")
    if rss:
        g = rss["growth"]
        out += [
            "",
            f"## Memory: adaptive {rss['preset']} learner through {fmt_bytes(rss['total_bytes'])} of {meta['input']} (cycled)",
            "",
            table(
                ["point", "bytes learned", "RSS", "target", "result"],
                [
                    ["after first 1 MB", f"{rss['first_bytes']:,}", fmt_bytes(rss["rss_after_first"]), "", ""],
                    [f"after {fmt_bytes(rss['total_bytes'])}", f"{rss['total_bytes']:,}", fmt_bytes(rss["rss_after_total"]), "", ""],
                    ["growth", f"{rss['total_bytes'] - rss['first_bytes']:,}", f"{g / 1e6:+.3f} MB", "< 1 MB", "PASS" if rss["pass"] else "MISS"],
                ],
                "lrrrl",
            ),
            "",
            f"Process peak RSS {fmt_bytes(rss['peak_rss'])}; run took {fmt_duration(rss['seconds'])};"
            f" final d {rss['final_d']:.2f}, {rss['obs_per_byte']:.4f} observations/byte overall.",
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="soma preset (default small)")
    ap.add_argument("--data", help="corpus directory (default: $SOMAD_DATA or ../shared/data/corpora next to the repo)")
    ap.add_argument("--input", default="nab_realKnownCause.csv", help="input file: a path, or a name in the corpus directory")
    ap.add_argument("--seconds", type=float, default=None, help="measured seconds per mode (default 2; --quick 0.5)")
    ap.add_argument("--warm-bytes", type=int, default=None, help="adaptive warm-up bytes before timing (default 300000; --quick 100000)")
    ap.add_argument("--rss-mb", type=float, default=None, help="MB of input for the RSS run (default 50, which takes a long time at adaptive speed; --quick 2; 0 skips it)")
    ap.add_argument("--modes", default="score,d0,adaptive", help="comma-separated subset of score,d0,adaptive")
    ap.add_argument("--score-piece", type=int, default=16384, help="bytes per L.score call (default 16384)")
    ap.add_argument("--learn-piece", type=int, default=4096, help="bytes per L.learn call (default 4096)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 0.5 s per mode, 100 KB warm-up, 2 MB RSS run")
    ap.add_argument("--json", metavar="OUT", help="write results as JSON")
    args = ap.parse_args(argv)

    args.seconds = args.seconds if args.seconds is not None else (0.5 if args.quick else 2.0)
    args.warm_bytes = args.warm_bytes if args.warm_bytes is not None else (100_000 if args.quick else 300_000)
    args.rss_mb = args.rss_mb if args.rss_mb is not None else (2.0 if args.quick else 50.0)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in TARGETS:
            ap.error(f"unknown mode {m!r}; choose from {list(TARGETS)}")
    if args.seconds <= 0 or args.warm_bytes < 0 or args.rss_mb < 0:
        ap.error("--seconds must be > 0, --warm-bytes and --rss-mb >= 0")
    if args.rss_mb and args.rss_mb < 1:
        ap.error("--rss-mb must be at least 1 (the baseline is taken after 1 MB), or 0 to skip")

    set_threads(1)
    path = resolve_input(args.input, args.data)
    data = path.read_bytes()
    make_learner(args.preset, "d0")  # validate the preset name before the long parts
    meta = {
        **machine_info(),
        "preset": args.preset,
        "input": path.name,
        "input_path": str(path),
        "input_bytes": len(data),
        "seconds_per_mode": args.seconds,
        "warm_bytes": args.warm_bytes,
        "rss_mb": args.rss_mb,
        "quick": args.quick,
    }
    log(f"preset {args.preset}, input {path} ({fmt_bytes(len(data))}), 1 torch thread")

    peak_seconds = 0.3 if args.quick else 1.5
    peak = gemm_peak_gflops(peak_seconds)
    log(f"single-thread fp32 GEMM peak: {peak:.1f} GFLOP/s")

    results = []
    for mode in modes:
        log(f"{MODE_LABELS[mode]} ...")
        results.append(measure_mode(mode, args.preset, data, args))
        gc.collect()

    rss = None
    if args.rss_mb:
        log(f"RSS run through {args.rss_mb:g} MB (progress every 10 s) ...")
        rss = measure_rss(args.preset, data, args.rss_mb, 1 << 16)

    print(render(meta, results, peak, rss))
    if args.json:
        write_json(args.json, {"meta": meta, "gemm_peak_gflops": peak, "modes": results, "rss": rss})
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
