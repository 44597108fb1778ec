"""NAB ablations of the scoring layer, offline: run the model once per file, score variants in seconds.

The model is the slow part and, while it learns every byte (``learn_while_open: normal``), its
output does not depend on the scoring layer at all. So ``cache`` runs it once per NAB file and
keeps, for every byte of every row (the row's value text + "\\n", as ``bench/nab`` feeds it):
the loss in bits, the entropy of the predicted distribution in bits, and the byte's offset
within its row; ``ablate`` then turns those into NAB scores for many record scores,
normalisations and anomaly transforms, each scored by ``bench/nab_scorer`` in seconds.

    .venv/bin/python -m bench.nab_offline cache --preset tiny --jobs 2      # minutes
    .venv/bin/python -m bench.nab_offline ablate --preset tiny              # seconds per row

Cache: ``bench/out/nab_cache/<preset>/<dir>__<file>.npz`` with ``bits`` and ``entropy``
(float32, one per byte), ``offset`` (uint8, the byte's position in its row, capped at 255)
and ``row_start`` (int64, rows + 1: where each row's bytes begin). A file is fed to the
learner in one ``learn()`` call rather than row by row: with every byte learned, the two
differ only in where chunks end inside a ``batch`` of observations (same weights, same
gradients; float rounding aside). Metabolism fixed at d = 0: every byte an observation.

Entropy comes from ``SomaLearner.learn_with_entropy`` (the daemon's own path).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import nab_scorer as nab
from .common import fmt_duration, log, set_threads, split_list, table, write_json

OUT_DIR = Path(__file__).resolve().parent / "out"
CACHE_DIR = OUT_DIR / "nab_cache"
ONSET_ROWS = 200  # onsets: rows a new high must beat before it counts again (best of 50/100/200/400 on small)
HTM_AVERAGING = 2  # records averaged before judging (HTM: 10; best of 1/2/3/5/10 on small)
OFFSETS = 32  # per-offset statistics for the first offsets of a row; later bytes share the last slot


# ------------------------------------------------------------------ the model pass (slow, cached)


def learn_with_entropy(learner, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(bits, entropy) of every byte of ``data`` as float32, each scored before the model learned it."""
    bits, entropy = learner.learn_with_entropy(data)
    return bits.numpy().astype(np.float32), entropy.numpy().astype(np.float32)


