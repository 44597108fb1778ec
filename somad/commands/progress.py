"""A progress display for long runs on stderr: bytes, bytes/s, running bits/byte and ETA.

On a terminal it is one line redrawn in place (at most ``redraw_per_s`` times a second);
elsewhere (a log file, a pipe) a plain line every ``line_every_s`` seconds, so that logs
stay readable. Nothing at all when disabled (``--json``).

>>> import io
>>> out = io.StringIO()
>>> p = Progress(out, total=2048, mode="lines", clock=iter([0.0, 20.0]).__next__)
>>> p.update(1024, 2048.0)
>>> print(out.getvalue().strip())
1.0 KiB / 2.0 KiB (50%)  51 B/s  2.000 bits/byte  ETA 0:00:20
"""

from __future__ import annotations

import time

from .common import human_bytes, human_duration


class Progress:
    def __init__(self, stream, total: int | None, mode: str, clock=time.monotonic, redraw_per_s: float = 8.0, line_every_s: float = 10.0):
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"progress mode must be bar, lines or off, got {mode!r}")
        self.stream = stream
        self.total = total  # bytes expected, None when unknown (stdin)
        self.mode = mode
        self.clock = clock
        self.interval = 1.0 / redraw_per_s if mode == "bar" else line_every_s
        self.start = clock()
        # a bar shows up at the first update (a live stream may stall right after it: the
        # screen should not wait for the next block); lines keep their pace from the start
        self.last_shown = float("-inf") if mode == "bar" else self.start
        self._drawn = 0  # characters of the bar on screen, to blank a shorter redraw

    @classmethod
    def for_stream(cls, stream, total: int | None, enabled: bool) -> Progress:
        """A bar on a terminal, periodic lines elsewhere, nothing when not ``enabled``."""
        if not enabled:
            return cls(stream, total, "off")
        is_tty = hasattr(stream, "isatty") and stream.isatty()
        return cls(stream, total, "bar" if is_tty else "lines")

    def update(self, done: int, bits: float, force: bool = False) -> None:
        """``done`` bytes processed so far, ``bits`` their summed loss. ``force`` redraws the
        bar now (a final state); periodic lines keep their pace (the summary follows anyway)."""
        if self.mode == "off":
            return
        now = self.clock()
        if not (force and self.mode == "bar") and now - self.last_shown < self.interval:
            return
        self.last_shown = now
        text = self.describe(done, bits, now - self.start)
        if self.mode == "bar":
            self.stream.write("\r" + text.ljust(self._drawn))
            self._drawn = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def describe(self, done: int, bits: float, elapsed: float) -> str:
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [human_bytes(done)]
        if self.total:
            parts[0] += f" / {human_bytes(self.total)} ({min(100.0, 100.0 * done / self.total):.0f}%)"
        parts.append(human_bytes(rate) + "/s")
        parts.append(f"{bits / done:.3f} bits/byte" if done else "-.--- bits/byte")
        if self.total and rate > 0:
            parts.append(f"ETA {human_duration(max(0, self.total - done) / rate)}")
        return "  ".join(parts)

    def finish(self) -> None:
        """End the bar's line so that what follows starts on a fresh one."""
        if self.mode == "bar" and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0
