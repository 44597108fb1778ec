"""Numerical faults: NaN/Inf in the weights, or a learning rate that makes the model diverge.

The daemon runs in this process (to reach into the running model), fed by a test-only source
whose bytes the test hands over step by step, so that the model is poisoned while its worker
waits for input (never under its feet). Each fault must be detected (``NumericalFault``), the
model rolled back to its last good checkpoint, ``somad_numerical_faults_total`` and
``somad_rollbacks_total`` counted, a log line written, no poisoned snapshot ever saved, and
learning must go on, finite, from the checkpoint.

Poisons:
- ``nan-in-W``: the output weights; the next byte's loss is NaN (found while learning);
- ``inf-in-b``: an output bias; the loss is NaN as well;
- ``nan-in-unseen-row``: the input rows of a byte value the stream never sent; no loss ever
  reads them, so only the finite check before a snapshot finds it.
"""

from __future__ import annotations

import io
import json
import math
import queue
import time
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import adapters.registry
from adapters.base import Chunk, Source
from somad.checkpoint import CheckpointStore, load_checkpoint
from somad.logs import configure_logging, reset_logging
from somad.model import V
from somad.stream import architecture_tag
from tests.faults.harness import InProcessDaemon, fixed_line, record_figures, wait_until

LINE = 16


@dataclass(frozen=True)
class FeedOptions:
    feed: str = "default"  # which of FeedSource.feeds this source reads


class FeedSource(Source):
    """Test-only source: hands on the byte strings the test puts in ``FeedSource.feeds[feed]``."""

    type_name = "feed"
    Options = FeedOptions
    feeds: ClassVar[dict[str, queue.Queue]] = {}

    def start(self) -> None:
        self._queue = self.feeds.setdefault(self.options.feed, queue.Queue())
        self._update_status(connected=True)

    def read(self, timeout: float) -> list[Chunk]:
        try:
            data = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        return [Chunk(data, received_at=time.monotonic())]

    def stop(self) -> None:
        self._update_status(connected=False)


@pytest.fixture
def feed(monkeypatch, request):
    monkeypatch.setitem(adapters.registry.SOURCES, "feed", f"{__name__}:FeedSource")
    name = request.node.name
    FeedSource.feeds[name] = queue.Queue()
    yield name
    FeedSource.feeds.pop(name, None)


@pytest.fixture
def json_log():
    """The daemon's log lines, as JSON objects, for the duration of a test."""
    out = io.StringIO()
    configure_logging(level="info", format="json", stream=out)
    yield lambda event: [e for e in map(json.loads, out.getvalue().splitlines()) if e.get("event") == event]
    reset_logging()


def config_text(tmp, feed: str, lr: float = 0.1) -> str:
    return f"""
state_dir: "{tmp / 'state'}"
metrics: {{listen: "127.0.0.1:0"}}
shutdown_timeout: 20
streams:
  - name: num
    source: {{type: feed, feed: "{feed}"}}
    framing: {{type: lines}}
    model: {{preset: tiny, lr: {lr}}}
    snapshot: {{every_seconds: 0.2}}
"""


def lines(start: int, n: int) -> bytes:
    return b"".join(fixed_line(i, LINE) for i in range(start, start + n))


def learn(running: InProcessDaemon, feed: str, data: bytes, until_bytes: int) -> None:
    """Hand ``data`` to the source, then wait until the model has learned ``until_bytes`` and
    snapshotted them (so the worker is idle and a good checkpoint holds exactly that)."""
    FeedSource.feeds[feed].put(data)
    model = running.model("num")
    wait_until(lambda: model.learner.bytes_seen == until_bytes, 60, f"learning up to {until_bytes} bytes (at {model.learner.bytes_seen})")
    wait_until(lambda: model.bytes_at_snapshot == until_bytes, 60, f"a snapshot at {until_bytes} bytes")


