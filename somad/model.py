"""The soma model: a phi-spaced bank of exponential traces read by a one-hidden-layer network.

Pure mathematics, no I/O. Read top to bottom:

1. ``SomaConfig`` and ``PRESETS``: the hyperparameters.
2. Trace-bank constants: decays ``alpha_k = 1 - r^-k``, the feature mixing matrix ``M``
   (identity for raw traces, bidiagonal for bandpass ``B_k = T_k - T_{k+1}``).
3. ``SomaParams``: the learnable tensors, with the readout ``U`` and the direct readout ``Wd``
   stored side by side as one matrix ``Ucat`` so that one GEMM serves both.
4. ``ChunkKernels`` and ``forward_chunk`` / ``backward_chunk``: the fast exact path. The
   weights are fixed inside a chunk of n bytes, so the n predictions are computed together:
       features(t) = (alpha^t * T0) M  +  local(t)
   The first (carry) term collapses to ``sum_j alpha_j^t P_j`` with ``P_j = T0[:, j]^T U~_j``
   (K x (H+256), carried between chunks); the second only involves the byte values that
   occur inside the chunk, so it is a small dense GEMM. Cost per byte is
   O(m*K*(H+256) + H*256) where m is the number of distinct byte values in the chunk,
   instead of O(256*K*(H+256)) for the naive forward.
5. ``naive_logits``: the textbook forward from a full trace bank, the reference for tests.

Shapes: V = 256 byte values, K bands, H hidden units, n bytes in a chunk, m distinct byte
values in the chunk, s "seen" byte values (rows of the trace bank that are non-zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

V = 256  # vocabulary: one symbol per byte value
PHI = (1.0 + math.sqrt(5.0)) / 2.0
LN2 = math.log(2.0)


@dataclass(frozen=True)
class SomaConfig:
    """Architecture. The first four fields define compatibility (continue / merge)."""

    n_bands: int = 24  # K: trace time constants r^1 .. r^K bytes (K=24, r=phi: 1.6 .. 1e5 bytes)
    hidden_dim: int = 128  # H: width of the hidden layer
    base: float = PHI  # r: ratio between adjacent time constants
    direct_readout: bool = True  # add a skip path Wd from features straight to the logits
    features: str = "bandpass"  # "traces" (T_k) or "bandpass" (B_k = T_k - T_{k+1})
    activation: str = "tanh"  # hidden nonlinearity: "tanh" or "relu"
    init_scale: float = 1.0  # std of U is init_scale / sqrt(K)
    seed: int = 0  # RNG seed for initialisation (same seed, same model)

    def __post_init__(self) -> None:
        if not 1 <= self.n_bands <= 64:
            raise ValueError(f"n_bands must be in 1..64, got {self.n_bands}")
        if not 1 <= self.hidden_dim <= 65536:
            raise ValueError(f"hidden_dim must be in 1..65536, got {self.hidden_dim}")
        if not 1.0 < self.base <= 16.0:
            raise ValueError(f"base must be in (1, 16], got {self.base}")
        if self.features not in ("traces", "bandpass"):
            raise ValueError(f"features must be 'traces' or 'bandpass', got {self.features!r}")
        if self.activation not in ("tanh", "relu"):
            raise ValueError(f"activation must be 'tanh' or 'relu', got {self.activation!r}")

    @property
    def out_dim(self) -> int:
        """Columns of Ucat: H hidden pre-activations, plus 256 direct logits if any."""
        return self.hidden_dim + (V if self.direct_readout else 0)

    def n_params(self) -> int:
        k, h = self.n_bands, self.hidden_dim
        return V * k * self.out_dim + h * V + V

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "SomaConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model fields: {sorted(unknown)}")
        return cls(**d)


COMPAT_FIELDS = ("n_bands", "hidden_dim", "base", "direct_readout")

# Edge presets. Sizes chosen by bench/throughput and bench/bpb (see README).
PRESETS: dict[str, SomaConfig] = {
    "tiny": SomaConfig(n_bands=16, hidden_dim=32, direct_readout=False),  # Pi Zero class: ~0.14 M parameters
    "small": SomaConfig(n_bands=24, hidden_dim=128),  # Pi 4 default: ~2.4 M parameters
    "base": SomaConfig(n_bands=32, hidden_dim=512),  # Mac mini: ~6.4 M parameters
    "seed": SomaConfig(n_bands=46, hidden_dim=8192),  # the paper's model: ~100 M parameters
}


def preset(name: str, **overrides) -> SomaConfig:
    """A preset with optional field overrides, e.g. ``preset("small", hidden_dim=64)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# --------------------------------------------------------------------------- trace bank


