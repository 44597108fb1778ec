"""The daemon end to end, in-process: real files, sinks, checkpoints, metrics server."""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

import adapters.registry
from adapters.base import Chunk, Source
from somad.checkpoint import CheckpointStore
from somad.config import SourceConfig, parse_config
from somad.daemon import Daemon
from somad.metrics import Metrics
from tests.support import DaemonThread, KeyedOptions, csv_lines, learned_bytes, wait_for


def config_text(tmp_path: Path, streams: str, **top) -> str:
    extra = "".join(f"{k}: {v}\n" for k, v in top.items())
    return f"""
state_dir: "{tmp_path / 'state'}"
metrics: {{listen: "127.0.0.1:0"}}
shutdown_timeout: 20
{extra}defaults:
  model: {{preset: tiny}}
  snapshot: {{every_seconds: 3600}}
streams:
{streams}
"""


def file_stream(tmp_path: Path, name: str = "log") -> str:
    return f"""  - name: {name}
    source: {{type: file, path: "{tmp_path / (name + '.csv')}", start: saved, poll_interval: 0.05}}
    sinks:
      - {{type: jsonl, path: "{tmp_path / (name + '-scores.jsonl')}", events: both, flush_seconds: 0}}
"""


def running(config, metrics=None) -> DaemonThread:
    return DaemonThread(Daemon(config, metrics=metrics))


def score_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_file_stream_scores_every_record_and_resumes_without_skip_or_repeat(tmp_path):
    data = tmp_path / "log.csv"
    data.write_bytes(csv_lines(0, 1500))
    cfg = parse_config(config_text(tmp_path, file_stream(tmp_path)))
    scores = tmp_path / "log-scores.jsonl"
    with running(cfg) as daemon:
        wait_for(lambda: learned_bytes(daemon, "log") == data.stat().st_size, what="first pass")
    first = [e for e in score_events(scores) if e["event"] == "score"]
    assert len(first) == 1500
    assert [e["index"] for e in first] == list(range(1500))
    store_dir = tmp_path / "state" / "log"
    assert list(store_dir.glob("*.pt")), "shutdown left no checkpoint"

    with data.open("ab") as f:  # the file grew while the daemon was down
        f.write(csv_lines(1500, 400))
    with running(parse_config(config_text(tmp_path, file_stream(tmp_path)))) as daemon:
        wait_for(lambda: learned_bytes(daemon, "log") == data.stat().st_size, what="resume")
        time.sleep(0.3)  # nothing more may arrive
        assert learned_bytes(daemon, "log") == data.stat().st_size
    events = [e for e in score_events(scores) if e["event"] == "score"]
    assert len(events) == 1900  # neither skipped nor repeated
    assert [e["index"] for e in events] == list(range(1900))  # the scorer's count resumed too


def test_an_excess_record_score_gets_each_bytes_entropy_from_the_learner(tmp_path):
    data = tmp_path / "log.csv"
    data.write_bytes(csv_lines(0, 300))
    stream = file_stream(tmp_path) + "    scoring: {detector: surprise, record_score: max_excess}\n"
    with running(parse_config(config_text(tmp_path, stream))) as daemon:
        wait_for(lambda: learned_bytes(daemon, "log") == data.stat().st_size, what="the file")
    scores = [e for e in score_events(tmp_path / "log-scores.jsonl") if e["event"] == "score"]
    assert len(scores) == 300
    # loss minus entropy: below zero where a byte cost less than the model expected (bits never are)
    assert min(e["bits"] for e in scores) < 0 < max(e["bits"] for e in scores)


def test_metrics_and_health_are_served_while_running(tmp_path):
    (tmp_path / "log.csv").write_bytes(csv_lines(0, 300))
    cfg = parse_config(config_text(tmp_path, file_stream(tmp_path)))
    with running(cfg) as daemon:
        wait_for(lambda: learned_bytes(daemon, "log") > 0, what="learning")
        wait_for(lambda: daemon.http is not None and daemon.http.port, what="metrics server")
        health = json.loads(urllib.request.urlopen(daemon.http.url("/healthz"), timeout=5).read())
        assert health["streams"]["log"]["alive"] is True
        wait_for(lambda: 'somad_bytes_total{stream="log"}' in urllib.request.urlopen(daemon.http.url("/metrics"), timeout=5).read().decode(), what="byte counter")


@dataclass(frozen=True)
class BoomOptions:
    fail_after: int = 2  # reads before the source raises


class BoomSource(Source):
    """A source with a bug: raises from read() (not a transient fault it would handle)."""

    type_name = "boom"
    Options = BoomOptions
    starts = 0

    def start(self):
        type(self).starts += 1
        self._reads = 0

    def read(self, timeout):
        self._reads += 1
        if self._reads > self.options.fail_after:
            raise RuntimeError("boom")
        time.sleep(min(timeout, 0.05))
        return [Chunk(b"1,2\n")]

    def stop(self):
        pass


