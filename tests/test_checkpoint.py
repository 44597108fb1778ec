"""Checkpoints: round trip, identity, refusal of bad files, atomic writes, retention, exact resume."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from somad.checkpoint import (
    MAX_HISTORY,
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    build_payload,
    check_compatible,
    compute_id,
    load_checkpoint,
    load_learner,
    save_checkpoint,
    write_payload,
)
from somad.learner import LearnerConfig, SomaLearner
from somad.metabolism import MetabolismConfig
from somad.model import preset
from tests.helpers import random_bytes, repetitive_bytes

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "somad" / "model.py").read_bytes()[:6000]


def trained(n: int = 3000, cfg=None, lcfg=None) -> SomaLearner:
    learner = SomaLearner(cfg or preset("tiny"), lcfg)
    learner.learn(TEXT[:n])
    return learner


def assert_same_state(a: dict, b: dict, where: str = "state") -> None:
    assert set(a) == set(b), where
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), f"{where}.{key}"
        elif isinstance(value, dict):
            assert_same_state(value, b[key], f"{where}.{key}")
        else:
            assert value == b[key], f"{where}.{key}"


# --------------------------------------------------------------------------- round trip


def test_history_keeps_only_the_most_recent_ancestors(tmp_path):
    history = tuple(f"{i:064x}" for i in range(MAX_HISTORY + 100))  # a long-lived daemon's snapshots
    cid = save_checkpoint(tmp_path / "m.pt", trained(), history=history)
    ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt.checkpoint_id == cid
    assert ckpt.history == history[-MAX_HISTORY:] and ckpt.parents == history[-1:]


@pytest.mark.parametrize("cfg", [preset("tiny"), preset("tiny", direct_readout=True, features="traces", n_bands=8)], ids=["tiny", "direct"])
def test_round_trip_keeps_every_tensor_config_and_extra(tmp_path, cfg):
    learner = trained(cfg=cfg)
    extra = {"scorer": {"fast": [1.5, 2.0], "open_alert": None, "peak": "ab\x00"}, "offset": 1234, "stream": "uart0", "hist": torch.arange(5.0)}
    history = ("a" * 64, "b" * 64)
    cid = save_checkpoint(tmp_path / "m.pt", learner, history=history, preset="tiny", extra=extra)

    ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt.checkpoint_id == cid and len(cid) == 64
    assert ckpt.history == history and ckpt.parents == history[-1:] and ckpt.lineage == (*history, cid)
    assert ckpt.model == cfg and ckpt.preset == "tiny" and ckpt.learner_config == learner.lcfg
    assert ckpt.bytes_seen == learner.bytes_seen == 3000
    assert ckpt.size_bytes == (tmp_path / "m.pt").stat().st_size
    assert_same_state(ckpt.state, learner.state_dict())
    assert ckpt.extra["scorer"] == extra["scorer"] and ckpt.extra["offset"] == 1234
    assert torch.equal(ckpt.extra["hist"], extra["hist"])
    assert ("Wd" in ckpt.state) == cfg.direct_readout
    assert ckpt.state["traces"].dtype == torch.float64

    again = ckpt.learner()
    assert_same_state(again.state_dict(), learner.state_dict())
    assert torch.equal(again.params.ucat, learner.params.ucat)


def test_the_id_covers_content_not_the_time_of_writing(tmp_path):
    learner = trained()
    first = save_checkpoint(tmp_path / "a.pt", learner)
    time.sleep(0.01)
    second = save_checkpoint(tmp_path / "b.pt", learner)
    assert first == second
    assert load_checkpoint(tmp_path / "a.pt").created_at < load_checkpoint(tmp_path / "b.pt").created_at
    # Anything that is state changes it: one more byte, other extra, another lineage.
    assert save_checkpoint(tmp_path / "c.pt", learner, extra={"offset": 1}) != first
    assert save_checkpoint(tmp_path / "d.pt", learner, history=("c" * 64,)) != first
    learner.learn(b"x")
    assert save_checkpoint(tmp_path / "e.pt", learner) != first


ID_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {root!r})
    from somad.checkpoint import build_payload
    from somad.learner import SomaLearner
    from somad.model import preset
    learner = SomaLearner(preset("tiny"))
    learner.learn(open({text!r}, "rb").read()[:3000])
    print(build_payload(learner, preset="tiny", extra={{"b": 2, "a": [1.5, None]}})["checkpoint_id"])
    """
)


