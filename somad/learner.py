"""Online learner: score every byte, then learn from it, in chunks.

``SomaLearner.learn(data)`` returns the loss (bits) of every byte of ``data``, each computed
*before* the model learned from that byte. ``score(data)`` does the same without learning
(the trace bank still advances: it is the model's memory of the stream).

Chunking. Weights are fixed inside a chunk, so a chunk's bytes are scored together (see
``model.forward_modes``). When learning, a chunk holds about ``batch`` observations: at d = 0
every byte is an observation and the weights are updated every ``batch`` bytes (the gradients
of those bytes summed: each byte is still one SGD step of size eta); at higher d the chunk
grows with the stride, up to ``max_chunk`` bytes. Where ``max_chunk`` bytes hold fewer than
``batch`` observations (d > log_r(max_chunk / batch): a familiar stream), the gradients of
successive chunks are summed in a ``GradientWindow`` and applied as one update once it holds
``batch`` observations or spans ``window_bytes`` bytes, whichever comes first (an update per
~580 bytes at d = 6 would be cheapest, but learning that late costs 1.8 % in bits/byte on the
NAB csv; 256 bytes cost 0.6 %, see README). A window only holds observations made at one d
and one eta_scale, so each update is exactly -eta * gamma_obs(k, d) times the gradient of its
observations' losses at the weights that scored them. ``score()`` and ``state_dict()`` first
apply what is pending (``apply_pending``): nothing observed is lost.

Two forward paths, the same mathematics (``LearnerConfig.kernel``). The torch path is the
above. The native kernel (``somad/native.py``, ``recurrence.c``) computes a chunk of any
length in one C call, through to each byte's loss, and a window's whole update in another
(``ObservationWindow`` keeps the window's bytes, and h and the logits at its observations).
So where the torch path's window spans several max_chunk chunks, a native learning chunk runs
to the window's update at once; the metabolism still judges it in pieces of max_chunk bytes,
as it judges the torch path's chunks, and a piece that moves d while the window holds
observations ends the chunk there (the rest is scored again with the updated weights). Both
paths make the same updates at the same bytes (tests/test_native.py).

Learning-rate rules (``LearnerConfig.rule``):
- ``"seed"``: the soma theory's rule: eta = 1 at full observational coherence, band k's step
  scaled by gamma_obs(k, d), and a structural bound |w| <= ``weight_bound`` on every weight
  instead of a small step.
- ``"sgd"``: the same per-band gamma_obs scaling with a tuned eta (``lr``), bound optional.
The default comes from ``bench/lr`` (see README, "Learning-rate rule").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from . import native
from .metabolism import Metabolism, MetabolismConfig
from .model import (
    LN2,
    V,
    ChunkKernels,
    LengthKernels,
    SomaConfig,
    SomaParams,
    band_confidence,
    carry_state,
    chunk_values,
    expand_carry_grad,
    forward_modes,
    output_gradient,
    project_rows,
    read_rows,
)


KERNELS = ("auto", "native", "torch")
# Bytes per chunk when scoring with the native kernel (all chunks of a score() call in one C
# call: soma_score_chunks). Its cost per byte does not grow with the chunk (the torch path's lag
# modes do, and its kernels take O(K n^2) memory, hence max_chunk); longer chunks spread the
# rows' mixing, shorter ones keep the chunk's h and logits in cache: small on the NAB csv
# scored 890 / 920 / 891 / 812 / 752 KB per CPU-second at 256 / 512 / 1024 / 2048 / 4096 bytes
# (one run; before the one call, when each chunk cost a call: 460 / 545 / 600 / 590 at 256 ..
# 2048).
NATIVE_SCORE_CHUNK = 512
# The most bytes a native learning chunk holds (one runs to the window's update at window_bytes,
# see _learn_chunk_length); window buffers hold a chunk more than the longest window.
NATIVE_LEARN_CHUNK = 512


@dataclass(frozen=True)
class LearnerConfig:
    rule: str = "sgd"  # "sgd" (tuned eta) or "seed" (eta = 1 with a weight bound)
    lr: float = 0.1  # eta for "sgd"; "seed" always uses 1.0
    weight_bound: float = 0.0  # |w| <= bound after each update (0 = none); "seed" needs one
    batch: int = 32  # observations per weight update
    max_chunk: int = 128  # bytes scored together at most (fewer, larger GEMMs; kernel memory grows as chunk^2)
    window_bytes: int = 256  # at high d, learn at least this often even before batch observations (staleness vs cost, see README)
    resync_chunks: int = 256  # recompute the carried state exactly at least this often (chunks); it is advanced incrementally
    kernel: str = "auto"  # forward pass: "native" (compiled recurrence, somad/native.py), "torch" (lag-mode GEMMs), "auto" (native where it builds)
    metabolism: MetabolismConfig = field(default_factory=MetabolismConfig)

    def __post_init__(self) -> None:
        if self.rule not in ("sgd", "seed"):
            raise ValueError(f"rule must be 'sgd' or 'seed', got {self.rule!r}")
        if self.rule == "seed" and self.weight_bound <= 0:
            raise ValueError("the seed rule (eta = 1) needs weight_bound > 0")
        if not 0 < self.lr <= 10:
            raise ValueError(f"lr must be in (0, 10], got {self.lr}")
        if not 1 <= self.batch <= self.max_chunk <= 1024:
            raise ValueError(f"need 1 <= batch ({self.batch}) <= max_chunk ({self.max_chunk}) <= 1024")
        if self.window_bytes < 1:
            raise ValueError(f"window_bytes must be >= 1, got {self.window_bytes}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")

    @property
    def eta(self) -> float:
        return 1.0 if self.rule == "seed" else self.lr


class NumericalFault(RuntimeError):
    """The model produced NaN/Inf: the caller should roll back to a good checkpoint."""


class _Window:
    """What both windows keep of the observations not yet learned from: when and how they
    opened (the trace bank then, their band d and learning-rate scale) and how much they hold."""

    def __init__(self) -> None:
        self.start: torch.Tensor | None = None  # trace bank when the window opened (None: closed)
        self.d = 0.0  # decimation band of its observations (gamma_obs is applied at the update)
        self.eta_scale = 1.0  # learning-rate scale of its observations
        self.bytes = 0  # bytes since it opened
        self.observations = 0  # observations stored so far

    @property
    def open(self) -> bool:
        return self.start is not None

    def begin(self, traces: torch.Tensor, d: float, eta_scale: float) -> None:
        self.start, self.d, self.eta_scale = traces, d, eta_scale


class GradientWindow(_Window):
    """Observations not yet learned from: one update's worth, possibly over many chunks.

    The gradient for Ucat row (v, k) is sum over observed t of x_t[v, k] dZ_t, x_t the features
    before byte t. Over a window opened at trace bank T_ref, the traces before t are
    alpha^(t - start) T_ref (every seen row) plus the traces of the window's own bytes (a few
    rows, given slots). So the window stores, per observation t (in trace space: the band
    mixing M is applied once, at the update):
    - ``decays[t]`` = alpha^(t - start) (K,): how T_ref reaches t;
    - ``feats[t]`` (slots, K): the traces of the window's own bytes at t;
    - ``hidden[t]`` (H,), ``dz[t]`` (H,) and ``g[t]`` (256,): what the gradients are made of
      (dZ_t = [dz_t | g_t] with a direct readout, see ``model.output_gradient``).
    The update then needs a few GEMMs over the observations (``gradients``). Buffers have a
    fixed size: ``capacity`` slots and ``batch + max_chunk`` observations (a window is applied
    once it holds ``batch``; it closes early when its slots would overflow).
    """

    def __init__(self, cfg: SomaConfig, capacity: int, max_observations: int):
        super().__init__()
        k = cfg.n_bands
        self.capacity = capacity  # distinct byte values one window can hold
        self.slot_of = torch.full((V,), -1, dtype=torch.long)  # byte value -> slot, -1 if none
        self.values = torch.zeros(capacity, dtype=torch.long)  # slot -> byte value
        self.traces = torch.zeros(capacity, k, dtype=torch.float64)  # per slot: traces from window bytes
        self.feats = torch.zeros(max_observations, capacity, k)  # per observation: those traces, float32
        self.decays = torch.zeros(max_observations, k)  # per observation: alpha^(t - start)
        self.hidden = torch.zeros(max_observations, cfg.hidden_dim)  # per observation: h_t
        self.dz = torch.zeros(max_observations, cfg.hidden_dim)  # per observation: dz_t (output_gradient)
        self.g = torch.zeros(max_observations, V)  # per observation: g_t; dZ_t = [dz_t | g_t] with a direct readout
        self.direct = cfg.direct_readout
        self.decay = torch.ones(k, dtype=torch.float64)  # alpha^(bytes since the window opened)
        self.used = 0  # slots in use

    @property
    def span(self) -> int:
        """Bytes since its first observation's chunk (what window_bytes bounds)."""
        return self.bytes

    def has_room(self, uniq: torch.Tensor) -> bool:
        """Whether a chunk with the distinct values ``uniq`` fits (slots for its new values)."""
        return self.used + int((self.slot_of.index_select(0, uniq) < 0).sum()) <= self.capacity

    def slots(self, uniq: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(slots of ``uniq`` (m,), slots in use before), allocating slots for new values."""
        before = self.used
        slots = self.slot_of.index_select(0, uniq)
        new = slots < 0
        fresh = int(new.sum())
        if fresh:
            values = uniq[new]
            self.slot_of[values] = torch.arange(before, before + fresh)
            self.values[before : before + fresh] = values
            self.used += fresh
            self.feats[: self.observations, before : self.used] = 0.0  # earlier observations: no traces yet
            slots = self.slot_of.index_select(0, uniq)
        return slots, before

    def add_chunk(self, cfg: SomaConfig, params: SomaParams, lk: LengthKernels, onehot: torch.Tensor, slots: torch.Tensor, used_before: int, idx: torch.Tensor | None, h: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> None:
        """Store a chunk's o observations: positions ``idx`` (None = all), their hidden
        activations ``h``, log-probabilities ``logp`` and ``targets``, all (o, ...)."""
        n, m = onehot.shape
        k = self.decays.shape[1]
        o0, o = self.observations, h.shape[0]
        rows = slice(o0, o0 + o)
        carry_t = lk.carry if idx is None else lk.carry.index_select(0, idx)  # (o, K): alpha^t
        torch.mul(carry_t, self.decay.to(torch.float32), out=self.decays[rows])
        self.hidden[rows] = h
        output_gradient(cfg, params, h, logp, targets, self.dz[rows], self.g[rows])
        feats = self.feats[rows]  # (o, slots, K)
        if used_before:  # the window's earlier bytes, decayed into the chunk
            torch.mul(carry_t[:, None, :], self.traces[:used_before].to(torch.float32)[None], out=feats[:, :used_before])
        feats[:, used_before : self.used] = 0.0
        lags, span = lk.lags, lk.span
        if idx is None:  # (o, m, K): traces from the chunk's own bytes
            local = (onehot.t() @ lags.in_chunk[:n]).view(m, k, span)[:, :, :n].permute(2, 0, 1)
        else:
            local = torch.matmul(lags.in_chunk_by_t.index_select(0, idx)[:, :, :n], onehot).transpose(1, 2)
        feats.index_add_(1, slots, local)
        self.observations += o

    def advance(self, lk: LengthKernels, slots: torch.Tensor, increment: torch.Tensor) -> None:
        """The trace bank moved past a chunk: decay the window's traces, add the chunk's bytes."""
        self.traces[: self.used] *= lk.decay64
        self.traces.index_add_(0, slots, increment)
        self.decay *= lk.decay64
        self.bytes += lk.n  # bytes since the window opened

    def gradients(self, hdim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(D (K, C) = sum_t alpha^(t - start) dZ_t, own (slots, K, C) trace-space gradient of
        the window's byte values from their window traces, grad W (H, 256), grad b (256,))."""
        o, u = self.observations, self.used
        g = self.g[:o]  # (o, 256)
        dzc = torch.cat([self.dz[:o], g], dim=1) if self.direct else self.dz[:o]  # (o, C)
        carry = self.decays[:o].t() @ dzc  # (K, C)
        own = self.feats[:o, :u].reshape(o, -1).t() @ dzc  # (u*K, C)
        return carry, own.view(u, self.decays.shape[1], -1), self.hidden[:o].t() @ g, g.sum(0)

    def reset(self) -> None:
        used = self.used
        self.slot_of[self.values[:used]] = -1
        self.traces[:used] = 0.0
        self.decay.fill_(1.0)
        self.start, self.used, self.observations = None, 0, 0
        self.bytes = 0


class ObservationWindow(_Window):
    """Observations not yet learned from, on the native kernel: the bytes read since the window
    opened, which of them were observations, and what the forward pass gave there (h_t and the
    logits). ``Recurrence.window_update`` derives everything else in one call at the update:
    the output gradients, the window's own traces at each observation (from its bytes), the
    gradients in trace space, the step on every seen row and on W and b. So a chunk only stores
    o rows, where ``GradientWindow`` also stores gradients and (o, slots, K) features built with
    ChunkKernels. Buffers have a fixed size: ``capacity`` bytes and ``max_observations``
    observations (a window is applied before a chunk it has no room for).
    """

    def __init__(self, cfg: SomaConfig, capacity: int, max_observations: int):
        super().__init__()
        self.capacity = capacity
        self.max_observations = max_observations
        self.data = torch.zeros(capacity, dtype=torch.uint8)  # the bytes since it opened
        self.positions = torch.zeros(max_observations, dtype=torch.long)  # per observation: its byte in data
        self.hidden = torch.zeros(max_observations, cfg.hidden_dim)  # per observation: h_t
        self.logits = torch.zeros(max_observations, V)  # per observation: the logits that predicted its byte
        self.lead = 0  # of the bytes since it opened, those before the piece of its first observation

    @property
    def span(self) -> int:
        """Bytes since the piece of its first observation (what window_bytes bounds): a window
        opens with its chunk, but the torch path's would open with that piece, its own chunk."""
        return self.bytes - self.lead

    def has_room(self, n: int, o: int) -> bool:
        """Whether a chunk of n more bytes with o observations fits."""
        return self.bytes + n <= self.capacity and self.observations + o <= self.max_observations

    def add_chunk(self, chunk: torch.Tensor, positions: torch.Tensor, h: torch.Tensor, logits: torch.Tensor) -> None:
        """Store a chunk (n,): its bytes, and for its observations at ``positions`` (o,) their
        hidden activations and logits, rows of ``h`` (n, H) and ``logits`` (n, 256)."""
        n, o = chunk.numel(), positions.numel()
        if not self.has_room(n, o):
            raise ValueError(f"a window of {self.capacity} bytes, {self.max_observations} observations has no room for {n} bytes, {o} observations more after {self.bytes}, {self.observations}")
        if o:
            rows = slice(self.observations, self.observations + o)
            torch.add(positions, self.bytes, out=self.positions[rows])
            if o == n:  # every byte observed (d = 0)
                self.hidden[rows] = h
                self.logits[rows] = logits
            else:
                torch.index_select(h, 0, positions, out=self.hidden[rows])
                torch.index_select(logits, 0, positions, out=self.logits[rows])
        self.data[self.bytes : self.bytes + n] = chunk
        self.bytes += n
        self.observations += o

    def reset(self) -> None:
        self.start, self.bytes, self.lead, self.observations = None, 0, 0, 0


class SomaLearner:
    """One stream's model, trace bank and metabolism. Not thread-safe."""

    def __init__(self, cfg: SomaConfig, lcfg: LearnerConfig | None = None, params: SomaParams | None = None):
        self.cfg = cfg
        self.lcfg = lcfg or LearnerConfig()
        self._params = params or SomaParams.init(cfg)  # the weights; ``params`` brings pending rows up to date first
        if self.lcfg.weight_bound > 0:  # the bound holds for every weight, from the start
            for tensor in (self._params.ucat, self._params.w, self._params.b):
                tensor.clamp_(-self.lcfg.weight_bound, self.lcfg.weight_bound)
        self.kern = ChunkKernels(cfg, self.lcfg.max_chunk)
        self.alpha = self.kern.alpha  # (K,) float64
        self.traces = torch.zeros(V, cfg.n_bands, dtype=torch.float64)  # the trace bank
        self.seen = torch.zeros(V, dtype=torch.bool)  # rows of the bank that are non-zero
        self.carry = torch.zeros(cfg.n_bands, cfg.out_dim)  # P: the bank read through U~
        self.metabolism = Metabolism(self.lcfg.metabolism, cfg.base, cfg.n_bands)
        self.bytes_seen = 0
        self.updates = 0
        self.chunks = 0  # chunks run (bytes_seen / chunks: the mean chunk length, bench/throughput)
        self.eta_scale = 1.0  # the pipeline lowers it while an alert is open ("reduced" learning)
        self._chunks_since_sync = 0
        self._projected = torch.zeros(V, self.kern.rank, cfg.out_dim)  # Ucat rows in lag modes (project_rows)
        self._projected_ok = torch.zeros(V, dtype=torch.bool)  # which rows of _projected are current
        self._projected_of = (self._params.ucat, 0, -1, 0)  # (tensor, address, version, span of chunk lengths) they come from
        self._power = torch.zeros(cfg.n_bands, dtype=torch.float64)  # gradient power of the last update ...
        self._power_obs = 0  # ... and its observations, until reported to the metabolism
        self._band_step_of: tuple | None = None  # (d, eta, dtype) of the last _band_step ...
        self._band_step_value = torch.zeros(cfg.n_bands, dtype=torch.float64)  # ... and its value
        self._recurrence = self._load_kernel(self.lcfg.kernel)
        self._work = native.Workspace()  # the compiled kernel's scratch memory
        # rows outside a window move at their next read (native; recurrence.c, "pending")
        self._pending = None if self._recurrence is None else native.PendingRows(cfg.n_bands, cfg.out_dim)
        self._score_chunk = self.lcfg.max_chunk if self._recurrence is None else max(self.lcfg.max_chunk, NATIVE_SCORE_CHUNK)
        self.window = self._new_window()  # observations not yet applied

    @staticmethod
    def _load_kernel(kernel: str) -> native.Recurrence | None:
        """The compiled recurrence for "native" (an error where it cannot be had) and "auto"
        (None there: the torch path); None for "torch"."""
        if kernel == "torch":
            return None
        recurrence = native.recurrence()
        if recurrence is None and kernel == "native":
            raise native.KernelUnavailable(f"kernel 'native' asked for but unavailable: {native.unavailable_reason()}")
        return recurrence

    def _new_window(self) -> GradientWindow | ObservationWindow:
        """The window for this forward path, its buffers sized for the longest window there can
        be. Native: a window is applied once it holds ``batch`` observations (fewer than
        (batch + 1) r^d_max bytes) or spans window_bytes, and a chunk adds at most NATIVE_LEARN_CHUNK
        bytes (``_learn_chunk_length``), so it holds at most batch - 1 + NATIVE_LEARN_CHUNK
        observations."""
        lc = self.lcfg
        if self._recurrence is None:
            return GradientWindow(self.cfg, min(V, lc.max_chunk), lc.batch + lc.max_chunk)
        chunk = max(lc.max_chunk, NATIVE_LEARN_CHUNK)
        longest = min(lc.window_bytes, math.ceil((lc.batch + 1) * self.metabolism.base**lc.metabolism.d_max))
        return ObservationWindow(self.cfg, longest + 2 * chunk, lc.batch + chunk)  # + leading bytes without observations

    @property
    def params(self) -> SomaParams:
        """The weights, every row up to date. On the native kernel a weight update moves the
        rows of byte values outside its window only when they are next read (a chunk that reads
        them, or a batch of updates at once: recurrence.c, "pending"); reading the weights from
        outside first applies what is pending."""
        self._refresh_all()
        return self._params

    @params.setter
    def params(self, params: SomaParams) -> None:
        """Replace the weights (whole: nothing stays pending for them). P is the caller's to
        make consistent (``sync_carry``)."""
        self._params = params
        if self._pending is not None:
            self._pending.reset()

    @property
    def kernel(self) -> str:
        """The forward path in use: "native" or "torch"."""
        return "torch" if self._recurrence is None else "native"

    @property
    def score_chunk(self) -> int:
        """Bytes per chunk when only scoring: max_chunk, or NATIVE_SCORE_CHUNK on the native kernel."""
        return self._score_chunk

    # ------------------------------------------------------------------ public API

    def score(self, data: bytes | bytearray | memoryview) -> torch.Tensor:
        """Loss in bits of each byte, without learning. Returns (len(data),) float32.

        Gradients pending from earlier ``learn`` calls are applied first.
        """
        self.apply_pending()
        return self._run(data, learn=False)[0]

    def learn(self, data: bytes | bytearray | memoryview) -> torch.Tensor:
        """Score each byte, then learn from it (at the metabolism's observations)."""
        return self._run(data, learn=True)[0]

    def score_with_entropy(self, data: bytes | bytearray | memoryview) -> tuple[torch.Tensor, torch.Tensor]:
        """``score``, plus the entropy in bits of each byte's predicted distribution (the loss
        a byte drawn from the model's own prediction would cost on average)."""
        self.apply_pending()
        return self._run(data, learn=False, with_entropy=True)

    def learn_with_entropy(self, data: bytes | bytearray | memoryview) -> tuple[torch.Tensor, torch.Tensor]:
        """``learn``, plus each byte's predicted entropy in bits (as ``score_with_entropy``).

        >>> from somad.model import preset
        >>> bits, entropy = SomaLearner(preset("tiny")).learn_with_entropy(b"ab" * 64)
        >>> bits.shape == entropy.shape, bool((entropy >= 0).all()), round(float(entropy[0]))
        (True, True, 8)
        """
        return self._run(data, learn=True, with_entropy=True)

    def apply_pending(self) -> None:
        """Apply the gradients summed in the window now (a no-op when none are pending)."""
        if self.window.open:
            self._apply_window()

    def _refresh_all(self) -> None:
        """Apply the pending row updates to every seen row (native kernel; a no-op otherwise)."""
        pending = self._pending
        if pending is not None and pending.count:
            cfg = self.cfg
            self._recurrence.refresh_rows(self._params.ucat, self.seen, pending, cfg.features == "bandpass", self._work)
            pending.reset()

    def sync_carry(self) -> None:
        """Recompute the carried state P exactly from the trace bank and weights."""
        self.carry = carry_state(self.cfg, self.params, self.traces, self.seen)
        self._chunks_since_sync = 0

    @property
    def last_update_power(self) -> torch.Tensor:
        """Gradient power per band |g_k|^2 (K,) float64 of the most recent weight update (zeros
        before the first). Updates apply windows of observations that may span several
        ``learn`` calls; ``apply_pending`` closes the window now. ``metabolism.band_power`` is
        the running average per observation."""
        return self._power.clone()

    def stats(self) -> dict:
        return {"bytes_seen": self.bytes_seen, "updates": self.updates, "eta": self.lcfg.eta * self.eta_scale, **self.metabolism.stats()}

    def state_dict(self) -> dict:
        """Everything that evolves while learning, as copies (safe to save while learning goes on).

        U and Wd are stored apart (the checkpoint format names them); ``carry`` is kept although
        it can be recomputed, so that a resumed learner continues bit for bit as this one does.
        ``eta_scale`` is not state: the pipeline sets it before each chunk. Gradients still
        pending in the window are applied first (``apply_pending``), and the rows' deferred moves
        (``params``), so the state holds every observation so far.

        >>> from somad.model import preset
        >>> a = SomaLearner(preset("tiny")); _ = a.learn(b"hello world\\n" * 4)
        >>> b = SomaLearner(preset("tiny")); b.load_state_dict(a.state_dict())
        >>> bool((a.learn(b"hello") == b.learn(b"hello")).all())
        True
        """
        self.apply_pending()
        params, hdim = self.params, self.cfg.hidden_dim  # every row up to date
        state = {
            "U": params.ucat[:, :hdim].contiguous().clone(),  # (256*K, H)
            "W": params.w.clone(),  # (H, 256)
            "b": params.b.clone(),  # (256,)
            "traces": self.traces.clone(),  # (256, K) float64
            "seen": self.seen.clone(),  # (256,) bool
            "carry": self.carry.clone(),  # (K, out_dim)
            "bytes_seen": self.bytes_seen,
            "updates": self.updates,
            "chunks_since_sync": self._chunks_since_sync,
            "metabolism": self.metabolism.state_dict(),
        }
        if self.cfg.direct_readout:
            state["Wd"] = params.ucat[:, hdim:].contiguous().clone()  # (256*K, 256)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Take over a ``state_dict()`` of a learner with the same architecture.

        Raises ``ValueError`` naming the missing, unknown or misshapen entries. Gradients
        pending in this learner's window are dropped: the loaded state replaces them.
        """
        expected = learner_state_shapes(self.cfg)
        known = set(expected) | {"bytes_seen", "updates", "chunks_since_sync", "metabolism"}
        missing, unknown = sorted(known - set(state)), sorted(set(state) - known)
        if missing or unknown:
            raise ValueError(f"learner state: missing {missing}, unknown {unknown}")
        for name, (shape, dtype) in expected.items():
            tensor = state[name]
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or tensor.dtype != dtype:
                got = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"learner state: {name} must be {shape} {dtype}, got {got}")
        hdim = self.cfg.hidden_dim
        self._params.ucat[:, :hdim] = state["U"]
        if self.cfg.direct_readout:
            self._params.ucat[:, hdim:] = state["Wd"]
        self._params.w.copy_(state["W"])
        self._params.b.copy_(state["b"])
        self.traces = state["traces"].clone()
        self.seen = state["seen"].clone()
        self.carry = state["carry"].clone()
        self.bytes_seen = int(state["bytes_seen"])
        self.updates = int(state["updates"])
        self._chunks_since_sync = int(state["chunks_since_sync"])
        self.metabolism.load_state_dict(state["metabolism"])
        self.window.reset()
        if self._pending is not None:  # the rows were replaced: what was pending for them is void
            self._pending.reset()

    # ------------------------------------------------------------------ internals

    def _run(self, data, learn: bool, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(bits, entropy or None) of every byte of ``data``, chunk by chunk."""
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if len(data) else torch.zeros(0, dtype=torch.long)
        entropy = torch.empty(buf.numel()) if with_entropy else None
        if not learn and self._recurrence is not None and buf.numel():
            return self._score_native(buf, entropy), entropy
        out = torch.empty(buf.numel())
        pos = 0
        while pos < buf.numel():
            n = self._learn_chunk_length() if learn else self._score_chunk
            chunk = buf[pos : pos + n]
            end = pos + chunk.numel()
            bits = self._step(chunk, learn, None if entropy is None else entropy[pos:end])
            end = pos + bits.numel()  # a native learning step may take fewer bytes (_step_native)
            out[pos:end] = bits
            pos = end
            self.chunks += 1
        return out, entropy

    def _score_native(self, buf: torch.Tensor, entropy_out: torch.Tensor | None) -> torch.Tensor:
        """Scoring on the native kernel: every chunk of ``buf`` (score_chunk bytes) in one C call,
        the metabolism then told of all its bytes at once (its averages are exact over any
        split; only d's steps come a call apart, not a chunk: while scoring, d only waits for
        learning to resume). Returns the losses."""
        cfg, params = self.cfg, self._params
        step = self._finite(self._recurrence.score_chunks(buf, self._score_chunk, params.ucat, self.alpha, self.carry.contiguous(), cfg.features == "bandpass", cfg.hidden_dim, cfg.activation, params.w, params.b, self.traces, self.seen, self._work, entropy_out, self._pending))
        self.traces = step.traces
        n, size = buf.numel(), self._score_chunk
        chunks = -(-n // size)
        self._chunks_since_sync += chunks - 1  # the chunks this call ran (_next_carry counts the last)
        self._next_carry(step.carry)
        self._account(step.bits, 0, 0.0)
        self.chunks += chunks
        return step.bits

    def _learn_chunk_length(self) -> int:
        """Bytes of the next learning chunk: about ``batch`` observations, at most max_chunk. On
        the native kernel, where a chunk holds fewer than ``batch`` observations (the window
        spans chunks), the chunk runs to the window's update at window_bytes instead, at most
        NATIVE_LEARN_CHUNK bytes: the same weights score the same bytes in fewer calls (the kernel
        has no ChunkKernels, so no max_chunk)."""
        if self._recurrence is not None and not self._chunk_holds_batch():
            return max(1, min(NATIVE_LEARN_CHUNK, self.lcfg.window_bytes - self.window.span))
        return self.metabolism.bytes_per_observation_batch(self.lcfg.batch, self.lcfg.max_chunk)

    def _step(self, chunk: torch.Tensor, learn: bool, entropy_out: torch.Tensor | None = None) -> torch.Tensor:
        """Score a chunk with the current weights; when learning, add its observations to the
        window and apply the window once it holds ``batch`` observations. ``entropy_out``
        (n,), if given, receives the entropy in bits of each byte's prediction."""
        if self._recurrence is not None:
            return self._step_native(chunk, entropy_out) if learn else self._score_native(chunk, entropy_out)
        t0 = time.perf_counter()
        n = chunk.numel()
        lk = self.kern.at(n)
        uniq, onehot = chunk_values(chunk)
        observed, n_obs, rows = None, 0, None
        update_every_chunk = learn and self._chunk_holds_batch()
        if learn:
            if self.metabolism.stride == 1.0:  # every byte an observation (the phase stays as it is)
                n_obs = n
            else:
                observed = self.metabolism.observation_mask(n)
                n_obs = int(observed.sum())
            self._close_window_if_changed(lambda window: window.has_room(uniq))
        if update_every_chunk:  # the weights change after this chunk: no use keeping projections
            k, c = self.cfg.n_bands, self.cfg.out_dim
            rows = self._params.ucat.view(V, k * c).index_select(0, uniq).view(-1, k, c)  # (m, K, C)
            projected = project_rows(lk, rows)
        else:
            projected = self._projected_rows(lk, uniq)
        h, logits = forward_modes(self.cfg, self._params, lk, self.carry, onehot, projected)
        logp, bits = self._losses(logits, chunk, entropy_out)
        window = self.window
        if n_obs and not window.open:
            window.begin(self.traces, self.metabolism.d, self.eta_scale)
        slots, used_before = window.slots(uniq) if window.open else (None, 0)
        if n_obs:
            idx = None if n_obs == n else observed.nonzero().squeeze(1)
            sel = (lambda x: x) if idx is None else (lambda x: x.index_select(0, idx))
            window.add_chunk(self.cfg, self._params, lk, onehot, slots, used_before, idx, sel(h), sel(logp), sel(chunk))
        increment = onehot.t().to(torch.float64) @ lk.last64  # (m, K): the chunk's bytes in the traces after it
        if window.open:
            window.advance(lk, slots, increment)
        self.traces = self.traces * lk.decay64  # a new tensor: the window may hold the old one
        self.traces.index_add_(0, uniq, increment)
        self.seen[uniq] = True
        self._advance_carry(lk, uniq, onehot, increment, rows)  # P for the new traces, weights as they were
        if window.open and self._window_due(update_every_chunk):
            self._apply_window()
        self._account(bits, n_obs, time.perf_counter() - t0 if learn else 0.0)
        return bits

    def _step_native(self, chunk: torch.Tensor, entropy_out: torch.Tensor | None) -> torch.Tensor:
        """``_step`` on the compiled kernel, learning (scoring is ``_score_native``): one call
        scores the chunk (through to each byte's loss) and gives the trace bank's and P's moves
        past it; the window keeps the chunk's bytes, and h and the logits at its observations,
        and its update is one more call (``ObservationWindow``). The metabolism judges the chunk
        in pieces of max_chunk bytes, as it judges the torch path's chunks, so a long chunk does
        not make it slower to react; if a piece moves d while the window holds observations,
        the chunk ends there (the rest, scored with weights about to change, is dropped and
        comes back as the next chunk). Returns the losses of the bytes it took."""
        t0 = time.perf_counter()
        n = chunk.numel()
        update_every_chunk = self._chunk_holds_batch()
        self._close_window_if_changed(lambda window: window.has_room(n, n))
        carry_in = self.carry.contiguous()
        step = self._run_native(chunk, carry_in, entropy_out)
        bits = step.bits
        taken = self._observe_pieces(chunk, step.zc[:, : self.cfg.hidden_dim], step.logits, bits, t0)
        if taken < n:  # the state where the chunk ends now (rare: d moved mid-chunk)
            step = self._run_native(chunk[:taken], carry_in)  # (seen may keep values of the dropped bytes: harmless, their traces are zero)
            bits = bits[:taken]
        self._move_past(step)
        window = self.window
        if window.open and window.observations == 0:  # bytes but no observation yet: nothing to learn
            window.reset()
        if window.open and self._window_due(update_every_chunk):
            self._apply_window()
        return bits

    def _observe_pieces(self, chunk: torch.Tensor, h: torch.Tensor, logits: torch.Tensor, bits: torch.Tensor, t0: float) -> int:
        """Add a scored chunk's observations to the window, found piece by piece (max_chunk
        bytes): each piece's at the metabolism's stride, then the metabolism's verdict on the
        piece. Stops after a piece that moved d while the window holds observations made at
        the old d, or that made the window due. Returns the bytes taken."""
        n, piece = chunk.numel(), self.lcfg.max_chunk
        window, metabolism = self.window, self.metabolism
        if not window.open:
            window.begin(self.traces, metabolism.d, self.eta_scale)
        held, found, taken = window.observations, [], n
        for a in range(0, n, piece):
            b = min(n, a + piece)
            if held == 0:  # the window's d is that of its observations
                window.d = metabolism.d
            every = metabolism.stride == 1.0  # every byte an observation (the phase stays as it is)
            positions = list(range(a, b)) if every else metabolism.observation_list(b - a, a)
            found += positions
            held += len(positions)
            if held == 0:
                window.lead = window.bytes + b
            self._account(bits[a:b], len(positions), (time.perf_counter() - t0) * (b - a) / n)
            if b < n and held and (metabolism.d != window.d or self._due(held, window.bytes + b - window.lead)):
                taken = b
                break
        window.add_chunk(chunk[:taken], torch.tensor(found, dtype=torch.long), h[:taken], logits[:taken])
        return taken

    def _run_native(self, chunk: torch.Tensor, carry: torch.Tensor, entropy_out: torch.Tensor | None = None) -> native.ChunkPass:
        """The compiled forward pass of a chunk from the carried state ``carry``: h, logits and
        each byte's loss (its entropy into ``entropy_out`` if given), the trace bank and P after
        it (``seen`` is marked for its byte values). Raises NumericalFault on a non-finite loss."""
        cfg, params = self.cfg, self._params
        return self._finite(self._recurrence.run_chunk(chunk, params.ucat, self.alpha, carry, cfg.features == "bandpass", cfg.hidden_dim, cfg.activation, params.w, params.b, self.traces, self.seen, self._work, entropy_out, self._pending))

    def _finite(self, step: native.ChunkPass | native.ScorePass) -> native.ChunkPass | native.ScorePass:
        """``step``, once its losses are known finite; NumericalFault otherwise."""
        if not step.finite:
            raise NumericalFault(f"non-finite loss after {self.bytes_seen} bytes")
        return step

    def _move_past(self, step: native.ChunkPass) -> None:
        """Move the trace bank and the carried state past a chunk the compiled kernel ran."""
        self.traces = step.traces  # a new tensor: the window may hold the old one
        self._next_carry(step.carry)

    def _window_due(self, update_every_chunk: bool) -> bool:
        """Whether the open window is to be applied after this chunk."""
        return update_every_chunk or self._due(self.window.observations, self.window.span)

    def _due(self, observations: int, nbytes: int) -> bool:
        """Whether a window of ``observations`` over ``nbytes`` bytes is to be applied."""
        return observations >= self.lcfg.batch or nbytes >= self.lcfg.window_bytes

    def _account(self, bits: torch.Tensor, n_obs: int, seconds: float) -> None:
        """Count a chunk's bytes and report it to the metabolism (with the gradient power of
        the last update, per observation of this chunk)."""
        self.bytes_seen += bits.numel()
        power = None
        if n_obs and self._power_obs:
            power, self._power_obs = self._power.numpy() * (n_obs / self._power_obs), 0
        self.metabolism.after_chunk(bits, n_obs, power, seconds)

    def _losses(self, logits: torch.Tensor, chunk: torch.Tensor, entropy_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities (n, 256), loss in bits of each byte (n,)); the entropy of each
        prediction into ``entropy_out`` if given. Raises NumericalFault on a non-finite loss."""
        logp = torch.log_softmax(logits, dim=1)  # (n, 256)
        bits = logp.gather(1, chunk[:, None]).squeeze(1).mul_(-1.0 / LN2)  # (n,)
        if entropy_out is not None:  # H = -sum p log2 p
            entropy_out.copy_((logp.exp() * logp).sum(1).mul_(-1.0 / LN2))
        if not math.isfinite(float(bits.sum())):
            raise NumericalFault(f"non-finite loss after {self.bytes_seen} bytes")
        return logp, bits

    def _next_carry(self, advanced: torch.Tensor | None) -> bool:
        """Count a chunk; recompute P exactly from the traces when a resync is due (every
        ``resync_chunks`` chunks), else take ``advanced`` (if given) as P. True if it resynced."""
        self._chunks_since_sync += 1
        if self._chunks_since_sync >= self.lcfg.resync_chunks:
            self.sync_carry()
            return True
        if advanced is not None:
            self.carry = advanced
        return False

    def _chunk_holds_batch(self) -> bool:
        """At this stride a chunk was sized to hold ``batch`` observations: update every chunk."""
        return self.lcfg.batch * self.metabolism.stride <= self.lcfg.max_chunk

    def _close_window_if_changed(self, has_room) -> None:
        """Apply the window before a chunk that cannot join it: its observations were made at
        another d or eta_scale (gamma_obs and eta are exact per window), or ``has_room(window)``
        says the chunk does not fit."""
        window = self.window
        if window.open and (window.d != self.metabolism.d or window.eta_scale != self.eta_scale or not has_room(window)):
            self._apply_window()

    def _projected_rows(self, lk: LengthKernels, uniq: torch.Tensor) -> torch.Tensor:
        """project_rows of Ucat's rows ``uniq`` (m, r, C) for chunks of lk.n bytes, cached per span.

        Any change is caught: another tensor (params replaced), another address (a deep copy),
        another version (written in place, by the learner or anyone else), another span of
        chunk lengths (its own lag modes).
        """
        ucat = self._params.ucat
        source = (ucat, ucat.data_ptr(), ucat._version, lk.span)
        if self._projected_of[0] is not ucat or self._projected_of[1:] != source[1:]:
            self._projected_ok.zero_()
            self._projected_of = source
        cache = self._projected[:, : lk.rank]
        missing = uniq[~self._projected_ok.index_select(0, uniq)]
        if missing.numel():
            k, c = self.cfg.n_bands, self.cfg.out_dim
            rows = ucat.view(V, k * c).index_select(0, missing).view(-1, k, c)
            cache[missing] = project_rows(lk, rows)
            self._projected_ok[missing] = True
        return cache.index_select(0, uniq)

    def _advance_carry(self, lk: LengthKernels, uniq: torch.Tensor, onehot: torch.Tensor, increment: torch.Tensor, rows: torch.Tensor | None) -> None:
        """P <- alpha^n P + increment read through U~ (weights unchanged; exact up to rounding).

        ``rows``: Ucat rows of ``uniq`` (m, K, C) if already gathered."""
        if self._next_carry(None):
            return
        k, c = self.cfg.n_bands, self.cfg.out_dim
        if rows is None:
            rows = self._params.ucat.view(V, k * c).index_select(0, uniq).view(-1, k, c)  # (m, K, C)
        pairs = torch.matmul(lk.last_pairs, onehot)  # (K, 2, m): band_pairs of the increment, float32
        self.carry = torch.addcmul(read_rows(self.cfg, rows, increment, pairs), self.carry, lk.decay[:, None])

    def _apply_window(self) -> None:
        """One SGD step from the window's observations: Ucat rows, W, b, and P kept exact.

        Row (v, k) moves by delta[v, k] = -eta * eta_scale * gamma_obs(k, d) * g[v, k], g the
        feature-space gradient: every seen row is reached through the window's starting traces
        T_ref (g = M^T-mix of T_ref[v] (x) D), the window's own byte values also through their
        own traces. P stays exact for the current traces T: it moves by
        sum_v T[v, j] (M delta)[v, j] (``read_rows``), no recomputation from all the weights.
        """
        cfg, window = self.cfg, self.window
        eta = self.lcfg.eta * window.eta_scale
        bound = self.lcfg.weight_bound
        if self._recurrence is not None:  # one call in C from the window's bytes, h and logits
            o, params, pending = window.observations, self._params, self._pending
            if pending is not None and pending.full:  # room for this update's entry
                self._refresh_all()
            self.carry = self.carry.contiguous()  # written in place
            coef = self._band_step(window.d, eta, torch.float32)
            self._power = self._recurrence.window_update(self.seen, window.start, self.traces, window.data[: window.bytes], window.positions[:o], window.hidden[:o], window.logits[:o], self.alpha, coef, eta, params.ucat, params.w, params.b, self.carry, cfg.features == "bandpass", cfg.activation, eta != 0, self._work, pending)
            if eta != 0 and pending is not None:
                pending.push(window.start)
            seen_idx = None
        else:
            seen_idx = self.seen.nonzero().squeeze(1)  # (s,) includes the window's byte values
            t_ref = window.start.index_select(0, seen_idx)  # (s, K) float64
            coef64 = self._band_step(window.d, eta)
            carry_grad, own, grad_w, grad_b = window.gradients(cfg.hidden_dim)
            self._power = self._apply_rows(seen_idx, t_ref, carry_grad, own, window.values[: window.used], coef64, eta != 0)
            if eta != 0:
                self._params.w.add_(grad_w, alpha=-eta)
                self._params.b.add_(grad_b, alpha=-eta)
        self._power_obs = window.observations
        if eta != 0:
            self.updates += 1
            if bound > 0:
                seen_idx = self.seen.nonzero().squeeze(1) if seen_idx is None else seen_idx
                ucat = self.params.ucat.view(V, -1)  # every row up to date first
                ucat.index_copy_(0, seen_idx, ucat.index_select(0, seen_idx).clamp_(-bound, bound))
                self._params.w.clamp_(-bound, bound)
                self._params.b.clamp_(-bound, bound)
                self.sync_carry()  # clamping is not linear: recompute P
        window.reset()

    def _apply_rows(self, seen_idx: torch.Tensor, t_ref: torch.Tensor, carry_grad: torch.Tensor, own: torch.Tensor, own_values: torch.Tensor, coef64: torch.Tensor, apply: bool) -> torch.Tensor:
        """The Ucat rows' part of ``_apply_window`` as tensor operations (the torch path; the
        native kernel does the same in one call, ``Recurrence.window_update``): move the seen
        rows by delta and P with them (if ``apply``); return the gradient power per band (K,)
        float64."""
        cfg = self.cfg
        k, c = cfg.n_bands, cfg.out_dim
        coef = coef64.to(torch.float32)
        delta = expand_carry_grad(cfg, t_ref, carry_grad, coef)  # (s, K, C)
        own_f = own * coef[:, None]  # feature space, scaled: coef_k (own_k - own_{k+1})
        if cfg.features == "bandpass" and k > 1:
            own_f[:, :-1].addcmul_(own[:, 1:], coef[:-1, None], value=-1.0)
        delta.index_add_(0, torch.searchsorted(seen_idx, own_values), own_f)
        power = torch.linalg.vector_norm(delta, dim=2).square().sum(0).to(torch.float64) / (coef64 * coef64)  # |g_k|^2
        if apply:
            self._params.ucat.view(V, k * c).index_add_(0, seen_idx, delta.view(-1, k * c))
            if self.lcfg.weight_bound <= 0:  # with a bound, P is recomputed after clamping
                t_now = self.traces.index_select(0, seen_idx).to(torch.float32)  # (s, K)
                self.carry = self.carry + read_rows(cfg, delta, t_now)  # P moves by sum_v T[v, j] (M delta)[v, j]
        return power

    def _band_step(self, d: float, eta: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The step per band of an update at band d: -eta gamma_obs(k, d) (K,) (gamma_obs alone
        for eta 0: an update that only measures), remembered for the last (d, eta, dtype) asked."""
        if self._band_step_of != (d, eta, dtype):
            step = band_confidence(self.cfg.base, self.cfg.n_bands, d) * (-eta if eta != 0 else 1.0)
            self._band_step_value, self._band_step_of = step.to(dtype), (d, eta, dtype)
        return self._band_step_value

    def check_finite(self) -> None:
        if not self.params.all_finite() or not bool(torch.isfinite(self.carry).all()):
            raise NumericalFault(f"non-finite weights after {self.bytes_seen} bytes")


def learner_state_shapes(cfg: SomaConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor of ``SomaLearner.state_dict()`` for an architecture."""
    k, h = cfg.n_bands, cfg.hidden_dim
    shapes = {
        "U": ((V * k, h), torch.float32),
        "W": ((h, V), torch.float32),
        "b": ((V,), torch.float32),
        "traces": ((V, k), torch.float64),
        "seen": ((V,), torch.bool),
        "carry": ((k, cfg.out_dim), torch.float32),
    }
    if cfg.direct_readout:
        shapes["Wd"] = ((V * k, V), torch.float32)
    return shapes