def row_layout(values: list[str]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(bytes fed, row_start (rows + 1,), offset of each byte within its row)."""
    lines = [v.encode() + b"\n" for v in values]
    lengths = np.fromiter((len(x) for x in lines), dtype=np.int64, count=len(lines))
    row_start = np.concatenate(([0], np.cumsum(lengths)))
    offset = np.arange(row_start[-1]) - np.repeat(row_start[:-1], lengths)
    return b"".join(lines), row_start, np.minimum(offset, 255).astype(np.uint8)


def cache_path(preset_name: str, name: str, root: Path = CACHE_DIR) -> Path:
    return root / preset_name / (name.replace("/", "__").removesuffix(".csv") + ".npz")


def cache_file(task: tuple[str, str, str, str]) -> tuple[str, int, float]:
    """Worker: one NAB file through a fresh learner; writes its npz. Returns (name, bytes, CPU s)."""
    preset_name, nab_root, name, cache_root = task
    set_threads(1)
    from somad.learner import LearnerConfig, SomaLearner
    from somad.metabolism import MetabolismConfig
    from somad.model import preset

    _, values = nab.read_csv_column(Path(nab_root) / "data" / name, "value")
    data, row_start, offset = row_layout(values)
    learner = SomaLearner(preset(preset_name), LearnerConfig(metabolism=MetabolismConfig(mode="fixed", d=0.0)))
    t0 = time.process_time()
    bits, entropy = learn_with_entropy(learner, data)
    spent = time.process_time() - t0
    path = cache_path(preset_name, name, Path(cache_root))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, bits=bits, entropy=entropy, offset=offset, row_start=row_start)
    tmp.replace(path)  # a crash leaves no half-written cache behind
    return name, len(data), spent


def build_cache(preset_name: str, root: Path, names: list[str], jobs: int, cache_root: Path) -> None:
    todo = [n for n in names if not cache_path(preset_name, n, cache_root).exists()]
    sizes = {n: (root / "data" / n).stat().st_size for n in todo}
    tasks = [(preset_name, str(root), n, str(cache_root)) for n in sorted(todo, key=lambda n: -sizes[n])]  # big first
    log(f"cache: {len(tasks)} of {len(names)} files to run ({preset_name}) on {jobs} worker(s)")
    t0, total_bytes, total_cpu = time.perf_counter(), 0, 0.0
    ctx = multiprocessing.get_context("spawn")  # no fork after torch's thread pools exist
    with ctx.Pool(jobs) as pool:
        for done, (name, n_bytes, spent) in enumerate(pool.imap_unordered(cache_file, tasks), 1):
            total_bytes, total_cpu = total_bytes + n_bytes, total_cpu + spent
            log(f"  [{done}/{len(tasks)}] {name}: {n_bytes} bytes, {n_bytes / max(spent, 1e-9):,.0f} B/s, elapsed {fmt_duration(time.perf_counter() - t0)}")
    if tasks:
        log(f"cache: {total_bytes} bytes in {fmt_duration(total_cpu)} CPU ({total_bytes / max(total_cpu, 1e-9):,.0f} B/s per core)")


@dataclass(frozen=True)
class Cached:
    """One file's cached model output."""

    bits: np.ndarray  # (bytes,) loss of each byte, bits
    entropy: np.ndarray  # (bytes,) entropy of the prediction for each byte, bits
    offset: np.ndarray  # (bytes,) position of the byte within its row
    row_start: np.ndarray  # (rows + 1,) where each row's bytes begin

    @classmethod
    def load(cls, path: Path) -> Cached:
        with np.load(path) as z:
            return cls(z["bits"].astype(np.float64), z["entropy"].astype(np.float64), z["offset"].astype(np.int64), z["row_start"])


# ------------------------------------------------------------------ record scores (per byte -> per row)


def per_row(values: np.ndarray, row_start: np.ndarray, how: str) -> np.ndarray:
    """Reduce per-byte ``values`` to one per row: mean, max or sum.

    >>> per_row(np.array([1.0, 3.0, 2.0, 5.0]), np.array([0, 2, 4]), "mean").tolist()
    [2.0, 3.5]
    """
    starts = row_start[:-1]
    if how == "max":
        return np.maximum.reduceat(values, starts)
    sums = np.add.reduceat(values, starts)
    return sums / np.diff(row_start) if how == "mean" else sums


def offset_z(surprise: np.ndarray, offset: np.ndarray, tau: float = 500.0, min_std: float = 0.05) -> np.ndarray:
    """Standard score of each byte's surprise against running statistics of its offset in the
    row (first ``OFFSETS`` offsets, later ones pooled), judged before the byte updates them.

    Bytes at the same offset play the same role (leading digit, decimal point, last digit), so
    a last digit's usual noise stops masking a leading digit's rare miss.

    >>> z = offset_z(np.array([1.0, 5.0, 1.0, 5.0, 1.0, 9.0]), np.array([0, 1, 0, 1, 0, 1]))
    >>> [round(float(v), 1) for v in z]
    [0.0, 0.0, 0.0, 0.0, 0.0, 80.0]
    """
    slot = np.minimum(offset, OFFSETS - 1)
    count, mean, var = np.zeros(OFFSETS), np.zeros(OFFSETS), np.zeros(OFFSETS)
    z = np.zeros(surprise.size)
    for i, (x, k) in enumerate(zip(surprise.tolist(), slot.tolist())):
        if count[k] >= 2:
            z[i] = (x - mean[k]) / max(math.sqrt(var[k]), min_std)
        count[k] = min(count[k] + 1.0, tau)
        alpha = 1.0 / count[k]
        diff = x - mean[k]
        mean[k] += alpha * diff
        var[k] = (1.0 - alpha) * (var[k] + alpha * diff * diff)
    return z


def record_scores(c: Cached) -> dict[str, np.ndarray]:
    """Every record score under study, for one file: name -> (rows,)."""
    excess = c.bits - c.entropy
    out = {
        "mean_bits": per_row(c.bits, c.row_start, "mean"),
        "max_bits": per_row(c.bits, c.row_start, "max"),
        "mean_excess": per_row(excess, c.row_start, "mean"),
        "max_excess": per_row(excess, c.row_start, "max"),
        "possum_excess": per_row(np.maximum(excess, 0.0), c.row_start, "sum"),
    }
    for source, values in (("bits", c.bits), ("excess", excess)):
        z = offset_z(values, c.offset)
        out[f"offz_max_{source}"] = per_row(z, c.row_start, "max")
        out[f"offz_mean_{source}"] = per_row(z, c.row_start, "mean")
    return out


# ------------------------------------------------------------------ anomaly transforms (per row -> NAB score)


def squash(x: np.ndarray) -> np.ndarray:
    """Monotone map of the reals into (0, 1), exact in ranking far into the tails (NAB's sweep
    starts at 1.1 and wants scores in [0, 1]; only their order matters to it)."""
    return 0.5 + 0.5 * x / (1.0 + np.abs(x))


def shipped(scores: np.ndarray, use_tail: bool) -> np.ndarray:
    """``somad.scoring.StreamScorer``'s surprise detector (its defaults, every row judged: the
    onsets are a transform of their own here), fed each row's record score; its anomaly score,
    or -log10 of its tail probability (finer ranking where anomaly saturates)."""
    from somad.scoring import ScoringConfig, StreamScorer

    scorer = StreamScorer("nab", ScoringConfig(detector="surprise", onset_records=0))
    out = np.zeros(scores.size)
    one = np.zeros(1)
    for i, s in enumerate(scores.tolist()):
        one[0] = s
        scored, _ = scorer.score_record(b"", one)
        out[i] = -math.log10(max(scorer.last_tail, 1e-300)) if use_tail else scored.anomaly
    return squash(out) if use_tail else out


def htm_likelihood(scores: np.ndarray, log_scale: bool, averaging: int = HTM_AVERAGING, historic: int = 8640,
                   learning: int = 288, reestimate: int = 100, min_std: float = 0.05) -> np.ndarray:  # fmt: skip
    """HTM's anomaly likelihood (``nupic.algorithms.anomaly_likelihood``) over record scores.

    The mean of the last ``averaging`` scores is judged against a Gaussian fitted to the
    last ``historic`` such means (refitted every ``reestimate`` records, after ``learning``
    records); likelihood = 1 - its tail probability (either side, as HTM's tailProbability
    folds the lower tail onto the upper), with HTM's red-zone filter (after a likelihood
    above 0.99999 the next is capped at 0.999). ``log_scale``: HTM's
    ``log(1.0000000001 - L) / log(1 - 0.99999)``, what NAB's numenta detector reports.
    ``min_std`` (bits) plays HTM's variance floor, in the record score's own units.
    """
    n = scores.size
    csum = np.concatenate(([0.0], np.cumsum(scores)))
    idx = np.arange(n)
    lo = np.maximum(idx + 1 - averaging, 0)
    averaged = (csum[idx + 1] - csum[lo]) / (idx + 1 - lo)
    likelihood = np.full(n, 0.5)
    mean = std = None
    for i in range(n):
        if i >= learning and (mean is None or (i - learning) % reestimate == 0):
            past = averaged[max(0, i - historic) : i]
            mean, std = float(past.mean()), max(float(past.std()), min_std)
        if mean is not None:
            z = abs(averaged[i] - mean) / std
            likelihood[i] = 1.0 - 0.5 * math.erfc(z / math.sqrt(2.0))
    redzone, yellowzone = 0.99999, 0.999
    filtered = likelihood.copy()
    for i in range(1, n):
        if likelihood[i] > redzone and filtered[i - 1] > redzone:
            filtered[i] = yellowzone
    if not log_scale:
        return filtered
    return np.log(1.0000000001 - filtered) / math.log(1.0 - 0.99999)


def onsets(anomaly: np.ndarray, rows: int = ONSET_ROWS) -> np.ndarray:
    """Keep a row's score only where it reaches the highest of the ``rows`` rows before it;
    0 elsewhere. NAB counts every detecting row outside a window as a false positive but only
    the first inside one, so a run of high rows should report its onset and then hold back;
    this does that without knowing the threshold NAB will pick.

    >>> onsets(np.array([0.1, 0.9, 0.8, 0.95, 0.2, 0.1]), rows=2).tolist()
    [0.1, 0.9, 0.0, 0.95, 0.0, 0.0]
    """
    padded = np.concatenate((np.full(rows, -np.inf), anomaly))
    previous = np.lib.stride_tricks.sliding_window_view(padded[:-1], rows).max(axis=1)
    return np.where(anomaly >= previous, anomaly, 0.0)


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "shipped": lambda s: shipped(s, use_tail=False),
    "shipped_tail": lambda s: shipped(s, use_tail=True),
    "htm": lambda s: htm_likelihood(s, log_scale=False),
    "htm_log": lambda s: htm_likelihood(s, log_scale=True),
    "htm10": lambda s: htm_likelihood(s, log_scale=False, averaging=10),  # HTM's own averaging window
}
# each transform also with its onsets only ("<name>+onset"), computed from the same scores
POST_FILTERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"": lambda a: a, "+onset": onsets}


