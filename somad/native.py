"""soma's forward pass and weight update in C (``recurrence.c``), built on the device at first use.

Why: the torch path (``model.forward_modes``) scores a chunk with lag-mode GEMMs, about
140 k multiply-adds per byte for ``small``; the exact recurrence P_j <- alpha_j P_j +
(1 - alpha_j) U~[x, j] needs 2 K C (18 k), but one byte after another, which only compiled
code does fast. ``Recurrence.run_chunk`` runs a chunk through to each byte's loss in one call;
``Recurrence.window_update`` takes a window's bytes and, at each observation, h and the logits,
and does the rest in another: output gradients, the window's own traces, the gradients in
trace space, the rows, W, b and P (the torch path needs kernels, a window of stored features
and a dozen tensor operations); rows outside the window are moved later, batched
(``PendingRows``). Measured in ``bench/throughput`` (README). The library allocates nothing:
the caller passes a ``Workspace``.

How: the C file is compiled with the system's C compiler (``$CC``, else ``cc``) into a shared
library loaded with ctypes (no Python headers, no torch headers: a second or less to build).
A library is named by a tag: the source's hash, the flags and this CPU (``-march=native``
code must not run on another CPU), so a stale or foreign build is never loaded. It is looked
for, then built, in:

1. ``$SOMAD_KERNEL_DIR`` if set;
2. the package directory (``python -m somad.native`` builds there at install time, see
   deploy/install.sh: the service's file system is read-only);
3. ``$CACHE_DIRECTORY`` (systemd's ``CacheDirectory=``), ``$XDG_CACHE_HOME/somad`` or
   ``~/.cache/somad``, then the temporary directory.

No compiler, a failed build or a library that will not load: ``recurrence()`` returns None,
says why once in the log, and the learner keeps the torch path (same mathematics; results
agree to float32 rounding).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when a chunk is run: building needs only a C compiler (deploy/install.sh)
    import torch

SOURCE = Path(__file__).with_name("recurrence.c")
ABI_VERSION = 10  # soma_abi_version() of a library this module can call
# -ffp-contract=fast: a * p + u as one fused multiply-add (ISO C modes leave it off)
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fPIC", "-shared", "-std=c99")
PORTABLE_FLAGS = ("-O3", "-ffp-contract=fast", "-fPIC", "-shared", "-std=c99")  # when the compiler knows no -march=native
LIBS = ("-lm",)  # after the source: logf
BUILD_TIMEOUT_S = 120.0

log = logging.getLogger("somad.native")


class KernelUnavailable(RuntimeError):
    """The compiled recurrence cannot be built or loaded here (the message says why)."""


@dataclass
class ChunkPass:
    """What one call computes for a chunk of n bytes (recurrence.c, soma_chunk_forward)."""

    zc: torch.Tensor  # (n, C) float32: [hidden activations h | direct logits + b] predicting each byte
    logits: torch.Tensor  # (n, 256) float32
    bits: torch.Tensor  # (n,) float32: each byte's loss in bits
    entropy: torch.Tensor | None  # (n,) float32: each prediction's entropy in bits, if asked for
    carry: torch.Tensor  # (K, C) float32: the carried state P after the chunk
    traces: torch.Tensor  # (256, K) float64: the trace bank after the chunk
    finite: bool  # every loss finite


@dataclass
class ScorePass:
    """What one scoring call computes for n bytes (recurrence.c, soma_score_chunks)."""

    bits: torch.Tensor  # (n,) float32: each byte's loss in bits
    entropy: torch.Tensor | None  # (n,) float32: each prediction's entropy in bits, if asked for
    carry: torch.Tensor  # (K, C) float32: the carried state P after the last byte
    traces: torch.Tensor  # (256, K) float64: the trace bank after the last byte
    finite: bool  # every loss finite


ACTIVATIONS = {"tanh": 1, "relu": 2}  # soma_chunk_forward's codes (0: none, the pre-activations)
NEED_WORKSPACE = -3  # what the C functions return when the workspace is too small
NOT_FINITE = -4  # soma_chunk_forward: a loss is NaN or infinite (every output written)


class Workspace:
    """Scratch memory for the C functions, owned by the caller (one per learner): the library
    allocates nothing, so a call never pays for fresh pages (large mallocs are new mappings,
    zeroed by the kernel at every call: a third of an update's time), and the memory is
    freed with its owner. Grows to the largest call it has served, then stays."""

    def __init__(self) -> None:
        import torch

        self.tensor = torch.empty(0)  # float32; torch allocations are 64-byte aligned

    def call(self, fn, *args) -> int:
        """fn(*args, work, &work_len), growing the workspace and calling again on NEED_WORKSPACE."""
        import torch

        length = ctypes.c_int64(self.tensor.numel())
        rc = fn(*args, self.tensor.data_ptr(), ctypes.byref(length))
        if rc == NEED_WORKSPACE:
            self.tensor = torch.empty(length.value)
            length = ctypes.c_int64(self.tensor.numel())
            rc = fn(*args, self.tensor.data_ptr(), ctypes.byref(length))
        return rc

    def __deepcopy__(self, memo: dict) -> Workspace:  # scratch: a copy starts empty
        return Workspace()

    def __reduce__(self):
        return Workspace, ()


class PendingRows:
    """Row updates kept for later (``pending`` in recurrence.c): up to ``capacity`` window
    updates' D (K, C), step per band and T_ref (the trace bank the window opened with), and for
    each byte value how many of them its row has had. Owned by a learner; its memory is fixed
    (capacity x K x C floats: at most ENTRIES_BYTES, at most MAX_ENTRIES entries)."""

    MAX_ENTRIES = 64  # small: an update a row at most per 64 (learning at d = 0: per 2 KB)
    ENTRIES_BYTES = 16 << 20  # seed (1.55 MB an entry): 10 entries

    def __init__(self, n_bands: int, out_dim: int):
        import torch

        self.capacity = max(2, min(self.MAX_ENTRIES, self.ENTRIES_BYTES // (4 * n_bands * out_dim)))
        self.d = torch.zeros(self.capacity, n_bands, out_dim)
        self.coef = torch.zeros(self.capacity, n_bands)
        self.banks: list = [None] * self.capacity  # the T_ref tensors (kept alive: C reads them)
        self.bank_ptrs = torch.zeros(self.capacity, dtype=torch.int64)  # their addresses
        self.version = torch.zeros(256, dtype=torch.int32)
        self.count = 0

    @property
    def full(self) -> bool:
        return self.count == self.capacity

    def push(self, bank: torch.Tensor) -> None:
        """Count the entry an update just wrote (at ``count``), with its T_ref ``bank``."""
        import torch

        _require("bank", bank, torch.float64, (256, self.d.shape[1]))
        if self.full:
            raise ValueError(f"pending: all {self.capacity} entries taken")
        self.banks[self.count] = bank
        self.bank_ptrs[self.count] = bank.data_ptr()
        self.count += 1

    def reset(self) -> None:
        """No entries (every row up to date, or replaced)."""
        self.count = 0
        self.version.zero_()
        self.banks = [None] * self.capacity

    def __getstate__(self) -> dict:  # addresses do not survive a copy: made again from the tensors
        return {k: v for k, v in self.__dict__.items() if k != "bank_ptrs"}

    def __setstate__(self, state: dict) -> None:
        import torch

        self.__dict__.update(state)
        self.bank_ptrs = torch.tensor([0 if b is None else b.data_ptr() for b in self.banks], dtype=torch.int64)


def _bind(fn, argtypes: list):
    """A C function of the library, typed: it returns an int status, takes ``argtypes``."""
    fn.restype = ctypes.c_int
    fn.argtypes = argtypes
    return fn


class Recurrence:
    """The loaded library: ``preactivations`` / ``run_chunk`` for a chunk's forward pass,
    ``window_update`` for a weight update. Thread-safe (no shared state; ctypes releases the GIL
    during the call, so streams on other threads run meanwhile)."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        i, p = ctypes.c_int, ctypes.c_void_p
        self._fn = _bind(lib.soma_chunk_forward, [i] * 6 + [p] * 14 + [i] + [p] * 6)
        self._update = _bind(lib.soma_window_update, [i] * 6 + [p] * 3 + [i, p, i] + [p] * 5 + [ctypes.c_float] + [p] * 5 + [i] + [p] * 5)
        self._score = _bind(lib.soma_score_chunks, [i] * 7 + [p] * 12 + [i] + [p] * 6)
        self._refresh = _bind(lib.soma_rows_refresh, [i] * 3 + [p] * 2 + [i] + [p] * 6)

    def __deepcopy__(self, memo: dict) -> Recurrence:  # stateless: copies of a learner share it
        return self

    def __reduce__(self):  # a pickled learner loads the library again in its process
        return load, (self.path,)

    def preactivations(self, chunk: torch.Tensor, ucat: torch.Tensor, alpha: torch.Tensor, carry: torch.Tensor, bandpass: bool, carry_out: torch.Tensor | None = None, work: Workspace | None = None) -> torch.Tensor:
        """zc (n, C) float32: the pre-activations predicting each byte of ``chunk`` (n,) int64
        from the carried state ``carry`` (K, C) float32 entering it, weights ``ucat`` (256*K, C)
        float32, decays ``alpha`` (K,) float64. Equal to ``model.forward_modes``'s (before the
        activation) up to float32 rounding. ``carry_out`` (K, C), if given (it may be
        ``carry``), receives the state after the chunk, rounded once (recurrence.c)."""
        import torch

        self._check(chunk, ucat, alpha, carry)
        if carry_out is not None:
            _require("carry_out", carry_out, torch.float32, tuple(carry.shape))
        zc = torch.empty(chunk.numel(), carry.shape[1])
        if chunk.numel():
            self._call(work or Workspace(), chunk, ucat, alpha, carry, bandpass, zc, carry_out=carry_out)
            if carry_out is not None:
                _mark_written(carry_out)
        return zc

    def run_chunk(self, chunk: torch.Tensor, ucat: torch.Tensor, alpha: torch.Tensor, carry: torch.Tensor, bandpass: bool, hidden: int, activation: str, w: torch.Tensor, b: torch.Tensor, traces: torch.Tensor, seen: torch.Tensor, work: Workspace, entropy: torch.Tensor | None = None, pending: PendingRows | None = None) -> ChunkPass:
        """The forward pass of a chunk (n >= 1) through to each byte's loss, and the trace bank
        and carried state past it. ``hidden`` H, ``activation`` ("tanh" or "relu"); ``w`` (H,
        256) and ``b`` (256,) the readout; ``traces`` (256, K) float64 the trace bank before the
        chunk (not changed: the pass returns a new one); ``seen`` (256,) bool is set for the
        chunk's byte values; ``work`` the caller's scratch memory; ``entropy`` (n,) float32, if
        given, receives each prediction's entropy in bits; ``pending`` (if given): the rows of
        the chunk's byte values are first brought up to date with it (in ``ucat``)."""
        import torch

        k, c, n = self._check_forward(chunk, ucat, alpha, carry, hidden, w, b, traces, seen, entropy)
        out = ChunkPass(torch.empty(n, c), torch.empty(n, 256), torch.empty(n), entropy, torch.empty(k, c), torch.empty(256, k, dtype=torch.float64), True)
        rc = self._call(work, chunk, ucat, alpha, carry, bandpass, out.zc, hidden, ACTIVATIONS[activation], w, b, out.logits, out.bits, entropy, out.carry, traces, out.traces, seen, pending)
        out.finite = rc != NOT_FINITE
        if pending is not None and pending.count:  # the bytes' rows were brought up to date in ucat
            _mark_written(ucat)
        return out

    def score_chunks(self, data: torch.Tensor, chunk: int, ucat: torch.Tensor, alpha: torch.Tensor, carry: torch.Tensor, bandpass: bool, hidden: int, activation: str, w: torch.Tensor, b: torch.Tensor, traces: torch.Tensor, seen: torch.Tensor, work: Workspace, entropy: torch.Tensor | None = None, pending: PendingRows | None = None) -> ScorePass:
        """``run_chunk`` over ``data`` (n >= 1) in chunks of ``chunk`` bytes in one call, scoring
        only (nobody gets h or the logits): each byte's loss, and the carried state and trace
        bank after the last byte (arguments as ``run_chunk``'s)."""
        import torch

        k, c, n = self._check_forward(data, ucat, alpha, carry, hidden, w, b, traces, seen, entropy)
        out = ScorePass(torch.empty(n), entropy, torch.empty(k, c), torch.empty(256, k, dtype=torch.float64), True)
        pointers = [None if t is None else t.data_ptr() for t in (data, ucat, alpha, carry, w, b, out.bits, entropy, out.carry, traces, out.traces, seen)]
        rc = work.call(self._score, n, chunk, k, c, hidden, int(bandpass), ACTIVATIONS[activation], *pointers, *_pending_pointers(pending, k, c, with_banks=True))
        if rc < 0 and rc != NOT_FINITE:
            raise ValueError(f"soma_score_chunks: bad arguments (n={n}, chunk={chunk}, K={k}, C={c}, bytes 0..255)")
        out.finite = rc != NOT_FINITE
        if pending is not None and pending.count:  # the bytes' rows were brought up to date in ucat
            _mark_written(ucat)
        return out

    def window_update(self, seen: torch.Tensor, bank_ref: torch.Tensor, bank_now: torch.Tensor, window: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor, logits: torch.Tensor, alpha: torch.Tensor, coef: torch.Tensor, eta: float, ucat: torch.Tensor, w: torch.Tensor, b: torch.Tensor, carry: torch.Tensor, bandpass: bool, activation: str, apply: bool, work: Workspace | None = None, pending: PendingRows | None = None) -> torch.Tensor:
        """One SGD step from a window of observations on the seen rows of ``ucat``, on ``w``,
        ``b`` and ``carry``, in place (``soma_window_update`` in recurrence.c has the
        arithmetic). Returns the gradient power per band (K,) float64.

        seen (256,) bool: the byte values seen so far (every byte of the window among them);
        bank_ref and bank_now (256, K) float64: the trace bank when the window opened and now;
        window (L,) uint8: the bytes read since it opened; positions (o,) int64: its
        observations (increasing, < L); hidden (o, H) and logits (o, 256) float32: what the
        forward pass gave at each; alpha (K,) float64; coef (K,) float32: the step per band
        (-eta gamma_obs; nonzero); eta: the readout's step; ``apply`` False only measures the
        power; ``work`` the caller's scratch memory; ``pending`` (if given, not full): the rows
        outside the window are not moved but their move written as its entry ``count`` (the
        caller then ``push``es it), and the window's own rows must be up to date with it."""
        import torch

        k, c = carry.shape
        hdim = w.shape[0]
        n, o = window.numel(), positions.numel()
        expected = (("seen", seen, torch.bool, (256,)), ("bank_ref", bank_ref, torch.float64, (256, k)), ("bank_now", bank_now, torch.float64, (256, k)), ("window", window, torch.uint8, (n,)), ("positions", positions, torch.int64, (o,)), ("hidden", hidden, torch.float32, (o, hdim)), ("logits", logits, torch.float32, (o, 256)), ("alpha", alpha, torch.float64, (k,)), ("coef", coef, torch.float32, (k,)), ("ucat", ucat, torch.float32, (256 * k, c)), ("w", w, torch.float32, (hdim, 256)), ("b", b, torch.float32, (256,)), ("carry", carry, torch.float32, (k, c)))
        for name, tensor, dtype, shape in expected:
            _require(name, tensor, dtype, shape)
        power = torch.empty(k, dtype=torch.float64)
        pointers = (t.data_ptr() for t in (seen, bank_ref, bank_now))
        if pending is not None and pending.full:
            raise ValueError("window_update: no room for a pending entry (refresh the rows first)")
        pend = _pending_pointers(pending, k, c, with_banks=False)
        rc = (work or Workspace()).call(self._update, k, c, hdim, int(bandpass), ACTIVATIONS[activation], int(apply), *pointers, n, window.data_ptr(), o, positions.data_ptr(), hidden.data_ptr(), logits.data_ptr(), alpha.data_ptr(), coef.data_ptr(), eta, *(t.data_ptr() for t in (ucat, w, b, carry, power)), *pend)
        if rc != 0:
            why = f"bad arguments (K={k}, C={c}, H={hdim}, L={n}, o={o}: every window byte seen, positions increasing in 0..L-1, coef nonzero)"
            raise ValueError("soma_window_update: " + why)
        if apply:
            _mark_written(ucat, w, b, carry)
        return power

    def refresh_rows(self, ucat: torch.Tensor, seen: torch.Tensor, pending: PendingRows, bandpass: bool, work: Workspace | None = None) -> None:
        """Every seen row of ``ucat`` brought up to date with ``pending`` (in place); the caller
        then resets it."""
        import torch

        k, c = pending.d.shape[1:]
        _require("ucat", ucat, torch.float32, (256 * k, c))
        _require("seen", seen, torch.bool, (256,))
        rc = (work or Workspace()).call(self._refresh, k, c, int(bandpass), ucat.data_ptr(), seen.data_ptr(), *_pending_pointers(pending, k, c, with_banks=True))
        if rc != 0:
            raise ValueError(f"soma_rows_refresh: bad arguments (K={k}, C={c})")
        _mark_written(ucat)

    @staticmethod
    def _check(chunk: torch.Tensor, ucat: torch.Tensor, alpha: torch.Tensor, carry: torch.Tensor) -> None:
        import torch

        for name, tensor, dtype in (("chunk", chunk, torch.int64), ("ucat", ucat, torch.float32), ("alpha", alpha, torch.float64), ("carry", carry, torch.float32)):
            _require(name, tensor, dtype)
        k, c = carry.shape
        if ucat.shape != (256 * k, c) or alpha.shape != (k,) or chunk.dim() != 1:
            raise ValueError(f"shapes do not agree: chunk {tuple(chunk.shape)}, ucat {tuple(ucat.shape)}, alpha {tuple(alpha.shape)}, carry {tuple(carry.shape)}")

    @classmethod
    def _check_forward(cls, chunk, ucat, alpha, carry, hidden, w, b, traces, seen, entropy) -> tuple[int, int, int]:
        """``_check``, and the readout's, trace bank's, seen flags' and entropy's dtypes and
        shapes (``run_chunk``'s arguments). Returns (K, C, n)."""
        import torch

        cls._check(chunk, ucat, alpha, carry)
        (k, c), n = carry.shape, chunk.numel()
        for name, tensor, dtype, shape in (("w", w, torch.float32, (hidden, 256)), ("b", b, torch.float32, (256,)), ("traces", traces, torch.float64, (256, k)), ("seen", seen, torch.bool, (256,))):
            _require(name, tensor, dtype, shape)
        if entropy is not None:
            _require("entropy", entropy, torch.float32, (n,))
        return k, c, n

    def _call(self, work, chunk, ucat, alpha, carry, bandpass, zc, hidden=None, act=0, w=None, b=None, logits=None, bits=None, entropy=None, carry_out=None, traces=None, traces_out=None, seen=None, pending=None) -> int:
        """Run soma_chunk_forward (arguments as ``run_chunk``; None: not wanted). Returns the
        chunk's number of distinct byte values, or NOT_FINITE."""
        (k, c), n = carry.shape, chunk.numel()
        pointers = [None if t is None else t.data_ptr() for t in (w, b, zc, logits, bits, entropy, carry_out, traces, traces_out, seen)]
        pend = _pending_pointers(pending, k, c, with_banks=True)
        m = work.call(self._fn, n, k, c, c if hidden is None else hidden, int(bandpass), act, chunk.data_ptr(), ucat.data_ptr(), alpha.data_ptr(), carry.data_ptr(), *pointers, *pend)
        if m < 0 and m != NOT_FINITE:
            raise ValueError(f"soma_chunk_forward: bad arguments (n={n}, K={k}, C={c}, bytes 0..255)")
        return m


def _pending_pointers(pending: PendingRows | None, k: int, c: int, with_banks: bool) -> tuple:
    """The C functions' pending arguments: (count, d, coef[, banks], version), checked; none
    (0 and NULLs) for None."""
    import torch

    if pending is None:
        return (0, None, None, None, None) if with_banks else (0, None, None, None)
    for name, tensor, dtype, shape in (("pending.d", pending.d, torch.float32, (pending.capacity, k, c)), ("pending.coef", pending.coef, torch.float32, (pending.capacity, k)), ("pending.bank_ptrs", pending.bank_ptrs, torch.int64, (pending.capacity,)), ("pending.version", pending.version, torch.int32, (256,))):
        _require(name, tensor, dtype, shape)
    if not 0 <= pending.count <= pending.capacity:
        raise ValueError(f"pending: count {pending.count} out of 0..{pending.capacity}")
    if with_banks:
        return (pending.count, pending.d.data_ptr(), pending.coef.data_ptr(), pending.bank_ptrs.data_ptr(), pending.version.data_ptr())
    return (pending.count, pending.d.data_ptr(), pending.coef.data_ptr(), pending.version.data_ptr())


def _require(name: str, tensor: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> None:
    """Raise ValueError unless ``tensor`` is contiguous, of ``dtype`` and (if given) ``shape``:
    the C code reads and writes raw memory."""
    if tensor.dtype != dtype or not tensor.is_contiguous() or (shape is not None and tuple(tensor.shape) != shape):
        want = f"contiguous {dtype}" + ("" if shape is None else f" {shape}")
        got = f"{tensor.dtype} {tuple(tensor.shape)}{'' if tensor.is_contiguous() else ' (not contiguous)'}"
        raise ValueError(f"{name} must be {want}, got {got}")


def _mark_written(*tensors: torch.Tensor) -> None:
    """Count a write through C on each tensor's version counter, as torch's own in-place ops
    do: caches keyed on it see the change (torch's API for writes it cannot see; 0.3 us a
    tensor, against 4 us for an in-place op on an empty slice)."""
    import torch

    torch.autograd.graph.increment_version(tensors)


def compiler() -> str | None:
    """The C compiler to use: ``$CC`` or ``cc`` (None if neither is on PATH)."""
    name = os.environ.get("CC") or "cc"
    return shutil.which(name)


def cpu_identity() -> str:
    """What ``-march=native`` code depends on: machine, and on Linux the CPU's model and flags."""
    parts = [sys.platform, platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("model name", "flags", "features", "cpu part", "cpu implementer") and line not in parts:
                    parts.append(line.strip())
                if not line.strip() and len(parts) > 3:  # first processor's block is enough
                    break
    except OSError:
        pass
    return "\n".join(parts)


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def library_name() -> str:
    """``recurrence-<cpu>-<build>.so``: <cpu> names this CPU, <build> the source and flags, so
    neither a build for another CPU nor one of another source is ever loaded."""
    return f"recurrence-{_digest(cpu_identity().encode())}-{_digest(SOURCE.read_bytes(), ' '.join(FLAGS).encode())}.so"


def prune_stale(directory: Path, keep: Path) -> None:
    """Remove the libraries in ``directory`` built for this CPU from other sources (earlier
    versions of somad), keeping ``keep``; libraries for other CPUs are left alone."""
    cpu_prefix = keep.name.rsplit("-", 1)[0] + "-"
    for path in directory.glob(cpu_prefix + "*.so"):
        if path != keep:
            try:
                path.unlink()
            except OSError:  # in use elsewhere, or not ours to remove: harmless
                pass


def candidate_dirs() -> list[Path]:
    """Where a library is looked for and built, in order (module docstring)."""
    dirs = []
    if os.environ.get("SOMAD_KERNEL_DIR"):
        dirs.append(Path(os.environ["SOMAD_KERNEL_DIR"]))
    dirs.append(SOURCE.parent)
    if os.environ.get("CACHE_DIRECTORY"):  # systemd may list several, separated by ':'
        dirs.extend(Path(p) / "kernels" for p in os.environ["CACHE_DIRECTORY"].split(":") if p)
    xdg = os.environ.get("XDG_CACHE_HOME")
    dirs.append((Path(xdg) if xdg else Path.home() / ".cache") / "somad")
    dirs.append(Path(tempfile.gettempdir()) / f"somad-kernels-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
    return dirs


def build(directory: Path) -> Path:
    """Compile ``recurrence.c`` into ``directory`` (created if needed) and return the library.

    Written under a temporary name and renamed: processes building at once never load half a file.
    Raises KernelUnavailable with the compiler's message.
    """
    cc = compiler()
    if cc is None:
        raise KernelUnavailable(f"no C compiler ({os.environ.get('CC') or 'cc'} not on PATH)")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / library_name()
    fd, tmp = tempfile.mkstemp(prefix=".recurrence-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        errors = []
        for flags in (FLAGS, PORTABLE_FLAGS):
            try:
                done = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), *LIBS], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as err:
                raise KernelUnavailable(f"{cc}: {err}") from err
            if done.returncode == 0:
                os.replace(tmp, target)
                prune_stale(directory, target)
                return target
            errors.append(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
        raise KernelUnavailable(f"{cc} failed: {' / '.join(errors)}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: Path) -> Recurrence:
    """Load a built library, checking that it speaks this module's ABI."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise KernelUnavailable(f"cannot load {path}: {err}") from err
    version = lib.soma_abi_version()
    if version != ABI_VERSION:
        raise KernelUnavailable(f"{path} has ABI {version}, expected {ABI_VERSION}")
    return Recurrence(lib, path)


def find_or_build(dirs: list[Path] | None = None) -> Recurrence:
    """The first library already built in ``dirs`` (default ``candidate_dirs()``), else a new
    build in the first directory that takes one. Raises KernelUnavailable saying why each failed."""
    dirs = candidate_dirs() if dirs is None else dirs
    name = library_name()
    for directory in dirs:
        if (directory / name).is_file():
            try:
                return load(directory / name)
            except KernelUnavailable as err:
                log.warning("native kernel %s not usable: %s", directory / name, err)
    reasons = []
    for directory in dirs:  # a compiler that fails (KernelUnavailable) fails everywhere: not caught
        try:
            path = build(directory)
        except OSError as err:  # not writable, full: try the next directory
            reasons.append(f"{directory}: {err}")
            continue
        try:
            return load(path)
        except KernelUnavailable as err:  # e.g. a file system mounted noexec
            reasons.append(str(err))
    raise KernelUnavailable("no directory to build in and load from: " + "; ".join(reasons))


_lock = threading.Lock()
_loaded: Recurrence | None = None
_error: str | None = None


def recurrence() -> Recurrence | None:
    """The compiled recurrence, built or loaded once per process; None (logged once, with the
    reason) where it cannot be had. ``SOMAD_KERNEL=torch`` turns it off."""
    global _loaded, _error
    with _lock:
        if _loaded is None and _error is None:
            if os.environ.get("SOMAD_KERNEL", "").lower() == "torch":
                _error = "SOMAD_KERNEL=torch"
            else:
                try:
                    _loaded = find_or_build()
                except KernelUnavailable as err:
                    _error = str(err)
                    log.warning("native kernel unavailable, learning with the torch path (slower): %s", err)
        return _loaded


def unavailable_reason() -> str | None:
    """Why ``recurrence()`` is None (None while it is loaded or not yet asked for)."""
    return _error


def main(argv: list[str] | None = None) -> int:
    """``python -m somad.native [--dir DIR]``: build the library (default: in the package
    directory, for installs whose file system is read-only at run time) and print where."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m somad.native", description=main.__doc__)
    parser.add_argument("--dir", type=Path, default=SOURCE.parent, help="directory to build in (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        path = build(args.dir)
        load(path)
    except (KernelUnavailable, OSError) as err:
        print(json.dumps({"built": False, "error": str(err)}))
        return 1
    print(json.dumps({"built": True, "path": str(path)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
