"""The model verbs end to end: ``somad train|score|chat|inspect|merge`` on real files, in a
subprocess (pipes, a pseudo-terminal, signals), plus the bad-input cases in-process."""

from __future__ import annotations

import io
import json
import math
import os
import pty
import random
import resource
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from somad import cli
from somad.checkpoint import build_payload, load_checkpoint, save_checkpoint
from somad.commands.chat import continue_text
from somad.commands.progress import Progress
from somad.model import preset

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / ".venv" / "bin" / "somad"
SOMAD = [str(ENTRY)] if ENTRY.exists() else [sys.executable, "-m", "somad"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
ANOMALY = range(1000, 1020)  # lines of the sensor file that are garbage


def somad(*args, cwd: Path, stdin: bytes | None = None, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*SOMAD, *map(str, args)], cwd=cwd, input=stdin, capture_output=True, timeout=timeout, env=ENV, check=False, **kwargs)


def sensor_lines(n: int = 1400, seed: int = 0) -> bytes:
    """A sensor printing temperature and pressure, with garbage lines at ``ANOMALY``."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i in ANOMALY:
            lines.append("".join(rng.choice("!@#$%^&*()QWERTYzxcv") for _ in range(14)) + "\n")
        else:
            lines.append(f"{20 + 3 * math.sin(i / 40):.2f},{1013 + rng.random():.1f}\n")
    return "".join(lines).encode()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("verbs")
    (work / "sensor.csv").write_bytes(sensor_lines())
    return work


@pytest.fixture(scope="module")
def model(work) -> tuple[Path, dict]:
    out = somad("train", "--input", "sensor.csv", "--out", "model.pt", "--preset", "tiny", "--json", cwd=work)
    assert out.returncode == 0, out.stderr
    return work / "model.pt", json.loads(out.stdout)


def one_line_error(err: str, *needles: str) -> None:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and "error:" in err, err
    for needle in needles:
        assert needle in err, err


# --------------------------------------------------------------------------- train


def test_train_writes_a_checkpoint_and_the_exact_json_summary(work, model):
    path, summary = model
    assert set(summary) == {"bytes", "bits_per_byte", "bytes_per_second", "checkpoint_id"}
    assert summary["bytes"] == (work / "sensor.csv").stat().st_size
    assert 0 < summary["bits_per_byte"] < 8 and summary["bytes_per_second"] > 0
    ckpt = load_checkpoint(path)
    assert ckpt.checkpoint_id == summary["checkpoint_id"]
    assert ckpt.bytes_seen == summary["bytes"] and ckpt.preset == "tiny" and ckpt.history == ()


def test_train_resume_from_a_file_and_stdin_is_reproducible(work, model):
    path, first = model
    (work / "head.csv").write_bytes(sensor_lines(1000, seed=2))
    extra = b"21.07,1013.9\n" * 300
    out = somad("train", "--resume", path, "--input", "head.csv", "-", "--out", "more.pt", "--json", cwd=work, stdin=extra)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    ckpt = load_checkpoint(work / "more.pt")
    assert ckpt.history == (first["checkpoint_id"],) and ckpt.parents == (first["checkpoint_id"],)
    stream = (work / "head.csv").read_bytes() + extra
    assert len(stream) > 16384 and summary["bytes"] == len(stream) and ckpt.bytes_seen == first["bytes"] + len(stream)
    # The same bytes in the same 16 KiB blocks give the same model, whatever the pipes did.
    learner = load_checkpoint(path).learner()
    for i in range(0, len(stream), 16384):
        learner.learn(stream[i : i + 16384])
    assert build_payload(learner, history=(first["checkpoint_id"],), preset="tiny")["checkpoint_id"] == summary["checkpoint_id"]


def read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    """Read a pty master until ``needle`` shows up (or the deadline / the end)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_a_bar_shows_at_the_first_update_then_keeps_its_pace():
    """A block may be learned faster than the bar's redraw interval, and a live stream may stall
    after it: the bar must not wait for the next block. Log lines keep their pace from the start."""
    times = iter([0.0, 0.01, 0.02, 0.2])
    out = io.StringIO()
    bar = Progress(out, None, "bar", clock=lambda: next(times))  # 8 redraws a second at most
    bar.update(1024, 2048.0)  # at 0.01 s
    assert "1.0 KiB" in out.getvalue()
    bar.update(2048, 4096.0)  # at 0.02 s: too soon
    assert "2.0 KiB" not in out.getvalue()
    bar.update(3072, 6144.0)  # at 0.2 s
    assert "3.0 KiB" in out.getvalue()
    lines = io.StringIO()
    Progress(lines, None, "lines", clock=iter([0.0, 1.0]).__next__).update(1024, 2048.0)
    assert lines.getvalue() == ""


