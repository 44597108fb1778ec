"""Reference implementations used by the tests: the textbook definitions, written plainly."""

from __future__ import annotations

import math
import random

import torch

from somad.model import V, SomaConfig, SomaParams, activate, feature_matrix


def random_bytes(n: int, seed: int = 0, alphabet: int = 256) -> bytes:
    rng = random.Random(seed)
    if alphabet == 256:
        return rng.randbytes(n)
    return bytes(rng.randrange(alphabet) for _ in range(n))


def repetitive_bytes(n: int, pattern: bytes = b"0123456789,\n") -> bytes:
    return (pattern * (n // len(pattern) + 1))[:n]


def random_params(cfg: SomaConfig, scale: float = 0.1, seed: int = 1) -> SomaParams:
    """Params with every block non-zero (init leaves Wd and b at zero, which would hide bugs)."""
    p = SomaParams.init(cfg)
    gen = torch.Generator().manual_seed(seed)
    p.ucat[:, cfg.hidden_dim :] = torch.randn(p.ucat[:, cfg.hidden_dim :].shape, generator=gen) * scale
    p.b[:] = torch.randn(V, generator=gen) * scale
    return p


def trace_banks(traces: torch.Tensor, data: list[int], alpha: torch.Tensor) -> torch.Tensor:
    """Stack of the bank *before* each byte of ``data`` (n, 256, K), evolving ``traces`` in place
    by the recurrence T_k <- alpha_k T_k + (1 - alpha_k) onehot(byte)."""
    banks = torch.empty(len(data), *traces.shape, dtype=torch.float64)
    for i, byte in enumerate(data):
        banks[i] = traces
        traces.mul_(alpha)
        traces[byte] += 1.0 - alpha
    return banks


def naive_logits_batch(cfg: SomaConfig, params: SomaParams, banks: torch.Tensor) -> torch.Tensor:
    """The textbook forward for a stack of banks (n, 256, K): x = flatten(T @ M), z = x @ U,
    h = act(z), logits = h @ W + b (+ x @ Wd). Same formula as ``model.naive_logits``, one GEMM."""
    n = banks.shape[0]
    x = (banks @ feature_matrix(cfg)).reshape(n, -1).to(torch.float32)  # (n, 256*K)
    zc = x @ params.ucat
    h = activate(cfg, zc[:, : cfg.hidden_dim])
    logits = h @ params.w + params.b
    if cfg.direct_readout:
        logits = logits + zc[:, cfg.hidden_dim :]
    return logits


def bits_of(logits: torch.Tensor, targets: list[int] | torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each target under its logits, in bits."""
    t = torch.as_tensor(targets, dtype=torch.long)
    return -torch.log_softmax(logits.double(), dim=1).gather(1, t[:, None]).squeeze(1) / math.log(2.0)
