"""The learner's fast path: lag modes, gradient windows over several chunks, cached projections.

The reference is always the textbook model (tests/helpers.py) and autograd through it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from somad.learner import NATIVE_LEARN_CHUNK, LearnerConfig, SomaLearner
from somad.metabolism import MetabolismConfig
from somad.model import (
    V,
    ChunkKernels,
    SomaConfig,
    activate,
    carry_state,
    chunk_values,
    closed_form_traces,
    decays,
    feature_matrix,
    forward_chunk,
    forward_modes,
    gamma_obs,
    lag_kernel,
    lag_modes,
    preset,
    project_rows,
)
from tests.helpers import bits_of, naive_logits_batch, random_bytes, random_params, trace_banks


def windowed(d: float = 3.0, features: str = "bandpass", kernel: str = "torch", **lcfg) -> SomaLearner:
    """A learner whose chunks (16 bytes) hold fewer than ``batch`` (8) observations at stride r^d."""
    cfg = SomaConfig(n_bands=10, hidden_dim=16, features=features)
    opts = {"lr": 0.05, "batch": 8, "max_chunk": 16, "kernel": kernel, "metabolism": MetabolismConfig(mode="fixed", d=d), **lcfg}
    return SomaLearner(cfg, LearnerConfig(**opts), params=random_params(cfg))


@pytest.fixture(params=["torch", "native"])
def kernel(request) -> str:
    """Each forward path in turn: windows are kept apart on each (GradientWindow on torch,
    ObservationWindow and one C call per update on native)."""
    if request.param == "native":
        request.getfixturevalue("recurrence")  # skipped (or failed in CI) without a compiler
    return request.param


# --------------------------------------------------------------------------- lag modes


@pytest.mark.parametrize("name", ["tiny", "small", "seed"])
@pytest.mark.parametrize("n", [16, 64, 128])
def test_lag_modes_are_few_and_exact(name, n):
    cfg = preset(name)
    a, b = lag_modes(cfg, n)
    assert a.shape[1] == b.shape[0] <= min(14, cfg.n_bands)  # K = 46 for seed: the rank does not grow with K
    assert (a @ b - lag_kernel(cfg, n)).abs().max().item() < 1e-8


@pytest.mark.parametrize("features", ["traces", "bandpass"])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_forward_modes_equals_forward_chunk(features, n):
    cfg = SomaConfig(n_bands=16, hidden_dim=24, features=features)
    params = random_params(cfg, scale=0.3)
    kern = ChunkKernels(cfg, 64)
    traces = closed_form_traces(random_bytes(2000, seed=5, alphabet=90), decays(cfg))
    seen = traces.sum(1) > 0
    data = torch.tensor(list(random_bytes(n, seed=6, alphabet=120)))  # some values never seen
    carry = carry_state(cfg, params, traces, seen)
    uniq, onehot = chunk_values(data)
    lk = kern.at(n)
    projected = project_rows(lk, params.ucat.view(V, cfg.n_bands, -1)[uniq])
    _, logits = forward_modes(cfg, params, lk, carry, onehot, projected)
    reference = forward_chunk(cfg, params, kern, carry, data).logits
    assert (logits - reference).abs().max().item() < 1e-5
    assert reference.std().item() > 0.1


# --------------------------------------------------------------------------- windows over chunks


def _run_one_window(learner: SomaLearner, data: bytes) -> tuple[list[int], torch.Tensor]:
    """Feed chunks until one update happens; (bytes fed, observation mask) of that window."""
    updates, meta = learner.updates, copy.deepcopy(learner.metabolism)
    fed, observed, pos = [], [], 0
    while learner.updates == updates:
        n = learner.metabolism.bytes_per_observation_batch(learner.lcfg.batch, learner.lcfg.max_chunk)
        chunk = list(data[pos : pos + n])
        pos += n
        observed.append(meta.observation_mask(n))
        learner._step(torch.tensor(chunk), True)
        fed += chunk
    return fed, torch.cat(observed)


def assert_one_sgd_step(learner: SomaLearner, before, traces0: torch.Tensor, data: list[int], observed: torch.Tensor) -> None:
    """The learner's last update (from ``before``, trace bank ``traces0``) was -eta
    gamma_obs(k, d) times the gradient of the summed loss of the bytes ``observed`` in ``data``
    at the weights that scored them, with P exact after it and the band power reported."""
    cfg, d = learner.cfg, learner.metabolism.d
    ucat = before.ucat.double().requires_grad_()
    w = before.w.double().requires_grad_()
    b = before.b.double().requires_grad_()
    x = (trace_banks(traces0, data, decays(cfg)) @ feature_matrix(cfg)).reshape(len(data), -1)
    zc = x @ ucat
    logits = activate(cfg, zc[:, : cfg.hidden_dim]) @ w + b + zc[:, cfg.hidden_dim :]
    ce = -torch.log_softmax(logits, 1).gather(1, torch.tensor(data)[:, None]).squeeze(1)
    ce[observed].sum().backward()
    eta = learner.lcfg.lr
    grad_u = ucat.grad.view(V, cfg.n_bands, -1)
    expected = before.ucat.double().view(V, cfg.n_bands, -1) - eta * gamma_obs(cfg, d)[None, :, None] * grad_u
    got = learner.params.ucat.double().view(V, cfg.n_bands, -1)
    assert (got - expected).abs().max().item() < 1e-6
    assert (got - before.ucat.double().view(V, cfg.n_bands, -1)).abs().max().item() > 1e-3
    assert (learner.params.w.double() - (before.w.double() - eta * w.grad)).abs().max().item() < 1e-6
    assert (learner.params.b.double() - (before.b.double() - eta * b.grad)).abs().max().item() < 1e-6
    torch.testing.assert_close(learner.carry, carry_state(cfg, learner.params, learner.traces, learner.seen), rtol=1e-5, atol=1e-5)
    power = grad_u.pow(2).sum(dim=(0, 2))  # |g_k|^2 of the window, reported to the metabolism
    torch.testing.assert_close(learner._power, power, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("features", ["traces", "bandpass"])
def test_window_over_chunks_is_one_exact_sgd_step(features, kernel):
    """An update from observations spread over several chunks is -eta gamma_obs(k, d) times
    the gradient of their summed loss at the weights that scored them, and P stays exact."""
    d = 4.0  # stride 6.9: 8 observations span 4 chunks
    learner = windowed(d, features, kernel)
    learner.learn(random_bytes(300, seed=1, alphabet=12))
    learner.apply_pending()
    before, traces0 = learner.params.clone(), learner.traces.clone()
    data, observed = _run_one_window(learner, random_bytes(400, seed=2, alphabet=12))
    assert len(data) >= 3 * learner.lcfg.max_chunk, "the window must span several chunks"
    assert int(observed.sum()) >= learner.lcfg.batch
    assert_one_sgd_step(learner, before, traces0, data, observed)


@pytest.mark.parametrize("features", ["traces", "bandpass"])
def test_native_learning_chunks_run_to_the_window_end(features, recurrence):
    """On the native kernel a window of window_bytes (here 7.5 max_chunks) is scored as one
    chunk by ``learn`` and applied as one exact SGD step."""
    learner = windowed(4.5, features, "native", batch=16, window_bytes=120)  # 120 bytes: 13-14 observations
    learner.learn(random_bytes(300, seed=1, alphabet=12))
    learner.apply_pending()
    assert learner._learn_chunk_length() == 120 > learner.lcfg.max_chunk
    before, traces0, updates = learner.params.clone(), learner.traces.clone(), learner.updates
    observed = copy.deepcopy(learner.metabolism).observation_mask(120)
    data = list(random_bytes(120, seed=2, alphabet=12))
    learner.learn(bytes(data))
    assert learner.updates == updates + 1 and not learner.window.open
    assert_one_sgd_step(learner, before, traces0, data, observed)


def test_native_window_buffers_are_sized_by_the_longest_window(recurrence):
    """window_bytes far above what batch observations span: buffers for batch r^d_max bytes
    plus a chunk, not for window_bytes, and learning goes on within them."""
    learner = windowed(6.0, kernel="native", batch=8, window_bytes=10**6, metabolism=MetabolismConfig(mode="fixed", d=6.0, d_max=6.0))
    window = learner.window
    assert window.capacity == math.ceil(9 * learner.metabolism.base**6.0) + 2 * NATIVE_LEARN_CHUNK
    assert window.max_observations == 8 + NATIVE_LEARN_CHUNK
    learner.learn(random_bytes(5000, seed=3, alphabet=20))
    assert learner.updates >= 5000 // NATIVE_LEARN_CHUNK


def test_windowed_learning_matches_naive_forward(kernel):
    """Every byte's loss, over many windows, equals the textbook model's with the weights of that moment."""
    learner = windowed(4.0, kernel=kernel, batch=6)
    cfg, alpha = learner.cfg, decays(learner.cfg)
    data = random_bytes(3000, seed=3, alphabet=10)
    traces = torch.zeros(V, cfg.n_bands, dtype=torch.float64)
    pos, worst = 0, 0.0
    while pos < len(data):
        n = learner.metabolism.bytes_per_observation_batch(learner.lcfg.batch, learner.lcfg.max_chunk)
        chunk = list(data[pos : pos + n])
        ref = bits_of(naive_logits_batch(cfg, learner.params, trace_banks(traces, chunk, alpha)), chunk)
        worst = max(worst, (learner._step(torch.tensor(chunk), True).double() - ref).abs().max().item())
        pos += n
    assert worst < 1e-4
    assert learner.updates > 20
    torch.testing.assert_close(learner.traces, closed_form_traces(data, alpha), rtol=1e-10, atol=1e-13)


def test_window_bytes_bounds_how_long_learning_waits(kernel):
    late = windowed(6.0, kernel=kernel, batch=8, window_bytes=10**6)
    soon = windowed(6.0, kernel=kernel, batch=8, window_bytes=32)
    data = random_bytes(960, seed=4, alphabet=8)
    for i in range(0, len(data), 16):  # one chunk per call
        late.learn(data[i : i + 16])
        soon.learn(data[i : i + 16])
        assert soon.window.bytes < 32  # a window is applied once it spans two chunks
    assert late.updates > 0
    assert soon.updates > 3 * late.updates  # 8 observations take ~140 bytes at stride 18


def test_window_closes_when_eta_scale_changes(kernel):
    learner = windowed(6.0, kernel=kernel, window_bytes=10**6)  # observations at bytes 18, 36, 54, ...
    learner.learn(random_bytes(32, seed=5, alphabet=8))
    assert learner.window.open and learner.updates == 0
    learner.eta_scale = 0.5
    learner.learn(random_bytes(16, seed=6, alphabet=8))
    assert learner.updates == 1  # the first window was applied with its own eta_scale
    assert learner.window.open and learner.window.eta_scale == 0.5


def test_window_closes_when_its_slots_are_full():
    learner = windowed(6.0, window_bytes=10**6)  # torch path: 16 slots
    learner.learn(bytes([1, 2, 3, 4] * 8))
    assert learner.window.open and learner.window.used == 4
    learner.learn(bytes(range(100, 116)))  # 16 new values: no room
    assert learner.updates == 1 and learner.window.used == 16


def test_score_and_state_dict_apply_pending_observations(kernel):
    learner = windowed(6.0, kernel=kernel)
    learner.learn(random_bytes(48, seed=7, alphabet=8))
    assert learner.window.open and learner.window.observations > 0
    twin = copy.deepcopy(learner)
    state = learner.state_dict()
    assert not learner.window.open and learner.updates == 1
    twin.score(b"x")
    assert not twin.window.open and twin.updates == 1
    torch.testing.assert_close(twin.params.ucat, learner.params.ucat, rtol=0, atol=0)
    resumed = windowed(6.0, kernel=kernel)
    resumed.load_state_dict(state)
    tail = random_bytes(200, seed=8, alphabet=8)
    assert torch.equal(resumed.learn(tail), learner.learn(tail))


# --------------------------------------------------------------------------- cached projections


def test_projection_cache_follows_weights_changed_from_outside():
    cfg = SomaConfig(n_bands=10, hidden_dim=16)
    learner = SomaLearner(cfg, params=random_params(cfg, scale=0.3))
    head, tail = random_bytes(500, seed=9, alphabet=30), random_bytes(200, seed=10, alphabet=30)
    learner.score(head)
    with torch.no_grad():
        learner.params.ucat.mul_(1.5)  # in place, behind the learner's back
    learner.sync_carry()
    got = learner.score(tail)
    ref = bits_of(naive_logits_batch(cfg, learner.params, trace_banks(closed_form_traces(head, decays(cfg)), list(tail), decays(cfg))), list(tail))
    assert (got.double() - ref).abs().max().item() < 1e-4


def test_projection_cache_of_a_deep_copy_is_its_own():
    cfg = SomaConfig(n_bands=10, hidden_dim=16)
    learner = SomaLearner(cfg, LearnerConfig(metabolism=MetabolismConfig(mode="fixed", d=0.0)), params=random_params(cfg))
    learner.learn(random_bytes(64, seed=11, alphabet=20))
    copied = copy.deepcopy(learner)
    copied.params.ucat.add_(0.01)
    copied.sync_carry()
    data = random_bytes(64, seed=12, alphabet=20)
    ref = bits_of(naive_logits_batch(cfg, copied.params, trace_banks(copied.traces.clone(), list(data), decays(cfg))), list(data))
    assert (copied.score(data).double() - ref).abs().max().item() < 1e-4
