"""soma throughput per core, work per byte, and memory growth.

One torch thread throughout. For ``--preset`` (default small), on ``--input`` (default
nab_realKnownCause.csv from the corpus directory; cycled when more bytes are needed):

1. scoring only (``L.score``), d = 0 learning (every byte an observation) and adaptive learning
   on a familiar stream (the default metabolism, warmed up by learning the first
   ``--warm-bytes`` of the input, then timed on what follows): bytes per CPU-second (the
   per-core rate; a shared machine stretches wall time, not CPU time) and per wall-second
   over at least ``--seconds`` of measured work each, against the issue's targets;
2. MACs/byte from ``somad.model.macs_per_byte`` with the chunk length the learner actually
   used in that mode, the mean number of distinct byte values per chunk of that length in the
   input, and the measured observations/byte; the achieved GFLOP/s = 2 * MACs/byte * bytes/s;
   and how far that is from this machine's single-thread fp32 GEMM rate (256x384 @ 384x384);
3. with ``--kernels native,torch`` (default: the learner's "auto"), each forward path of this
   tree timed in turn on the same bytes (somad/native.py: the compiled recurrence; torch: the
   lag-mode GEMMs), and the CPU-time ratio per mode;
   with ``--baseline DIR`` (a directory holding another version's model.py, learner.py and
   metabolism.py, e.g. from ``git show``), the same modes for that version, timed piece by
   piece in turn with this one on the same bytes, and the CPU-time ratio per mode;
4. RSS of an adaptive learner after 1 MB and after ``--rss-mb`` MB of input (default 50;
   progress goes to stderr), and the growth between them (target < 1 MB).

    PYTHONPATH=. python -m bench.throughput --quick        # smoke test, a few minutes
    PYTHONPATH=. python -m bench.throughput --json bench/out/throughput.json
    mkdir -p /tmp/old && for f in model learner metabolism; do git show HEAD~1:somad/$f.py > /tmp/old/$f.py; done
    PYTHONPATH=. python -m bench.throughput --baseline /tmp/old --rss-mb 0
    PYTHONPATH=. python -m bench.throughput --kernels native,torch --rss-mb 0

Units: 1 KB = 1000 bytes, 1 MB = 10^6 bytes.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import inspect
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

import somad.learner
import somad.metabolism
import somad.model

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
    """Best-of-trials single-thread fp32 GEMM rate, GFLOP per CPU-second (2*m*k*n flops per product)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    for _ in range(10):
        torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(trials):
        reps, t0 = 0, time.process_time()
        while (elapsed := time.process_time() - t0) < seconds / trials:
            for _ in range(20):
                torch.mm(a, b, out=out)
            reps += 20
        best = max(best, 2.0 * m * k * n * reps / elapsed / 1e9)
    return best


@dataclass
class Impl:
    """A version of the learner to time: this tree's somad, or a baseline loaded from elsewhere."""

    name: str
    learner: ModuleType  # its somad.learner
    metabolism: ModuleType  # its somad.metabolism
    model: ModuleType  # its somad.model
    kernel: str = "auto"  # this tree's LearnerConfig.kernel

    def make(self, preset_name: str, mode: str):
        """A learner as bench.common.make_learner builds one: fixed d = 0 for mode d0, else the defaults."""
        if self.learner is somad.learner:
            return make_learner(preset_name, "d0" if mode == "d0" else "adaptive", self.kernel)
        meta = self.metabolism.MetabolismConfig(mode="fixed", d=0.0) if mode == "d0" else self.metabolism.MetabolismConfig()
        return self.learner.SomaLearner(self.model.preset(preset_name), self.learner.LearnerConfig(metabolism=meta))

    def macs_per_byte(self, learner, distinct: float, chunk: int, obs_per_byte: float, reproject: bool) -> float:
        fn, cfg = self.model.macs_per_byte, learner.cfg
        params = inspect.signature(fn).parameters
        if "kernel" in params:
            return fn(cfg, distinct, chunk, obs_per_byte, reproject=reproject, kernel=learner.kernel)
        if "reproject" in params:
            return fn(cfg, distinct, chunk, obs_per_byte, reproject=reproject)
        return fn(cfg, distinct, chunk, obs_per_byte)


