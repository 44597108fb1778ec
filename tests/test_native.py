"""somad.native: the compiled per-byte recurrence against the textbook model and the torch path;
building, finding and refusing libraries."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from somad import native
from somad.learner import LearnerConfig, SomaLearner
from somad.metabolism import MetabolismConfig
from somad.model import V, SomaConfig, carry_state, decays, feature_matrix, preset
from tests.helpers import random_bytes, random_params, repetitive_bytes

REPO = Path(__file__).resolve().parents[1]


def reference_preactivations(cfg: SomaConfig, params, traces: torch.Tensor, data: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(zc (n, C), traces after) in float64, from the full trace bank before each byte: the
    textbook z = flatten(T M) @ Ucat, no carried state, no recurrence on P."""
    alpha, mix = decays(cfg), feature_matrix(cfg)
    ucat = params.ucat.double()
    traces = traces.clone()
    out = []
    for byte in data:
        out.append((traces @ mix).reshape(-1) @ ucat)
        traces.mul_(alpha)
        traces[byte] += 1.0 - alpha
    return torch.stack(out), traces


ARCHITECTURES = [
    SomaConfig(n_bands=12, hidden_dim=32),  # bandpass, direct readout: C = 288 (4.5 column blocks)
    SomaConfig(n_bands=7, hidden_dim=40, features="traces", direct_readout=False),  # C = 40 < one block
    SomaConfig(n_bands=1, hidden_dim=64, direct_readout=False),  # one band, exactly one block
    SomaConfig(n_bands=64, hidden_dim=8, direct_readout=False),  # the most bands the kernel holds
]


@pytest.mark.parametrize("cfg", ARCHITECTURES, ids=lambda c: f"K{c.n_bands}-H{c.hidden_dim}-{c.features}-{'Wd' if c.direct_readout else 'noWd'}")
@pytest.mark.parametrize("n", [1, 2, 37, 128])
def test_preactivations_and_carried_state_match_the_textbook_model(recurrence, cfg, n):
    params = random_params(cfg, scale=0.3)
    history = list(random_bytes(500, seed=2, alphabet=20))
    _, traces = reference_preactivations(cfg, params, torch.zeros(V, cfg.n_bands, dtype=torch.float64), history)
    seen = traces.abs().sum(1) > 0
    carry = carry_state(cfg, params, traces, seen)
    chunk = list(random_bytes(n, seed=n, alphabet=30))
    want, traces_after = reference_preactivations(cfg, params, traces, chunk)
    out = carry.clone()
    zc = recurrence.preactivations(torch.tensor(chunk), params.ucat, decays(cfg), carry, cfg.features == "bandpass", carry_out=out)
    assert zc.shape == (n, cfg.out_dim)
    assert (zc.double() - want).abs().max().item() < 1e-5
    exact_after = carry_state(cfg, params, traces_after, traces_after.abs().sum(1) > 0)
    assert (out - exact_after).abs().max().item() < 1e-5
    assert (out - carry).abs().max().item() > 1e-4  # it moved: a copy of the input would not pass
    again = recurrence.preactivations(torch.tensor(chunk), params.ucat, decays(cfg), carry, cfg.features == "bandpass", carry_out=carry)
    assert torch.equal(again, zc) and torch.equal(carry, out)  # carry_out may be the carry itself


def test_carried_state_does_not_drift_over_many_chunks(recurrence):
    """Slow bands decay by 1 - 1e-5 per byte, which float32 cannot hold: the state carried
    between chunks must still stay with the exact one (the kernel sums it in float64)."""
    cfg = preset("small")
    params = random_params(cfg, scale=0.3)
    data = repetitive_bytes(128 * 300, b"2014-07-01 00:00:00,10844\n")
    traces = torch.zeros(V, cfg.n_bands, dtype=torch.float64)
    carry = torch.zeros(cfg.n_bands, cfg.out_dim)
    alpha = decays(cfg)
    for i in range(0, len(data), 128):
        chunk = torch.tensor(list(data[i : i + 128]))
        recurrence.preactivations(chunk, params.ucat, alpha, carry, True, carry_out=carry)
        for byte in chunk.tolist():
            traces.mul_(alpha)
            traces[byte] += 1.0 - alpha
    exact = carry_state(cfg, params, traces, traces.abs().sum(1) > 0)
    assert (carry - exact).abs().max().item() < 2e-5 * max(1.0, exact.abs().max().item())


