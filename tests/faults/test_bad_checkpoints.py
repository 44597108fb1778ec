"""Bad checkpoints found at start: corrupt, truncated, tampered, malicious.

Each is refused with one line naming the file and what is wrong, and is left in place for an
operator (never loaded, never deleted). With ``on_bad_checkpoint: fresh`` the daemon starts
beside them (a fresh model, or the newest good checkpoint behind them); with ``exit`` it
refuses to start (exit 1). The malicious one is a real pickle payload that creates a marker
file when unpickled the unsafe way (checked here, on a copy): the marker never appears.
"""

from __future__ import annotations

import io
import os
import random
import shlex
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from somad.checkpoint import CheckpointError, CheckpointStore, load_checkpoint
from somad.config import load_config
from somad.learner import SomaLearner
from somad.stream import architecture_tag
from tests.faults.harness import fixed_line, record_figures, start_daemon, wait_until

LINES = 300
LINE = 16


def config_text(tmp: Path, policy: str) -> str:
    return f"""
state_dir: "{tmp / 'state'}"
metrics: {{listen: "127.0.0.1:0"}}
log: {{level: info, format: json}}
on_bad_checkpoint: {policy}
streams:
  - name: ckpt
    source: {{type: file, path: "{tmp / 'sensor.log'}", start: saved, poll_interval: 0.05}}
    model: {{preset: tiny}}
    snapshot: {{every_seconds: 0.5}}
"""


class Setup:
    """A config, its data file, and the store the daemon will look in."""

    def __init__(self, tmp: Path, policy: str = "fresh"):
        self.tmp = tmp
        self.config = tmp / "somad.yaml"
        self.config.write_text(config_text(tmp, policy))
        self.data = tmp / "sensor.log"
        self.data.write_bytes(b"".join(fixed_line(i, LINE) for i in range(LINES)))
        self.stream = load_config(self.config).streams[0]
        self.prefix = architecture_tag(self.stream.model.soma_config())
        self.directory = tmp / "state" / "ckpt"
        self.marker = tmp / "PWNED"

    def store(self) -> CheckpointStore:
        return CheckpointStore(self.directory, prefix=self.prefix)

    def good(self, nbytes: int) -> Path:
        """A genuine snapshot of a model that learned the data file's first ``nbytes``, as the
        daemon writes it (same store, prefix and extra)."""
        learner = SomaLearner(self.stream.model.soma_config(), self.stream.model.learner_config(self.stream.metabolism))
        learner.learn(self.data.read_bytes()[:nbytes])
        return self.store().save(learner, extra={"offset": nbytes, "stream": "ckpt"}, preset="tiny")

    def named(self, seq: int) -> Path:
        """A snapshot file name the store takes for its ``seq``-th snapshot."""
        return self.directory / f"{self.prefix}-{seq:08d}-{'%012x' % (0xBAD000 + seq)}.pt"


# --------------------------------------------------------------------------- the bad ones


def corrupt(good: bytes, marker: Path) -> bytes:
    """4 KiB of the middle overwritten with random bytes (a failing SD card)."""
    raw = bytearray(good)
    middle = len(raw) // 2
    raw[middle : middle + 4096] = random.Random(1).randbytes(4096)
    return bytes(raw)


