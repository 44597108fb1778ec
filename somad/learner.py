"""Online learner: score every byte, then learn from it, in chunks.

``SomaLearner.learn(data)`` returns the loss (bits) of every byte of ``data``, each computed
*before* the model learned from that byte. ``score(data)`` does the same without learning
(the trace bank still advances: it is the model's memory of the stream).

Chunking. Weights are fixed inside a chunk, so a chunk's bytes are scored together (see
``model.forward_chunk``). When learning, a chunk holds about ``batch`` observations: at d = 0
every byte is an observation and the weights are updated every ``batch`` bytes (the gradients
of those bytes summed: each byte is still one SGD step of size eta); at higher d the chunk
grows with the stride, up to ``max_chunk`` bytes.

Learning-rate rules (``LearnerConfig.rule``):
- ``"seed"``: the soma theory's rule: eta = 1 at full observational coherence, band k's step
  scaled by gamma_obs(k, d), and a structural bound |w| <= ``weight_bound`` on every weight
  instead of a small step.
- ``"sgd"``: the same per-band gamma_obs scaling with a tuned eta (``lr``), bound optional.
The default comes from ``bench/lr`` (see README, "Learning-rate rule").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .metabolism import Metabolism, MetabolismConfig
from .model import (
    V,
    ChunkKernels,
    SomaConfig,
    SomaParams,
    backward_chunk,
    bits_per_byte,
    carry_state,
    expand_carry_grad,
    forward_chunk,
    mix_bands,
)


@dataclass(frozen=True)
class LearnerConfig:
    rule: str = "sgd"  # "sgd" (tuned eta) or "seed" (eta = 1 with a weight bound)
    lr: float = 0.1  # eta for "sgd"; "seed" always uses 1.0
    weight_bound: float = 0.0  # |w| <= bound after each update (0 = none); "seed" needs one
    batch: int = 32  # observations per weight update
    max_chunk: int = 64  # bytes scored together at most (memory of kernels grows as chunk^2)
    resync_chunks: int = 256  # score-only: recompute the carried state exactly this often
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

    @property
    def eta(self) -> float:
        return 1.0 if self.rule == "seed" else self.lr


class NumericalFault(RuntimeError):
    """The model produced NaN/Inf: the caller should roll back to a good checkpoint."""


class SomaLearner:
    """One stream's model, trace bank and metabolism. Not thread-safe."""

    def __init__(self, cfg: SomaConfig, lcfg: LearnerConfig | None = None, params: SomaParams | None = None):
        self.cfg = cfg
        self.lcfg = lcfg or LearnerConfig()
        self.params = params or SomaParams.init(cfg)
        if self.lcfg.weight_bound > 0:  # the bound holds for every weight, from the start
            for tensor in (self.params.ucat, self.params.w, self.params.b):
                tensor.clamp_(-self.lcfg.weight_bound, self.lcfg.weight_bound)
        self.kern = ChunkKernels(cfg, self.lcfg.max_chunk)
        self.alpha = self.kern.alpha  # (K,) float64
        self.traces = torch.zeros(V, cfg.n_bands, dtype=torch.float64)  # the trace bank
        self.seen = torch.zeros(V, dtype=torch.bool)  # rows of the bank that are non-zero
        self.carry = torch.zeros(cfg.n_bands, cfg.out_dim)  # P: the bank read through U~
        self.metabolism = Metabolism(self.lcfg.metabolism, cfg.base, cfg.n_bands)
        self.bytes_seen = 0
        self.updates = 0
        self.eta_scale = 1.0  # the pipeline lowers it while an alert is open ("reduced" learning)
        self._chunks_since_sync = 0

    # ------------------------------------------------------------------ public API

    def score(self, data: bytes | bytearray | memoryview) -> torch.Tensor:
        """Loss in bits of each byte, without learning. Returns (len(data),) float32."""
        return self._run(data, learn=False)

    def learn(self, data: bytes | bytearray | memoryview) -> torch.Tensor:
        """Score each byte, then learn from it (at the metabolism's observations)."""
        return self._run(data, learn=True)

    def sync_carry(self) -> None:
        """Recompute the carried state P exactly from the trace bank and weights."""
        self.carry = carry_state(self.cfg, self.params, self.traces, self.seen)
        self._chunks_since_sync = 0

    def stats(self) -> dict:
        return {"bytes_seen": self.bytes_seen, "updates": self.updates, "eta": self.lcfg.eta * self.eta_scale, **self.metabolism.stats()}

    def state_dict(self) -> dict:
        """Everything that evolves while learning, as copies (safe to save while learning goes on).

        U and Wd are stored apart (the checkpoint format names them); ``carry`` is kept although
        it can be recomputed, so that a resumed learner continues bit for bit. ``eta_scale`` is
        not state: the pipeline sets it before each chunk.

        >>> from somad.model import preset
        >>> a = SomaLearner(preset("tiny")); _ = a.learn(b"hello world\\n" * 4)
        >>> b = SomaLearner(preset("tiny")); b.load_state_dict(a.state_dict())
        >>> bool((a.learn(b"hello") == b.learn(b"hello")).all())
        True
        """
        hdim = self.cfg.hidden_dim
        state = {
            "U": self.params.ucat[:, :hdim].contiguous().clone(),  # (256*K, H)
            "W": self.params.w.clone(),  # (H, 256)
            "b": self.params.b.clone(),  # (256,)
            "traces": self.traces.clone(),  # (256, K) float64
            "seen": self.seen.clone(),  # (256,) bool
            "carry": self.carry.clone(),  # (K, out_dim)
            "bytes_seen": self.bytes_seen,
            "updates": self.updates,
            "chunks_since_sync": self._chunks_since_sync,
            "metabolism": self.metabolism.state_dict(),
        }
        if self.cfg.direct_readout:
            state["Wd"] = self.params.ucat[:, hdim:].contiguous().clone()  # (256*K, 256)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Take over a ``state_dict()`` of a learner with the same architecture.

        Raises ``ValueError`` naming the missing, unknown or misshapen entries.
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
        self.params.ucat[:, :hdim] = state["U"]
        if self.cfg.direct_readout:
            self.params.ucat[:, hdim:] = state["Wd"]
        self.params.w.copy_(state["W"])
        self.params.b.copy_(state["b"])
        self.traces = state["traces"].clone()
        self.seen = state["seen"].clone()
        self.carry = state["carry"].clone()
        self.bytes_seen = int(state["bytes_seen"])
        self.updates = int(state["updates"])
        self._chunks_since_sync = int(state["chunks_since_sync"])
        self.metabolism.load_state_dict(state["metabolism"])

    # ------------------------------------------------------------------ internals

    def _run(self, data, learn: bool) -> torch.Tensor:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if len(data) else torch.zeros(0, dtype=torch.long)
        out = torch.empty(buf.numel())
        pos = 0
        while pos < buf.numel():
            n = self.metabolism.bytes_per_observation_batch(self.lcfg.batch, self.lcfg.max_chunk) if learn else self.lcfg.max_chunk
            chunk = buf[pos : pos + n]
            out[pos : pos + chunk.numel()] = self._step(chunk, learn)
            pos += chunk.numel()
        return out

    def _step(self, chunk: torch.Tensor, learn: bool) -> torch.Tensor:
        t0 = time.perf_counter()
        n = chunk.numel()
        cache = forward_chunk(self.cfg, self.params, self.kern, self.carry, chunk)
        bits, probs = bits_per_byte(cache.logits, chunk)
        if not bool(torch.isfinite(bits).all()):
            raise NumericalFault(f"non-finite loss after {self.bytes_seen} bytes")
        old_traces = self.traces
        self._advance_traces(cache)
        n_obs, power = 0, None
        if learn:
            observed = self.metabolism.observation_mask(n)
            n_obs = int(observed.sum())
            if n_obs:
                power = self._update(cache, probs, observed if n_obs < n else None, old_traces)
        if learn and n_obs:
            self.carry = carry_state(self.cfg, self.params, self.traces, self.seen)
        else:
            self._advance_carry(cache)
        self.bytes_seen += n
        self.metabolism.after_chunk(bits, n_obs, power, time.perf_counter() - t0 if learn else 0.0)
        return bits

    def _advance_traces(self, cache) -> None:
        """T <- alpha^n T + sum over the chunk's bytes (exact, float64)."""
        n = cache.data.numel()
        increment = torch.zeros(cache.uniq.numel(), self.cfg.n_bands, dtype=torch.float64)
        increment.index_add_(0, cache.inverse, self.kern.last_row(n).t())  # (m, K)
        self.traces = self.traces * self.kern.carry64[n]
        self.traces.index_add_(0, cache.uniq, increment)
        self.seen[cache.uniq] = True
        self._increment = increment  # used by _advance_carry

    def _advance_carry(self, cache) -> None:
        """P <- alpha^n P + increment read through U~ (score-only; exact up to rounding)."""
        self._chunks_since_sync += 1
        if self._chunks_since_sync >= self.lcfg.resync_chunks:
            self.sync_carry()
            return
        n, k = cache.data.numel(), self.cfg.n_bands
        rows = mix_bands(self.cfg, cache.rows.view(-1, k, self.cfg.out_dim))  # (m, K, C)
        increment = (self._increment.float()[:, :, None] * rows).sum(0)  # (K, C)
        self.carry = self.carry * self.kern.carry[n][:, None] + increment

    def _update(self, cache, probs, observed, old_traces) -> torch.Tensor:
        """One SGD step from the chunk's observations. Returns per-band gradient power (K,)."""
        cfg, k = self.cfg, self.cfg.n_bands
        grads = backward_chunk(cfg, self.params, cache, probs, observed)
        seen_idx = self.seen.nonzero().squeeze(1)  # includes this chunk's bytes
        delta = expand_carry_grad(cfg, old_traces[seen_idx], grads.carry_bands)  # (s, K, C)
        where = torch.searchsorted(seen_idx, cache.uniq)
        delta.index_add_(0, where, grads.local_rows)
        power = delta.pow(2).sum(dim=(0, 2)).to(torch.float64)  # |g_k|^2 summed over observations
        eta = self.lcfg.eta * self.eta_scale
        gamma = self.metabolism.gamma().to(torch.float32)  # (K,)
        delta.mul_((-eta * gamma)[None, :, None])
        rows = self.params.ucat.view(V, k, -1)
        new_rows = rows[seen_idx] + delta
        self.params.w.add_(grads.w, alpha=-eta)
        self.params.b.add_(grads.b, alpha=-eta)
        bound = self.lcfg.weight_bound
        if bound > 0:
            new_rows.clamp_(-bound, bound)
            self.params.w.clamp_(-bound, bound)
            self.params.b.clamp_(-bound, bound)
        rows[seen_idx] = new_rows
        self.updates += 1
        return power

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


def online_bits_per_byte(learner: SomaLearner, data: bytes, chunk: int = 1 << 16) -> float:
    """Mean bits/byte of learning through ``data`` (every byte scored before it is learned)."""
    total = 0.0
    for i in range(0, len(data), chunk):
        total += float(learner.learn(data[i : i + chunk]).double().sum())
    return total / max(1, len(data))