def test_id_is_the_same_in_another_process(tmp_path):
    (tmp_path / "text").write_bytes(TEXT)
    script = ID_SCRIPT.format(root=str(ROOT), text=str(tmp_path / "text"))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, check=False)
    assert out.returncode == 0, out.stderr
    here = build_payload(trained(), preset="tiny", extra={"a": [1.5, None], "b": 2})["checkpoint_id"]
    assert out.stdout.strip() == here


def test_compute_id_is_canonical():
    payload = build_payload(trained(500), extra={"x": torch.ones(3)})
    reordered = dict(reversed(list(payload.items())))
    assert compute_id(reordered) == payload["checkpoint_id"]
    as_lists = {**payload, "checkpoint_history": tuple(payload["checkpoint_history"])}
    assert compute_id(as_lists) == payload["checkpoint_id"]
    # A tensor's dtype is part of its identity, not just its values.
    other = {**payload, "extra": {"x": torch.ones(3, dtype=torch.float64)}}
    assert compute_id(other) != payload["checkpoint_id"]


# --------------------------------------------------------------------------- refusing bad files


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.pt"
    save_checkpoint(path, trained(), preset="tiny", history=("a" * 64,))
    return path


def refused(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def resave(payload: dict, path: Path, recompute: bool) -> None:
    if recompute:
        payload["checkpoint_id"] = compute_id(payload)
    torch.save(payload, path)


def test_changed_tensor_is_refused(good_file, tmp_path):
    payload = torch.load(good_file, weights_only=True)
    payload["state"]["U"][3, 4] += 1e-3
    resave(payload, tmp_path / "t.pt", recompute=False)
    assert "checkpoint_id mismatch" in refused(tmp_path / "t.pt")


@pytest.mark.parametrize("change", ["history", "bytes_seen", "model", "extra", "metabolism"])
def test_changed_metadata_is_refused(good_file, tmp_path, change):
    payload = torch.load(good_file, weights_only=True)
    if change == "history":
        payload["checkpoint_history"] = ["b" * 64]
    elif change == "bytes_seen":
        payload["state"]["bytes_seen"] += 1
    elif change == "model":
        payload["model"]["init_scale"] = 2.0
    elif change == "extra":
        payload["extra"]["injected"] = 1
    else:
        payload["state"]["metabolism"]["d"] = 0.5
    resave(payload, tmp_path / "t.pt", recompute=False)
    assert "checkpoint_id mismatch" in refused(tmp_path / "t.pt")


def test_flipped_bytes_anywhere_are_refused(good_file, tmp_path):
    data = good_file.read_bytes()
    rng = random.Random(3)
    for position in [100, len(data) // 3, len(data) // 2, len(data) - 100] + rng.sample(range(len(data)), 6):
        damaged = bytearray(data)
        damaged[position] ^= 0x10
        (tmp_path / "f.pt").write_bytes(damaged)
        try:
            load_checkpoint(tmp_path / "f.pt")
        except CheckpointError as err:
            assert str(tmp_path / "f.pt") in str(err)
            continue
        # A flip in bytes the reader never interprets (zip padding) changes no content.
        assert compute_id(torch.load(tmp_path / "f.pt", weights_only=True)) == load_checkpoint(good_file).checkpoint_id


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.1, 0.0])
def test_truncated_file_is_refused(good_file, tmp_path, keep):
    data = good_file.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: int(len(data) * keep)])
    message = refused(tmp_path / "cut.pt")
    assert any(word in message for word in ("truncated", "empty", "not a"))