# ------------------------------------------------------------------ ablation


def ablate(preset_name: str, root: Path, files: list[nab.LabelledFile], cache_root: Path, record_names: list[str] | None, transform_names: list[str] | None) -> list[dict]:
    profiles = nab.load_profiles(root)
    per_file = {f.name: record_scores(Cached.load(cache_path(preset_name, f.name, cache_root))) for f in files}
    for f in files:
        rows = per_file[f.name]["mean_bits"].size
        if rows != f.n_rows:
            raise RuntimeError(f"{f.name}: cache has {rows} rows, the csv {f.n_rows}; rebuild the cache")
    records = record_names or list(next(iter(per_file.values())))
    transforms = transform_names or list(TRANSFORMS)
    results = []
    for rec in records:
        for tr in transforms:
            t0 = time.perf_counter()
            base = {name: TRANSFORMS[tr](scores[rec]) for name, scores in per_file.items()}
            for suffix, post in POST_FILTERS.items():
                anomaly = {name: post(a) for name, a in base.items()}
                scored = nab.score_detector(files, anomaly, profiles)
                row = {"record": rec, "transform": tr + suffix, "scores": {p: r.score for p, r in scored.items()},
                       "thresholds": {p: r.threshold for p, r in scored.items()}, "seconds": time.perf_counter() - t0}  # fmt: skip
                log(f"  {rec:>16} {tr + suffix:>18}: " + "  ".join(f"{row['scores'][p]:6.2f}" for p in nab.PROFILE_NAMES) + f"  ({row['seconds']:.1f} s)")
                results.append(row)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench.nab_offline", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("cache", "ablate", "all"))
    ap.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    ap.add_argument("--files", help="comma-separated subset (default: all 58)")
    ap.add_argument("--jobs", type=int, default=2, help="cache: worker processes (default: 2)")
    ap.add_argument("--records", help="ablate: record scores, comma-separated (default: all)")
    ap.add_argument("--transforms", help=f"ablate: {'|'.join(TRANSFORMS)} (default: all)")
    ap.add_argument("--nab", help="NAB directory (default: ../shared/data/nab, or $SOMAD_NAB)")
    ap.add_argument("--cache", default=str(CACHE_DIR), help=f"cache directory (default: {CACHE_DIR})")
    ap.add_argument("--json", default=str(OUT_DIR / "nab_ablation.json"), help="ablate: where the table goes")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    unknown = [t for t in split_list(args.transforms) if t not in TRANSFORMS]
    if unknown:
        raise SystemExit(f"--transforms: unknown {unknown}; choose from {list(TRANSFORMS)}")
    root = nab.nab_dir(args.nab)
    files = nab.load_corpus(root, split_list(args.files))
    cache_root = Path(args.cache)
    if args.command in ("cache", "all"):
        build_cache(args.preset, root, [f.name for f in files], args.jobs, cache_root)
    if args.command in ("ablate", "all"):
        results = ablate(args.preset, root, files, cache_root, split_list(args.records) or None, split_list(args.transforms) or None)
        results.sort(key=lambda r: -r["scores"]["standard"])
        print(table(["record score", "transform", "standard", "low FP", "low FN"],
                    [(r["record"], r["transform"], *(f"{r['scores'][p]:.2f}" for p in nab.PROFILE_NAMES)) for r in results]))  # fmt: skip
        write_json(args.json, {"preset": args.preset, "files": [f.name for f in files], "rows": results})
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
