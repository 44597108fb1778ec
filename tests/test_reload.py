"""Live reload (issue 6): SIGHUP / a changed file / ``request_reload`` re-read the config; only
changed streams restart (resuming from their checkpoint), the others keep their model,
learner, counters and source connection; a bad reload keeps the daemon serving on the old
config; a model whose architecture changed starts fresh beside the old checkpoint.

Real files, real checkpoints, a real metrics listener, and one real ``somad run`` process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import structlog

import adapters.registry
from somad.checkpoint import load_checkpoint
from somad.config import parse_config
from somad.daemon import Daemon
from somad.metrics import Metrics
from somad.notify import SystemdNotifier
from tests.support import DaemonThread, learned_bytes, wait_for

ROOT = Path(__file__).resolve().parent.parent
SOMAD = ROOT / ".venv" / "bin" / "somad"


# --------------------------------------------------------------------------- helpers


def lines(start: int, n: int) -> bytes:
    return b"".join(f"{i % 89},{(i * 5) % 11}.{i % 7}\n".encode() for i in range(start, start + n))


def running(config_file: Path, metrics: Metrics | None = None, notifier=None) -> DaemonThread:
    """The daemon as ``somad run --config`` builds it (so that SIGHUP-style reloads re-read the file)."""
    config = parse_config(config_file.read_text(), str(config_file))
    return DaemonThread(Daemon(config, metrics=metrics or Metrics(), notifier=notifier, config_path=config_file))


def stream_yaml(tmp_path: Path, name: str, extra: str = "") -> str:
    return f"""  - name: {name}
    source: {{type: file, path: "{tmp_path / (name + '.csv')}", start: saved, poll_interval: 0.05}}
    sinks:
      - {{type: jsonl, path: "{tmp_path / (name + '-scores.jsonl')}", events: both, flush_seconds: 0}}
{extra}"""


def config_yaml(tmp_path: Path, *streams: str, top: str = "") -> str:
    return f"""state_dir: "{tmp_path / 'state'}"
metrics: {{listen: "127.0.0.1:0"}}
shutdown_timeout: 20
{top}defaults:
  model: {{preset: tiny}}
  snapshot: {{every_seconds: 3600}}
streams:
{''.join(streams)}"""


def sample(metrics: Metrics, name: str, stream: str | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, {"stream": stream} if stream else {})


def reloads(metrics: Metrics) -> tuple[float, float]:
    return sample(metrics, "somad_config_reloads_total"), sample(metrics, "somad_config_reload_failures_total")


def reload_and_wait(daemon: Daemon, metrics: Metrics, attempts: float) -> None:
    """SIGHUP's path: request, then wait until the main loop has handled the request."""
    daemon.request_reload()
    wait_for(lambda: reloads(metrics)[0] >= attempts, what=f"reload attempt {attempts:.0f}")


def score_count(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip() and json.loads(line)["event"] == "score")


# --------------------------------------------------------------------------- reload keeps what did not change


