"""somad.metabolism: observation schedule, adaptation to surprise, energy budget."""

from __future__ import annotations

import math

import pytest
import torch

from somad.learner import LearnerConfig, SomaLearner
from somad.metabolism import Metabolism, MetabolismConfig
from somad.model import PHI, SomaConfig, gamma_obs
from tests.helpers import random_bytes, repetitive_bytes

BASES = [PHI, 2.0]
DS = [0.0, 0.5, 1.0, PHI, 2.5, math.log(4.0, PHI), 4.2, 7.0, 10.0]
LENGTHS = [1, 7, 64, 3, 500, 13, 0, 1000, 2, 411, 64, 64, 5]  # uneven calls, 2134 bytes in all


def fixed(d: float, base: float = PHI, n_bands: int = 12) -> Metabolism:
    return Metabolism(MetabolismConfig(mode="fixed", d=d, d_max=10.0), base, n_bands)


# --------------------------------------------------------------------------- 2. stride and observations


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("d", DS)
def test_stride_cost_and_gamma(base, d):
    m = fixed(d, base)
    assert m.stride == pytest.approx(base**d, rel=1e-12)
    assert m.cost_per_byte == pytest.approx(base**-d, rel=1e-12)
    torch.testing.assert_close(m.gamma(), gamma_obs(SomaConfig(n_bands=12, hidden_dim=8, base=base), d))


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("d", DS)
def test_observation_count_is_n_over_stride(base, d):
    """N bytes give N r^-d observations (within one), the phase carried across uneven calls."""
    m = fixed(d, base)
    total_bytes = total_obs = 0
    for n in LENGTHS:
        mask = m.observation_mask(n)
        assert mask.shape == (n,) and mask.dtype == torch.bool
        total_bytes += n
        total_obs += int(mask.sum())
        assert abs(total_obs - total_bytes * base**-d) <= 1.0, (total_bytes, total_obs)


@pytest.mark.parametrize("d", [0.5, PHI, 4.2, 10.0])
def test_observations_are_evenly_spaced(d):
    m = fixed(d)
    masks = [m.observation_mask(n) for n in LENGTHS]
    where = torch.cat(masks).nonzero().squeeze(1)
    gaps = set((where[1:] - where[:-1]).tolist())
    s = PHI**d
    assert gaps <= {math.floor(s), math.ceil(s)}, gaps


def test_every_byte_observed_at_band_zero():
    m = fixed(0.0)
    for n in LENGTHS:
        assert bool(m.observation_mask(n).all())


def test_observation_mask_does_not_depend_on_call_lengths():
    """Splitting a stream differently gives the same observations (stride 4, exact in binary)."""
    whole = fixed(2.0, base=2.0).observation_mask(sum(LENGTHS))
    m = fixed(2.0, base=2.0)
    split = torch.cat([m.observation_mask(n) for n in LENGTHS])
    assert torch.equal(whole, split)
    assert int(whole.sum()) == sum(LENGTHS) // 4


@pytest.mark.parametrize("d, expected", [(0.0, 16), (1.0, 26), (3.0, 64), (10.0, 64)])
def test_chunk_length_holds_a_batch_of_observations(d, expected):
    assert fixed(d).bytes_per_observation_batch(16, 64) == expected


# --------------------------------------------------------------------------- metabolism alone


def _feed(m: Metabolism, bits: torch.Tensor, chunk: int = 64) -> list[float]:
    """Drive the metabolism as the learner does; returns d after each chunk."""
    ds = []
    for i in range(0, bits.numel(), chunk):
        piece = bits[i : i + chunk]
        m.after_chunk(piece, int(m.observation_mask(piece.numel()).sum()))
        ds.append(m.d)
    return ds


def test_fixed_mode_never_moves():
    m = fixed(PHI)
    ds = _feed(m, torch.cat([torch.full((20000,), 0.1), torch.full((2000,), 8.0)]))
    assert set(ds) == {PHI}


def test_d_rises_on_stationary_loss_and_falls_on_a_jump():
    gen = torch.Generator().manual_seed(0)
    m = Metabolism(MetabolismConfig(mode="adaptive", budget=1.0, d_max=6.0, rise_bytes=512.0), PHI, 12)
    calm = 0.5 + 0.05 * torch.randn(40000, generator=gen)
    ds = _feed(m, calm)
    assert ds[-1] == pytest.approx(m.cfg.d_max)
    assert all(0.0 <= d <= m.cfg.d_max for d in ds)
    ds = _feed(m, torch.full((256,), 8.0), chunk=16)
    assert 0.0 in ds[:8], ds  # back to every byte within 128 bytes of the jump


