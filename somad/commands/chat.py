"""``somad chat``: type text, the model continues it byte by byte, and learns from what you type.

What you type is learned from (``--no-learn``: only remembered, in the trace bank); what the
model writes is remembered but never learned from (a model taught by its own output drifts).
On a terminal, each line you type gets a continuation; in a pipe, all of stdin is the prompt
and one continuation is written (``echo hi | somad chat --resume m.pt -n 200``). Control
characters in the model's output are escaped on a terminal (they could drive it), written
as they are into a pipe.
"""

from __future__ import annotations

import argparse
import codecs
import sys

import torch

from ..checkpoint import CheckpointError, save_checkpoint
from ..learner import SomaLearner
from ..model import forward_chunk
from .common import (
    CommandError,
    StopFlag,
    StopRequested,
    check_output,
    open_checkpoint,
    silence_stdout,
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _temperature(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 100] (0: always the likeliest byte), got {text}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="type text and let the model continue it (it learns from what you type)",
        description="Interactive continuation: on a terminal, one continuation per line typed (Ctrl-D or Ctrl-C to end); "
        "in a pipe, stdin is the prompt.",
    )
    p.add_argument("--resume", required=True, metavar="CKPT", help="the model to talk to")
    p.add_argument("-n", "--max-bytes", type=_positive_int, default=200, help="bytes to generate per prompt (default: 200)")
    p.add_argument("-t", "--temperature", type=_temperature, default=0.8, help="sampling temperature, 0 = greedy (default: 0.8)")
    p.add_argument("--no-learn", action="store_true", help="do not learn from the typed text")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: unpredictable)")
    p.add_argument("--save", metavar="CKPT", help="save the model at the end (it may be the --resume file)")
    p.add_argument("--force", action="store_true", help="replace an existing --save file that is not the --resume file")
    p.set_defaults(handler=run)


def next_byte_logits(learner: SomaLearner) -> torch.Tensor:
    """Logits (256,) of the byte that would come next, from the learner's current state.

    A one-byte probe chunk: its first prediction depends only on the state before it, so the
    probe's value does not matter and nothing is advanced.
    """
    probe = torch.zeros(1, dtype=torch.long)
    return forward_chunk(learner.cfg, learner.params, learner.kern, learner.carry, probe).logits[0]


def sample_byte(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    """The likeliest byte at temperature 0, else a draw from softmax(logits / temperature)."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / temperature, dim=0)
    return int(torch.multinomial(probs, 1, generator=generator))


def continue_text(learner: SomaLearner, n: int, temperature: float, generator: torch.Generator, emit=None, should_stop=None) -> bytes:
    """Generate up to ``n`` bytes; each is remembered (the trace bank advances), none is
    learned from. ``emit(byte)`` sees each as it comes; ``should_stop()`` ends early."""
    out = bytearray()
    for _ in range(n):
        if should_stop is not None and should_stop():
            break
        byte = sample_byte(next_byte_logits(learner), temperature, generator)
        learner.score(bytes([byte]))
        out.append(byte)
        if emit is not None:
            emit(byte)
    return bytes(out)


class TerminalWriter:
    """Writes bytes to a terminal as UTF-8 text, control characters escaped."""

    def __init__(self, stream):
        self.stream = stream
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")

    def write(self, data: bytes, final: bool = False) -> None:
        text = self.decoder.decode(data, final=final)
        self.stream.write("".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in text))
        self.stream.flush()


def run(args) -> int:
    ckpt = open_checkpoint(args.resume, "--resume")
    save = check_output(args.save, "--save", force=args.force, may_replace=(args.resume,)) if args.save else None
    learner = ckpt.learner()
    generator = torch.Generator()
    if args.seed is None:
        generator.seed()
    else:
        generator.manual_seed(args.seed)
    with StopFlag() as flag:  # Ctrl-C ends the conversation between bytes; a second one leaves at once
        session = Session(learner, args, generator, flag)
        try:
            session.interactive() if sys.stdin.isatty() else session.one_shot()
        except BrokenPipeError:  # the reader went away (| head): the model can still be saved
            silence_stdout()
        if save is not None:
            try:
                checkpoint_id = save_checkpoint(save, learner, history=ckpt.lineage, preset=ckpt.preset)
            except CheckpointError as err:
                raise CommandError(str(err)) from None
            print(f"somad chat: saved {save} (id {checkpoint_id[:16]})", file=sys.stderr)
    return 0


class Session:
    """One conversation: prompts fed to the learner, continuations written to stdout."""

    def __init__(self, learner: SomaLearner, args, generator: torch.Generator, flag: StopFlag):
        self.learner, self.args, self.generator, self.flag = learner, args, generator, flag
        self.feed = learner.score if args.no_learn else learner.learn

    def one_shot(self) -> None:
        """stdin (a pipe or a file) is the prompt; one continuation."""
        prompt = self._read(sys.stdin.buffer.read)
        if prompt:
            self.feed(prompt)
        if sys.stdout.isatty():
            self._reply_to_terminal(TerminalWriter(sys.stdout))
            return
        out = sys.stdout.buffer  # written as generated: a reader that leaves (| head) stops us early
        self._continue(emit=lambda b: out.write(bytes([b])))
        out.flush()

    def interactive(self) -> None:
        """A continuation for each line typed, until Ctrl-D or Ctrl-C."""
        writer = TerminalWriter(sys.stdout)
        print(f"somad chat: {self.args.max_bytes} bytes per reply, temperature {self.args.temperature}; Ctrl-D to end", file=sys.stderr)
        while not self.flag.stop:
            sys.stderr.write("> ")
            sys.stderr.flush()
            line = self._read(sys.stdin.buffer.readline)
            if not line:
                break
            self.feed(line)
            self._reply_to_terminal(writer)
        sys.stderr.write("\n")

    def _continue(self, emit=None) -> bytes:
        a = self.args
        return continue_text(self.learner, a.max_bytes, a.temperature, self.generator, emit=emit, should_stop=lambda: self.flag.stop)

    def _reply_to_terminal(self, writer: TerminalWriter) -> None:
        self._continue(emit=lambda b: writer.write(bytes([b])))
        writer.write(b"", final=True)
        sys.stdout.write("\n")
        sys.stdout.flush()

    def _read(self, read) -> bytes:
        """A blocking read that Ctrl-C ends (returning what counts as end of input)."""
        self.flag.interruptible = True
        try:
            return read()
        except StopRequested:
            return b""
        finally:
            self.flag.interruptible = False
