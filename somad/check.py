"""``somad check --config FILE [--json]``: validate a configuration without running anything.

Exit codes: 0 valid (the effective configuration, secrets masked, on stdout), 1 invalid
(every problem on stderr, one per line, ``FILE:LINE:COLUMN: path: message``), 2 usage.
With ``--json``, stdout carries one JSON object either way (``valid``, then ``config`` or
``problems``); stderr still lists the problems.

>>> import io, argparse
>>> err = io.StringIO()
>>> check_command(argparse.Namespace(config=None, json=False), err=err)
2
>>> err.getvalue()
'somad check: --config FILE is required\\n'
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from .config import ConfigError, dump_config, load_config, to_plain


def add_check_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``check`` verb's arguments, for ``somad.cli`` to attach to its sub-parser."""
    parser.add_argument("--config", metavar="FILE", help="YAML configuration to validate")
    parser.add_argument("--json", action="store_true", help="print one JSON object (valid, config or problems) on stdout")
    return parser


def check_command(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Validate ``args.config``; print the effective configuration or the problems. Returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    path = getattr(args, "config", None)
    if not path:
        print("somad check: --config FILE is required", file=err)
        return 2
    try:
        config = load_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue.located(exc.origin), file=err)
        if getattr(args, "json", False):
            problems = [{"path": p.path, "message": p.message, "line": p.line, "column": p.column, "text": str(p)} for p in exc.issues]
            print(json.dumps({"valid": False, "origin": exc.origin, "problems": problems}, indent=2), file=out)
        return 1
    if getattr(args, "json", False):
        print(json.dumps({"valid": True, "origin": path, "config": to_plain(config, mask_secrets=True)}, indent=2), file=out)
    else:
        names = ", ".join(s.name for s in config.streams)
        print(f"# {path}: valid, {len(config.streams)} stream(s): {names}. Effective configuration, secrets masked:", file=out)
        out.write(dump_config(config, mask_secrets=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m somad.check --config FILE`` (the same as ``somad check``)."""
    parser = add_check_arguments(argparse.ArgumentParser(prog="somad check", description="Validate a somad configuration."))
    return check_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