def test_a_failing_stream_is_restarted_and_does_not_stop_the_others(tmp_path, monkeypatch):
    monkeypatch.setitem(adapters.registry.SOURCES, "boom", f"{__name__}:BoomSource")
    BoomSource.starts = 0
    data = tmp_path / "log.csv"
    data.write_bytes(csv_lines(0, 800))
    cfg = parse_config(config_text(tmp_path, file_stream(tmp_path) + file_stream(tmp_path, "other")))
    boom = replace(cfg.streams[1], source=SourceConfig("boom", BoomOptions()))
    cfg = replace(cfg, streams=(cfg.streams[0], boom))
    metrics = Metrics()
    with running(cfg, metrics=metrics) as daemon:
        wait_for(lambda: learned_bytes(daemon, "log") == data.stat().st_size, what="healthy stream")
        wait_for(lambda: BoomSource.starts >= 2, timeout=30, what="restart of the failed stream")
        assert daemon.runners["log"].alive
    restarts = metrics.registry.get_sample_value("somad_stream_restarts_total", {"stream": "other"})
    assert restarts >= 1


@dataclass(frozen=True)
class FloodOptions:
    chunk_bytes: int = 16384


class FloodSource(Source):
    """Produces bytes as fast as it is read: faster than any learner."""

    type_name = "flood"
    Options = FloodOptions

    def start(self):
        self.produced = 0
        self._block = csv_lines(0, self.options.chunk_bytes // 8)[: self.options.chunk_bytes]

    def read(self, timeout):
        self.produced += len(self._block)
        return [Chunk(self._block, received_at=time.monotonic())]

    def stop(self):
        pass


def test_a_source_faster_than_the_learner_drops_oldest_and_counts_every_byte(tmp_path, monkeypatch):
    monkeypatch.setitem(adapters.registry.SOURCES, "flood", f"{__name__}:FloodSource")
    cfg = parse_config(config_text(tmp_path, file_stream(tmp_path)))
    flood = replace(cfg.streams[0], source=SourceConfig("flood", FloodOptions()), queue=replace(cfg.streams[0].queue, max_bytes=65536, policy="drop_oldest"))
    cfg = replace(cfg, streams=(flood,))
    metrics = Metrics()
    with running(cfg, metrics=metrics) as daemon:
        runner = wait_for(lambda: daemon.runners.get("log"), what="runner")
        wait_for(lambda: runner.queue.dropped_bytes > 0, what="drops")
        time.sleep(1.0)
    queue = runner.queue
    assert queue.high_water_bytes <= 65536  # memory bounded by the queue, whatever the source does
    learned = sum(m.learner.bytes_seen for m in runner.pipeline.models.values())
    assert learned + queue.dropped_bytes + queue.queued_bytes == runner.source.produced
    counted = metrics.registry.get_sample_value("somad_dropped_bytes_total", {"stream": "log"})
    assert counted == queue.dropped_bytes


def test_split_by_key_keeps_one_model_and_checkpoint_set_per_key(tmp_path, monkeypatch):
    monkeypatch.setitem(adapters.registry.SOURCES, "keyed", "tests.support:KeyedSource")
    cfg = parse_config(config_text(tmp_path, file_stream(tmp_path)))
    arrival = KeyedOptions(keys=("b", "a/x", "c"), interval=0.01)  # arrival order: a/x, c, b (refused), ...
    keyed = replace(cfg.streams[0], source=SourceConfig("keyed", arrival), split_by_key=True, max_substreams=2)
    cfg = replace(cfg, streams=(keyed,))
    with running(cfg) as daemon:
        runner = wait_for(lambda: daemon.runners.get("log"), what="runner")
        wait_for(lambda: runner.pipeline.unrouted_bytes > 0, what="a third key refused")
        assert sorted(m.name for m in runner.pipeline.models.values()) == ["log/a/x", "log/c"]
    dirs = sorted(p.name for p in (tmp_path / "state" / "log").iterdir())
    assert len(dirs) == 2 and all(list((tmp_path / "state" / "log" / d).glob("*.pt")) for d in dirs)


@pytest.mark.parametrize("policy", ["fresh", "exit"])
def test_a_corrupt_checkpoint_is_refused_and_never_loaded(tmp_path, policy):
    data = tmp_path / "log.csv"
    data.write_bytes(csv_lines(0, 200))
    text = config_text(tmp_path, file_stream(tmp_path), on_bad_checkpoint=policy)
    with running(parse_config(text)) as daemon:
        wait_for(lambda: learned_bytes(daemon, "log") == data.stat().st_size, what="first pass")
    (good,) = (tmp_path / "state" / "log").glob("*.pt")
    bad = good.with_name(good.name.replace("-00000001-", "-00000002-"))
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a newer, truncated snapshot
    daemon = Daemon(parse_config(text))
    if policy == "exit":
        with pytest.raises(Exception, match="unusable checkpoint"):
            daemon.run()
        return
    with running(parse_config(text)) as daemon:
        runner = wait_for(lambda: daemon.runners.get("log"), what="runner")
        model = runner.pipeline.models[""]
        assert model.learner.bytes_seen == data.stat().st_size  # resumed from the older good one
        assert [Path(e.path) for e in model.store.skipped] == [bad]
    assert bad.exists()  # left in place for an operator


def test_store_layout_names_the_architecture(tmp_path):
    (tmp_path / "log.csv").write_bytes(csv_lines(0, 50))
    cfg = parse_config(config_text(tmp_path, file_stream(tmp_path)))
    with running(cfg) as daemon:
        wait_for(lambda: learned_bytes(daemon, "log") > 0, what="learning")
    names = [p.name for p in (tmp_path / "state" / "log").glob("*.pt")]
    assert names and all(n.startswith("k16-h32-") for n in names)
    assert CheckpointStore(tmp_path / "state" / "log", prefix=names[0].rsplit("-", 2)[0]).latest() is not None
