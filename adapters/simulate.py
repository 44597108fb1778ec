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

``SimulateSource`` is the same generator as a daemon source (``type: simulate``); its
options are ``SimulateConfig``'s fields, paced by default, with faults written in YAML as
``faults: [{kind: spike, at_line: 3000}, {kind: stuck, at_line: 4500, length: 40}]``.

>>> s = SimulatedSensor(SimulateConfig(seed=1))
>>> s.read(64).count(b"\\n") > 0
True
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass, field, fields

from .base import Chunk, Source


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
    clock_start: float = 0.0  # seconds added to each line's time stamp (the embedded default starts at the wall clock, so a restarted demo's clock goes on instead of repeating)
    faults: tuple[Fault, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.period_lines < 2:
            raise ValueError(f"period_lines must be >= 2, got {self.period_lines}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        if not 0 <= self.decimals <= 12:
            raise ValueError(f"decimals must be between 0 and 12, got {self.decimals}")
        # Faults come from YAML as mappings: make them Fault objects (frozen, so set directly).
        object.__setattr__(self, "faults", tuple(_as_fault(f, i) for i, f in enumerate(self.faults)))


def _as_fault(fault, index: int) -> Fault:
    """A ``Fault`` from a Fault or a mapping, errors naming ``faults[index]``.

    >>> _as_fault({"kind": "spike", "at_line": 10}, 0)
    Fault(kind='spike', at_line=10, length=1, magnitude=5.0)
    >>> _as_fault({"kind": "spike", "line": 10}, 2)
    Traceback (most recent call last):
    ...
    ValueError: faults[2]: unknown key 'line' (known: kind, at_line, length, magnitude)
    """
    if isinstance(fault, Fault):
        return fault
    if not isinstance(fault, dict):
        raise ValueError(f"faults[{index}]: expected a mapping with kind and at_line, got {fault!r}")
    known = [f.name for f in fields(Fault)]
    for key in fault:
        if key not in known:
            raise ValueError(f"faults[{index}]: unknown key {key!r} (known: {', '.join(known)})")
    try:
        return Fault(**fault)
    except (TypeError, ValueError) as err:
        raise ValueError(f"faults[{index}]: {err}") from None


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
            if f.kind == "spike" or f.kind == "shift":
                v += f.magnitude * c.amplitude
            elif f.kind == "noise":
                noise *= 10.0
            elif f.kind == "stuck":
                return self._last_value
        return v + self.rng.gauss(0.0, noise)

    def next_line(self) -> bytes:
        v = self.value(self.line)
        self._last_value = v
        t = self.cfg.clock_start + self.line / self.cfg.rate
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


# ---------------------------------------------------------------------- as a daemon source

SIM_CHUNK_BYTES = 16384  # bytes per read when not paced
SIM_MAX_LINES_PER_READ = 2000  # a paced source that fell behind catches up in reads of at most this


@dataclass(frozen=True)
class SimulateOptions(SimulateConfig):
    """``SimulateConfig`` as the ``simulate`` source's YAML keys; only the pacing default differs."""

    realtime: bool = True  # pace lines to the wall clock at ``rate``, as a sensor sends them (False: as fast as read)


class SimulateSource(Source):
    """The simulated sensor behind the source contract: the embedded default stream.

    >>> source = SimulateSource(SimulateSource.Options(realtime=False, seed=1))
    >>> source.start()
    >>> source.read(0.1)[0].data[:4]
    b'0.0,'
    """

    type_name = "simulate"
    Options = SimulateOptions

    def __init__(self, options: SimulateOptions | None = None, name: str = ""):
        super().__init__(options or SimulateOptions(), name)
        self.sensor = SimulatedSensor(self.options)
        self._stop = threading.Event()
        self._started_at = 0.0  # time.monotonic() when line 0 was due

    def start(self) -> None:
        self._started_at = time.monotonic()
        self._update_status(connected=True)

    def read(self, timeout: float) -> list[Chunk]:
        if self._stop.is_set():
            return []
        if not self.options.realtime:
            return [Chunk(self.sensor.read(SIM_CHUNK_BYTES), received_at=time.monotonic())]
        deadline = time.monotonic() + timeout
        while not self._stop.is_set():
            now = time.monotonic()
            next_due = self._due_time(self.sensor.line)
            if next_due <= now:
                due = max(1, int((now - self._started_at) * self.options.rate) + 1 - self.sensor.line)
                return [self._lines(min(due, SIM_MAX_LINES_PER_READ))]
            if now >= deadline:
                return []
            self._stop.wait(min(next_due, deadline) - now)
        return []

    def stop(self) -> None:
        self._stop.set()
        self._update_status(connected=False)

    def _lines(self, n: int) -> Chunk:
        # Stamped with the first line's due time: latency then includes any delay in reading it,
        # as it would for a real sensor.
        first_due = self._due_time(self.sensor.line)
        return Chunk(b"".join(self.sensor.next_line() for _ in range(n)), received_at=first_due)

    def _due_time(self, line: int) -> float:
        return self._started_at + line / self.options.rate