def test_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "text.pt").write_text("hello, I am not a model\n")
    assert "not a somad checkpoint" in refused(tmp_path / "text.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    assert "no format marker" in refused(tmp_path / "other.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    assert "not a somad checkpoint" in refused(tmp_path / "tensor.pt")
    assert "no such file" in refused(tmp_path / "missing.pt")
    assert "is a directory" in refused(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty" in refused(tmp_path / "empty.pt")


def test_newer_format_and_inconsistent_shapes_are_refused_even_with_a_matching_id(good_file, tmp_path):
    payload = torch.load(good_file, weights_only=True)
    payload["format_version"] = 99
    resave(payload, tmp_path / "new.pt", recompute=True)
    assert "newer" in refused(tmp_path / "new.pt")

    payload = torch.load(good_file, weights_only=True)
    payload["state"]["U"] = payload["state"]["U"][:, :5].contiguous()
    resave(payload, tmp_path / "shape.pt", recompute=True)
    assert "state.U" in refused(tmp_path / "shape.pt")

    payload = torch.load(good_file, weights_only=True)
    payload["state"]["metabolism"]["cfg"] = "not an attribute to set"
    resave(payload, tmp_path / "meta.pt", recompute=True)
    assert "state.metabolism" in refused(tmp_path / "meta.pt")


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_and_nothing_runs(good_file, tmp_path):
    marker = tmp_path / "code-ran"
    payload = torch.load(good_file, weights_only=True)
    payload["extra"] = {"gift": RunsCode(marker)}
    torch.save(payload, tmp_path / "evil.pt")  # a real torch zip, format marker and all
    message = refused(tmp_path / "evil.pt")
    assert "refused" in message and "system" in message and "nothing was run" in message
    assert not marker.exists()

    # A bare pickle (torch's legacy format) is not even unpickled.
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(RunsCode(marker)))
    assert "not a somad checkpoint" in refused(tmp_path / "evil.pkl")
    assert not marker.exists()

    # The crafted file is live: an unsafe load would have run it (so the test can fail).
    live = tmp_path / "live"
    torch.save({"x": RunsCode(live)}, tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)
    assert live.exists()


def test_extra_that_cannot_be_stored_is_named(tmp_path):
    learner = trained(200)
    with pytest.raises(CheckpointError, match=r"extra\.obj: cannot store a object"):
        save_checkpoint(tmp_path / "m.pt", learner, extra={"obj": object()})
    with pytest.raises(CheckpointError, match="keys must be strings"):
        save_checkpoint(tmp_path / "m.pt", learner, extra={"map": {1: 2}})
    assert not (tmp_path / "m.pt").exists()
    save_checkpoint(tmp_path / "m.pt", learner, extra={"n": np.float64(2.5), "k": np.int64(3), "hist": np.arange(3)})
    extra = load_checkpoint(tmp_path / "m.pt").extra
    assert extra["n"] == 2.5 and type(extra["n"]) is float and extra["k"] == 3
    assert torch.equal(extra["hist"], torch.arange(3))  # numpy arrays come back as tensors


def test_non_finite_weights_are_never_saved(tmp_path):
    learner = trained(200)
    save_checkpoint(tmp_path / "m.pt", learner)
    learner.params.w[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        save_checkpoint(tmp_path / "m.pt", learner)
    assert load_checkpoint(tmp_path / "m.pt").bytes_seen == 200


# --------------------------------------------------------------------------- compatibility, resume


def test_check_compatible_lists_every_differing_field():
    check_compatible(preset("tiny"), preset("tiny", seed=3, init_scale=2.0))
    with pytest.raises(CheckpointError) as info:
        check_compatible(preset("tiny"), preset("small"), labels=("a.pt", "b.pt"))
    message = str(info.value)
    for name in ("n_bands (a.pt 16, b.pt 24)", "hidden_dim (a.pt 32, b.pt 128)", "direct_readout (a.pt False, b.pt True)"):
        assert name in message
    assert "base" not in message


@pytest.mark.parametrize(
    "lcfg",
    [LearnerConfig(), LearnerConfig(rule="seed", weight_bound=0.5, metabolism=MetabolismConfig(mode="fixed", d=2.0))],
    ids=["default", "seed-rule-fixed-d"],
)
def test_resume_is_exact(tmp_path, lcfg):
    """A learner loaded from a checkpoint continues as the saved one does, byte for byte; and
    as one never saved, to float32 rounding (saving brings every row up to date: the native
    kernel defers the moves of rows outside a window, learner.params)."""
    stream = TEXT[:2500] + random_bytes(300, seed=5) + repetitive_bytes(1200)
    cut = 1777  # not a multiple of any chunk size

    def rest(learner: SomaLearner) -> torch.Tensor:
        return torch.cat([learner.learn(stream[cut:2900]), learner.score(stream[2900:3400]), learner.learn(stream[3400:])])

    one = SomaLearner(preset("tiny"), lcfg)
    first = one.learn(stream[:cut])
    rest_one = rest(one)

    two = SomaLearner(preset("tiny"), lcfg)
    assert torch.equal(two.learn(stream[:cut]), first)
    save_checkpoint(tmp_path / "half.pt", two)
    resumed = load_learner(tmp_path / "half.pt")
    rest_two, rest_resumed = rest(two), rest(resumed)

    assert torch.equal(rest_two, rest_resumed)  # bit for bit: the carried state is saved too
    assert torch.allclose(rest_one, rest_resumed, rtol=0, atol=1e-4)
    assert resumed.bytes_seen == one.bytes_seen == len(stream)


def test_learner_with_other_settings_continues_the_same_weights(tmp_path):
    learner = trained()
    save_checkpoint(tmp_path / "m.pt", learner)
    ckpt = load_checkpoint(tmp_path / "m.pt")
    bounded = ckpt.learner(LearnerConfig(rule="seed", weight_bound=0.05))
    assert bounded.lcfg.weight_bound == 0.05
    assert bool(bounded.params.ucat.abs().max() <= torch.tensor(0.05))  # the bound in float32
    plain = ckpt.learner(LearnerConfig(lr=0.01))
    assert torch.equal(plain.params.ucat, learner.params.ucat) and plain.lcfg.lr == 0.01


def test_learner_load_state_dict_names_what_is_wrong():
    learner = SomaLearner(preset("tiny"))
    state = SomaLearner(preset("tiny", hidden_dim=16)).state_dict()
    with pytest.raises(ValueError, match="U must be"):
        learner.load_state_dict(state)
    state = learner.state_dict()
    del state["traces"]
    with pytest.raises(ValueError, match="missing \\['traces'\\]"):
        learner.load_state_dict(state)


# --------------------------------------------------------------------------- writing and the store


def test_failed_write_leaves_the_previous_file_and_no_temp(tmp_path):
    learner = trained(300)
    first = save_checkpoint(tmp_path / "m.pt", learner)
    payload = build_payload(learner)
    payload["extra"] = {"cannot": lambda: None}  # fails half-way through torch.save
    with pytest.raises(Exception, match="lambda"):
        write_payload(tmp_path / "m.pt", payload)
    with pytest.raises(CheckpointError, match="does not exist"):
        write_payload(tmp_path / "gone" / "m.pt", build_payload(learner))
    with pytest.raises(CheckpointError, match="is a directory"):
        save_checkpoint(tmp_path, learner)
    assert load_checkpoint(tmp_path / "m.pt").checkpoint_id == first
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 1 MiB tmpfs, to run out of space for real (needs root; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, timeout=20, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=20, check=False)


def test_disk_full_keeps_the_previous_checkpoint(small_filesystem):
    learner = trained(300)  # a tiny checkpoint is about 0.6 MB: one fits in 1 MiB, two do not
    store = CheckpointStore(small_filesystem, "uart0", keep=3)
    first = store.save(learner)
    learner.learn(b"more bytes\n")
    with pytest.raises(CheckpointError, match="No space left on device"):
        store.save(learner)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(small_filesystem / "other.pt", learner)
    assert sorted(p.name for p in small_filesystem.iterdir()) == [first.name]  # no temp files left
    assert store.latest().bytes_seen == 300


def test_store_chains_history_retains_keep_and_survives_restart(tmp_path):
    learner = trained(200)
    store = CheckpointStore(tmp_path / "state" / "uart0", "k16-h32", keep=2)
    assert store.latest() is None
    ids = []
    for _ in range(4):
        learner.learn(b"12.5\n" * 10)
        path = store.save(learner, extra={"offset": learner.bytes_seen}, preset="tiny")
        ids.append(load_checkpoint(path).checkpoint_id)
        assert store.last_id == ids[-1]
    files = store.snapshots()
    assert len(files) == 2 and [load_checkpoint(p).checkpoint_id for p in files] == ids[-2:]
    newest = store.latest()
    assert newest.history == tuple(ids[:-1]) and newest.parents == (ids[-2],)
    assert newest.extra["offset"] == learner.bytes_seen

    # A new process (a new store object) continues the same lineage.
    again = CheckpointStore(tmp_path / "state" / "uart0", "k16-h32", keep=2)
    resumed = again.latest().learner()
    resumed.learn(b"13.0\n")
    path = again.save(resumed)
    assert load_checkpoint(path).history == tuple(ids)
    # history=() starts a new lineage on purpose.
    assert load_checkpoint(again.save(resumed, history=())).history == ()
    # Another prefix in the same directory is another store.
    assert CheckpointStore(tmp_path / "state" / "uart0", "k16").latest() is None


def test_store_skips_corrupt_snapshots_and_never_deletes_them(tmp_path):
    learner = trained(200)
    store = CheckpointStore(tmp_path, "s", keep=1)
    good = store.save(learner)
    learner.learn(b"abc\n")
    newest = store.save(learner)
    assert not good.exists()  # keep=1
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # the newest one is damaged on disk

    fresh = CheckpointStore(tmp_path, "s", keep=1)
    assert fresh.latest() is None
    assert [e.path for e in fresh.skipped] == [str(newest)] and "truncated" in str(fresh.skipped[0])

    learner.learn(b"def\n")
    saved = fresh.save(learner)
    learner.learn(b"ghi\n")
    saved_again = fresh.save(learner)
    assert newest.exists()  # refused, reported, left for an operator
    assert not saved.exists() and saved_again.exists()
    assert fresh.latest().bytes_seen == learner.bytes_seen


def test_store_removes_temps_of_dead_writers_only(tmp_path):
    learner = trained(200)
    store = CheckpointStore(tmp_path, "s", keep=3)
    store.save(learner)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".s-00000009-0123456789ab.pt.{dead.pid}.deadbeef.tmp"
    alive = tmp_path / f".s-00000009-0123456789ab.pt.{os.getppid()}.cafef00d.tmp"
    mine = tmp_path / f".s-00000009-0123456789ab.pt.{os.getpid()}.0badf00d.tmp"
    other_prefix = tmp_path / f".t-00000009-0123456789ab.pt.{dead.pid}.deadbeef.tmp"
    for path in (stale, alive, mine, other_prefix):
        path.write_bytes(b"partial")
    store.save(learner)
    assert not stale.exists() and not mine.exists()  # a dead writer's, and this process's own leftover
    assert alive.exists() and other_prefix.exists()  # a live writer's, and another store's


def test_store_rejects_bad_names():
    with pytest.raises(ValueError, match="prefix"):
        CheckpointStore("/tmp", "../escape")
    with pytest.raises(ValueError, match="keep"):
        CheckpointStore("/tmp", "ok", keep=0)


def test_kill_9_mid_save_never_leaves_the_directory_without_a_good_checkpoint(tmp_path):
    """A writer saving in a loop is killed at random moments; after each kill the directory
    holds only complete snapshots and the newest one loads."""
    learner = trained(300)
    CheckpointStore(tmp_path, "s", keep=2).save(learner)
    rng = random.Random(11)
    temps_seen = 0
    for _ in range(24):
        pid = os.fork()
        if pid == 0:  # the writer: save, learn a little, save again... until killed
            try:
                store = CheckpointStore(tmp_path, "s", keep=2)
                while True:
                    learner.learn(b"21.5,1013.2\n")
                    store.save(learner)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.02, 0.25))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        temps_seen += any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
        store = CheckpointStore(tmp_path, "s", keep=2)
        assert store.latest() is not None
        assert store.skipped == []  # no snapshot file is ever partial: rename is atomic
        for path in store.snapshots():
            load_checkpoint(path)
    assert temps_seen >= 1, "no kill landed inside a write: the test did not test atomicity"
    store = CheckpointStore(tmp_path, "s", keep=2)
    store.save(store.latest().learner())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(store.snapshots()) == 2


def test_checkpoint_is_a_torch_zip_with_the_documented_keys(good_file):
    assert zipfile.is_zipfile(good_file)
    payload = torch.load(good_file, weights_only=True)
    for key in ("format", "format_version", "checkpoint_id", "checkpoint_history", "checkpoint_parents", "created_at", "model", "state", "extra"):
        assert key in payload
    for key in ("U", "W", "b", "traces", "bytes_seen", "metabolism"):
        assert key in payload["state"]
    assert isinstance(load_checkpoint(good_file), Checkpoint)
