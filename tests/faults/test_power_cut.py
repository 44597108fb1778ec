"""Power cuts: ``somad run --config`` killed with SIGKILL at random moments, dozens of times.

A file source follows a file that a writer keeps appending fixed-length lines to; snapshots
are due every 0.25 s, so kills land mid-snapshot too (some are aimed there: the kill follows
the appearance of a snapshot's temp file). After every kill:

- the checkpoint store holds a loadable checkpoint (``CheckpointStore.latest()``), refuses
  none, and never goes backwards;
- in that checkpoint, the saved file offset equals the bytes the model has learned (the file
  is read from 0 and only appended to, so any skip or repeat would show as a difference);
- the restarted daemon resumes exactly there: ``resumed`` (bytes_seen) and the file source's
  ``file_opened`` (offset) say the checkpoint's numbers, and its first scored record is the
  checkpoint's record count;

and at the end, once caught up, the model has learned exactly the file's size, every line was
scored, and no temp file is left. Figures (re-learned bytes, recovery times, kills that hit a
write) go to ``bench/out/faults-part1.json``.

A SIGKILL is not a power cut for the page cache (the kernel keeps what was written); what it
does test is every moment of the daemon's own state machine, including mid-write.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from somad.checkpoint import CheckpointStore
from somad.config import load_config
from somad.stream import architecture_tag
from tests.faults.harness import (
    AppendingWriter,
    CreationWatch,
    WarmLauncher,
    event_time,
    record_figures,
    start_daemon,
    summarize,
    wait_until,
)

ITERATIONS = int(os.environ.get("SOMAD_POWER_CUTS", "50"))  # the issue asks for >= 50
COLD_EVERY = 10  # every 10th restart is a cold start of the console script (real start-up time)
LINE = 16  # bytes per line written
WRITE_RATE = 3000  # bytes/s appended: below what the tiny model learns on a loaded 2-core box
SEED = int(os.environ.get("SOMAD_FAULT_SEED", "8"))


def config_text(tmp: Path) -> str:
    return f"""
state_dir: "{tmp / 'state'}"
metrics: {{listen: "127.0.0.1:0"}}
log: {{level: info, format: json}}
shutdown_timeout: 30
streams:
  - name: cut
    source: {{type: file, path: "{tmp / 'sensor.log'}", start: saved, poll_interval: 0.02}}
    framing: {{type: lines}}
    model: {{preset: tiny}}
    snapshot: {{every_seconds: 0.25, keep: 3}}
    sinks:
      - {{type: jsonl, path: "{tmp / 'scores.jsonl'}", events: scores, flush_seconds: 0}}
"""


@pytest.fixture(scope="module")
def launcher():
    warm = WarmLauncher()
    yield warm
    warm.close()


def score_events(path: Path, start: int) -> list[dict]:
    """Score lines of the JSONL sink written from byte ``start`` on (a line cut by a kill is skipped)."""
    if not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(start)
        data = f.read()
    events = []
    for line in data.split(b"\n"):
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return [e for e in events if e.get("event") == "score"]


def end_partial_line(path: Path) -> None:
    """A kill can cut the sink's last line short: end it, so the next run's lines stand apart."""
    if path.exists() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def temp_files(directory: Path, pid: int | None = None) -> list[str]:
    """Snapshot temp files in ``directory`` (``.<target>.<pid>.<hex>.tmp``), of ``pid`` only if given."""
    try:
        names = [name for name in os.listdir(directory) if name.endswith(".tmp")]
    except FileNotFoundError:
        return []
    return names if pid is None else [name for name in names if name.split(".")[-3] == str(pid)]


def check_checkpoint(store: CheckpointStore, previous, size: int):
    """The newest checkpoint after a kill: loadable, nothing refused, consistent, not older."""
    ckpt = store.latest()
    assert not store.skipped, f"refused after a kill: {[str(e) for e in store.skipped]}"
    if previous is not None:
        assert ckpt is not None, "a checkpoint existed before this kill and none is loadable now"
        assert ckpt.bytes_seen >= previous.bytes_seen, "the newest checkpoint went backwards"
    if ckpt is not None:
        offset = ckpt.extra["offset"]
        assert offset == ckpt.bytes_seen, f"checkpoint offset {offset} != bytes learned {ckpt.bytes_seen}: bytes were skipped or repeated"
        assert offset <= size
    return ckpt


def kill_at_random(daemon, rng: random.Random, mode: str, store_dir: Path) -> float:
    """Wait as ``mode`` says, then SIGKILL; returns the kill's time.time()."""
    if mode == "first":  # a fresh model learns slowly at first: let it reach its first checkpoint
        daemon.wait_event("ready", timeout=60)
        wait_until(lambda: list(store_dir.glob("*.pt")), timeout=60, what="the first checkpoint")
        time.sleep(rng.uniform(0.0, 0.3))
        return daemon.kill()
    if mode == "early":  # anywhere in start-up: interpreter, restore, source, READY
        time.sleep(rng.uniform(0.0, 0.3))
        return daemon.kill()
    daemon.wait_event("ready", timeout=60)
    if mode == "mid-snapshot":  # the moment a snapshot's temp file appears (it lives a few ms)
        store_dir.mkdir(parents=True, exist_ok=True)
        watch = CreationWatch(store_dir)
        try:
            watch.wait(lambda name: name.endswith(".tmp") and f".{daemon.pid}." in name, timeout=1.5)
            return daemon.kill()
        finally:
            watch.close()
    time.sleep(rng.uniform(0.05, 0.6))
    return daemon.kill()


