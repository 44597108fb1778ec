"""``somad inspect``: what a checkpoint is — id, lineage, hyperparameters, bytes seen, size —
and whether another checkpoint is compatible with it (same n_bands, hidden_dim, base,
direct_readout: it can be continued or merged)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

from ..checkpoint import Checkpoint, config_differences
from ..model import COMPAT_FIELDS
from .common import human_bytes, open_checkpoint


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="show a checkpoint's id, lineage, hyperparameters and size",
        description="Verify a checkpoint and describe it; with --against, say whether another one is compatible.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="the checkpoint file")
    p.add_argument("--against", metavar="OTHER", help="report compatibility with this checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(handler=run)


def describe(ckpt: Checkpoint) -> dict:
    """The facts shown by ``inspect``, as plain JSON-able values."""
    metabolism = ckpt.state["metabolism"]
    return {
        "path": str(ckpt.path),
        "checkpoint_id": ckpt.checkpoint_id,
        "history": list(ckpt.history),
        "parents": list(ckpt.parents),
        "format_version": ckpt.format_version,
        "created_at": ckpt.created_at,
        "written_by": ckpt.written_by,
        "size_bytes": ckpt.size_bytes,
        "preset": ckpt.preset,
        "model": ckpt.model.to_dict(),
        "parameters": ckpt.model.n_params(),
        "bytes_seen": ckpt.bytes_seen,
        "updates": int(ckpt.state["updates"]),
        "observations": int(metabolism["observations"]),
        "decimation_band": float(metabolism["d"]),
        "learner_config": asdict(ckpt.learner_config),
        "extra_keys": sorted(ckpt.extra),
    }


def compatibility(ckpt: Checkpoint, other: Checkpoint) -> dict:
    diff = config_differences(ckpt.model, other.model, COMPAT_FIELDS)
    return {
        "path": str(other.path),
        "checkpoint_id": other.checkpoint_id,
        "compatible": not diff,
        "differences": {name: list(values) for name, values in diff.items()},
        "related": ckpt.checkpoint_id in other.lineage or other.checkpoint_id in ckpt.lineage or bool(set(ckpt.lineage) & set(other.lineage)),
    }


def run(args) -> int:
    ckpt = open_checkpoint(args.checkpoint)
    info = describe(ckpt)
    if args.against:
        info["against"] = compatibility(ckpt, open_checkpoint(args.against, "--against"))
    if args.json:
        print(json.dumps(info))
    else:
        print(render(info))
    return 0


def render(info: dict) -> str:
    created = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(info["created_at"])) if info["created_at"] else "unknown"
    history = info["history"]
    lineage = " -> ".join(h[:12] for h in history) if history else "none (a new model)"
    model = " ".join(f"{k}={v}" for k, v in info["model"].items())
    learner = {k: v for k, v in info["learner_config"].items() if k != "metabolism"}
    lines = [
        f"checkpoint   {info['path']}",
        f"id           {info['checkpoint_id']}",
        f"lineage      {len(history)} ancestor(s): {lineage}",
        f"parents      {', '.join(p[:12] for p in info['parents']) or 'none'}",
        f"model        preset {info['preset'] or '(custom)'}: {model}",
        f"parameters   {info['parameters']:,}",
        f"bytes_seen   {info['bytes_seen']:,} ({info['updates']:,} updates, {info['observations']:,} observations, d={info['decimation_band']:.2f})",
        f"learner      {' '.join(f'{k}={v}' for k, v in learner.items())}",
        f"file         {human_bytes(info['size_bytes'])}, format {info['format_version']}, written {created} by {info['written_by'] or 'unknown'}",
    ]
    if info["extra_keys"]:
        lines.append(f"extra        {', '.join(info['extra_keys'])}")
    if "against" in info:
        against = info["against"]
        if against["compatible"]:
            verdict = "compatible (can be continued or merged)"
        else:
            verdict = "incompatible: " + ", ".join(f"{k} ({a} vs {b})" for k, (a, b) in against["differences"].items())
        relation = "; shares lineage" if against["related"] else ""
        lines.append(f"against      {against['path']}: {verdict}{relation}")
    return "\n".join(lines)
