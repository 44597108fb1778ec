"""The model verbs of the command line: train, score, chat, inspect, merge.

Each module adds its sub-parser (``add_parser``) and sets ``handler`` to a function that
takes the parsed arguments and returns the exit status; failures the user can act on are
raised as ``CommandError`` (exit 1) or ``UsageError`` (exit 2) and printed as one line by
``run_verb``.
"""

from __future__ import annotations

import os
import sys

from ..checkpoint import CheckpointError
from . import chat, inspect, merge, score, train
from .common import CommandError, UsageError, silence_stdout

VERBS = (train, score, chat, inspect, merge)


def add_parsers(sub) -> None:
    for verb in VERBS:
        verb.add_parser(sub)


def run_verb(args) -> int:
    """Run the chosen verb; any failure becomes one line on stderr and a non-zero status."""
    name = f"somad {args.command}"
    try:
        return args.handler(args)
    except UsageError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except (CommandError, CheckpointError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        silence_stdout()
        return 1
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"{name}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    except MemoryError:
        print(f"{name}: error: out of memory (try a smaller preset)", file=sys.stderr)
        return 1
    except Exception as err:  # a bug: one line, the traceback only on request
        if os.environ.get("SOMAD_DEBUG"):
            raise
        print(f"{name}: internal error: {type(err).__name__}: {err} (set SOMAD_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
