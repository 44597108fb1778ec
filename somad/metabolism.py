"""Metabolism: when to observe (learn), and how much learning costs.

The trace bank measures every byte; *observations* (gradient + update) happen at stride
S(d) = r^d bytes, d being the decimation band. This module decides d from the stream's own
surprise, within an energy budget, and keeps the bookkeeping the metrics endpoint shows:

- E(d)  = N r^-d     observations per N bytes (``cost_per_byte`` is r^-d)
- I(d)  = sum_k gamma_obs(k, d) |g_k|^2    useful learning signal per observation
- eta(d) = r^d I(d)  spectral efficiency

Policy (``mode="adaptive"``):
- surprise z = (fast mean of bits - slow mean of bits) / standard error of the fast mean
  (per-byte std over sqrt(2 * fast_bytes), the effective sample size of the fast average);
- z > ``novel_z``: d falls at once to its floor (observe every byte while the budget lasts);
- -``progress_z`` < z < ``familiar_z``: neither surprised nor still improving (a learned,
  stationary stream): d rises by one band per ``rise_bytes`` bytes, up to ``d_max``;
- z <= -``progress_z``: the loss is still falling (learning pays): d holds;
- energy budget: a token bucket filled at ``budget`` observations per byte (or per second
  when ``budget_obs_per_s`` is set) holding at most ``burst`` observations; while it is empty,
  d is held at or above log_r(1 / rate) so the long-run cost stays within the budget.

Pure: no clocks, no I/O. Time (for per-second budgets) is passed in by the caller.

>>> m = Metabolism(MetabolismConfig(mode="fixed", d=0.0))
>>> m.observation_mask(4).tolist()
[True, True, True, True]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .model import band_confidence


@dataclass(frozen=True)
class MetabolismConfig:
    mode: str = "adaptive"  # "adaptive": d follows surprise; "fixed": d stays at ``d``
    d: float = 0.0  # starting band (adaptive) or the band (fixed)
    d_max: float = 6.0  # ceiling for d: at r = phi, one observation per 18 bytes
    budget: float = 0.25  # long-run observations per byte at most (1.0 = no limit)
    budget_obs_per_s: float | None = None  # alternatively, observations per second at most
    burst: float = 8192.0  # observations that may be spent above budget in one burst
    fast_bytes: float = 64.0  # time constant (bytes) of the fast average of surprise
    slow_bytes: float = 8192.0  # time constant (bytes) of the slow average and variance
    novel_z: float = 6.0  # surprise (standard errors) that sends d to its floor
    familiar_z: float = 2.0  # surprise below which d may rise
    progress_z: float = 2.0  # improvement (standard errors) that means "still learning": hold d
    rise_bytes: float = 2048.0  # bytes of familiar input per band of rise

    def __post_init__(self) -> None:
        if self.mode not in ("adaptive", "fixed"):
            raise ValueError(f"metabolism mode must be 'adaptive' or 'fixed', got {self.mode!r}")
        if not 0.0 <= self.d <= self.d_max:
            raise ValueError(f"d must be in [0, d_max={self.d_max}], got {self.d}")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be a share of bytes in (0, 1], got {self.budget}")
        if self.budget_obs_per_s is not None and self.budget_obs_per_s <= 0:
            raise ValueError(f"budget_obs_per_s must be > 0, got {self.budget_obs_per_s}")
        if self.fast_bytes <= 0 or self.slow_bytes <= self.fast_bytes:
            raise ValueError("need 0 < fast_bytes < slow_bytes")


class Metabolism:
    """Decimation band controller and cost accounting for one stream."""

    def __init__(self, cfg: MetabolismConfig, base: float = (1 + math.sqrt(5)) / 2, n_bands: int = 24):
        self.cfg = cfg
        self.base = base
        self.n_bands = n_bands
        self.d = cfg.d
        self.phase = 0.0  # fraction of the way to the next observation
        self.tokens = cfg.burst
        self.fast = 0.0
        self.slow = 0.0
        self.slow_sq = 0.0
        self.warm = 0.0  # bytes seen, capped; debiases the averages during warm-up
        self.observations = 0
        self.bytes = 0
        self.byte_rate = 0.0  # bytes per second, when the caller passes elapsed time
        self.band_power = torch.zeros(n_bands, dtype=torch.float64)  # EMA of |g_k|^2 per observation
        self._weights = np.zeros((2, 0))  # EMA weights of the longest chunk so far (_ema_weights)

    # ------------------------------------------------------------------ planning

    @property
    def stride(self) -> float:
        return self.base**self.d

    @property
    def cost_per_byte(self) -> float:
        """E(d) / N = r^-d: observations per byte at the current band."""
        return self.base ** (-self.d)

    def gamma(self) -> torch.Tensor:
        """gamma_obs(k, d) for k = 1..K (float64)."""
        return band_confidence(self.base, self.n_bands, self.d)

    def observation_mask(self, n: int) -> torch.Tensor:
        """Which of the next n bytes are observations at stride r^d (advances the phase)."""
        return torch.from_numpy(self._crossings(n))

    def observation_positions(self, n: int) -> torch.Tensor:
        """Positions (o,) int64 of the observations among the next n bytes (``observation_mask``'s
        True entries; advances the phase the same way)."""
        return torch.tensor(self.observation_list(n), dtype=torch.long)

    def observation_list(self, n: int, offset: int = 0) -> list[int]:
        """``observation_positions`` as a list, each plus ``offset``.

        Found one observation at a time, in plain Python: at a stride above a few bytes that
        is a handful of steps where ``_crossings`` runs numpy over every byte (and each numpy
        or torch call costs tens of microseconds between the kernel's large passes). Each
        candidate is judged by the same arithmetic as ``_crossings``, so both agree exactly."""
        step = 1.0 / self.stride
        if step > 0.25:  # dense: most bytes observed
            return (np.flatnonzero(self._crossings(n)) + offset).tolist()
        phase = self.phase

        def crossed(t: int) -> bool:
            cum = phase + step * (t + 1)
            return math.floor(cum) > math.floor(cum - step)

        positions, k, last = [], 1, -1  # the phase is in [0, 1): whole number k is crossed at byte ~ (k - phase) / step - 1
        while True:
            guess = math.ceil((k - phase) / step) - 1
            t = next((c for c in (guess - 1, guess, guess + 1) if c > last and crossed(c)), None)
            if t is None:  # rounding put the crossing further off: the exact scan
                return (np.flatnonzero(self._crossings(n)) + offset).tolist()
            if t >= n:
                break
            positions.append(t + offset)
            last, k = t, k + 1
        cum = phase + step * n
        self.phase = float(cum - math.floor(cum)) if n else phase
        return positions

    def _crossings(self, n: int) -> np.ndarray:
        """(n,) bool: the bytes where the phase crosses a whole number (advances it). numpy,
        not torch: this runs for every chunk, and at this size a torch op costs more than its work."""
        step = 1.0 / self.stride
        cum = self.phase + step * np.arange(1, n + 1, dtype=np.float64)
        crossed = np.floor(cum) > np.floor(cum - step)
        self.phase = float(cum[-1] - math.floor(cum[-1])) if n else self.phase
        return crossed

    def bytes_per_observation_batch(self, batch: int, cap: int) -> int:
        """Chunk length holding about ``batch`` observations at the current stride, <= cap."""
        return max(1, min(cap, int(math.ceil(batch * self.stride))))

    # ------------------------------------------------------------------ feedback

    def after_chunk(self, bits: torch.Tensor, n_obs: int, band_power: np.ndarray | torch.Tensor | None = None, seconds: float = 0.0) -> None:
        """Account a scored chunk: its per-byte losses, observations made, gradient power."""
        n = bits.numel()
        if n == 0:
            return
        self.bytes += n
        self.observations += n_obs
        self._update_surprise(bits)
        if band_power is not None and n_obs:  # through numpy views of the tensors: torch ops cost more than the work at K values
            average = self.band_power.numpy()
            average *= 0.9
            average += np.asarray(band_power, dtype=np.float64) * (0.1 / n_obs)
        self._spend(n, n_obs, seconds)
        if self.cfg.mode == "adaptive":
            self._adapt(n)

    def _ema_weights(self, n: int) -> tuple[np.ndarray, tuple[float, float]]:
        """(2, n) weights and the two decays: the closed form of n EMA steps. The weights for n
        are the last n of those for any longer run, so one array is kept (grown to the longest
        chunk seen), not one per length."""
        a_fast, a_slow = 1.0 - 1.0 / self.cfg.fast_bytes, 1.0 - 1.0 / self.cfg.slow_bytes
        if self._weights.shape[1] < n:
            a = np.array([a_fast, a_slow])
            self._weights = (1.0 - a)[:, None] * a[:, None] ** np.arange(n - 1, -1, -1, dtype=np.float64)
        return self._weights[:, self._weights.shape[1] - n :], (a_fast**n, a_slow**n)

    def _update_surprise(self, bits: torch.Tensor) -> None:
        w, (decay_fast, decay_slow) = self._ema_weights(bits.numel())
        x = bits.numpy().astype(np.float64)  # numpy: three weighted sums a chunk, where torch's overhead would dominate
        # products and sums, not w @ x: numpy's BLAS runs a long dot product on threads that
        # then spin on the other core (measured: scoring at half speed, per CPU-second)
        fast, slow = (w * x).sum(axis=1)
        slow_sq = float((w[1] * x * x).sum())
        self.fast = decay_fast * self.fast + float(fast)
        self.slow = decay_slow * self.slow + float(slow)
        self.slow_sq = decay_slow * self.slow_sq + slow_sq
        self.warm = min(self.warm + bits.numel(), 10 * self.cfg.slow_bytes)

    def _debiased(self, value: float, tau: float) -> float:
        """EMA started at zero, corrected for the missing history (as Adam does)."""
        return value / (1.0 - (1.0 - 1.0 / tau) ** self.warm) if self.warm else 0.0

    def surprise(self) -> float:
        """z = (fast mean - slow mean) / standard error of the fast mean."""
        if self.warm < self.cfg.fast_bytes:
            return 0.0
        fast = self._debiased(self.fast, self.cfg.fast_bytes)
        slow = self._debiased(self.slow, self.cfg.slow_bytes)
        var = max(self._debiased(self.slow_sq, self.cfg.slow_bytes) - slow * slow, 0.0)
        return (fast - slow) / math.sqrt((var + 0.01) / (2.0 * self.cfg.fast_bytes))

    def _spend(self, n: int, n_obs: int, seconds: float) -> None:
        if seconds > 0:
            rate = n / seconds
            self.byte_rate = rate if self.byte_rate == 0 else 0.9 * self.byte_rate + 0.1 * rate
        income = self.cfg.budget_obs_per_s * seconds if self.cfg.budget_obs_per_s else self.cfg.budget * n
        self.tokens = min(self.cfg.burst, self.tokens + income) - n_obs

    def budget_share(self) -> float:
        """Observations per byte the budget allows in the long run."""
        if self.cfg.budget_obs_per_s is None:
            return self.cfg.budget
        return min(1.0, self.cfg.budget_obs_per_s / self.byte_rate) if self.byte_rate > 0 else 1.0

    def budget_floor(self) -> float:
        """Lowest d the budget allows now: 0 while tokens remain, else the budget's band."""
        share = self.budget_share()
        if self.tokens > 0 or share >= 1.0:
            return 0.0
        return min(self.cfg.d_max, math.log(1.0 / share, self.base))

    def _adapt(self, n: int) -> None:
        z = self.surprise()
        if z > self.cfg.novel_z:
            self.d = 0.0
        elif -self.cfg.progress_z < z < self.cfg.familiar_z:
            self.d = min(self.cfg.d_max, self.d + n / self.cfg.rise_bytes)
        self.d = max(self.d, self.budget_floor())

    # ------------------------------------------------------------------ reporting

    def information(self) -> float:
        """I(d) = sum_k gamma_obs(k, d) |g_k|^2 (from the recent observations)."""
        return float(self.gamma() @ self.band_power)

    def efficiency(self) -> float:
        """eta(d) = r^d I(d): useful information per unit of metabolic cost."""
        return self.stride * self.information()

    def stats(self) -> dict:
        return {
            "d": self.d,
            "stride": self.stride,
            "observations": self.observations,
            "bytes": self.bytes,
            "cost_per_byte": self.cost_per_byte,
            "information": self.information(),
            "efficiency": self.efficiency(),
            "surprise": self.surprise(),
            "tokens": self.tokens,
            "band_power": self.band_power.tolist(),
        }

    def state_dict(self) -> dict:
        keys = ("d", "phase", "tokens", "fast", "slow", "slow_sq", "warm", "observations", "bytes", "byte_rate")
        return {**{k: getattr(self, k) for k in keys}, "band_power": self.band_power.clone()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v.clone() if isinstance(v, torch.Tensor) else v)