def test_kill_9_at_random_moments_neither_loses_nor_repeats_bytes(tmp_path, launcher):
    rng = random.Random(SEED)
    config = tmp_path / "somad.yaml"
    config.write_text(config_text(tmp_path))
    stream = load_config(config).streams[0]
    store_dir = tmp_path / "state" / "cut"
    store = lambda: CheckpointStore(store_dir, prefix=architecture_tag(stream.model.soma_config()))  # a fresh look each time
    scores = tmp_path / "scores.jsonl"
    data = tmp_path / "sensor.log"
    logs = tmp_path / "logs"
    logs.mkdir()

    writer = AppendingWriter(data, rate=WRITE_RATE, width=LINE)
    writer.write_lines(100)
    writer.start()
    ckpt = None
    kills_mid_write, relearned, ready_s, first_record_s, cold_ready_s, cold_first_s = 0, [], [], [], [], []
    modes = {"first": 0, "random": 0, "mid-snapshot": 0, "early": 0}
    pending_relearn = None  # (the killed process's scored end position) to compare with the next checkpoint
    try:
        for i in range(ITERATIONS):
            ckpt = check_checkpoint(store(), ckpt, data.stat().st_size)
            expected = ckpt.bytes_seen if ckpt is not None else 0
            if pending_relearn is not None:
                relearned.append(max(0, pending_relearn - expected))
            scores_from = scores.stat().st_size if scores.exists() else 0

            cold = i % COLD_EVERY == COLD_EVERY - 1
            log_path = logs / f"run-{i:03d}.log"
            daemon = start_daemon(config, log_path) if cold else launcher.start(config, log_path)
            mode = "first" if i == 0 else "mid-snapshot" if i % 3 == 1 else "early" if i % 9 == 3 else "random"
            modes[mode] += 1
            try:
                killed_at = kill_at_random(daemon, rng, mode, store_dir)
            finally:
                daemon.ensure_dead()
            if temp_files(store_dir, daemon.pid):  # this process was killed while writing a snapshot
                kills_mid_write += 1
            end_partial_line(scores)

            # What the killed process said about where it resumed.
            opened = daemon.events("file_opened")
            if opened:
                assert opened[0]["offset"] == expected, f"run {i}: the file source reopened at {opened[0]['offset']}, the checkpoint says {expected}"
            resumed = daemon.events("resumed")
            if ckpt is not None and opened:
                assert resumed and resumed[0]["bytes_seen"] == expected == resumed[0]["offset"], f"run {i}: resumed {resumed}, checkpoint at {expected}"
            new_scores = score_events(scores, scores_from)
            if new_scores and ckpt is not None:
                assert new_scores[0]["index"] == ckpt.extra["scorer"]["records"], f"run {i}: first record {new_scores[0]['index']} after a checkpoint of {ckpt.extra['scorer']['records']} records"
            pending_relearn = (new_scores[-1]["index"] + 1) * LINE if new_scores else None
            ready = daemon.events("ready")
            if ready and i > 0:
                (cold_ready_s if cold else ready_s).append(event_time(ready[0]) - daemon.started_at)
            if new_scores and i > 0:
                (cold_first_s if cold else first_record_s).append(new_scores[0]["time"] - daemon.started_at)
            assert killed_at >= daemon.started_at

        # Catch up: the writer stops, one last daemon learns to the end and stops cleanly.
        size = writer.stop()
        ckpt = check_checkpoint(store(), ckpt, size)
        if pending_relearn is not None:
            relearned.append(max(0, pending_relearn - (ckpt.bytes_seen if ckpt else 0)))
        scores_from = scores.stat().st_size if scores.exists() else 0
        daemon = launcher.start(config, logs / "final.log")
        try:
            daemon.wait_event("ready", timeout=60)
            started_bytes = ckpt.bytes_seen if ckpt else 0
            wait_until(lambda: started_bytes + daemon.metric("somad_bytes_total", stream="cut") >= size, timeout=120, what=f"the daemon to learn the file to its end ({size} bytes)")
            assert daemon.terminate(timeout=60) == 0
        finally:
            daemon.ensure_dead()
    finally:
        writer.stop()

    final = store().latest()
    assert final.bytes_seen == size == final.extra["offset"], f"after catching up: learned {final.bytes_seen}, offset {final.extra['offset']}, file {size}"
    assert final.extra["scorer"]["records"] == size // LINE
    assert not temp_files(store_dir), "temp files of killed writers were not cleaned up"
    last_run = [e["index"] for e in score_events(scores, scores_from)]
    assert last_run == list(range(last_run[0], size // LINE)), "the last run skipped or repeated lines"
    every_index = {e["index"] for e in score_events(scores, 0)}
    assert every_index == set(range(size // LINE)), "some lines were never scored"

    figures = {
        "iterations": ITERATIONS,
        "kill_modes": modes,
        "cold_starts": sum(1 for i in range(ITERATIONS) if i % COLD_EVERY == COLD_EVERY - 1),
        "kills_mid_write": kills_mid_write,
        "file_bytes": size,
        "bytes_relearned_per_restart": summarize([float(x) for x in relearned], 0),
        "relearned_note": "lines the killed process had scored past the checkpoint it is resumed from (a lower bound: its sink may not have written its last lines)",
        "restart_to_ready_s_warm": summarize(ready_s),
        "restart_to_first_record_s_warm": summarize(first_record_s),
        "restart_to_ready_s_cold": summarize(cold_ready_s),
        "restart_to_first_record_s_cold": summarize(cold_first_s),
        "snapshot_every_s": 0.25,
        "preset": "tiny",
        "lost_bytes": size - final.bytes_seen,
        "refused_checkpoints": 0,
        "seed": SEED,
    }
    record_figures("power_cut", figures)
    print(json.dumps(figures, indent=1))
