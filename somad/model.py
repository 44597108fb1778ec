"""The soma model: a phi-spaced bank of exponential traces read by a one-hidden-layer network.

Pure mathematics, no I/O. Read top to bottom:

1. ``SomaConfig`` and ``PRESETS``: the hyperparameters.
2. Trace-bank constants: decays ``alpha_k = 1 - r^-k``, the feature mixing matrix ``M``
   (identity for raw traces, bidiagonal for bandpass ``B_k = T_k - T_{k+1}``).
3. ``SomaParams``: the learnable tensors, with the readout ``U`` and the direct readout ``Wd``
   stored side by side as one matrix ``Ucat`` so that one GEMM serves both.
4. ``ChunkKernels`` and ``forward_chunk`` / ``backward_chunk``: the exact chunked path. The
   weights are fixed inside a chunk of n bytes, so the n predictions are computed together:
       features(t) = (alpha^t * T0) M  +  local(t)
   The first (carry) term collapses to ``sum_j alpha_j^t P_j`` with ``P_j = T0[:, j]^T U~_j``
   (K x (H+256), carried between chunks); the second only involves the byte values that
   occur inside the chunk, so it is a small dense GEMM. Cost per byte is
   O(m*K*(H+256) + H*256) where m is the number of distinct byte values in the chunk,
   instead of O(256*K*(H+256)) for the naive forward.
5. The fast path the learner runs (``forward_modes``, ``read_rows``, ``output_gradient``):
   the local lag kernel of a chunk, K exponentials sampled at n lags, has numerical rank
   r ~ 10 whatever K is (``lag_modes``), so the local GEMM runs in r lag modes against
   weights projected once (``project_rows``): O(m*r*(H+256)) per byte.
6. ``naive_logits``: the textbook forward from a full trace bank, the reference for tests.

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
    """P (K, out_dim), contiguous: P_j = sum_v T[v, j] U~[v, j, :] over the seen rows, exactly."""
    k = cfg.n_bands
    idx = seen.nonzero().squeeze(1)  # (s,)
    rows = params.ucat.view(V, -1).index_select(0, idx).view(-1, k, cfg.out_dim)  # (s, K, C)
    return read_rows(cfg, rows, traces.index_select(0, idx).to(torch.float32)).contiguous()


# --------------------------------------------------------------------------- chunked forward


LAG_MODE_TOL = 1e-8  # lag modes kept: singular values above this fraction of the largest


def lag_kernel(cfg: SomaConfig, n: int) -> torch.Tensor:
    """L (n, K) float64: feature k of a byte seen ``lag`` bytes before a prediction, lag = 0..n-1.

    L[lag, k] = sum_j (1 - alpha_j) alpha_j^lag M[j, k]: every local feature of a chunk is a sum
    of these rows, one per earlier byte of the chunk.
    """
    alpha = decays(cfg)
    lags = torch.arange(n, dtype=torch.float64)[:, None]
    return ((1.0 - alpha) * alpha**lags) @ feature_matrix(cfg)


def lag_modes(cfg: SomaConfig, n: int, tol: float = LAG_MODE_TOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank factors of the lag kernel: L ~= A @ B, A (n, r), B (r, K), float64.

    K exponentials sampled at n lags span only about a dozen dimensions (the slow bands are
    nearly polynomial over a chunk), so r is small whatever K is; r keeps every singular value
    above ``tol`` times the largest, which leaves an error far below float32 rounding.

    >>> a, b = lag_modes(preset("small"), 64)
    >>> a.shape[1] < 24 and bool(((a @ b) - lag_kernel(preset("small"), 64)).abs().max() < 1e-9)
    True
    """
    u, s, vh = torch.linalg.svd(lag_kernel(cfg, n), full_matrices=False)
    r = max(1, int((s > tol * s[0]).sum()))
    return u[:, :r] * s[:r], vh[:r]


@dataclass(frozen=True)
class SpanKernels:
    """Lag-mode matrices for chunks of up to ``span`` bytes; a shorter chunk uses the top-left
    part (its lags are a subset). Spans are powers of two (and max_chunk), so the memory of all
    of them stays within 2x of the largest."""

    span: int
    proj: torch.Tensor  # (r, K) float32: B of lag_modes(cfg, span); weights are read through it (project_rows)
    modes: torch.Tensor  # (span, r*span) float32: modes[s, (q, t)] = A[t-1-s, q] for s < t, else 0
    in_chunk: torch.Tensor  # (span, K*span) float32: in_chunk[s, (k, t)] = (1-alpha_k) alpha_k^(t-1-s) for s < t: trace k at t from byte s
    in_chunk_by_t: torch.Tensor  # (span, K, span) float32: the same as [t, k, s], to pick a few t

    @property
    def rank(self) -> int:
        return self.proj.shape[0]