def test_train_shows_progress_on_a_terminal_and_ctrl_c_saves(work):
    """stdin stays open (a live stream): the bar shows up on the terminal, Ctrl-C stops the
    blocked read and saves everything received."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*SOMAD, "train", "--input", "-", "--out", "live.pt", "--preset", "tiny"],
        cwd=work, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=slave, env=ENV,
    )
    os.close(slave)
    try:
        data = sensor_lines(1300, seed=1)[: 16384 + 1000]  # a full block, then 1000 bytes that wait for more
        proc.stdin.write(data)
        proc.stdin.flush()
        screen = read_until(master, b"16.0 KiB", timeout=90)  # the bar after the first block
        assert b"bits/byte" in screen and b"/s" in screen and b"\r" in screen, screen
        time.sleep(0.5)  # the last 1000 bytes are read (a blocking read waits for the rest)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=60)
        screen += read_until(master, b"saving", timeout=5)
    finally:
        proc.kill()
        os.close(master)
    assert proc.returncode == 0, screen
    assert b"interrupted after" in screen and b"Traceback" not in screen
    assert b"saved live.pt" in stdout
    assert load_checkpoint(work / "live.pt").bytes_seen == len(data)


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # a checkpoint is ~0.6 MB


def test_train_save_failure_keeps_the_previous_checkpoint(work, model):
    """The disk refuses the new checkpoint (a file size limit here; test_checkpoint runs a
    full tmpfs): one line, exit 1, the checkpoint being continued intact, no temp left."""
    target = work / "keep.pt"
    target.write_bytes(model[0].read_bytes())
    before = target.read_bytes()
    (work / "short.csv").write_bytes(sensor_lines(100, seed=4))
    out = somad("train", "--input", "short.csv", "--resume", "keep.pt", cwd=work, preexec_fn=_limit_file_size)
    assert out.returncode == 1
    one_line_error(out.stderr.decode(), "keep.pt", "cannot save", "untouched")
    assert target.read_bytes() == before
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- score


def test_score_lines_to_csv_finds_the_garbage(work, model):
    out = somad("score", "--input", "sensor.csv", "--resume", model[0], "--frame", "lines", "--out", "lines.csv", "--grace-period", "300", "--json", cwd=work)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert set(summary) == {"bytes", "bits_per_byte", "bytes_per_second", "checkpoint_id", "records", "alerts"}
    assert summary["records"] == 1400 and summary["alerts"] >= 1 and summary["checkpoint_id"] == model[1]["checkpoint_id"]
    rows = (work / "lines.csv").read_text().splitlines()
    assert rows[0] == "index,bits,anomaly,alert,record" and len(rows) == 1401
    opened = [int(r.split(",")[0]) for r in rows[1:] if r.split(",")[3] == "open"]
    assert any(i in range(ANOMALY.start, ANOMALY.start + 5) for i in opened), opened
    first = rows[1 + ANOMALY.start].split(",")
    assert float(first[2]) > 0.99 and float(first[1]) > 2 * summary["bits_per_byte"]


def test_score_resume_is_exact_across_save_and_load(work, model, capsys):
    """Per-byte scores of a stream in one run == two runs split by --save / --resume, the
    second one in another process."""
    data = (work / "sensor.csv").read_bytes()[:6500]
    for name, part in (("whole", data), ("part1", data[:4096]), ("part2", data[4096:])):
        (work / name).write_bytes(part)
    common = ["--frame", "bytes", "--grace-period", "100", "--threshold", "0.9", "--json"]
    for name, args in (("whole", ["--out", "whole.jsonl"]), ("part1", ["--out", "p1.jsonl", "--save", "half.pt"])):
        assert cli.main(["score", "--input", str(work / name), "--resume", str(model[0]), *[str(work / a) if a.endswith((".jsonl", ".pt")) else a for a in args], *common]) == 0
    capsys.readouterr()
    out = somad("score", "--input", "part2", "--resume", "half.pt", "--out", "p2.jsonl", *common, cwd=work)
    assert out.returncode == 0, out.stderr

    def events(*names):
        found = [json.loads(line) for name in names for line in (work / name).read_text().splitlines()]
        return [(e["event"], e["index"] if e["event"] == "score" else e["alert_id"].split("-")[1], e.get("bits"), e.get("anomaly")) for e in found]

    whole, split = events("whole.jsonl"), events("p1.jsonl", "p2.jsonl")
    assert len(whole) >= 6500 and whole == split
    assert any(e[0] == "alert_open" for e in whole)  # alerts too are where they were
    half = load_checkpoint(work / "half.pt")
    assert half.history == (model[1]["checkpoint_id"],) and half.extra["scorer"]["records"] == 4096


# --------------------------------------------------------------------------- chat


def test_chat_with_piped_input_continues_learns_and_saves(work, model, monkeypatch, capsysbinary):
    prompt = b"20.12,1013.4\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(prompt)))
    assert cli.main(["chat", "--resume", str(model[0]), "-n", "64", "--seed", "3", "--save", str(work / "chat.pt")]) == 0
    assert len(capsysbinary.readouterr().out) == 64
    saved, before = load_checkpoint(work / "chat.pt"), load_checkpoint(model[0])
    assert saved.bytes_seen == before.bytes_seen + len(prompt) + 64  # its own words are remembered
    assert saved.history == (before.checkpoint_id,)
    assert not torch.equal(saved.state["W"], before.state["W"])  # ...and the prompt learned from


def test_chat_on_a_terminal_answers_each_line(work, model):
    master, slave = pty.openpty()
    proc = subprocess.Popen([*SOMAD, "chat", "--resume", str(model[0]), "-n", "40", "-t", "0"], cwd=work, stdin=slave, stdout=slave, stderr=slave, env=ENV)
    os.close(slave)
    try:
        assert b"> " in read_until(master, b"> ", timeout=90)
        os.write(master, b"20.5")
        os.write(master, b"0,1013.2\n")
        reply = read_until(master, b"> ", timeout=60)
        os.write(master, b"\x04")  # Ctrl-D ends the conversation
        proc.wait(timeout=30)
    finally:
        proc.kill()
        os.close(master)
    assert proc.returncode == 0
    text = reply.split(b"1013.2", 1)[-1]
    assert len(text.replace(b"\r\n", b"\n").strip(b"\n> ")) >= 20, reply
    assert not any(b < 32 and b not in b"\r\n\t" for b in text), reply  # control bytes escaped


def test_chat_no_learn_and_a_fixed_seed(work, model, monkeypatch, capsysbinary):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"21.0,1013.0\n")))
    assert cli.main(["chat", "--resume", str(model[0]), "-n", "30", "--seed", "5", "--no-learn", "--save", str(work / "frozen.pt")]) == 0
    first = capsysbinary.readouterr().out
    assert len(first) == 30
    frozen, before = load_checkpoint(work / "frozen.pt"), load_checkpoint(model[0])
    assert torch.equal(frozen.state["W"], before.state["W"]) and frozen.bytes_seen == before.bytes_seen + 12 + 30
    again = [continue_text(before.learner(), 30, 0.8, torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert again[0] == again[1] != again[2]


# --------------------------------------------------------------------------- inspect, merge


def incompatible_checkpoint(work: Path) -> Path:
    from somad.learner import SomaLearner

    path = work / "narrow.pt"
    if not path.exists():
        learner = SomaLearner(preset("tiny", hidden_dim=16))
        learner.learn(b"1,2\n" * 50)
        save_checkpoint(path, learner, preset=None)
    return path


def test_inspect_json_reports_lineage_size_and_compatibility(work, model):
    out = somad("inspect", model[0], "--against", incompatible_checkpoint(work), "--json", cwd=work)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["checkpoint_id"] == model[1]["checkpoint_id"] and info["history"] == []
    assert info["model"]["n_bands"] == 16 and info["preset"] == "tiny" and info["parameters"] == preset("tiny").n_params()
    assert info["bytes_seen"] == model[1]["bytes"] and info["size_bytes"] == model[0].stat().st_size
    assert info["against"]["compatible"] is False and info["against"]["differences"] == {"hidden_dim": [32, 16]}


def test_inspect_human_readable(work, model, capsys):
    assert cli.main(["inspect", str(model[0]), "--against", str(model[0])]) == 0
    text = capsys.readouterr().out
    assert model[1]["checkpoint_id"] in text and "bytes_seen" in text and "compatible (can be continued or merged)" in text


def test_merge_averages_and_lists_both_lineages(work, model):
    a = load_checkpoint(model[0])
    learner = a.learner()
    learner.learn(b"19.99,1012.0\n" * 300)
    save_checkpoint(work / "b.pt", learner, history=a.lineage, preset="tiny")
    b = load_checkpoint(work / "b.pt")
    out = somad("merge", model[0], "b.pt", "--out", "merged.pt", "--weights", "1,3", "--json", cwd=work)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    merged = load_checkpoint(work / "merged.pt")
    assert summary["checkpoint_id"] == merged.checkpoint_id
    assert merged.parents == (a.checkpoint_id, b.checkpoint_id)
    assert merged.history == (a.checkpoint_id, b.checkpoint_id)  # a is b's ancestor: listed once
    assert merged.bytes_seen == a.bytes_seen + b.bytes_seen
    expected = 0.25 * a.state["U"].double() + 0.75 * b.state["U"].double()
    assert torch.allclose(merged.state["U"].double(), expected, atol=1e-6)
    assert torch.allclose(merged.state["traces"], 0.25 * a.state["traces"] + 0.75 * b.state["traces"])
    merged.learner().learn(b"20.0,1013.0\n")  # usable as it is


# --------------------------------------------------------------------------- bad input


def bad_cases(work: Path, model: Path) -> list[tuple[list[str], int, tuple[str, ...]]]:
    (work / "empty.txt").write_bytes(b"")
    (work / "garbage.pt").write_bytes(b"not a model at all")
    (work / "exists.pt").write_bytes(model.read_bytes())
    (work / "cut.pt").write_bytes(model.read_bytes()[:20000])
    narrow = str(incompatible_checkpoint(work))
    w = str(work)
    m = str(model)
    return [
        (["train", "--input", f"{w}/missing.txt", "--out", f"{w}/x.pt"], 1, ("missing.txt", "no such file")),
        (["train", "--input", w, "--out", f"{w}/x.pt"], 1, ("is a directory",)),
        (["train", "--input", f"{w}/empty.txt", "--out", f"{w}/x.pt", "--preset", "tiny"], 1, ("no input bytes", "empty.txt")),
        (["train", "--input", f"{w}/sensor.csv", "--resume", f"{w}/garbage.pt", "--out", f"{w}/x.pt"], 1, ("garbage.pt", "not a somad checkpoint")),
        (["train", "--input", f"{w}/sensor.csv", "--resume", f"{w}/nope.pt"], 1, ("nope.pt", "no such file")),
        (["train", "--input", f"{w}/sensor.csv", "--resume", m, "--preset", "small", "--out", f"{w}/x.pt"], 1, ("n_bands", "hidden_dim", "direct_readout")),
        (["train", "--input", f"{w}/sensor.csv", "--out", f"{w}/exists.pt"], 1, ("exists.pt", "--force")),
        (["train", "--input", f"{w}/sensor.csv", "--out", f"{w}/no/such/dir.pt"], 1, ("does not exist",)),
        (["train", "--input", f"{w}/sensor.csv", "--out", w], 1, ("is a directory",)),
        (["train", "--input", "-", "-", "--out", f"{w}/x.pt"], 1, ("more than once",)),
        (["score", "--input", f"{w}/sensor.csv", "--out", f"{w}/s.txt"], 2, ("s.txt", ".csv or .jsonl")),
        (["score", "--input", f"{w}/empty.txt", "--out", f"{w}/s.csv", "--force", "--preset", "tiny"], 1, ("no input bytes",)),
        (["chat", "--resume", w], 1, ("is a directory",)),
        (["inspect", f"{w}/sensor.csv"], 1, ("sensor.csv", "not a somad checkpoint")),
        (["inspect", f"{w}/cut.pt"], 1, ("cut.pt", "truncated")),
        (["inspect", m, "--against", f"{w}/garbage.pt"], 1, ("--against", "garbage.pt")),
        (["merge", m, "--out", f"{w}/x.pt"], 2, ("at least two",)),
        (["merge", m, m, "--out", f"{w}/x.pt", "--weights", "1,2,3"], 2, ("3 values for 2",)),
        (["merge", m, m, "--out", f"{w}/x.pt", "--weights=-1,2"], 2, ("positive",)),
        (["merge", m, narrow, "--out", f"{w}/x.pt"], 1, ("incompatible", "hidden_dim")),
    ]


def test_bad_input_is_one_clear_line_and_writes_nothing(work, model, capsys):
    for argv, status, needles in bad_cases(work, model[0]):
        assert cli.main(argv) == status, argv
        captured = capsys.readouterr()
        one_line_error(captured.err, *needles)
        assert captured.out == "", argv
        assert not (work / "x.pt").exists(), argv
    assert (work / "exists.pt").read_bytes() == model[0].read_bytes()


@pytest.mark.parametrize("argv", [["chat", "--resume", "m.pt", "-n", "0"], ["score", "--input", "x"], ["merge"], ["train"], ["score", "--input", "x", "--out", "y.csv", "--threshold", "2"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["train", "score", "chat", "inspect", "merge"])
def test_each_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([verb, "--help"])
    assert info.value.code == 0
    assert f"usage: somad {verb}" in capsys.readouterr().out


def test_plot_draws_or_says_what_is_missing(work, model, capsys):
    argv = ["score", "--input", str(work / "sensor.csv"), "--resume", str(model[0]), "--frame", "lines", "--out", str(work / "p.csv"), "--plot", str(work / "p.png"), "--force"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert cli.main(argv) == 1
        one_line_error(capsys.readouterr().err, "matplotlib", "somad[plot]")
        assert not (work / "p.csv").exists()
        return
    assert cli.main(argv) == 0
    assert (work / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
