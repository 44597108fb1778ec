"""A simulated sensor: the embedded default source (no broker or device needed).

Emits CSV lines ``<seconds>,<value>\\n`` where value is a daily-like periodic signal plus a
slower harmonic and Gaussian noise, at ``rate`` lines per second of simulated time. Faults
can be injected at given line numbers, so the anomaly path can be shown end to end:

- ``spike``: one reading far outside the range;
- ``shift``: the level jumps and stays for ``length`` lines;
- ``stuck``: the reading freezes for ``length`` lines;
- ``noise``: the noise grows tenfold for ``length`` lines.

Deterministic for a given seed. ``read`` never blocks unless ``realtime`` is set, in which
case lines are paced to the wall clock (as a real sensor would send them).

>>> s = SimulatedSensor(SimulateConfig(seed=1))
>>> s.read(64).count(b"\\n") > 0
True
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Fault:
    kind: str  # spike | shift | stuck | noise
    at_line: int
    length: int = 1
    magnitude: float = 5.0  # in units of the signal's amplitude

    def __post_init__(self) -> None:
        if self.kind not in ("spike", "shift", "stuck", "noise"):
            raise ValueError(f"fault kind must be spike, shift, stuck or noise, got {self.kind!r}")
        if self.at_line < 0 or self.length < 1:
            raise ValueError("fault needs at_line >= 0 and length >= 1")

    def active(self, line: int) -> bool:
        return self.at_line <= line < self.at_line + self.length


@dataclass(frozen=True)
class SimulateConfig:
    rate: float = 10.0  # lines per second (simulated time; wall clock too when realtime)
    period_lines: int = 288  # lines per cycle of the main periodic component
    level: float = 50.0
    amplitude: float = 10.0
    noise: float = 0.5
    decimals: int = 2
    seed: int = 0
    realtime: bool = False
    faults: tuple[Fault, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.period_lines < 2:
            raise ValueError(f"period_lines must be >= 2, got {self.period_lines}")


class SimulatedSensor:
    def __init__(self, cfg: SimulateConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.line = 0
        self._pending = b""
        self._last_value = cfg.level
        self._started = time.monotonic()

    def value(self, line: int) -> float:
        c = self.cfg
        phase = 2 * math.pi * line / c.period_lines
        v = c.level + c.amplitude * math.sin(phase) + 0.3 * c.amplitude * math.sin(3 * phase + 1.0)
        noise = c.noise
        for f in c.faults:
            if not f.active(line):
                continue
            if f.kind == "spike":
                v += f.magnitude * c.amplitude
            elif f.kind == "shift":
                v += f.magnitude * c.amplitude
            elif f.kind == "noise":
                noise *= 10.0
            elif f.kind == "stuck":
                return self._last_value
        return v + self.rng.gauss(0.0, noise)

    def next_line(self) -> bytes:
        v = self.value(self.line)
        self._last_value = v
        t = self.line / self.cfg.rate
        self.line += 1
        return f"{t:.1f},{v:.{self.cfg.decimals}f}\n".encode()

    def read(self, max_bytes: int = 4096) -> bytes:
        """Up to ``max_bytes`` bytes of whole and partial lines, in order."""
        if self.cfg.realtime:
            due = int((time.monotonic() - self._started) * self.cfg.rate) + 1
            while self.line < due and len(self._pending) < max_bytes:
                self._pending += self.next_line()
            if not self._pending:
                time.sleep(min(0.1, 1.0 / self.cfg.rate))
        else:
            while len(self._pending) < max_bytes:
                self._pending += self.next_line()
        out, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return out
