"""somad.model: trace bank, observation weights, chunked forward, hand gradients, presets."""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch

import somad.model
from somad.model import (
    PHI,
    PRESETS,
    V,
    ChunkKernels,
    SomaConfig,
    SomaParams,
    activate,
    backward_chunk,
    bits_per_byte,
    carry_state,
    closed_form_traces,
    decays,
    expand_carry_grad,
    feature_matrix,
    forward_chunk,
    gamma_obs,
    naive_logits,
    preset,
    stride,
    update_traces,
)
from tests.helpers import bits_of, naive_logits_batch, random_bytes, random_params, repetitive_bytes, trace_banks

BASES = [PHI, 2.0]
STREAMS = {
    "random": random_bytes(3000, seed=0),
    "repetitive": repetitive_bytes(3000),
    "few-values": random_bytes(3000, seed=1, alphabet=3),
}

# --------------------------------------------------------------------------- 1. trace bank


@pytest.mark.parametrize("base", BASES)
def test_decays_are_one_minus_inverse_powers(base):
    cfg = SomaConfig(n_bands=12, hidden_dim=16, base=base)
    expected = torch.tensor([1.0 - base ** (-k) for k in range(1, 13)], dtype=torch.float64)
    assert decays(cfg).dtype == torch.float64
    torch.testing.assert_close(decays(cfg), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("stream", sorted(STREAMS))
def test_closed_form_equals_recurrence(base, stream):
    data = STREAMS[stream]
    alpha = decays(SomaConfig(n_bands=16, hidden_dim=16, base=base))
    recurrent = update_traces(torch.zeros(V, 16, dtype=torch.float64), data, alpha)
    torch.testing.assert_close(closed_form_traces(data, alpha), recurrent, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("n", [0, 1, 7, 3000])
def test_each_band_sums_to_one_minus_alpha_power(base, n):
    data = STREAMS["random"][:n]
    alpha = decays(SomaConfig(n_bands=16, hidden_dim=16, base=base))
    expected = 1.0 - alpha**n
    torch.testing.assert_close(closed_form_traces(data, alpha).sum(0), expected, rtol=0, atol=1e-12)
    recurrent = update_traces(torch.zeros(V, 16, dtype=torch.float64), data, alpha)
    torch.testing.assert_close(recurrent.sum(0), expected, rtol=0, atol=1e-12)


def test_closed_form_only_fills_rows_of_bytes_seen():
    data = b"abcabcxyz"
    traces = closed_form_traces(data, decays(SomaConfig(n_bands=8, hidden_dim=16)))
    nonzero = set(torch.nonzero(traces.sum(1)).squeeze(1).tolist())
    assert nonzero == set(data)
    # the most recent byte carries the largest weight in the fastest band
    assert int(traces[:, 0].argmax()) == ord("z")


@pytest.mark.parametrize(
    "features, expected",
    [
        ("traces", [[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
        # features = T @ M: B_1 = T_1 - T_2, B_2 = T_2 - T_3, B_3 = T_3
        ("bandpass", [[1, 0, 0], [-1, 1, 0], [0, -1, 1]]),
    ],
)
def test_feature_matrix(features, expected):
    m = feature_matrix(SomaConfig(n_bands=3, hidden_dim=4, features=features))
    torch.testing.assert_close(m, torch.tensor(expected, dtype=torch.float64))
    t = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    if features == "bandpass":
        torch.testing.assert_close(t @ m, torch.tensor([[0.2, 0.1, 0.2]], dtype=torch.float64))


# --------------------------------------------------------------------------- 2. observation weights


def _gamma_ref(base: float, k_max: int, d: float) -> torch.Tensor:
    return torch.tensor([min(1.0, base ** (k - d)) for k in range(1, k_max + 1)], dtype=torch.float64)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("d", [0.0, 0.5, 1.0, 2.5, PHI, 7.25, 12.0])
def test_gamma_obs_is_min_one_power(base, d):
    cfg = SomaConfig(n_bands=12, hidden_dim=16, base=base)
    g = gamma_obs(cfg, d)
    torch.testing.assert_close(g, _gamma_ref(base, 12, d), rtol=1e-12, atol=0)
    assert bool((g[1:] >= g[:-1]).all()), "gamma_obs must be non-decreasing in k"
    assert bool((g <= 1.0).all()) and bool((g > 0).all())
    # bands at or above d are fully trusted, bands below are strictly discounted
    k = torch.arange(1, 13, dtype=torch.float64)
    assert bool((g[k >= d] == 1.0).all())
    assert bool((g[k < d] < 1.0).all())


@pytest.mark.parametrize("base", BASES)
def test_gamma_obs_at_zero_is_all_ones(base):
    assert bool((gamma_obs(SomaConfig(n_bands=16, hidden_dim=16, base=base), 0.0) == 1.0).all())


def test_gamma_obs_fractional_value():
    cfg = SomaConfig(n_bands=4, hidden_dim=8, base=2.0)
    torch.testing.assert_close(gamma_obs(cfg, 2.5), torch.tensor([2**-1.5, 2**-0.5, 1.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("d", [0.0, 0.5, 1.0, 2.880, 10.0])
def test_stride_is_power_of_base(base, d):
    assert stride(SomaConfig(n_bands=8, hidden_dim=8, base=base), d) == pytest.approx(base**d, rel=1e-14)


# --------------------------------------------------------------------------- chunked forward (no learning)


def _naive_reference(cfg, params, traces0, data):
    banks = trace_banks(traces0.clone(), list(data), decays(cfg))
    return naive_logits_batch(cfg, params, banks)


@pytest.mark.parametrize("features", ["traces", "bandpass"])
@pytest.mark.parametrize("direct_readout", [True, False])
def test_batched_reference_matches_naive_logits(features, direct_readout):
    """The vectorised reference used by the tests is model.naive_logits, bank by bank."""
    cfg = SomaConfig(n_bands=10, hidden_dim=16, features=features, direct_readout=direct_readout)
    params = random_params(cfg)
    traces = closed_form_traces(random_bytes(300, seed=3, alphabet=40), decays(cfg))
    data = list(random_bytes(6, seed=4, alphabet=50))
    banks = trace_banks(traces.clone(), data, decays(cfg))
    batch = naive_logits_batch(cfg, params, banks)
    for i in range(len(data)):
        torch.testing.assert_close(batch[i], naive_logits(cfg, params, banks[i]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("features", ["traces", "bandpass"])
@pytest.mark.parametrize("direct_readout", [True, False])
@pytest.mark.parametrize("n", [1, 5, 32])
def test_forward_chunk_equals_naive(features, direct_readout, n):
    cfg = SomaConfig(n_bands=12, hidden_dim=24, features=features, direct_readout=direct_readout)
    params = random_params(cfg)
    kern = ChunkKernels(cfg, 32)
    traces = closed_form_traces(random_bytes(1000, seed=5, alphabet=80), decays(cfg))
    seen = traces.sum(1) > 0
    data = random_bytes(n, seed=6, alphabet=100)  # includes byte values never seen before
    cache = forward_chunk(cfg, params, kern, carry_state(cfg, params, traces, seen), torch.tensor(list(data)))
    ref = _naive_reference(cfg, params, traces, data)
    assert cache.logits.shape == (n, V)
    assert (cache.logits - ref).abs().max().item() < 1e-5


def test_bits_per_byte_matches_cross_entropy():
    logits = torch.randn(20, V) * 3
    targets = torch.randint(0, V, (20,))
    bits, probs = bits_per_byte(logits, targets)
    torch.testing.assert_close(bits.double(), bits_of(logits, targets), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs.sum(1), torch.ones(20))
    assert bits_per_byte(torch.zeros(1, V), torch.tensor([7]))[0].item() == pytest.approx(8.0, abs=1e-5)


# --------------------------------------------------------------------------- 4. hand gradients


def _autograd_grads(cfg, params, traces0, data, observed):
    """Gradients of sum over observed t of CE (nats), through the naive forward, in float64."""
    ucat = params.ucat.double().requires_grad_()
    w = params.w.double().requires_grad_()
    b = params.b.double().requires_grad_()
    banks = trace_banks(traces0.clone(), data, decays(cfg))
    x = (banks @ feature_matrix(cfg)).reshape(len(data), -1)
    zc = x @ ucat
    logits = activate(cfg, zc[:, : cfg.hidden_dim]) @ w + b
    if cfg.direct_readout:
        logits = logits + zc[:, cfg.hidden_dim :]
    ce = -torch.log_softmax(logits, dim=1).gather(1, torch.tensor(data)[:, None]).squeeze(1)
    ce[observed].sum().backward()
    return ucat.grad.view(V, cfg.n_bands, -1), w.grad, b.grad


@pytest.mark.parametrize("features", ["traces", "bandpass"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("direct_readout", [True, False])
@pytest.mark.parametrize("mask", ["random", "all"])
def test_hand_gradients_match_autograd(features, activation, direct_readout, mask):
    cfg = SomaConfig(n_bands=10, hidden_dim=16, features=features, activation=activation, direct_readout=direct_readout)
    params = random_params(cfg)
    n = 32
    kern = ChunkKernels(cfg, n)
    traces0 = closed_form_traces(random_bytes(500, seed=1, alphabet=60), decays(cfg))
    seen = traces0.sum(1) > 0
    data = list(random_bytes(n, seed=2, alphabet=70))  # some values new to the bank
    cache = forward_chunk(cfg, params, kern, carry_state(cfg, params, traces0, seen), torch.tensor(data))
    _, probs = bits_per_byte(cache.logits, cache.data)
    gen = torch.Generator().manual_seed(3)
    observed = torch.rand(n, generator=gen) < 0.5 if mask == "random" else torch.ones(n, dtype=torch.bool)
    assert 0 < int(observed.sum()) <= n
    g = backward_chunk(cfg, params, cache, probs, observed if mask == "random" else None)

    ref_u, ref_w, ref_b = _autograd_grads(cfg, params, traces0, data, observed)

    seen_after = seen.clone()
    seen_after[torch.tensor(data)] = True
    sidx = seen_after.nonzero().squeeze(1)
    full = expand_carry_grad(cfg, traces0[sidx], g.carry_bands)
    full.index_add_(0, torch.searchsorted(sidx, cache.uniq), g.local_rows)

    tol = 1e-5
    assert (full.double() - ref_u[sidx]).abs().max().item() < tol
    assert ref_u[~seen_after].abs().max().item() == 0.0, "rows of unseen byte values get no gradient"
    assert (g.w.double() - ref_w).abs().max().item() < tol
    assert (g.b.double() - ref_b).abs().max().item() < tol
    assert ref_u[sidx].abs().max().item() > 1e-2, "reference gradient is degenerate"


# --------------------------------------------------------------------------- 11. presets


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_configs_are_valid(name):
    cfg = preset(name)
    assert isinstance(cfg, SomaConfig)
    assert SomaConfig.from_dict(cfg.to_dict()) == cfg  # re-runs validation
    assert cfg.out_dim == cfg.hidden_dim + (V if cfg.direct_readout else 0)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_n_params_counts_parameter_tensors(name):
    cfg = preset(name)
    p = SomaParams.init(cfg)
    assert cfg.n_params() == p.ucat.numel() + p.w.numel() + p.b.numel()
    assert p.ucat.shape == (V * cfg.n_bands, cfg.out_dim)
    assert p.w.shape == (cfg.hidden_dim, V) and p.b.shape == (V,)


@pytest.mark.parametrize("direct_readout", [True, False])
def test_n_params_without_direct_readout(direct_readout):
    cfg = preset("tiny", direct_readout=direct_readout)
    p = SomaParams.init(cfg)
    assert cfg.n_params() == p.ucat.numel() + p.w.numel() + p.b.numel()


def test_seed_preset_is_the_papers_model():
    cfg = preset("seed")  # not instantiated: ~100 M parameters
    assert (cfg.n_bands, cfg.hidden_dim) == (46, 8192)
    assert cfg.base == pytest.approx(PHI)
    assert 95e6 < cfg.n_params() < 105e6


def _documented_sizes() -> dict[str, float]:
    """The "~N M parameters" comments next to the PRESETS entries in somad/model.py."""
    src = inspect.getsource(somad.model)
    return {m[1]: float(m[2]) * 1e6 for m in re.finditer(r'"(\w+)": SomaConfig\(.*#.*~([\d.]+) M parameters', src)}


@pytest.mark.parametrize(
    "name",
    [
        "tiny",
        "small",
        "base",
        "seed",
    ],
)
def test_preset_sizes_match_their_comments(name):
    documented = _documented_sizes()
    if name not in documented:
        pytest.skip(f"no size documented for preset {name!r}")
    assert preset(name).n_params() == pytest.approx(documented[name], rel=0.1)


def test_preset_overrides_and_unknown_name():
    assert preset("small", hidden_dim=64).hidden_dim == 64
    assert preset("small", hidden_dim=64).n_bands == PRESETS["small"].n_bands
    with pytest.raises(ValueError):
        preset("huge")
    with pytest.raises(ValueError):
        preset("tiny", n_bands=0)


# --------------------------------------------------------------------------- 12. validation


@pytest.mark.parametrize(
    "bad",
    [
        {"n_bands": 0},
        {"n_bands": 65},
        {"hidden_dim": 0},
        {"base": 1.0},
        {"base": 0.5},
        {"base": 17.0},
        {"features": "x"},
        {"activation": "x"},
    ],
)
def test_soma_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        SomaConfig(**bad)


def test_soma_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError):
        SomaConfig.from_dict({"n_bands": 8, "bogus": 1})


def test_params_init_is_deterministic_per_seed():
    cfg = SomaConfig(n_bands=8, hidden_dim=16, seed=7)
    a, b = SomaParams.init(cfg), SomaParams.init(cfg)
    assert torch.equal(a.ucat, b.ucat) and torch.equal(a.w, b.w)
    c = SomaParams.init(SomaConfig(n_bands=8, hidden_dim=16, seed=8))
    assert not torch.equal(a.ucat, c.ucat)
    assert math.isclose(float(a.ucat[:, :16].std()), 1.0 / math.sqrt(8), rel_tol=0.05)