def decays(cfg: SomaConfig) -> torch.Tensor:
    """alpha_k = 1 - r^-k for k = 1..K, float64 (K,). Band k has time constant r^k bytes."""
    k = torch.arange(1, cfg.n_bands + 1, dtype=torch.float64)
    return 1.0 - cfg.base ** (-k)


def feature_matrix(cfg: SomaConfig) -> torch.Tensor:
    """M (K, K) with features = T @ M. Bandpass: B_k = T_k - T_{k+1}, B_K = T_K."""
    m = torch.eye(cfg.n_bands, dtype=torch.float64)
    if cfg.features == "bandpass":
        m -= torch.diag(torch.ones(cfg.n_bands - 1, dtype=torch.float64), -1)
    return m


def update_traces(traces: torch.Tensor, data: bytes, alpha: torch.Tensor) -> torch.Tensor:
    """Reference recurrence T_k <- alpha_k T_k + (1 - alpha_k) onehot(byte), one byte at a time.

    Slow; used by tests and as the definition. ``traces`` is (256, K) float64, updated in place.
    """
    for byte in data:
        traces.mul_(alpha)
        traces[byte] += 1.0 - alpha
    return traces


def closed_form_traces(data: bytes, alpha: torch.Tensor) -> torch.Tensor:
    """T_k after a stream from zero state: sum_s (1 - alpha_k) alpha_k^(N-1-s) onehot(b_s)."""
    n = len(data)
    out = torch.zeros(V, alpha.numel(), dtype=torch.float64)
    if n == 0:
        return out
    lags = torch.arange(n - 1, -1, -1, dtype=torch.float64)[:, None]  # (N, 1)
    weights = (1.0 - alpha) * alpha ** lags  # (N, K)
    idx = torch.tensor(list(data), dtype=torch.long)
    out.index_add_(0, idx, weights)
    return out


def band_confidence(base: float, n_bands: int, d: float) -> torch.Tensor:
    """gamma_obs(k, d) = min(1, r^(k - d)) for k = 1..K (float64): trust in band k's gradient at band d."""
    k = torch.arange(1, n_bands + 1, dtype=torch.float64)
    return torch.clamp(base ** (k - d), max=1.0)


def gamma_obs(cfg: SomaConfig, d: float) -> torch.Tensor:
    """band_confidence for a model's bands."""
    return band_confidence(cfg.base, cfg.n_bands, d)


def stride(cfg: SomaConfig, d: float) -> float:
    """S(d) = r^d bytes between observations."""
    return cfg.base**d


# --------------------------------------------------------------------------- parameters


@dataclass
class SomaParams:
    """Learnable tensors, float32.

    Ucat: (256*K, out_dim) rows indexed v*K + k. Columns [:H] are U (features -> hidden),
          columns [H:] are Wd (features -> logits) when direct_readout.
    W: (H, 256) hidden -> logits.  b: (256,) logit bias.
    """

    ucat: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor

    @classmethod
    def init(cls, cfg: SomaConfig) -> "SomaParams":
        gen = torch.Generator().manual_seed(cfg.seed)
        k, h = cfg.n_bands, cfg.hidden_dim
        ucat = torch.zeros(V * k, cfg.out_dim)
        ucat[:, :h] = torch.randn(V * k, h, generator=gen) * (cfg.init_scale / math.sqrt(k))
        w = torch.randn(h, V, generator=gen) * (0.1 / math.sqrt(h))
        return cls(ucat=ucat, w=w, b=torch.zeros(V))

    def u(self, cfg: SomaConfig) -> torch.Tensor:
        return self.ucat[:, : cfg.hidden_dim]

    def wd(self, cfg: SomaConfig) -> torch.Tensor | None:
        return self.ucat[:, cfg.hidden_dim :] if cfg.direct_readout else None

    def clone(self) -> "SomaParams":
        return SomaParams(self.ucat.clone(), self.w.clone(), self.b.clone())

    def all_finite(self) -> bool:
        return bool(torch.isfinite(self.ucat).all() and torch.isfinite(self.w).all() and torch.isfinite(self.b).all())


def activate(cfg: SomaConfig, z: torch.Tensor) -> torch.Tensor:
    return torch.tanh(z) if cfg.activation == "tanh" else torch.relu(z)


def activation_grad(cfg: SomaConfig, h: torch.Tensor) -> torch.Tensor:
    """d act / d z expressed through the activation's output h."""
    return 1.0 - h * h if cfg.activation == "tanh" else (h > 0).to(h.dtype)


