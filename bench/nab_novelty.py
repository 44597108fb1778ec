"""NAB ablation of the novelty detector's settings, through the daemon's own scorer, in seconds.

Under ``detector: novelty`` the anomaly score depends on the records' bytes only, not on soma's
loss, so this bench feeds each NAB file's rows (value text + "\\n", as ``bench/nab`` does) to a
fresh ``somad.scoring.StreamScorer`` per file, without the learner, and scores what its alert
machine judges (``last_trigger``) with NAB's rules (``bench/nab_scorer``). ``bench/nab`` runs the
full path (learner included) and gives the same figures for the same settings.

Each of ``--depth``, ``--onset-records``, ``--slots``, ``--grace`` and ``--repeats`` (on/off)
takes a comma-separated list; every combination is one row. ``--split`` also scores the odd- and even-numbered files
apart (sorted names) and reports, for each half, the setting chosen on it scored on the other:
an honest figure for settings that were themselves chosen on NAB.

    ./dev bench nab_novelty                                   # the daemon's defaults (~1 min)
    ./dev bench nab_novelty --depth 3,4,6,8 --onset-records 100,200,400 --split
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

from somad.scoring import AlertConfig, ScoringConfig, StreamScorer

from . import nab_scorer as nab
from .common import log, split_list, table, write_json

OUT = Path(__file__).resolve().parent / "out" / "nab_novelty.json"
IGNORED_BITS = np.ones(1)  # novelty never reads soma's loss; the scorer still checks that some is given


def triggers(rows: list[bytes], scoring: ScoringConfig) -> np.ndarray:
    """What the alert machine judges at each row of one stream (the anomaly at onsets, else 0)."""
    scorer = StreamScorer("nab", scoring, AlertConfig())
    out = np.zeros(len(rows))
    for i, row in enumerate(rows):
        scorer.score_record(row, IGNORED_BITS)
        out[i] = scorer.last_trigger
    return out


def settings(args) -> list[ScoringConfig]:
    grids = [[int(v) for v in split_list(getattr(args, key))] for key in ("depth", "onset_records", "slots", "grace")]
    repeats = [{"on": True, "off": False}[v] for v in split_list(args.repeats)]
    return [ScoringConfig(detector="novelty", novelty_depth=d, onset_records=o, novelty_slots=s, grace_period=g, novelty_repeats=r)
            for d, o, s, g, r in itertools.product(*grids, repeats)]  # fmt: skip


def run(files: list[nab.LabelledFile], rows: dict[str, list[bytes]], profiles, scoring: ScoringConfig, halves: dict) -> dict:
    t0 = time.process_time()
    scores = {f.name: triggers(rows[f.name], scoring) for f in files}
    seconds = time.process_time() - t0
    n_bytes = sum(len(r) for f in files for r in rows[f.name])
    out = {"depth": scoring.novelty_depth, "onset_records": scoring.onset_records, "slots": scoring.novelty_slots,
           "grace": scoring.grace, "repeats": scoring.novelty_repeats, "bytes_per_s": n_bytes / max(seconds, 1e-9)}  # fmt: skip
    for half, subset in halves.items():
        result = nab.score_detector(subset, scores, profiles)
        out[half] = {p: r.score for p, r in result.items()}
        out[f"{half}_thresholds"] = {p: r.threshold for p, r in result.items()}
    return out


def main(argv: list[str] | None = None) -> None:
    defaults = ScoringConfig(detector="novelty")
    ap = argparse.ArgumentParser(prog="bench.nab_novelty", description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", default=str(defaults.novelty_depth), help="novelty_depth value(s), comma-separated")
    ap.add_argument("--onset-records", default=str(defaults.onset_records), help="onset_records value(s), comma-separated")
    ap.add_argument("--slots", default=str(defaults.novelty_slots), help="novelty_slots value(s), comma-separated")
    ap.add_argument("--grace", default=str(defaults.grace), help="grace_period value(s), comma-separated")
    ap.add_argument("--repeats", default="on" if defaults.novelty_repeats else "off", help="novelty_repeats: on, off or on,off")
    ap.add_argument("--split", action="store_true", help="also score odd/even files apart: choose on one half, report the other")
    ap.add_argument("--files", help="comma-separated subset (default: all 58)")
    ap.add_argument("--nab", help="NAB directory (default: ../shared/data/nab, or $SOMAD_NAB)")
    ap.add_argument("--json", default=str(OUT), help=f"where the table goes (default: {OUT})")
    args = ap.parse_args(argv)

    root = nab.nab_dir(args.nab)
    files = nab.load_corpus(root, split_list(args.files))
    profiles = nab.load_profiles(root)
    rows = {f.name: [v.encode() + b"\n" for v in nab.read_csv_column(root / "data" / f.name, "value")[1]] for f in files}
    halves = {"all": files, **({"odd": files[1::2], "even": files[0::2]} if args.split else {})}
    results = []
    for scoring in settings(args):
        results.append(run(files, rows, profiles, scoring, halves))
        r = results[-1]
        log(f"  depth {r['depth']} onsets {r['onset_records']} slots {r['slots']} grace {r['grace']} repeats {r['repeats']}: " + "  ".join(f"{h} {r[h]['standard']:.2f}" for h in halves))
    results.sort(key=lambda r: -r["all"]["standard"])
    headers = ["depth", "onset records", "slots", "grace", "repeats", *(f"{h} {p}" for h in halves for p in ("std", "low FP", "low FN")), "threshold (std)", "bytes/s"]
    print(table(headers, [(r["depth"], r["onset_records"], r["slots"], r["grace"], "on" if r["repeats"] else "off", *(f"{r[h][p]:.2f}" for h in halves for p in nab.PROFILE_NAMES),
                           f"{r['all_thresholds']['standard']:.6f}", f"{r['bytes_per_s']:,.0f}") for r in results]))  # fmt: skip
    if args.split:
        for pick, other in (("odd", "even"), ("even", "odd")):
            best = max(results, key=lambda r: r[pick]["standard"])
            print(f"chosen on the {pick} files: depth {best['depth']}, onsets {best['onset_records']}, slots {best['slots']}, grace {best['grace']}"
                  f" -> {other} files " + " / ".join(f"{best[other][p]:.2f}" for p in nab.PROFILE_NAMES))  # fmt: skip
    write_json(args.json, {"files": [f.name for f in files], "rows": results})
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