def poison(learner, how: str) -> None:
    k = learner.cfg.n_bands
    if how == "nan-in-W":
        learner.params.w[3, ord("5")] = math.nan
    elif how == "inf-in-b":
        learner.params.b[ord("0")] = math.inf
    elif how == "nan-in-unseen-row":
        assert not bool(learner.seen[0xFF]), "the premise: byte 0xFF never occurs in the stream"
        learner.params.ucat.view(V, k, -1)[0xFF, k // 2, 0] = math.nan
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["nan-in-W", "inf-in-b", "nan-in-unseen-row"])
def test_poisoned_weights_roll_back_to_the_last_good_checkpoint(tmp_path, feed, json_log, how):
    with InProcessDaemon(config_text(tmp_path, feed)) as running:
        learn(running, feed, lines(0, 200), until_bytes=200 * LINE)
        model = running.model("num")
        good = model.checkpoint_id
        assert good and running.metric("somad_numerical_faults_total", stream="num") == 0

        poison(model.learner, how)
        FeedSource.feeds[feed].put(lines(200, 100))
        wait_until(lambda: running.metric("somad_rollbacks_total", stream="num") >= 1, 60, "a rollback")
        assert running.metric("somad_numerical_faults_total", stream="num") == 1
        (logged,) = json_log("numerical_fault_rolled_back")
        assert logged["to"] == good[:12] and "non-finite" in logged["error"], logged
        learner = running.model("num").learner
        assert learner.bytes_seen == 200 * LINE, "not back at the checkpoint"
        assert learner.params.all_finite() and bool(torch.isfinite(learner.carry).all())

        learn(running, feed, lines(300, 150), until_bytes=350 * LINE)  # learning goes on, finite
        newest = running.model("num")
        assert newest.learner.params.all_finite()
        assert running.metric("somad_snapshot_failures_total", stream="num") == 0, "a poisoned model reached the snapshot writer"
        assert running.metric("somad_numerical_faults_total", stream="num") == 1
        store = CheckpointStore(tmp_path / "state" / "num", prefix=architecture_tag(newest.learner.cfg))
        latest = store.latest()
        assert latest.bytes_seen == 350 * LINE and good in latest.history, "the new snapshot does not descend from the good one"
        for path in store.snapshots():  # every file on disk is finite
            ckpt = load_checkpoint(path)
            assert all(bool(torch.isfinite(t).all()) for t in (ckpt.state["U"], ckpt.state["W"], ckpt.state["b"]))
    record_figures(
        f"numerical_{how}",
        {"injected": 1, "detected": 1, "rolled_back_to": "last good checkpoint", "bytes_rolled_back": 100 * LINE if how == "nan-in-unseen-row" else "the chunk in flight", "snapshot_failures": 0},
    )


def test_a_diverging_learning_rate_is_caught_and_rolled_back(tmp_path, feed, json_log):
    """lr = 3 (valid, but far too large): the loss climbs to hundreds of bits per byte without
    ever becoming NaN. A chunk that costs more than 100 bits per byte on average (12x what a
    model that knows nothing pays) is a diverged step: rolled back like a NaN, its bytes
    counted as dropped (the model that read them is gone)."""
    with InProcessDaemon(config_text(tmp_path, feed, lr=0.1)) as running:  # a good checkpoint first
        learn(running, feed, lines(0, 200), until_bytes=200 * LINE)
        good = running.model("num").checkpoint_id
    with InProcessDaemon(config_text(tmp_path, feed, lr=3.0)) as running:
        assert running.model("num").checkpoint_id == good
        for start in range(200, 1000, 100):
            FeedSource.feeds[feed].put(lines(start, 100))
        wait_until(lambda: running.metric("somad_rollbacks_total", stream="num") >= 2, 60, "rollbacks")
        def accounted():
            return running.metric("somad_bytes_total", stream="num") + running.metric("somad_dropped_bytes_total", stream="num")

        wait_until(lambda: accounted() == 800 * LINE, 60, "800 lines learned or counted as dropped")
        assert running.metric("somad_dropped_bytes_total", stream="num") > 0
        faults = json_log("numerical_fault_rolled_back")
        assert faults and all("diverged" in e["error"] for e in faults), faults[:2]
        assert faults[0]["to"] == good[:12]
        assert running.daemon.runners["num"].alive
        learner = running.model("num").learner
        assert learner.params.all_finite()
        counted = running.metric("somad_numerical_faults_total", stream="num")
        assert counted == running.metric("somad_rollbacks_total", stream="num") == len(json_log("numerical_fault_rolled_back"))
    record_figures("numerical_diverging_lr", {"lr": 3.0, "faults_counted": counted, "every_fault_rolled_back": True})