def test_only_changed_streams_restart_and_they_resume_from_their_checkpoint(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.csv").write_bytes(lines(0, 400))
    config = tmp_path / "somad.yaml"
    config.write_text(config_yaml(tmp_path, stream_yaml(tmp_path, "a"), stream_yaml(tmp_path, "b")))
    metrics = Metrics()
    with running(config, metrics) as daemon:
        size = (tmp_path / "a.csv").stat().st_size
        wait_for(lambda: learned_bytes(daemon, "a") == size and learned_bytes(daemon, "b") == size, what="both streams learned")
        a, b = daemon.runners["a"], daemon.runners["b"]
        a_model, a_learner, a_source = a.pipeline.models[""], a.pipeline.models[""].learner, a.source
        a_counted = wait_for(lambda: sample(metrics, "somad_bytes_total", "a") == size and size, what="a counted")

        # b's alert threshold changes; a's settings do not
        config.write_text(config_yaml(tmp_path, stream_yaml(tmp_path, "a"), stream_yaml(tmp_path, "b", "    alerts: {threshold: 0.95}\n")))
        reload_and_wait(daemon, metrics, 1)
        assert reloads(metrics) == (1.0, 0.0)

        assert daemon.runners["a"] is a and a.alive  # untouched: the very same objects
        assert a.pipeline.models[""] is a_model and a_model.learner is a_learner and a.source is a_source
        assert sample(metrics, "somad_bytes_total", "a") == a_counted

        new_b = daemon.runners["b"]
        assert new_b is not b and new_b.cfg.alerts.threshold == 0.95
        b_model = new_b.pipeline.models[""]
        assert b_model.learner.bytes_seen == size  # resumed from the snapshot taken when b stopped
        (b_snapshot,) = (tmp_path / "state" / "b").glob("*.pt")
        assert b_model.checkpoint_id == load_checkpoint(b_snapshot).checkpoint_id

        with (tmp_path / "a.csv").open("ab") as f:
            f.write(lines(400, 100))
        with (tmp_path / "b.csv").open("ab") as f:
            f.write(lines(400, 100))
        grown = (tmp_path / "a.csv").stat().st_size
        wait_for(lambda: learned_bytes(daemon, "a") == grown and learned_bytes(daemon, "b") == grown, what="both streams learned the new lines")
        assert a_model.learner is a_learner
        # counters went on, not reset; and the restarted stream counted nothing twice
        wait_for(lambda: [sample(metrics, "somad_bytes_total", s) for s in "ab"] == [grown, grown], what="byte counters")
        time.sleep(0.3)
        assert [sample(metrics, "somad_bytes_total", s) for s in "ab"] == [grown, grown]
    assert score_count(tmp_path / "a-scores.jsonl") == 500
    assert score_count(tmp_path / "b-scores.jsonl") == 500  # b resumed at its saved offset: no line scored twice


def test_added_and_removed_streams_start_and_stop_and_removed_series_go(tmp_path, monkeypatch):
    monkeypatch.setitem(adapters.registry.SOURCES, "keyed", "tests.support:KeyedSource")
    for name in ("a", "c"):
        (tmp_path / f"{name}.csv").write_bytes(lines(0, 200))
    keyed = "  - name: b\n    source: {type: keyed}\n    split_by_key: true\n"
    config = tmp_path / "somad.yaml"
    config.write_text(config_yaml(tmp_path, stream_yaml(tmp_path, "a"), keyed))
    metrics = Metrics()
    with running(config, metrics) as daemon:
        wait_for(lambda: learned_bytes(daemon, "a") == (tmp_path / "a.csv").stat().st_size, what="a learned")
        wait_for(lambda: sample(metrics, "somad_bytes_total", "b/k1") and sample(metrics, "somad_bytes_total", "b/k2"), what="b's sub-streams")
        a = daemon.runners["a"]

        config.write_text(config_yaml(tmp_path, stream_yaml(tmp_path, "a"), stream_yaml(tmp_path, "c")))
        reload_and_wait(daemon, metrics, 1)

        assert sorted(daemon.runners) == ["a", "c"] and daemon.runners["a"] is a
        wait_for(lambda: learned_bytes(daemon, "c") == (tmp_path / "c.csv").stat().st_size, what="c learned")
        for series in ("b", "b/k1", "b/k2"):
            assert sample(metrics, "somad_bytes_total", series) is None, f"{series} still exported"
        assert "b" not in metrics.stream_names()
        wait_for(lambda: sample(metrics, "somad_bytes_total", "c") == (tmp_path / "c.csv").stat().st_size, what="c counted")
    assert len(list((tmp_path / "state" / "b").rglob("*.pt"))) == 2  # the removed stream's models were saved on the way out


# --------------------------------------------------------------------------- a bad reload keeps serving


def taken_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


BAD_RELOADS = {
    "unknown key": (lambda tmp, good, port: good.replace("shutdown_timeout: 20", "shutdown_timout: 20"), "shutdown_timout: unknown key (did you mean 'shutdown_timeout'?)"),
    "YAML syntax": (lambda tmp, good, port: good + "  - name: [\n", "YAML syntax error"),
    "no file": (None, "No such file"),
    "metrics address taken": (lambda tmp, good, port: good.replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"'), "cannot serve /metrics on '127.0.0.1:{port}'"),
    "state_dir not creatable": (lambda tmp, good, port: good.replace(str(tmp / "state"), str(tmp / "a.csv" / "state")), "state_dir: cannot create"),
}


@pytest.mark.parametrize("case", list(BAD_RELOADS))
def test_a_bad_reload_keeps_the_running_config_counts_and_says_why(tmp_path, case):
    edit, reason = BAD_RELOADS[case]
    (tmp_path / "a.csv").write_bytes(lines(0, 200))
    good = config_yaml(tmp_path, stream_yaml(tmp_path, "a"))
    config = tmp_path / "somad.yaml"
    config.write_text(good)
    metrics = Metrics()
    blocker = taken_port()
    try:
        with running(config, metrics) as daemon:
            wait_for(lambda: learned_bytes(daemon, "a") == (tmp_path / "a.csv").stat().st_size, what="a learned")
            before, runner, http = daemon.config, daemon.runners["a"], daemon.http
            if edit is None:
                config.unlink()
            else:
                config.write_text(edit(tmp_path, good, blocker.getsockname()[1]))
            with structlog.testing.capture_logs() as logs:
                daemon.request_reload()
                wait_for(lambda: [e for e in logs if e["event"] in ("reload_rejected", "reload_failed")], what="the log line saying why")
            assert reloads(metrics) == (1.0, 1.0)
            assert daemon.config is before and daemon.runners["a"] is runner and daemon.http is http
            why = [e for e in logs if e["event"] in ("reload_rejected", "reload_failed")]
            assert len(why) == 1 and why[0]["log_level"] == "error", logs
            assert reason.replace("{port}", str(blocker.getsockname()[1])) in json.dumps(why[0]), why[0]
            assert why[0]["kept"] == "the running config"

            with (tmp_path / "a.csv").open("ab") as f:  # still learning, still exporting
                f.write(lines(200, 50))
            wait_for(lambda: learned_bytes(daemon, "a") == (tmp_path / "a.csv").stat().st_size, what="a learned after the bad reload")
            body = urllib.request.urlopen(daemon.http.url("/metrics"), timeout=10).read().decode()
            assert "somad_config_reload_failures_total 1.0" in body
    finally:
        blocker.close()


def test_systemd_hears_ready_again_after_a_rejected_reload(tmp_path):
    """RELOADING=1 must be followed by READY=1 even when the new config is refused, or
    systemd shows the unit as reloading for ever (Type=notify-reload waits on it)."""
    (tmp_path / "a.csv").write_bytes(lines(0, 50))
    config = tmp_path / "somad.yaml"
    config.write_text(config_yaml(tmp_path, stream_yaml(tmp_path, "a")))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    listener.settimeout(10)
    try:
        metrics = Metrics()
        with running(config, metrics, notifier=SystemdNotifier(env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})) as daemon:
            assert listener.recv(4096).startswith(b"READY=1")
            config.write_text("streams: {}\n")
            daemon.request_reload()
            messages = []
            while not (messages and messages[-1].startswith(b"READY=1")):
                message = listener.recv(4096)  # times out (failing the test) if READY never comes
                if not message.startswith((b"STATUS=", b"WATCHDOG=")):
                    messages.append(message)
        assert messages[0] == b"RELOADING=1" and messages[1].startswith(b"READY=1"), messages
        assert reloads(metrics) == (1.0, 1.0)
    finally:
        listener.close()


def test_metrics_listener_moves_on_a_good_reload(tmp_path):
    (tmp_path / "a.csv").write_bytes(lines(0, 50))
    config = tmp_path / "somad.yaml"
    config.write_text(config_yaml(tmp_path, stream_yaml(tmp_path, "a")))
    metrics = Metrics()
    with running(config, metrics) as daemon:
        wait_for(lambda: daemon.http is not None and learned_bytes(daemon, "a") > 0, what="start")
        old_url = daemon.http.url("/metrics")
        with socket.socket() as probe:  # a port free now, for the new listener
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config.write_text(config_yaml(tmp_path, stream_yaml(tmp_path, "a")).replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"'))
        reload_and_wait(daemon, metrics, 1)
        assert reloads(metrics) == (1.0, 0.0) and daemon.http.port == port
        assert b"somad_bytes_total" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        with pytest.raises(OSError):
            urllib.request.urlopen(old_url, timeout=5)


# --------------------------------------------------------------------------- architecture changes


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.pt"))}


def test_a_new_architecture_starts_fresh_beside_the_old_checkpoint(tmp_path):
    data = tmp_path / "a.csv"
    data.write_bytes(lines(0, 300))
    config = tmp_path / "somad.yaml"
    config.write_text(config_yaml(tmp_path, stream_yaml(tmp_path, "a")))
    metrics = Metrics()
    with running(config, metrics) as daemon:
        wait_for(lambda: learned_bytes(daemon, "a") == data.stat().st_size, what="a learned")
        config.write_text(config_yaml(tmp_path, stream_yaml(tmp_path, "a", "    model: {hidden_dim: 48}\n")))
        reload_and_wait(daemon, metrics, 1)
        old = digests(tmp_path / "state" / "a")  # written when the old model stopped
        assert len(old) == 1 and all(name.startswith("k16-h32-") for name in old)
        (old_id,) = [load_checkpoint(tmp_path / "state" / "a" / n).checkpoint_id for n in old]

        model = daemon.runners["a"].pipeline.models[""]
        assert model.learner.cfg.hidden_dim == 48
        # fresh: nothing loaded (it may have begun reading the file already: its offset moves)
        assert model.checkpoint_id == "" and model.learner.bytes_seen <= data.stat().st_size
        wait_for(lambda: learned_bytes(daemon, "a") == data.stat().st_size, what="the new model read the file from its start")
    now = digests(tmp_path / "state" / "a")
    assert {n: d for n, d in now.items() if n in old} == old  # the old checkpoint, byte for byte
    (new_name,) = [n for n in now if n not in old]
    assert new_name.startswith("k16-h48-")
    new = load_checkpoint(tmp_path / "state" / "a" / new_name)
    assert old_id not in new.lineage  # a new lineage, not a continuation


# --------------------------------------------------------------------------- watch_config


def test_a_changed_file_is_reloaded_when_watch_config_is_on(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.csv").write_bytes(lines(0, 100))
    config = tmp_path / "somad.yaml"
    config.write_text(config_yaml(tmp_path, stream_yaml(tmp_path, "a"), top="watch_config: true\n"))
    metrics = Metrics()
    with running(config, metrics) as daemon:
        wait_for(lambda: learned_bytes(daemon, "a") > 0, what="a learned")
        replacement = tmp_path / "somad.yaml.new"  # as editors and config management do: a new file renamed over
        replacement.write_text(config_yaml(tmp_path, stream_yaml(tmp_path, "a"), stream_yaml(tmp_path, "b"), top="watch_config: true\n"))
        os.replace(replacement, config)
        wait_for(lambda: "b" in daemon.runners, timeout=30, what="the watched change applied")
        assert reloads(metrics) == (1.0, 0.0)
        time.sleep(2.5)  # another watch interval: an unchanged file is not reloaded again
        assert reloads(metrics) == (1.0, 0.0)


# --------------------------------------------------------------------------- SIGHUP to a real process


def log_events(path: Path) -> list[dict]:
    events = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else ():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass  # a line that is not JSON (a warning from a library before logging is set up)
    return events


def test_sighup_reloads_a_running_somad_process(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.csv").write_bytes(lines(0, 100))
    config = tmp_path / "somad.yaml"
    config.write_text(config_yaml(tmp_path, stream_yaml(tmp_path, "a"), top="log: {format: json}\n"))
    stderr = tmp_path / "stderr.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NOTIFY_SOCKET": ""}
    with stderr.open("wb") as err:
        proc = subprocess.Popen([str(SOMAD), "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path, env=env)
    try:
        events = lambda name: [e for e in log_events(stderr) if e.get("event") == name]
        wait_for(lambda: events("ready") or proc.poll() is not None, timeout=90, what="somad ready")
        assert proc.poll() is None, stderr.read_text()[-3000:]

        config.write_text(config_yaml(tmp_path, stream_yaml(tmp_path, "a"), stream_yaml(tmp_path, "b"), top="log: {format: json}\n"))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: events("reloaded"), timeout=60, what="reloaded")
        wait_for(lambda: score_count(tmp_path / "b-scores.jsonl") == 100, timeout=60, what="the added stream's scores")

        config.write_text("streams: [\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: events("reload_rejected"), timeout=60, what="reload_rejected")
        assert proc.poll() is None  # still running on the old config
        with (tmp_path / "b.csv").open("ab") as f:
            f.write(lines(100, 20))
        wait_for(lambda: score_count(tmp_path / "b-scores.jsonl") == 120, timeout=60, what="b still scored after the bad reload")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert events("stopped")