def truncated(good: bytes, marker: Path) -> bytes:
    """The first 60 %: a copy cut short (the store itself never leaves one)."""
    return good[: len(good) * 6 // 10]


def tampered(good: bytes, marker: Path) -> bytes:
    """One bit flipped inside the largest tensor, the zip CRCs recomputed: torch reads it
    happily, only the checkpoint id can tell."""
    raw = bytearray(good)
    with zipfile.ZipFile(io.BytesIO(good)) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    header = entry.header_offset
    name_len, extra_len = struct.unpack_from("<HH", raw, header + 26)
    start = header + 30 + name_len + extra_len
    raw[start + entry.file_size // 2] ^= 0x01
    crc = zlib.crc32(raw[start : start + entry.file_size])
    struct.pack_into("<I", raw, header + 14, crc)  # local file header
    central = raw.find(b"PK\x01\x02")
    while central != -1:  # the central directory record of the same entry
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", raw, central + 28)
        if raw[central + 46 : central + 46 + name_len].decode() == entry.filename:
            struct.pack_into("<I", raw, central + 16, crc)
            break
        central = raw.find(b"PK\x01\x02", central + 46 + name_len + extra_len + comment_len)
    return bytes(raw)


class Payload:
    """Unpickling this runs ``touch MARKER`` (what an attacker would make far worse)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def malicious(good: bytes, marker: Path) -> bytes:
    """A torch zip file that looks like a checkpoint and carries a code-running pickle."""
    out = io.BytesIO()
    torch.save({"format": "somad.checkpoint", "format_version": 1, "state": Payload(marker)}, out)
    return out.getvalue()


BAD = {"corrupt": corrupt, "truncated": truncated, "tampered": tampered, "malicious": malicious}
REASONS = {  # what the refusal must say
    "corrupt": "corrupt",
    "truncated": "truncated or corrupt",
    "tampered": "checkpoint_id mismatch",
    "malicious": "refused: its pickle asks for posix.system",
}


def plant_bad(setup: Setup, first_seq: int) -> dict[str, Path]:
    """One file of each bad kind, numbered after the good ones (so the store tries them first)."""
    good = load_good_bytes(setup)
    setup.directory.mkdir(parents=True, exist_ok=True)
    planted = {}
    for i, (kind, make) in enumerate(BAD.items()):
        path = setup.named(first_seq + i)
        path.write_bytes(make(good, setup.marker))
        planted[kind] = path
    return planted


def load_good_bytes(setup: Setup) -> bytes:
    """A genuine snapshot made elsewhere, to damage (the store beside it stays as it was)."""
    scratch = setup.tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    return Setup(scratch).good(LINE * 50).read_bytes()


# --------------------------------------------------------------------------- the loader


@pytest.mark.parametrize("kind", BAD)
def test_each_bad_checkpoint_is_refused_with_the_file_named(tmp_path, kind):
    setup = Setup(tmp_path)
    path = plant_bad(setup, first_seq=1)[kind]
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert REASONS[kind] in message, message
    assert not setup.marker.exists(), "the malicious pickle ran"
    if kind == "tampered":  # the premise: torch itself finds nothing wrong with it
        assert torch.load(path, weights_only=True)["format"] == "somad.checkpoint"


def test_the_malicious_payload_is_live(tmp_path):
    """Without this, 'the marker never appears' would prove nothing: loaded the unsafe way, a
    copy of the payload (pointing at another marker) does run."""
    proof_marker = tmp_path / "proof-it-runs"
    proof = tmp_path / "proof.pt"
    proof.write_bytes(malicious(b"", proof_marker))
    torch.load(proof, weights_only=False)
    assert proof_marker.exists()


# --------------------------------------------------------------------------- the daemon


def refusals(daemon) -> dict[str, str]:
    """{file path: error} of the daemon's ``checkpoint_refused`` log lines."""
    found = {}
    for entry in daemon.events("checkpoint_refused"):
        path = entry["error"].split(": ", 1)[0]
        found[path] = entry["error"]
    return found


@pytest.mark.parametrize("with_good", [False, True], ids=["only-bad", "good-behind-bad"])
def test_fresh_policy_starts_beside_bad_checkpoints(tmp_path, with_good):
    setup = Setup(tmp_path, policy="fresh")
    good_bytes = LINE * 120
    good = setup.good(good_bytes) if with_good else None
    planted = plant_bad(setup, first_seq=2)
    contents = {path: path.read_bytes() for path in planted.values()}
    size = setup.data.stat().st_size

    daemon = start_daemon(setup.config, tmp_path / "somad.log")
    try:
        daemon.wait_event("ready", timeout=120)
        found = refusals(daemon)
        assert set(found) == {str(p) for p in planted.values()}, found
        for kind, path in planted.items():
            assert REASONS[kind] in found[str(path)], found[str(path)]
        resumed = daemon.events("resumed")
        if with_good:
            assert resumed and resumed[0]["bytes_seen"] == good_bytes and resumed[0]["checkpoint"] == load_checkpoint(good).checkpoint_id[:12]
        else:
            assert not resumed
        opened = daemon.wait_event("file_opened", timeout=30)
        assert opened["offset"] == (good_bytes if with_good else 0)
        start = good_bytes if with_good else 0
        wait_until(lambda: start + daemon.metric("somad_bytes_total", stream="ckpt") >= size, timeout=120, what="learning the file")
        assert daemon.terminate(timeout=60) == 0
    finally:
        daemon.ensure_dead()

    assert not setup.marker.exists(), "the malicious pickle ran"
    for path, data in contents.items():
        assert path.read_bytes() == data, f"{path.name} was changed or removed"
    store = setup.store()
    newest = store.latest()
    assert newest.bytes_seen == size == newest.extra["offset"]
    assert newest.path.name > max(p.name for p in planted.values()), "the new snapshot is not numbered after the bad ones"
    for path in planted.values():  # still there, still refused
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
    if with_good:
        assert newest.history[-1] == load_checkpoint(good).checkpoint_id  # continued the good lineage
    record_figures(
        f"bad_checkpoints_fresh_{'good_behind_bad' if with_good else 'only_bad'}",
        {"planted": sorted(planted), "refused": len(found), "started": "from the good checkpoint" if with_good else "fresh", "marker_created": False, "bytes_lost": size - newest.bytes_seen},
    )


def test_exit_policy_refuses_to_start_and_names_every_file(tmp_path):
    setup = Setup(tmp_path, policy="exit")
    setup.good(LINE * 100)
    planted = plant_bad(setup, first_seq=2)
    daemon = start_daemon(setup.config, tmp_path / "somad.log")
    try:
        rc = daemon.wait(90)
    finally:
        daemon.ensure_dead()
    output = daemon.log.text()
    assert rc == 1, output
    assert not daemon.events("ready")
    assert set(refusals(daemon)) == {str(p) for p in planted.values()}
    last = output.strip().splitlines()[-1]
    assert last.startswith("somad: cannot start:") and "on_bad_checkpoint is 'exit'" in last and str(setup.directory) in last, last
    assert not setup.marker.exists(), "the malicious pickle ran"
    assert all(path.exists() for path in planted.values())
    record_figures("bad_checkpoints_exit", {"planted": sorted(planted), "exit_status": rc, "message": last, "marker_created": False})