THIS = Impl("this tree", somad.learner, somad.metabolism, somad.model)


def this_tree(kernels: list[str]) -> list[Impl]:
    """This tree's learner once per kernel asked for (one unnamed entry for the default)."""
    if kernels == ["auto"]:
        return [THIS]
    return [Impl(f"this tree, {kernel}", somad.learner, somad.metabolism, somad.model, kernel) for kernel in kernels]


def load_baseline(directory: str) -> Impl:
    """The model.py, learner.py and metabolism.py in ``directory``, imported as package somad_baseline."""
    path = Path(directory)
    missing = [f for f in ("model.py", "learner.py", "metabolism.py") if not (path / f).is_file()]
    if missing:
        raise SystemExit(f"--baseline {directory}: missing {', '.join(missing)}")
    package = importlib.util.module_from_spec(importlib.util.spec_from_loader("somad_baseline", loader=None, is_package=True))
    package.__path__ = [str(path)]
    sys.modules["somad_baseline"] = package
    mods = [importlib.import_module(f"somad_baseline.{name}") for name in ("learner", "metabolism", "model")]
    return Impl(f"baseline ({directory})", *mods)


@dataclass
class Timing:
    """Measured work of one learner."""

    bytes: int = 0
    wall: float = 0.0  # seconds inside the timed calls
    cpu: float = 0.0  # process CPU seconds inside them


def timed_in_turn(fns: list, streams: list[Cycle], seconds: float, piece: int, on_piece=None) -> list[Timing]:
    """Call each fn on its next piece in turn, until every fn has had ``seconds`` of wall time.

    Taking turns puts the learners under the same load on a shared machine; CPU time, not
    wall time, is what they are compared by (wall time also counts waiting for a core).
    """
    timings = [Timing() for _ in fns]
    while min(t.wall for t in timings) < seconds:
        for i, (fn, stream, t) in enumerate(zip(fns, streams, timings)):
            data = stream.take(piece)
            w0, c0 = time.perf_counter(), time.process_time()
            fn(data)
            t.wall += time.perf_counter() - w0
            t.cpu += time.process_time() - c0
            t.bytes += len(data)
            if on_piece:
                on_piece(i, t)
    return timings


def warm_up(mode: str, learner, stream: Cycle, args, label: str) -> float | None:
    """Untimed work before timing: allocations, and for adaptive a familiar stream. Returns d."""
    if mode == "score":
        learner.score(stream.take(args.score_piece))
        return None
    if mode == "d0":
        learner.learn(stream.take(1024))
        return None
    m = learner.metabolism
    prog = Progress(f"{label} adaptive warm-up on first {fmt_bytes(args.warm_bytes)}", args.warm_bytes)
    done = 0
    while done < args.warm_bytes:
        learner.learn(stream.take(min(args.learn_piece * 4, args.warm_bytes - done)))
        done = m.bytes
        prog.update(done, f"d={m.d:.2f} obs/byte so far {m.observations / max(1, m.bytes):.3f}")
    return m.d


