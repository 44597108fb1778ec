"""The ``somad`` command line. Exit codes: 0 ok, 1 failure, 2 usage.

``run`` is the daemon; the model verbs (train, score, chat, inspect, merge) live in
``somad/commands/``, one module each.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .check import add_check_arguments, check_command
from .commands import add_parsers, run_verb
from .model import PRESETS


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="somad",
        description="Streaming anomaly daemon: learns byte streams online with soma and scores their surprise.",
    )
    p.add_argument("--version", action="version", version=f"somad {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon (without --config: the embedded simulated-sensor default)")
    run.add_argument("--config", metavar="FILE", help="run every stream of this YAML config (SIGHUP reloads it)")
    run.add_argument("--seconds", type=_positive(float), default=None, help="stop after this many seconds (default: run until Ctrl-C)")
    run.add_argument("--preset", choices=sorted(PRESETS), default="small", help="embedded default only: model preset (default: small)")
    run.add_argument("--rate", type=_positive(float), default=200.0, help="embedded default only: simulated sensor lines per second (default: 200)")
    run.add_argument("--fast", action="store_true", help="embedded default only: feed the simulated sensor as fast as the learner goes")
    run.add_argument("--state-dir", metavar="DIR", help="embedded default only: where its checkpoints live (default: $XDG_STATE_HOME/somad-embedded)")
    run.add_argument("--json", action="store_true", help="print one final JSON summary on stdout (logs stay on stderr)")
    check = sub.add_parser("check", help="validate a config file and print the effective config (secrets masked)")
    add_check_arguments(check)
    add_parsers(sub)  # the model verbs: train, score, chat, inspect, merge (somad/commands/)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "check":
        return check_command(args)
    if args.command == "run" and args.config:
        from .daemon import run_config_file

        return run_config_file(args.config, seconds=args.seconds, summary_json=args.json)
    if args.command == "run":
        from .embedded import run_embedded

        return run_embedded(args.preset, args.rate, realtime=not args.fast, seconds=args.seconds, state_dir=args.state_dir, summary_json=args.json)
    if hasattr(args, "handler"):
        return run_verb(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