LEARNERS = [
    SomaConfig(n_bands=12, hidden_dim=32),  # tanh, bandpass, direct readout: C = 288
    # relu, raw traces, no direct readout, H > the C GEMM's inner block (256), C = 300 not a whole number of vectors
    SomaConfig(n_bands=5, hidden_dim=300, features="traces", activation="relu", direct_readout=False),
    SomaConfig(n_bands=6, hidden_dim=20),  # tanh over H not a whole number of vectors: C = 276
]


@pytest.mark.parametrize("cfg", LEARNERS, ids=["K12-H32-tanh", "K5-H300-relu-traces", "K6-H20-tanh"])
@pytest.mark.parametrize("metabolism", [MetabolismConfig(mode="fixed", d=0.0), MetabolismConfig()], ids=["d0", "adaptive"])
def test_learner_gives_the_same_losses_with_either_kernel(recurrence, metabolism, cfg):
    data = repetitive_bytes(4000, b"temp=21.5;hum=40\n") + random_bytes(2000, seed=9)
    runs = {}
    for kernel in ("torch", "native"):
        learner = SomaLearner(cfg, LearnerConfig(kernel=kernel, metabolism=metabolism))
        assert learner.kernel == kernel
        runs[kernel] = (learner.learn(data), learner)
    (bits_t, torch_learner), (bits_n, native_learner) = runs["torch"], runs["native"]
    assert (bits_t - bits_n).abs().max().item() < 1e-3
    assert torch_learner.updates == native_learner.updates > 0
    torch.testing.assert_close(native_learner.params.ucat, torch_learner.params.ucat, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(native_learner.carry, torch_learner.carry, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(native_learner.last_update_power, torch_learner.last_update_power, rtol=1e-3, atol=1e-9)
    assert float(native_learner.last_update_power.sum()) > 0
    # frozen learning (eta 0, an alert open): the update only measures gradient power
    for learner in (torch_learner, native_learner):
        learner.eta_scale = 0.0
        before = learner.params.clone()
        learner.learn(b"temp=99.9;hum=1\n" * 20)
        learner.apply_pending()
        assert torch.equal(learner.params.ucat, before.ucat) and torch.equal(learner.params.w, before.w)
    torch.testing.assert_close(native_learner.last_update_power, torch_learner.last_update_power, rtol=1e-3, atol=1e-9)


def test_kernel_choice_is_validated_and_torch_is_always_available():
    with pytest.raises(ValueError, match="kernel must be one of auto, native, torch"):
        LearnerConfig(kernel="cuda")
    assert SomaLearner(SomaConfig(n_bands=4, hidden_dim=8), LearnerConfig(kernel="torch")).kernel == "torch"


def test_bad_arguments_are_refused_not_read_out_of_bounds(recurrence):
    cfg = SomaConfig(n_bands=4, hidden_dim=8, direct_readout=False)
    params, alpha = random_params(cfg), decays(cfg)
    carry = torch.zeros(4, cfg.out_dim)
    with pytest.raises(ValueError, match="bad arguments"):
        recurrence.preactivations(torch.tensor([1, 256]), params.ucat, alpha, carry, True)
    with pytest.raises(ValueError, match="chunk must be contiguous torch.int64"):
        recurrence.preactivations(torch.tensor([1, 2], dtype=torch.int32), params.ucat, alpha, carry, True)
    with pytest.raises(ValueError, match="shapes do not agree"):
        recurrence.preactivations(torch.tensor([1, 2]), params.ucat[:100], alpha, carry, True)
    with pytest.raises(ValueError, match="carry must be contiguous"):
        recurrence.preactivations(torch.tensor([1, 2]), params.ucat, alpha, torch.zeros(cfg.out_dim, 4).t(), True)
    assert recurrence.preactivations(torch.tensor([], dtype=torch.long), params.ucat, alpha, carry, True).shape == (0, cfg.out_dim)


def test_bad_window_updates_are_refused_and_write_nothing(recurrence):
    cfg = SomaConfig(n_bands=4, hidden_dim=8, direct_readout=False)
    params, alpha = random_params(cfg), decays(cfg)
    carry = torch.zeros(4, cfg.out_dim)
    coef = torch.full((4,), -0.1)

    def update(seen, window, positions, hidden=None, coef=coef):
        mask = torch.zeros(V, dtype=torch.bool)
        mask[seen] = True
        positions = torch.tensor(positions, dtype=torch.long)
        bank = torch.rand(V, 4, dtype=torch.float64)
        hidden = torch.rand(positions.numel(), cfg.hidden_dim) if hidden is None else hidden
        logits = torch.randn(positions.numel(), V)
        window = torch.tensor(window, dtype=torch.uint8)
        return recurrence.window_update(mask, bank, bank, window, positions, hidden, logits, alpha, coef, 0.1, params.ucat, params.w, params.b, carry, True, "tanh", True)

    before = params.clone()
    for seen, window, positions in (
        ([1, 2], [1, 3], [1]),  # a window byte (3) never seen
        ([1, 2], [1, 2, 1], [2, 1]),  # positions not increasing
        ([1, 2], [1, 2, 1], [1, 1]),  # nor distinct
        ([1, 2], [1, 2], [2]),  # a position past the window
    ):
        with pytest.raises(ValueError, match="soma_window_update: bad arguments"):
            update(seen, window, positions)
    with pytest.raises(ValueError, match="soma_window_update: bad arguments"):
        update([1, 2], [1, 2], [0, 1], coef=torch.tensor([-0.1, 0.0, -0.1, -0.1]))  # a band without a step
    with pytest.raises(ValueError, match="hidden must be contiguous torch.float32"):
        update([1, 2], [1, 2], [0, 1], hidden=torch.rand(cfg.hidden_dim, 2).t())
    assert all(torch.equal(a, b) for a, b in ((params.ucat, before.ucat), (params.w, before.w), (params.b, before.b))) and not carry.any()
    power = update([1, 2, 7], [1, 2, 1], [0, 2])  # 7: seen before the window, moved along D only
    assert power.shape == (4,) and bool((power > 0).all())
    assert not torch.equal(params.ucat, before.ucat) and not torch.equal(params.w, before.w) and not torch.equal(params.b, before.b)
    assert not torch.equal(params.ucat.view(V, -1)[7], before.ucat.view(V, -1)[7]) and torch.equal(params.ucat.view(V, -1)[8], before.ucat.view(V, -1)[8])


# --------------------------------------------------------------------------- building and finding


def test_library_name_changes_with_the_cpu(monkeypatch):
    here = native.library_name()
    assert here.startswith("recurrence-") and here.endswith(".so")
    monkeypatch.setattr(native, "cpu_identity", lambda: "another cpu")
    assert native.library_name() != here  # -march=native code is never loaded on another CPU


def test_build_in_the_first_directory_that_takes_it(recurrence, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    kernel = native.find_or_build([blocked / "kernels", tmp_path / "cache"])
    assert kernel.path == tmp_path / "cache" / native.library_name()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [native.library_name()]  # no temporary left
    assert native.find_or_build([tmp_path / "cache"]).path == kernel.path  # found, not rebuilt


def test_a_corrupt_library_is_replaced(recurrence, tmp_path):
    (tmp_path / native.library_name()).write_bytes(b"\x7fELF truncated")
    kernel = native.find_or_build([tmp_path])
    cfg = SomaConfig(n_bands=3, hidden_dim=4, direct_readout=False)
    assert kernel.preactivations(torch.tensor([5, 6]), random_params(cfg).ucat, decays(cfg), torch.zeros(3, 4), True).shape == (2, 4)


def test_a_failing_compiler_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")
    with pytest.raises(native.KernelUnavailable, match="false failed"):
        native.find_or_build([tmp_path])
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(native.KernelUnavailable, match="no C compiler"):
        native.find_or_build([tmp_path])


def test_without_a_compiler_auto_falls_back_and_native_is_refused(tmp_path):
    """A process with no compiler and no library built: the learner runs the torch path and
    says why once; asking for "native" is an error naming the reason."""
    code = (
        "import json, logging, sys\n"
        "logging.basicConfig(stream=sys.stderr, level=logging.WARNING)\n"
        "from somad import native\n"
        "native.candidate_dirs = lambda: [native.Path(sys.argv[1])]\n"
        "from somad.learner import LearnerConfig, SomaLearner\n"
        "from somad.model import SomaConfig\n"
        "cfg = SomaConfig(n_bands=4, hidden_dim=8)\n"
        "learner = SomaLearner(cfg)\n"
        "bits = learner.learn(b'abc' * 100)\n"
        "try:\n"
        "    SomaLearner(cfg, LearnerConfig(kernel='native'))\n"
        "    refused = None\n"
        "except native.KernelUnavailable as err:\n"
        "    refused = str(err)\n"
        "print(json.dumps({'kernel': learner.kernel, 'bytes': len(bits), 'refused': refused}))\n"
    )
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc")}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "kernels")], capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {"kernel": "torch", "bytes": 300, "refused": result["refused"]}
    assert "no C compiler" in result["refused"]
    assert done.stderr.count("native kernel unavailable") == 1


def test_somad_kernel_torch_turns_it_off():
    code = "from somad.learner import SomaLearner; from somad.model import SomaConfig; print(SomaLearner(SomaConfig(n_bands=4, hidden_dim=8)).kernel)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "SOMAD_KERNEL": "torch"}, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch"


def test_build_command_for_installers(recurrence, tmp_path):
    done = subprocess.run([sys.executable, "-m", "somad.native", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == {"built": True, "path": str(tmp_path / native.library_name())}
    failed = subprocess.run([sys.executable, "-m", "somad.native", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "CC": "false"})
    assert failed.returncode == 1 and json.loads(failed.stdout)["built"] is False


def test_learners_with_the_kernel_copy_and_pickle(recurrence):
    import copy
    import pickle

    learner = SomaLearner(SomaConfig(n_bands=4, hidden_dim=8), LearnerConfig(kernel="native"))
    learner.learn(b"abc" * 50)
    twins = [copy.deepcopy(learner), pickle.loads(pickle.dumps(learner))]
    want = learner.learn(b"abcd" * 10)
    for twin in twins:
        assert twin.kernel == "native"
        assert torch.equal(twin.learn(b"abcd" * 10), want)


def test_a_new_build_removes_older_builds_for_this_cpu_only(recurrence, tmp_path):
    name = native.library_name()
    cpu = name.rsplit("-", 1)[0]
    older, foreign = tmp_path / f"{cpu}-000000000000.so", tmp_path / "recurrence-ffffffffffff-000000000000.so"
    older.write_bytes(b"old build")
    foreign.write_bytes(b"another cpu")
    native.build(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, foreign.name])


def test_writes_through_c_move_the_version_counters(recurrence):
    """Caches keyed on a tensor's version (the torch path's projected rows) must see the
    kernel's in-place writes as they see torch's own."""
    cfg = SomaConfig(n_bands=4, hidden_dim=8, direct_readout=False)
    learner = SomaLearner(cfg, LearnerConfig(kernel="native", metabolism=MetabolismConfig(mode="fixed", d=0.0)))
    before = learner.params.ucat._version
    learner.learn(b"abcabc" * 20)
    assert learner.updates > 0 and learner.params.ucat._version > before
    carry = torch.zeros(4, cfg.out_dim)
    version = carry._version
    recurrence.preactivations(torch.tensor([1, 2]), learner.params.ucat, decays(cfg), carry.clone(), True, carry_out=carry)
    assert carry._version > version


def test_a_chunk_cut_where_the_metabolism_moves_d_keeps_both_paths_in_step(recurrence, monkeypatch):
    """Native learning chunks span several metabolism pieces (max_chunk bytes each); when a piece
    moves d while the window holds observations, the chunk ends there and the rest is scored
    again with the updated weights. The torch path judges the same pieces as chunks of its own:
    both make the same updates at the same places."""
    cfg = SomaConfig(n_bands=12, hidden_dim=32)
    metabolism = MetabolismConfig(rise_bytes=256.0, progress_z=1e9)  # familiar input lifts d a band per 256 bytes
    # (the surprise has a small alphabet: the torch path closes a window early when its 32 value slots overflow)
    data = repetitive_bytes(6000, b"temp=21.5;hum=40\n") + random_bytes(700, seed=3, alphabet=12) + repetitive_bytes(3000, b"temp=21.5;hum=40\n")
    taken = []
    observe = SomaLearner._observe_pieces
    monkeypatch.setattr(SomaLearner, "_observe_pieces", lambda self, chunk, *a: taken.append((observe(self, chunk, *a), chunk.numel())) or taken[-1][0])
    runs = {}
    for kernel in ("torch", "native"):
        learner = SomaLearner(cfg, LearnerConfig(kernel=kernel, batch=8, max_chunk=32, window_bytes=96, metabolism=metabolism))
        runs[kernel] = (learner.learn(data), learner)
    (bits_t, torch_learner), (bits_n, native_learner) = runs["torch"], runs["native"]
    assert any(got < n for got, n in taken), "no chunk was cut: the test does not reach the case"
    assert any(n > 32 for _, n in taken), "no native chunk spanned several pieces"
    assert torch_learner.updates == native_learner.updates > 0
    assert torch_learner.metabolism.observations == native_learner.metabolism.observations
    assert (bits_t - bits_n).abs().max().item() < 1e-3


@pytest.mark.parametrize("scale", [0.3, 30.0])
def test_losses_and_entropy_match_torch_also_for_extreme_logits(recurrence, scale):
    """The kernel's own exp and log-sum-exp against torch's log_softmax, with logits of a few
    units and of hundreds (the exponent clamp, the max shift)."""
    cfg = SomaConfig(n_bands=8, hidden_dim=16)
    params = random_params(cfg, scale=scale)
    data = random_bytes(700, seed=4, alphabet=40)
    out = {}
    for kernel in ("torch", "native"):
        learner = SomaLearner(cfg, LearnerConfig(kernel=kernel), params=params.clone())
        out[kernel] = learner.score_with_entropy(data)
    (bits_t, ent_t), (bits_n, ent_n) = out["torch"], out["native"]
    assert bool(torch.isfinite(bits_n).all()) and float(bits_n.max()) > (50.0 if scale > 1 else 1.0)
    torch.testing.assert_close(bits_n, bits_t, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ent_n, ent_t, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("where", ["b", "w", "u", "wd"])
def test_a_nan_weight_is_a_numerical_fault(recurrence, activation, where):
    """A NaN anywhere in the weights must reach the loss check: the kernel's clamps (exp, tanh)
    and relu keep NaN NaN."""
    from somad.learner import NumericalFault

    cfg = SomaConfig(n_bands=4, hidden_dim=8, activation=activation)
    learner = SomaLearner(cfg, LearnerConfig(kernel="native"))
    learner.learn(b"abc" * 20)
    params = learner.params
    with torch.no_grad():
        if where == "b":
            params.b[5] = float("nan")
        elif where == "w":
            params.w[3, 7] = float("nan")
        else:  # a row of U (hidden columns) or of Wd (direct columns) of a byte that comes next
            params.ucat.view(V, cfg.n_bands, -1)[ord("a"), 1, 2 if where == "u" else cfg.hidden_dim + 2] = float("nan")
    learner.sync_carry()
    with pytest.raises(NumericalFault, match="non-finite"):
        learner.learn(b"abc")


@pytest.mark.parametrize("metabolism", [MetabolismConfig(mode="fixed", d=0.0), MetabolismConfig(rise_bytes=256.0, progress_z=1e9)], ids=["d0", "adaptive"])
def test_deferred_row_moves_equal_moving_every_row_at_once(recurrence, monkeypatch, metabolism):
    """Rows outside a window move when next read (recurrence.c, "pending"): with room for 2 and
    for 64 entries (full refreshes often, and rarely) the learner makes the same predictions and
    ends with the same weights as one that moves every row at each update."""
    cfg = SomaConfig(n_bands=10, hidden_dim=24)
    data = repetitive_bytes(3000, b"temp=21.5;hum=40\n") + random_bytes(1500, seed=2, alphabet=60) + repetitive_bytes(2000, b"x=1,y=2\n")
    runs = {}
    for name, entries in (("eager", None), ("2 entries", 2), ("64 entries", 64)):
        if entries is not None:
            monkeypatch.setattr(native.PendingRows, "MAX_ENTRIES", entries)
        learner = SomaLearner(cfg, LearnerConfig(batch=8, max_chunk=32, window_bytes=96, metabolism=metabolism), params=random_params(cfg, scale=0.3))
        if entries is None:
            learner._pending = None  # every row moved by the update itself
        else:
            assert learner._pending.capacity == entries
        runs[name] = (learner.learn(data), learner)
    bits, eager = runs["eager"]
    for name in ("2 entries", "64 entries"):
        other_bits, other = runs[name]
        assert other.updates == eager.updates > 100
        assert (other_bits - bits).abs().max().item() < 1e-3
        torch.testing.assert_close(other.params.ucat, eager.params.ucat, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(other.carry, eager.carry, rtol=1e-4, atol=1e-5)
    assert runs["64 entries"][1]._pending.count == 0  # reading params brought every row up to date


def test_a_copied_learner_keeps_its_pending_rows(recurrence):
    """Deferred row moves keep the trace banks they need by reference and their addresses;
    a deep copy or a pickle has its own, and continues exactly as the original."""
    import pickle

    learner = SomaLearner(SomaConfig(n_bands=6, hidden_dim=8), LearnerConfig(metabolism=MetabolismConfig(mode="fixed", d=0.0)))
    learner.learn(random_bytes(3000, seed=3, alphabet=50))
    assert learner._pending.count > 0
    twins = [copy.deepcopy(learner), pickle.loads(pickle.dumps(learner))]
    tail = random_bytes(500, seed=4, alphabet=50)
    want = learner.learn(tail)
    for twin in twins:
        assert twin._pending.bank_ptrs[0] != learner._pending.bank_ptrs[0]
        assert torch.equal(twin.learn(tail), want)