@dataclass(frozen=True)
class LengthKernels:
    """The constant matrices for chunks of exactly n bytes: views, no memory of their own."""

    n: int
    lags: SpanKernels  # the lag-mode matrices of the smallest span >= n
    carry: torch.Tensor  # (n, K) float32: alpha_j^t, decay of the state entering the chunk
    decay64: torch.Tensor  # (K,) float64: alpha^n, decay over the whole chunk
    decay: torch.Tensor  # (K,) float32: the same
    last64: torch.Tensor  # (n, K) float64: (1-alpha_k) alpha_k^(n-1-s), trace increment per byte
    last_pairs: torch.Tensor  # (K, 2, n) float32: [j, 0] = last[:, j], [j, 1] = last[:, j+1] (0 for j = K-1), see read_rows

    @property
    def rank(self) -> int:
        return self.lags.rank

    @property
    def span(self) -> int:
        return self.lags.span


class ChunkKernels:
    """Constant matrices for chunks of up to ``n`` bytes (depend on cfg only).

    carry[t, j]    = alpha_j^t                      (n+1, K): decay of the state entering the chunk
    local[k, t, s] = sum_j (1-alpha_j) alpha_j^(t-1-s) M[j, k]  for s < t   (K, n, n): features
    last[k, s]     = (1-alpha_k) alpha_k^(n-1-s)    (K, n): trace increment over a full chunk
    ``at(n)`` gives the learner's kernels for an n-byte chunk; ``rank`` is the largest number
    of lag modes any span up to n needs.
    """

    def __init__(self, cfg: SomaConfig, n: int):
        self.cfg = cfg
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
        pairs = torch.zeros(cfg.n_bands, 2, n + 1, n)  # [j, a, t, s] = trace_kernel[j + a, t, s] (0 past band K)
        pairs[:, 0] = trace_kernel
        pairs[:-1, 1] = trace_kernel[1:]
        self._last_pairs = pairs  # row t = n holds band_pairs of last_row(n), for every n
        self.rank = lag_modes(cfg, max(n, 1))[1].shape[0]  # the rank grows with the span
        self._spans: dict[int, SpanKernels] = {}
        self._by_length: dict[int, LengthKernels] = {}

    def last_row(self, n: int) -> torch.Tensor:
        """(K, n) float64: weight of each byte of an n-byte chunk in the traces after it."""
        return self.trace_kernel[:, n, :n]

    def span_for(self, n: int) -> int:
        """The span whose lag modes serve an n-byte chunk: the next power of two, at most self.n."""
        return min(self.n, 1 << max(0, n - 1).bit_length())

    def at(self, n: int) -> LengthKernels:
        """Kernels for an n-byte chunk (1 <= n <= self.n)."""
        kern = self._by_length.get(n)
        if kern is None:
            if not 1 <= n <= self.n:
                raise ValueError(f"chunk length {n} outside 1..{self.n}")
            kern = LengthKernels(
                n=n,
                lags=self._span(self.span_for(n)),
                carry=self.carry[:n],
                decay64=self.carry64[n],
                decay=self.carry[n],
                last64=self.last_row(n).t(),
                last_pairs=self._last_pairs[:, :, n, :n],
            )
            self._by_length[n] = kern
        return kern

    def _span(self, span: int) -> SpanKernels:
        kern = self._spans.get(span)
        if kern is None:
            k = self.trace_kernel.shape[0]
            a, b = lag_modes(self.cfg, span)  # (span, r), (r, K)
            t = torch.arange(span)
            lag = t[None, :] - t[:, None] - 1  # [s, t] = t - 1 - s
            modes = a[lag.clamp(min=0)] * (lag >= 0)[:, :, None]  # (s, t, r)
            within = self.trace_kernel[:, :span, :span]  # (K, t, s)
            kern = SpanKernels(
                span=span,
                proj=b.to(torch.float32).contiguous(),
                modes=modes.permute(0, 2, 1).reshape(span, -1).to(torch.float32).contiguous(),
                in_chunk=within.permute(2, 0, 1).reshape(span, k * span).to(torch.float32).contiguous(),
                in_chunk_by_t=within.permute(1, 0, 2).to(torch.float32).contiguous(),
            )
            self._spans[span] = kern
        return kern


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


