"""What the verbs share: one-line errors, input files read as one stream, output paths that
never clobber a checkpoint by accident, Ctrl-C handling, and number formatting."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from ..checkpoint import Checkpoint, CheckpointError, check_compatible, load_checkpoint
from ..learner import LearnerConfig, SomaLearner
from ..model import PRESETS, preset

STDIN = "-"


class CommandError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


class UsageError(CommandError):
    """Arguments that cannot work together: printed as one line, exit status 2."""


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputSpec:
    name: str  # as given on the command line ("-" for stdin)
    size: int | None  # bytes, for regular files (progress and ETA); None for stdin, pipes, devices

    @property
    def is_stdin(self) -> bool:
        return self.name == STDIN


def check_inputs(names: list[str]) -> list[InputSpec]:
    """Validate input names before any work: each exists, is not a directory, can be opened;
    ``-`` (stdin) at most once. Raises ``CommandError`` naming the first bad one."""
    if names.count(STDIN) > 1:
        raise CommandError("input '-' (stdin) given more than once")
    specs = []
    for name in names:
        if name == STDIN:
            specs.append(InputSpec(name, None))
            continue
        try:
            st = os.stat(name)
        except FileNotFoundError:
            raise CommandError(f"input {name}: no such file") from None
        except OSError as err:
            raise CommandError(f"input {name}: {err.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise CommandError(f"input {name}: is a directory, expected a file")
        try:
            with open(name, "rb"):
                pass
        except OSError as err:
            raise CommandError(f"input {name}: cannot open: {err.strerror}") from None
        specs.append(InputSpec(name, st.st_size if stat.S_ISREG(st.st_mode) else None))
    return specs


def total_size(specs: list[InputSpec]) -> int | None:
    """Sum of input sizes, or None when any input has no known size (stdin, a pipe)."""
    sizes = [spec.size for spec in specs]
    return None if any(s is None for s in sizes) else sum(sizes)


class StopRequested(Exception):
    """Raised inside a blocking read when Ctrl-C (or SIGTERM) asks to stop."""


class StopFlag:
    """First SIGINT/SIGTERM: set ``stop`` (and abort a blocking read, see ``interruptible``);
    the second one raises KeyboardInterrupt at once. Restores the previous handlers on exit."""

    def __init__(self) -> None:
        self.stop = False
        self.interruptible = False  # True while blocked waiting for input
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        if self.interruptible:
            raise StopRequested


def read_blocks(specs: list[InputSpec], block_size: int, flag: StopFlag | None = None) -> Iterator[bytes]:
    """The inputs as one stream of ``block_size`` byte blocks (the last one shorter): the
    same bytes give the same blocks however they arrive (file, pipe, several files), so
    learning from them is reproducible. Stops early, without error, when ``flag`` is set."""
    buffer = bytearray()
    for spec in specs:
        for piece in _read_pieces(spec, block_size, flag):
            buffer += piece
            while len(buffer) >= block_size:
                yield bytes(buffer[:block_size])
                del buffer[:block_size]
            if flag is not None and flag.stop:
                break
        if flag is not None and flag.stop:
            break
    if buffer:
        yield bytes(buffer)


def _read_pieces(spec: InputSpec, size: int, flag: StopFlag | None) -> Iterator[bytes]:
    # stdin: take what has arrived (a live stream); files: full reads. stdin is not closed.
    with contextlib.nullcontext(sys.stdin.buffer) if spec.is_stdin else open(spec.name, "rb") as stream:
        read = stream.read1 if spec.is_stdin else stream.read
        while not (flag is not None and flag.stop):
            try:
                if flag is not None:
                    flag.interruptible = True
                piece = read(size)
            except StopRequested:
                return
            except OSError as err:
                raise CommandError(f"input {spec.name}: read error: {err.strerror or err}") from None
            finally:
                if flag is not None:
                    flag.interruptible = False
            if not piece:
                return
            yield piece


# --------------------------------------------------------------------------- outputs


def silence_stdout() -> None:
    """After the reader of stdout went away (``| head``): send the rest to /dev/null, so that
    the final flush does not fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def check_output(name: str, what: str, *, force: bool = False, may_replace: tuple[str, ...] = ()) -> Path:
    """An output path that can be written: its directory exists, it is not a directory, and
    an existing file is only replaced with ``force`` or when it is one of ``may_replace``
    (the checkpoint being continued). Checked before the work, so no work is lost."""
    path = Path(name)
    if path.is_dir():
        raise CommandError(f"{what} {name}: is a directory, expected a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CommandError(f"{what} {name}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CommandError(f"{what} {name}: directory {parent} is not writable")
    if path.exists() and not force and not any(_same_file(path, Path(other)) for other in may_replace):
        raise CommandError(f"{what} {name}: exists; pass --force to replace it, or choose another name")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# --------------------------------------------------------------------------- models


def open_checkpoint(name: str, what: str = "checkpoint") -> Checkpoint:
    try:
        return load_checkpoint(name)
    except CheckpointError as err:
        raise CommandError(f"{what} {err}") from None


def fresh_or_resumed(resume: str | None, preset_name: str | None) -> tuple[SomaLearner, Checkpoint | None, str | None]:
    """(learner, the checkpoint it continues or None, preset name). An explicit ``--preset``
    with ``--resume`` must have the checkpoint's architecture."""
    if resume is None:
        name = preset_name or "small"
        return SomaLearner(preset(name), LearnerConfig()), None, name
    ckpt = open_checkpoint(resume, "--resume")
    if preset_name is not None:
        try:
            check_compatible(PRESETS[preset_name], ckpt.model, labels=(f"--preset {preset_name}", resume))
        except CheckpointError as err:
            raise CommandError(str(err)) from None
    return ckpt.learner(), ckpt, ckpt.preset


def add_preset_argument(parser, default_text: str) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help=f"model preset for a new model ({default_text})")


# --------------------------------------------------------------------------- formatting


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'.

    >>> human_bytes(512), human_bytes(1536), human_bytes(3 * 2**20)
    ('512 B', '1.5 KiB', '3.0 MiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(seconds: float) -> str:
    """3725 -> '1:02:05'.

    >>> human_duration(65), human_duration(3725)
    ('0:01:05', '1:02:05')
    """
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