def mix_bands(cfg: SomaConfig, rows: torch.Tensor) -> torch.Tensor:
    """U~ = M U per byte value: weights that act on raw traces. rows: (s, K, C) -> (s, K, C).

    Bandpass features B = T M give B . U = T . (M U), and M U is U_j - U_{j-1} along bands.
    """
    if cfg.features == "traces":
        return rows
    mixed = rows.clone()
    mixed[:, 1:] -= rows[:, :-1]
    return mixed


def carry_state(cfg: SomaConfig, params: SomaParams, traces: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """P (K, out_dim): P_j = sum_v T[v, j] U~[v, j, :] over the seen rows, exactly."""
    k = cfg.n_bands
    rows = params.ucat.view(V, k, -1)[seen]  # (s, K, C)
    t = traces[seen].to(torch.float32)  # (s, K)
    return torch.einsum("vj,vjc->jc", t, mix_bands(cfg, rows))


# --------------------------------------------------------------------------- chunked forward


class ChunkKernels:
    """Constant matrices for chunks of up to ``n`` bytes (depend on cfg only).

    carry[t, j]    = alpha_j^t                      (n+1, K): decay of the state entering the chunk
    local[k, t, s] = sum_j (1-alpha_j) alpha_j^(t-1-s) M[j, k]  for s < t   (K, n, n): features
    last[k, s]     = (1-alpha_k) alpha_k^(n-1-s)    (K, n): trace increment over a full chunk
    """

    def __init__(self, cfg: SomaConfig, n: int):
        self.n = n
        alpha = decays(cfg)
        t = torch.arange(n + 1, dtype=torch.float64)
        self.alpha = alpha
        self.carry64 = alpha[None, :] ** t[:, None]  # (n+1, K)
        self.carry = self.carry64.to(torch.float32)
        lag = t[:, None] - t[None, :] - 1.0  # (n+1, n+1): t - 1 - s
        mask = lag >= 0
        trace_kernel = torch.where(mask[None], (1.0 - alpha)[:, None, None] * alpha[:, None, None] ** lag.clamp(min=0)[None], 0.0)
        trace_kernel = trace_kernel[:, :, :n]  # (K, n+1, n): lag from byte s to prediction t
        mix = feature_matrix(cfg)  # (K, K): feature k = sum_j T_j M[j, k]
        feat = torch.einsum("jts,jk->kts", trace_kernel[:, :n], mix)
        self.local = feat.to(torch.float32).contiguous()  # (K, n, n)
        self.trace_kernel = trace_kernel  # float64, rows 0..n

    def last_row(self, n: int) -> torch.Tensor:
        """(K, n) float64: weight of each byte of an n-byte chunk in the traces after it."""
        return self.trace_kernel[:, n, :n]


@dataclass
class ChunkCache:
    """What backward needs from forward."""

    data: torch.Tensor  # (n,) long: the chunk's bytes, also the targets
    uniq: torch.Tensor  # (m,) long: distinct byte values in the chunk
    inverse: torch.Tensor  # (n,) long: index of each byte in uniq
    rows: torch.Tensor  # (m*K, C): Ucat rows of the chunk's byte values (a copy)
    feat_local: torch.Tensor  # (n, m*K) float32: local features
    carry: torch.Tensor  # (n, K) float32: alpha_j^t
    z: torch.Tensor  # (n, H) hidden pre-activations
    h: torch.Tensor  # (n, H) hidden activations
    logits: torch.Tensor  # (n, 256)


def forward_chunk(
    cfg: SomaConfig,
    params: SomaParams,
    kern: ChunkKernels,
    carry_p: torch.Tensor,
    data: torch.Tensor,
) -> ChunkCache:
    """Logits predicting each byte of ``data`` (n <= kern.n) from the traces before it.

    carry_p: P (K, out_dim) for the trace bank entering the chunk (see ``carry_state``).
    """
    n, k, hdim = data.numel(), cfg.n_bands, cfg.hidden_dim
    uniq, inv = torch.unique(data, return_inverse=True)  # (m,), (n,)
    m = uniq.numel()
    onehot = torch.zeros(n, m)
    onehot[torch.arange(n), inv] = 1.0  # (n, m)
    local = kern.local[:, :n, :n] if n < kern.n else kern.local
    feat_local = (local.reshape(k * n, n) @ onehot).view(k, n, m).permute(1, 2, 0).reshape(n, m * k)  # (n, m*K)
    rows = params.ucat.view(V, -1).index_select(0, uniq).view(m * k, -1)  # (m*K, C)
    carry = kern.carry[:n]  # (n, K)
    zc = torch.addmm(carry @ carry_p, feat_local, rows)  # (n, C)
    z = zc[:, :hdim]
    h = activate(cfg, z)
    logits = torch.addmm(params.b, h, params.w)  # (n, 256)
    if cfg.direct_readout:
        logits += zc[:, hdim:]
    return ChunkCache(data, uniq, inv, rows, feat_local, carry, z, h, logits)


def bits_per_byte(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss in bits (n,), probabilities (n, 256)) of each target byte under its logits."""
    logp = torch.log_softmax(logits, dim=1)
    loss = -logp.gather(1, targets[:, None]).squeeze(1) / LN2
    return loss, logp.exp()


@dataclass
class ChunkGrads:
    """Gradients of the summed loss (nats) over the observed bytes of a chunk."""

    local_rows: torch.Tensor  # (m, K, C): gradient for the chunk's byte values, local part
    carry_bands: torch.Tensor  # (K, C): D_j = sum_t alpha_j^t dZ_t; row v gets T0[v] (x) D, see below
    w: torch.Tensor  # (H, 256)
    b: torch.Tensor  # (256,)


def backward_chunk(
    cfg: SomaConfig,
    params: SomaParams,
    cache: ChunkCache,
    probs: torch.Tensor,
    observed: torch.Tensor | None,
) -> ChunkGrads:
    """Hand-derived gradients of sum_t CE(logits_t, data_t) over the observed positions.

    observed: (n,) bool mask of observations, or None for all bytes.
    The gradient for U/Wd row (v, k) is  sum_t F_t[v, k] dZ_t  with dZ = [dz | g]; F splits into
    the local features (a GEMM over the chunk's byte values) and the carried state, whose part
    is  sum_j T0[v, j] M[j, k] D_j  (see ``expand_carry_grad``).
    """
    k = cfg.n_bands
    idx = None if observed is None else observed.nonzero().squeeze(1)
    sel = (lambda x: x) if idx is None else (lambda x: x.index_select(0, idx))
    g = sel(probs).clone()  # (o, 256): softmax - onehot
    g[torch.arange(g.shape[0]), sel(cache.data)] -= 1.0
    h = sel(cache.h)
    grad_w = h.t() @ g  # (H, 256)
    grad_b = g.sum(0)
    dz = (g @ params.w.t()) * activation_grad(cfg, h)  # (o, H)
    dzc = torch.cat([dz, g], dim=1) if cfg.direct_readout else dz  # (o, C)
    m = cache.uniq.numel()
    local_rows = (sel(cache.feat_local).t() @ dzc).view(m, k, -1)  # (m, K, C)
    carry_bands = sel(cache.carry).t() @ dzc  # (K, C)
    return ChunkGrads(local_rows, carry_bands, grad_w, grad_b)


def expand_carry_grad(cfg: SomaConfig, traces_seen: torch.Tensor, carry_bands: torch.Tensor) -> torch.Tensor:
    """Carry part of the U/Wd gradient for the seen rows: (s, K, C).

    grad[v, k] = sum_j T0[v, j] M[j, k] D_j. M is the identity (traces) or bidiagonal
    (bandpass: M[k, k] = 1, M[k+1, k] = -1), so this is elementwise, O(s*K*C).
    """
    t = traces_seen.to(torch.float32)[:, :, None]  # (s, K, 1)
    grad = t * carry_bands[None]  # (s, K, C): T0[v, k] D_k
    if cfg.features == "bandpass":
        grad[:, :-1] -= grad[:, 1:].clone()  # - T0[v, k+1] D_{k+1}
    return grad


# --------------------------------------------------------------------------- reference


def naive_logits(cfg: SomaConfig, params: SomaParams, traces: torch.Tensor) -> torch.Tensor:
    """Textbook forward from a full (256, K) trace bank: O(256*K*(H+256)). Reference only."""
    x = (traces @ feature_matrix(cfg)).reshape(1, -1).to(params.ucat.dtype)  # (1, 256*K)
    zc = x @ params.ucat  # (1, C)
    h = activate(cfg, zc[:, : cfg.hidden_dim])
    logits = h @ params.w + params.b
    if cfg.direct_readout:
        logits = logits + zc[:, cfg.hidden_dim :]
    return logits[0]


def macs_per_byte(cfg: SomaConfig, distinct_per_chunk: float, chunk: int, observe_fraction: float = 0.0) -> float:
    """Multiply-adds per byte executed by forward_chunk (and backward_chunk for observations)."""
    k, c, h = cfg.n_bands, cfg.out_dim, cfg.hidden_dim
    fwd = k * chunk * distinct_per_chunk + distinct_per_chunk * k * c + k * c + h * V
    bwd = h * V * 2 + distinct_per_chunk * k * c + k * c
    return fwd + observe_fraction * bwd
