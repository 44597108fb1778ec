"""``somad merge``: average compatible checkpoints into a child that lists both lineages.

Weights, biases and trace banks are averaged with the given weights (the carried state is
then recomputed from them exactly); counters (bytes seen, updates, observations) are summed
(the parents' shared history, if any, is counted once per parent); the metabolism's
statistics are averaged. The child's history is the parents' lineages one after the other
(each oldest first, shared ancestors listed once) and its parents are the merged ids.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import torch

from ..checkpoint import Checkpoint, CheckpointError, check_compatible, save_checkpoint
from ..learner import SomaLearner
from ..model import COMPAT_FIELDS
from .common import CommandError, UsageError, check_output, open_checkpoint

# Averaging needs the same architecture and the same meaning of U: features and activation too.
MERGE_FIELDS = COMPAT_FIELDS + ("features", "activation")
AVERAGED_TENSORS = ("U", "Wd", "W", "b", "traces")
SUMMED_METABOLISM = ("observations", "bytes")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="average compatible checkpoints into one that lists both lineages",
        description="Merge checkpoints by weight averaging (traces averaged too). They must share "
        f"{', '.join(MERGE_FIELDS)}.",
    )
    p.add_argument("inputs", nargs="+", metavar="CKPT", help="two or more checkpoints")
    p.add_argument("--out", "-o", required=True, metavar="CKPT", help="the merged checkpoint to write")
    p.add_argument("--weights", metavar="W1,W2,...", help="one weight per input, normalised to sum 1 (default: equal)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    p.set_defaults(handler=run)


def parse_weights(text: str | None, n: int) -> list[float]:
    """Weights normalised to sum 1.

    >>> parse_weights("1,3", 2), parse_weights(None, 4)
    ([0.25, 0.75], [0.25, 0.25, 0.25, 0.25])
    """
    if text is None:
        return [1.0 / n] * n
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights {text!r}: expected numbers separated by commas") from None
    if len(weights) != n:
        raise UsageError(f"--weights has {len(weights)} values for {n} checkpoints")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise UsageError(f"--weights {text!r}: need finite values >= 0 with a positive sum")
    total = sum(weights)
    return [w / total for w in weights]


def merge_checkpoints(ckpts: Sequence[Checkpoint], weights: Sequence[float]) -> tuple[SomaLearner, tuple[str, ...], tuple[str, ...]]:
    """(merged learner, history, parents). The learner takes the first checkpoint's
    architecture and training settings; raises ``CheckpointError`` listing differing fields."""
    first = ckpts[0]
    for other in ckpts[1:]:
        check_compatible(first.model, other.model, MERGE_FIELDS, labels=(str(first.path), str(other.path)))
    learner = first.learner()
    state = learner.state_dict()
    for name in AVERAGED_TENSORS:
        if name in state:
            mixed = sum(w * c.state[name].to(torch.float64) for c, w in zip(ckpts, weights))
            state[name] = mixed.to(state[name].dtype)
    state["seen"] = torch.stack([c.state["seen"] for c in ckpts]).any(dim=0)
    for name in ("bytes_seen", "updates"):
        state[name] = sum(int(c.state[name]) for c in ckpts)
    state["chunks_since_sync"] = 0
    state["metabolism"] = _merge_metabolism([c.state["metabolism"] for c in ckpts], weights)
    learner.load_state_dict(state)
    learner.sync_carry()  # the carried state is bilinear in weights and traces: recompute, do not average
    history = tuple(dict.fromkeys(ident for c in ckpts for ident in c.lineage))
    parents = tuple(dict.fromkeys(c.checkpoint_id for c in ckpts))
    return learner, history, parents


def _merge_metabolism(states: list[dict], weights: Sequence[float]) -> dict:
    merged = {}
    for key, value in states[0].items():
        if isinstance(value, torch.Tensor):
            merged[key] = sum(w * s[key] for s, w in zip(states, weights))
        elif key in SUMMED_METABOLISM:
            merged[key] = sum(int(s[key]) for s in states)
        else:
            merged[key] = math.fsum(w * float(s[key]) for s, w in zip(states, weights))
    return merged


def run(args) -> int:
    if len(args.inputs) < 2:
        raise UsageError("merge needs at least two checkpoints")
    weights = parse_weights(args.weights, len(args.inputs))
    out = check_output(args.out, "--out", force=args.force)
    ckpts = [open_checkpoint(name) for name in args.inputs]
    try:
        learner, history, parents = merge_checkpoints(ckpts, weights)
    except CheckpointError as err:
        raise CommandError(str(err)) from None
    presets = {c.preset for c in ckpts}
    try:
        checkpoint_id = save_checkpoint(out, learner, history=history, parents=parents, preset=presets.pop() if len(presets) == 1 else None)
    except CheckpointError as err:
        raise CommandError(str(err)) from None
    summary = {"checkpoint_id": checkpoint_id, "parents": list(parents), "history": list(history), "bytes_seen": learner.bytes_seen, "out": str(out)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"merged {len(ckpts)} checkpoints ({', '.join(p[:12] for p in parents)}) into {out} (id {checkpoint_id[:16]})")
    return 0