def measure_mode(mode: str, preset_name: str, data: bytes, args, impls: list[Impl]) -> list[dict]:
    """Time ``mode`` for every impl in turn on the same bytes; one result dict per impl."""
    learners = [impl.make(preset_name, mode) for impl in impls]
    streams = [Cycle(data) for _ in impls]
    warm_d = [warm_up(mode, L, st, args, impl.name) for impl, L, st in zip(impls, learners, streams)]
    metas = [L.metabolism for L in learners]
    start = [(m.observations, m.bytes) for m in metas]
    chunks_start = [(getattr(L, "chunks", None), L.bytes_seen) for L in learners]  # a baseline may not count chunks
    d_samples = [[m.d] for m in metas]
    chunk_samples: list[list[int]] = [[] for _ in impls]
    prog = Progress(f"{MODE_LABELS[mode]} (timing {args.seconds:g}s each)", None, every_s=1.0)

    def on_piece(i: int, t: Timing) -> None:
        m, lc = metas[i], learners[i].lcfg
        d_samples[i].append(m.d)
        if mode != "score":
            chunk_samples[i].append(m.bytes_per_observation_batch(lc.batch, lc.max_chunk))
        prog.update(t.bytes, f"{impls[i].name}: d={m.d:.2f}")

    fns = [L.score if mode == "score" else L.learn for L in learners]
    piece = args.score_piece if mode == "score" else args.learn_piece
    timings = timed_in_turn(fns, streams, args.seconds, piece, on_piece)

    results = []
    for i, (impl, learner, m, t) in enumerate(zip(impls, learners, metas, timings)):
        lc = learner.lcfg
        observations = m.observations - start[i][0] if mode != "score" else 0
        obs_per_byte = observations / max(1, m.bytes - start[i][1]) if mode != "score" else 0.0
        chunk = float(np.mean(chunk_samples[i])) if chunk_samples[i] else float(getattr(learner, "score_chunk", lc.max_chunk))
        if mode != "score" and chunks_start[i][0] is not None and learner.chunks > chunks_start[i][0]:
            chunk = (learner.bytes_seen - chunks_start[i][1]) / (learner.chunks - chunks_start[i][0])  # measured
        if mode == "d0":
            chunk = float(m.bytes_per_observation_batch(lc.batch, lc.max_chunk))  # fixed at d = 0
        chunk_int = max(1, round(chunk))
        distinct = distinct_per_chunk(data, chunk_int)
        macs = impl.macs_per_byte(learner, distinct, chunk_int, obs_per_byte, reproject=mode == "d0")
        cpu_rate = t.bytes / t.cpu if t.cpu > 0 else float("inf")
        result = {
            "impl": impl.name,
            "kernel": getattr(learner, "kernel", "torch"),
            "mode": mode,
            "bytes": t.bytes,
            "seconds": t.wall,
            "cpu_seconds": t.cpu,
            "cpu_per_wall": t.cpu / t.wall if t.wall > 0 else None,
            "bytes_per_s": t.bytes / t.wall,
            "bytes_per_cpu_s": cpu_rate,
            "target_bytes_per_s": TARGETS[mode],
            "pass": cpu_rate >= TARGETS[mode],
            "d_after_warmup": warm_d[i],
            "d_start": d_samples[i][0],
            "d_end": m.d,
            "d_min": min(d_samples[i]),
            "d_max": max(d_samples[i]),
            "observations": observations,
            "obs_per_byte": obs_per_byte,
            "chunk": chunk,
            "max_chunk": lc.max_chunk,
            "distinct_per_chunk": distinct,
            "macs_per_byte": macs,
            "gflops": 2.0 * macs * cpu_rate / 1e9,
            "updates": learner.updates,
        }
        extra = f", d {result['d_start']:.2f} -> {result['d_end']:.2f}, obs/byte {obs_per_byte:.4f}" if mode != "score" else ""
        log(f"  {MODE_LABELS[mode]} [{impl.name}]: {fmt_rate(cpu_rate)} per CPU-second, {fmt_rate(result['bytes_per_s'])} wall, {fmt_bytes(t.bytes)}{extra}")
        results.append(result)
    return results


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
    with_impl = len({r["impl"] for r in modes}) > 1
    rows = []
    for r in modes:
        ok = "PASS" if r["pass"] else "MISS"
        dcol = "-" if r["mode"] != "adaptive" else f"{r['d_start']:.2f}->{r['d_end']:.2f}"
        bound = peak / r["gflops"] if r["gflops"] > 0 else float("inf")
        rows.append([
            MODE_LABELS[r["mode"]],
            *([r["impl"]] if with_impl else []),
            fmt_rate(r["bytes_per_cpu_s"]),
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
    headers = ["mode", *(["version"] if with_impl else []), "bytes/CPU-s", "bytes/s wall", "target", "result", "d (timed)", "obs/byte", "chunk", "distinct/chunk", "MACs/byte", "GFLOP/s", "within Nx of FLOP bound", "CPU/wall"]
    out = [
        f"## soma throughput: preset {meta['preset']}, 1 thread, input {meta['input']} ({meta['cpu']}); forward kernel: "
        + ", ".join(f"{name} = {kernel}" for name, kernel in meta.get("kernels", {}).items()),
        "",
        table(headers, rows, "l" + ("l" if with_impl else "") + "rrrlrrrrrrrr"),
        "",
        "bytes/CPU-s: bytes per second of process CPU time, the per-core rate the targets are judged by"
        " (on a shared machine wall time also counts waiting for a core: CPU/wall well below 1.00).",
        f"FLOP bound: single-thread fp32 GEMM 256x384 @ 384x384 on this machine = {peak:.1f} GFLOP per CPU-second;"
        " 'within Nx' = that / (2 * MACs/byte * bytes/CPU-s).",
        "MACs/byte: macs_per_byte(cfg, distinct/chunk, chunk, obs/byte, kernel) of that version's somad.model, chunk = mean chunk"
        " length the learner used in that mode (when scoring: max_chunk, or 512 bytes on the native kernel; when learning at high d: max_chunk,"
        " or on the native kernel up to the window's update, window_bytes; batch at d = 0).",
    ]
    if with_impl:
        names = list(dict.fromkeys(r["impl"] for r in modes))
        first, rest = names[0], names[1:]
        by = {(r["mode"], r["impl"]): r for r in modes}
        for other in rest:
            ratios = []
            for mode in dict.fromkeys(r["mode"] for r in modes):
                this, base = by[mode, first], by[mode, other]
                ratios.append(f"{MODE_LABELS[mode]} {this['bytes_per_cpu_s'] / base['bytes_per_cpu_s']:.2f}x")
            out.append(f"CPU time per byte, {other} / {first} (same bytes, timed in turn): " + ", ".join(ratios) + ".")
    for adaptive in (r for r in modes if r["mode"] == "adaptive"):
        out.append(
            f"Adaptive [{adaptive['impl']}]: warmed up on the first {fmt_bytes(meta['warm_bytes'])} of the input (d reached {adaptive['d_after_warmup']:.2f}),"
            f" then timed on the following bytes: d {adaptive['d_min']:.2f}..{adaptive['d_max']:.2f}, {adaptive['obs_per_byte']:.4f} observations/byte, {adaptive['updates']} updates in all."
        )
    times = ", ".join(f"{MODE_LABELS[r['mode']]}{' [' + r['impl'] + ']' if with_impl else ''} {r['seconds']:.2f}s/{fmt_bytes(r['bytes'])}" for r in modes)
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
    ap.add_argument("--kernels", default="auto", help="comma-separated LearnerConfig.kernel values to time in turn, e.g. native,torch (default auto)")
    ap.add_argument("--baseline", metavar="DIR", help="also time the model.py, learner.py and metabolism.py in DIR (another version), in turn with this one")
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

    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    if not kernels or any(k not in somad.learner.KERNELS for k in kernels):
        ap.error(f"--kernels: choose from {', '.join(somad.learner.KERNELS)}")
    impls = this_tree(kernels) + ([load_baseline(args.baseline)] if args.baseline else [])
    meta["kernels"] = {impl.name: impl.make(args.preset, "score").kernel for impl in impls if impl.learner is somad.learner}
    if args.baseline:
        meta["baseline"] = args.baseline
    results = []
    for mode in modes:
        log(f"{MODE_LABELS[mode]} ...")
        results.extend(measure_mode(mode, args.preset, data, args, impls))
        gc.collect()

    rss = None  # with the default kernel: what the daemon runs
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
