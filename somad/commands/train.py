"""``somad train``: learn from files or stdin and save the model as a checkpoint.

Every byte is scored before it is learned from, so the reported bits/byte is the model's
online compression of the input. Ctrl-C (or SIGTERM) stops reading and saves what was
learned; a second Ctrl-C abandons the save, leaving any previous file untouched.
"""

from __future__ import annotations

import json
import sys
import time

from ..checkpoint import CheckpointError, save_checkpoint
from ..learner import NumericalFault
from .common import (
    CommandError,
    StopFlag,
    add_preset_argument,
    check_inputs,
    check_output,
    fresh_or_resumed,
    read_blocks,
    total_size,
)
from .progress import Progress

BLOCK_BYTES = 16384  # bytes learned per call: the progress and Ctrl-C granularity
DEFAULT_OUT = "soma.pt"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="learn from files or stdin and save a checkpoint",
        description="Learn from the inputs (concatenated, in order) and save the model. "
        "Ctrl-C stops and saves what was learned.",
    )
    p.add_argument("--input", "-i", nargs="+", required=True, metavar="FILE", help="files to learn from, '-' for stdin")
    p.add_argument("--resume", metavar="CKPT", help="continue this checkpoint (default: a new model)")
    p.add_argument("--out", "-o", metavar="CKPT", help=f"where to save (default: the --resume file, else {DEFAULT_OUT})")
    add_preset_argument(p, "default: small; with --resume it must match the checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing --out file that is not the --resume file")
    p.add_argument("--json", action="store_true", help="no progress; print one JSON summary on stdout")
    p.set_defaults(handler=run)


def run(args) -> int:
    specs = check_inputs(args.input)
    out_name = args.out or args.resume or DEFAULT_OUT
    out = check_output(out_name, "--out", force=args.force, may_replace=(args.resume,) if args.resume else ())
    learner, resumed, preset_name = fresh_or_resumed(args.resume, args.preset)
    history = resumed.lineage if resumed else ()
    progress = Progress.for_stream(sys.stderr, total_size(specs), enabled=not args.json)
    n_bytes, bits, start = 0, 0.0, time.monotonic()
    with StopFlag() as flag:
        try:
            for block in read_blocks(specs, BLOCK_BYTES, flag):
                bits += float(learner.learn(block).double().sum())
                n_bytes += len(block)
                progress.update(n_bytes, bits)  # after Ctrl-C, read_blocks reads no more but hands over what it holds
        except NumericalFault:
            progress.finish()
            raise CommandError(f"the model diverged (non-finite loss) after {n_bytes} bytes; nothing saved") from None
        progress.update(n_bytes, bits, force=True)
        progress.finish()
        elapsed = time.monotonic() - start
        if n_bytes == 0:
            raise CommandError(f"no input bytes ({', '.join(args.input)} {'is' if len(args.input) == 1 else 'are'} empty); nothing saved")
        if flag.stop:
            print(f"somad train: interrupted after {n_bytes} bytes; saving {out}", file=sys.stderr)
        try:
            checkpoint_id = save_checkpoint(out, learner, history=history, preset=preset_name)
        except KeyboardInterrupt:
            raise CommandError(f"interrupted while saving; {out} is as it was before") from None
        except CheckpointError as err:
            raise CommandError(str(err)) from None
    summary = {
        "bytes": n_bytes,
        "bits_per_byte": bits / n_bytes,
        "bytes_per_second": n_bytes / max(elapsed, 1e-9),
        "checkpoint_id": checkpoint_id,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"learned {n_bytes} bytes at {summary['bytes_per_second']:.0f} B/s, {summary['bits_per_byte']:.3f} bits/byte; "
            f"saved {out} (id {checkpoint_id[:16]}, {learner.bytes_seen} bytes seen in all)"
        )
    return 0