def expand_carry_grad(cfg: SomaConfig, traces_seen: torch.Tensor, carry_bands: torch.Tensor, coef: torch.Tensor | None = None) -> torch.Tensor:
    """Carry part of the U/Wd gradient for the seen rows: (s, K, C), times coef[k] if given.

    grad[v, k] = sum_j T0[v, j] M[j, k] D_j. M is the identity (traces) or bidiagonal
    (bandpass: M[k, k] = 1, M[k+1, k] = -1), so this is elementwise, O(s*K*C). ``coef`` (K,)
    scales band k of the result (the learner's -eta * gamma_obs) at no extra pass.
    """
    t = traces_seen.to(torch.float32)[:, :, None]  # (s, K, 1)
    d = carry_bands if coef is None else carry_bands * coef[:, None]
    grad = t * d[None]  # (s, K, C): T0[v, k] D_k
    if cfg.features == "bandpass" and cfg.n_bands > 1:
        d_next = carry_bands[1:] if coef is None else carry_bands[1:] * coef[:-1, None]  # (K-1, C)
        grad[:, :-1].addcmul_(t[:, 1:], d_next[None], value=-1.0)  # - T0[v, k+1] D_{k+1}
    return grad


# --------------------------------------------------------------------------- fast path (lag modes)
#
# What the learner runs. The same mathematics as forward_chunk / backward_chunk, arranged for
# fewer multiply-adds and fewer tensor operations per chunk:
# - the local features of a chunk are formed in the r lag modes (``ChunkKernels.proj``), so the
#   local GEMM is (n x m*r) @ (m*r x C) against weights projected once (``project_rows``);
# - gradients are kept in trace space (before the band mixing M) so that the gradients of
#   several chunks can be summed cheaply before one update (see ``learner.GradientWindow``).