# --------------------------------------------------------------------------- 7. adaptation, end to end


def test_metabolism_adapts_to_repetition_then_novelty():
    cfg = SomaConfig(n_bands=12, hidden_dim=16)
    learner = SomaLearner(cfg, LearnerConfig(metabolism=MetabolismConfig(mode="adaptive", budget=1.0)))
    d_max = learner.metabolism.cfg.d_max
    assert learner.metabolism.d == 0.0

    stream = repetitive_bytes(60_000)
    for i in range(0, len(stream), 1024):
        learner.learn(stream[i : i + 1024])
    assert learner.metabolism.d == pytest.approx(d_max), learner.stats()
    assert learner.stats()["d"] == learner.metabolism.d
    assert learner.stats()["observations"] < 0.5 * len(stream)  # rising d saved observations

    noise = random_bytes(2000, seed=42)
    back_to_zero_at = None
    for i in range(0, len(noise), 16):
        learner.learn(noise[i : i + 16])
        if learner.metabolism.d == 0.0:
            back_to_zero_at = i + 16
            break
    assert back_to_zero_at is not None and back_to_zero_at <= 500, learner.stats()


# --------------------------------------------------------------------------- 9. energy budget


NEVER_RISE = 1e12  # rise_bytes: d never rises by familiarity, so only the budget holds it up


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
def test_budget_bounds_long_run_share(budget):
    """Always-novel input: the token bucket alone keeps observations within budget * N + burst."""
    burst, n_bytes = 256.0, 100_000
    m = Metabolism(MetabolismConfig(budget=budget, burst=burst, rise_bytes=NEVER_RISE), PHI, 12)
    gen = torch.Generator().manual_seed(0)
    pos = 0
    while pos < n_bytes:
        n = min(m.bytes_per_observation_batch(16, 64), n_bytes - pos)
        m.after_chunk(torch.rand(n, generator=gen) * 16, int(m.observation_mask(n).sum()))
        pos += n
    assert m.bytes == n_bytes
    assert m.observations <= budget * n_bytes + burst + 64
    assert m.observations >= budget * n_bytes - 64  # the budget binds, and is spent
    assert m.d >= math.log(1 / budget, PHI) - 1e-9


def test_budget_on_random_bytes_with_a_learner():
    budget, burst, n_bytes = 0.25, 256.0, 100_000
    cfg = SomaConfig(n_bands=8, hidden_dim=16, direct_readout=False)
    metab = MetabolismConfig(mode="adaptive", budget=budget, burst=burst, rise_bytes=NEVER_RISE)
    learner = SomaLearner(cfg, LearnerConfig(metabolism=metab))
    data = random_bytes(n_bytes, seed=9)
    for i in range(0, n_bytes, 8192):
        learner.learn(data[i : i + 8192])
    stats = learner.stats()
    share = stats["observations"] / stats["bytes"]
    assert stats["bytes"] == n_bytes
    assert share <= budget + (burst + 64) / n_bytes, stats
    assert share >= budget - 0.01, stats  # novel input spends the whole budget


def test_no_budget_observes_everything_when_novel():
    m = Metabolism(MetabolismConfig(budget=1.0, burst=16.0, rise_bytes=NEVER_RISE), PHI, 12)
    _feed(m, torch.rand(20000) * 8, chunk=16)
    assert m.bytes == 20000
    assert m.observations >= m.bytes - 1  # d creeps up by 16 / rise_bytes per chunk: one may slip


def test_metabolism_config_validation():
    with pytest.raises(ValueError):
        MetabolismConfig(mode="sometimes")
    with pytest.raises(ValueError):
        MetabolismConfig(budget=0.0)
    with pytest.raises(ValueError):
        MetabolismConfig(budget=1.5)
    with pytest.raises(ValueError):
        MetabolismConfig(d=-1.0)
    with pytest.raises(ValueError):
        MetabolismConfig(d=11.0, d_max=10.0)
    with pytest.raises(ValueError):
        MetabolismConfig(fast_bytes=100.0, slow_bytes=50.0)
