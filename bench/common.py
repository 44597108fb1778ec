"""Helpers shared by the benchmarks: data location, learner factory, tables, RSS, output."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

from somad.learner import LearnerConfig, SomaLearner
from somad.metabolism import MetabolismConfig
from somad.model import PRESETS, preset

KB = 1000  # rates are reported in SI units: 1 KB/s = 1000 bytes/s

# ------------------------------------------------------------------ data


def default_data_dir() -> Path:
    """``../shared/data/corpora`` next to the repository root (not inside it)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpora"


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """Corpus directory: ``--data`` beats ``$SOMAD_DATA`` beats the default location."""
    path = Path(override) if override else Path(os.environ["SOMAD_DATA"]) if os.environ.get("SOMAD_DATA") else default_data_dir()
    if not path.is_dir():
        raise SystemExit(f"corpus directory not found: {path} (set --data or SOMAD_DATA)")
    return path


def corpus_files(directory: Path, names: Sequence[str] | None = None) -> list[Path]:
    """The corpus files (MANIFEST and hidden files skipped), sorted, or the named subset."""
    available = sorted(p for p in directory.iterdir() if p.is_file() and p.name != "MANIFEST" and not p.name.startswith("."))
    if not names:
        return available
    by_name = {p.name: p for p in available}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SystemExit(f"unknown corpus file(s) {missing}; available: {sorted(by_name)}")
    return [by_name[n] for n in names]


def resolve_input(name_or_path: str, data_override: str | None = None) -> Path:
    """A path as given if it is a file, else the file of that name in the corpus directory."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    directory = data_dir(data_override)
    if (directory / name_or_path).is_file():
        return directory / name_or_path
    raise SystemExit(f"input not found: {name_or_path} (neither an existing file nor a file name in {directory})")


def split_list(text: str | None) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else []


# ------------------------------------------------------------------ learners

MODES = ("d0", "adaptive")  # d0: learn from every byte; adaptive: surprise-adaptive d (default)


def learner_config(mode: str, kernel: str = "auto") -> LearnerConfig:
    if mode == "d0":
        return LearnerConfig(metabolism=MetabolismConfig(mode="fixed", d=0.0), kernel=kernel)
    if mode == "adaptive":
        return LearnerConfig(kernel=kernel)
    raise SystemExit(f"unknown mode {mode!r}; choose from {list(MODES)}")


def make_learner(preset_name: str, mode: str, kernel: str = "auto") -> SomaLearner:
    """A learner for a bench mode; ``kernel`` as LearnerConfig.kernel ("native" fails loudly
    where the compiled kernel cannot be built)."""
    if preset_name not in PRESETS:
        raise SystemExit(f"unknown preset {preset_name!r}; choose from {sorted(PRESETS)}")
    return SomaLearner(preset(preset_name), learner_config(mode, kernel))


def set_threads(n: int) -> int:
    """Use n intra-op threads (0 = torch's default). Returns the count in effect."""
    if n > 0:
        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # only allowed before any inter-op work has started
            pass
    return torch.get_num_threads()


# ------------------------------------------------------------------ memory


def rss_bytes() -> int:
    """Current resident set size (Linux /proc/self/statm; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def process_memory(pid: int) -> dict[str, int]:
    """Another process's /proc/<pid>/status memory fields in bytes (VmRSS: resident now, VmHWM: peak)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for row in f:
            key, _, value = row.partition(":")
            if key.startswith("Vm") and value.strip().endswith("kB"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of another process so far (on a shared machine: its real work)."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; Linux: KiB


# ------------------------------------------------------------------ output


def log(msg: str) -> None:
    """Progress and diagnostics go to stderr; tables go to stdout."""
    print(msg, file=sys.stderr, flush=True)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / KB:.1f} KB/s"


def fmt_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


class Progress:
    """Rate-limited progress lines on stderr; ``total`` None for open-ended work."""

    def __init__(self, label: str, total: int | None, every_s: float = 2.0):
        self.label, self.total, self.every_s = label, total, every_s
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int, extra: str = "") -> None:
        now = time.perf_counter()
        finished = self.total is not None and done >= self.total
        if now - self.last < self.every_s and not finished:
            return
        self.last = now
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total is None:
            where = f"{fmt_bytes(done)} {fmt_rate(rate)}"
        else:
            eta = fmt_duration((self.total - done) / rate) if rate > 0 else "?"
            pct = 100.0 * done / self.total if self.total else 100.0
            where = f"{fmt_bytes(done)}/{fmt_bytes(self.total)} ({pct:.0f}%) {fmt_rate(rate)} eta {eta}"
        log(f"  [{self.label}] {where}{'  ' + extra if extra else ''}")


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A markdown pipe table. ``align``: one of 'l'/'r' per column (default: first l, rest r)."""
    rows = [[str(c) for c in r] for r in rows]
    headers = [str(h) for h in headers]
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":" if a == "r" else ":" + "-" * (w + 1)) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for row in f:
                if row.startswith("model name"):
                    cpu = row.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Write atomically (temp file + rename) so a partial run never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