def chunk_values(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uniq (m,) sorted distinct byte values, onehot (n, m) float32) of a chunk (n,) long.

    >>> uniq, onehot = chunk_values(torch.tensor([7, 3, 7]))
    >>> uniq.tolist(), onehot.tolist()
    ([3, 7], [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    """
    uniq = torch.bincount(data, minlength=V).nonzero().squeeze(1)  # (m,)
    return uniq, (data[:, None] == uniq[None, :]).to(torch.float32)


def project_rows(lk: LengthKernels, rows: torch.Tensor) -> torch.Tensor:
    """Weights read in lag modes: (m, K, C) rows of Ucat -> (m, r, C), row v = proj @ Ucat[v]."""
    return torch.matmul(lk.lags.proj, rows)


def forward_modes(
    cfg: SomaConfig,
    params: SomaParams,
    lk: LengthKernels,
    carry_p: torch.Tensor,
    onehot: torch.Tensor,
    projected: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h (n, H), logits (n, 256)) for a chunk, with ``projected`` = project_rows of its values.

    Equal to forward_chunk up to the lag-mode truncation (below float32 rounding).
    """
    n, m = onehot.shape
    r, span = lk.rank, lk.span
    y = (onehot.t() @ lk.lags.modes[:n]).view(m, r, span)[:, :, :n].permute(2, 0, 1).reshape(n, m * r)  # (n, m*r): lag-mode features
    zc = torch.addmm(lk.carry @ carry_p, y, projected.view(m * r, -1))  # (n, C)
    return readout(cfg, params, zc)


def readout(cfg: SomaConfig, params: SomaParams, zc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h (n, H), logits (n, 256)) from the pre-activations zc (n, C) = [z | direct logits]."""
    hdim = cfg.hidden_dim
    h = fast_activate(cfg, zc[:, :hdim])  # (n, H)
    logits = torch.addmm(params.b, h, params.w)  # (n, 256)
    if cfg.direct_readout:
        logits += zc[:, hdim:]
    return h, logits


def fast_activate(cfg: SomaConfig, z: torch.Tensor) -> torch.Tensor:
    """``activate``, with tanh as 2 sigmoid(2z) - 1: several times faster than torch.tanh on
    CPU, equal to it within 2e-7 (absolute)."""
    if cfg.activation != "tanh":
        return activate(cfg, z)
    return torch.sigmoid(z * 2.0).mul_(2.0).sub_(1.0)


def band_pairs(coef: torch.Tensor) -> torch.Tensor:
    """(s, K) -> (K, 2, s): [j, 0] = coef[:, j], [j, 1] = coef[:, j+1] (zero for the last band)."""
    pairs = coef.new_zeros(coef.shape[1], 2, coef.shape[0])
    pairs[:, 0] = coef.t()
    pairs[:-1, 1] = coef[:, 1:].t()
    return pairs


def read_rows(cfg: SomaConfig, rows: torch.Tensor, coef: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """sum_v coef[v, j] U~[v, j, :] (K, C) for rows (s, K, C) of Ucat and coef (s, K) float32.

    With coef = traces this is the carried state P (``carry_state``); with coef = a chunk's
    trace increments, what the chunk adds to P. U~ = M U is never formed: for bandpass
    U~_j = U_j - U_{j-1}, so band j of the result also pairs coef band j with weight band
    j - 1. Both come from one batched GEMM over bands with ``band_pairs(coef)`` (which may be
    passed in as ``pairs`` when already at hand).

    >>> cfg = SomaConfig(n_bands=3, hidden_dim=2, direct_readout=False)
    >>> rows, coef = torch.randn(5, 3, 2), torch.rand(5, 3)
    >>> ref = torch.einsum("vj,vjc->jc", coef, mix_bands(cfg, rows))
    >>> bool(torch.allclose(read_rows(cfg, rows, coef), ref, atol=1e-6))
    True
    """
    if cfg.features == "traces":
        first = coef.t().unsqueeze(1) if pairs is None else pairs[:, :1]  # (K, 1, s)
        return torch.bmm(first, rows.transpose(0, 1)).squeeze(1)  # (K, C)
    pairs = band_pairs(coef) if pairs is None else pairs  # (K, 2, s)
    out = torch.bmm(pairs, rows.transpose(0, 1))  # (K, 2, C): sum_v coef_j U_j, sum_v coef_{j+1} U_j
    out[1:, 0] -= out[:-1, 1]
    return out[:, 0]


def output_gradient(cfg: SomaConfig, params: SomaParams, h: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor, dz: torch.Tensor, g: torch.Tensor) -> None:
    """Write g (o, 256) and dz (o, H) for o observed positions into the given tensors.

    g = softmax - onehot(target) is the gradient of the loss (nats) at the logits,
    dz = (g W^T) * act'(z) at the hidden pre-activations. The gradient for Ucat row (v, k) is
    sum_t x_t[v, k] dZ_t with dZ = [dz | g] (dz alone without a direct readout); for W it is
    h^T g, for b the sum of g.
    """
    torch.exp(logp, out=g)
    g[torch.arange(g.shape[0]), targets] -= 1.0
    torch.mm(g, params.w.t(), out=dz)
    dz.mul_(activation_grad(cfg, h))


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


def macs_per_byte(cfg: SomaConfig, distinct_per_chunk: float, chunk: int, observe_fraction: float = 0.0, reproject: bool = False, kernel: str = "torch") -> float:
    """Multiply-adds per byte of the learner's path for chunks of ``chunk`` bytes holding
    ``distinct_per_chunk`` byte values: the forward and the carried state's advance, plus for
    each observation (``observe_fraction`` per byte) its gradients (``output_gradient`` and the
    update's GEMMs). Leaves out the update's elementwise passes over the seen rows (their cost
    depends on how many byte values the stream has used).

    ``kernel`` "torch": ``forward_modes`` (lag-mode GEMMs); ``reproject``: the chunk's rows are
    projected afresh each chunk (weights updated every chunk, as at d = 0). "native": the
    compiled recurrence (``recurrence.c``), whose state update P += g U~ - g P and running sum
    z += P are counted as 2 K C per byte, plus mixing the chunk's rows and the carried state's
    advance (m K C per chunk each) and the logits GEMM.

    >>> round(macs_per_byte(preset("small"), 15.0, 64) / 1e3)  # k MACs/byte, scoring the NAB csv
    114
    >>> round(macs_per_byte(preset("small"), 15.6, 128, kernel="native") / 1e3)
    53
    """
    k, c, h, m, n = cfg.n_bands, cfg.out_dim, cfg.hidden_dim, distinct_per_chunk, chunk
    if kernel == "native":
        fwd = 2.0 * k * c + 2.0 * m * k * c / n + h * V
    else:
        r = lag_modes(cfg, max(1, n))[1].shape[0]
        fwd = r * n * m + m * r * c + k * c + h * V + 2.0 * m * k * c / n  # lag features, local, carry read, logits, P advance
        if reproject:
            fwd += m * r * k * c / n
    per_obs = 2 * h * V + k * c + m * k * c + k * n * m  # g W^T and h^T g, carry and own-row gradients, in-chunk traces
    return fwd + observe_fraction * per_obs
