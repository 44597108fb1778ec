"""Learning-rate rules against each other: online bits/byte and speed at d = 0.

    python -m bench.lr [--input nab_realKnownCause.csv] [--max-bytes 300000] [--preset small]
                       [--features bandpass|traces]

Rows: the seed's rule (eta = 1 with a weight bound |w| <= c, several c) and plain SGD with
several eta, all with per-band gamma_obs scaling (all 1 at d = 0) and the default batch.
The README's "Learning-rate rule" section quotes this table; the default in
``somad.learner.LearnerConfig`` is the best row.
"""

from __future__ import annotations

import argparse
import math
import time

from somad.learner import LearnerConfig, SomaLearner
from somad.metabolism import MetabolismConfig
from somad.model import preset

from .common import log, resolve_input, set_threads, table, write_json

RULES = (
    ("seed", 1.0, 1.0),
    ("seed", 1.0, 0.25),
    ("seed", 1.0, 0.05),
    ("sgd", 0.02, 0.0),
    ("sgd", 0.05, 0.0),
    ("sgd", 0.1, 0.0),
    ("sgd", 0.2, 0.0),
    ("sgd", 0.1, 1.0),
)


def run_rule(data: bytes, preset_name: str, features: str, rule: str, lr: float, bound: float) -> dict:
    cfg = LearnerConfig(rule=rule, lr=lr, weight_bound=bound, metabolism=MetabolismConfig(mode="fixed", d=0.0))
    learner = SomaLearner(preset(preset_name, features=features), cfg)
    start = time.process_time()
    bits = learner.learn(data).double()
    seconds = time.process_time() - start
    tail = bits[-len(data) // 5 :]
    finite = bool(bits.isfinite().all())
    return {
        "rule": rule,
        "eta": cfg.eta,
        "bound": bound,
        "bits_per_byte": float(bits.mean()) if finite else math.inf,
        "last_fifth_bits_per_byte": float(tail.mean()) if finite else math.inf,
        "bytes_per_second": len(data) / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lr", description=__doc__.splitlines()[0])
    p.add_argument("--input", default="nab_realKnownCause.csv")
    p.add_argument("--max-bytes", type=int, default=300_000)
    p.add_argument("--preset", default="small")
    p.add_argument("--features", choices=("bandpass", "traces"), default="bandpass")
    p.add_argument("--data", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    set_threads(1)
    path = resolve_input(args.input, args.data)
    data = path.read_bytes()[: args.max_bytes]
    results = []
    for rule, lr, bound in RULES:
        log(f"{rule} eta={lr} bound={bound} ...")
        results.append(run_rule(data, args.preset, args.features, rule, lr, bound))
    print(f"## Learning-rate rules at d=0: preset {args.preset} ({args.features}), first {len(data):,} bytes of {path.name}, 1 thread")
    print(
        table(
            ["rule", "eta", "weight bound", "bits/byte", "last 1/5 bits/byte", "KB/s (CPU time)"],
            [
                [r["rule"], f"{r['eta']:g}", f"{r['bound']:g}" if r["bound"] else "none", f"{r['bits_per_byte']:.3f}", f"{r['last_fifth_bits_per_byte']:.3f}", f"{r['bytes_per_second'] / 1e3:.1f}"]
                for r in results
            ],
            align="lrrrrr",
        )
    )
    if args.json:
        write_json(args.json, {"input": path.name, "bytes": len(data), "preset": args.preset, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
