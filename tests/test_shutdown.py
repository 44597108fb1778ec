"""Graceful shutdown of ``somad run --config`` as a real process: signals, time bounds, checkpoints.

SIGTERM (or a first SIGINT) stops the sources, drains the queues within ``shutdown_timeout``,
writes a final checkpoint and exits 0; a second signal during a long drain exits at once with
a non-zero status. Each test starts the console script in its own process and reads its JSON
log from stderr.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Self

import pytest

from somad.checkpoint import CheckpointStore
from tests.support import csv_lines, wait_for

# The console script beside this interpreter (the venv's), else the module form.
_SCRIPT = Path(sys.executable).with_name("somad")
SOMAD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "somad"]
START_TIMEOUT = 60.0  # seconds for a fresh interpreter to import torch and start, on a loaded machine
EXIT_MARGIN = 1.0  # seconds past shutdown_timeout for the interpreter itself to wind down


class SomadProcess:
    """``somad run --config FILE`` as a child process; its JSON log events collected as they come."""

    def __init__(self, config: Path, stdin=subprocess.DEVNULL):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [*SOMAD, "run", "--config", str(config)],
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=config.parent,
        )
        self.events: list[dict] = []
        self.stderr_lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._changed:
                self.stderr_lines.append(line)
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                if isinstance(event, dict):
                    self.events.append(event)
                self._changed.notify_all()

    def wait_event(self, name: str, timeout: float = START_TIMEOUT) -> dict:
        """The first log event called ``name`` (waiting for it at most ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((e for e in self.events if e.get("event") == name), None)
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no {name!r} event within {timeout} s; log:\n" + self.log_tail())
                self._changed.wait(min(remaining, 0.2))

    def has_event(self, name: str) -> bool:
        with self._changed:
            return any(e.get("event") == name for e in self.events)

    def log_tail(self, lines: int = 40) -> str:
        with self._changed:
            return "\n".join(self.stderr_lines[-lines:])

    def metric(self, name: str, stream: str) -> float:
        """One sample from the process's /metrics (0 when the series is not there yet)."""
        address = self.wait_event("metrics_listening")["address"]
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
        prefix = f'{name}{{stream="{stream}"}} '
        values = [float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)]
        return values[0] if values else 0.0

    def wait_exit(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:  # a failed test must not leave a daemon behind
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        self.proc.stdout.close()
        self.proc.stderr.close()


def write_config(tmp_path: Path, stream: str, shutdown_timeout: float, preset: str = "tiny") -> Path:
    path = tmp_path / "somad.yaml"
    path.write_text(f"""
state_dir: "{tmp_path / 'state'}"
metrics: {{listen: "127.0.0.1:0"}}
log: {{level: info, format: json}}
shutdown_timeout: {shutdown_timeout}
streams:
{stream}
    model: {{preset: {preset}}}
    snapshot: {{every_seconds: 3600}}
""")
    return path


def latest_checkpoint(tmp_path: Path, stream: str):
    directory = tmp_path / "state" / stream
    files = sorted(directory.glob("*.pt"))
    assert files, f"no checkpoint in {directory}"
    prefix = files[-1].name.rsplit("-", 2)[0]
    ckpt = CheckpointStore(directory, prefix=prefix).latest()
    assert ckpt is not None, f"no loadable checkpoint in {directory}"
    return ckpt


def backlog_stream(tmp_path: Path, n_lines: int) -> str:
    """A file stream whose whole file is queued at once (block policy, queue larger than the file)."""
    data = tmp_path / "backlog.csv"
    data.write_bytes(csv_lines(0, n_lines))
    return f"""  - name: backlog
    source: {{type: file, path: "{data}", start: beginning, poll_interval: 0.05}}
    queue: {{max_bytes: 16777216, policy: block}}"""


def test_sigterm_exits_zero_within_the_shutdown_timeout_with_a_checkpoint(tmp_path):
    stream = """  - name: sensor
    source: {type: simulate, rate: 2000}"""
    timeout = 5.0
    with SomadProcess(write_config(tmp_path, stream, timeout)) as somad:
        somad.wait_event("ready")
        wait_for(lambda: somad.metric("somad_bytes_total", "sensor") > 0, 30, "bytes learned")
        signalled = time.monotonic()
        somad.proc.send_signal(signal.SIGTERM)
        rc = somad.wait_exit(timeout + 30)  # generous wait; the bound is asserted below
        took = time.monotonic() - signalled
        assert rc == 0, somad.log_tail()
        assert took < timeout + EXIT_MARGIN, f"exit took {took:.1f} s with shutdown_timeout {timeout}"
        assert somad.has_event("stopped")
    ckpt = latest_checkpoint(tmp_path, "sensor")
    assert ckpt.bytes_seen > 0


def test_a_drain_longer_than_the_timeout_is_cut_and_the_checkpoint_matches_what_was_learned(tmp_path):
    timeout = 5.0
    config = write_config(tmp_path, backlog_stream(tmp_path, 150_000), timeout, preset="small")
    size = (tmp_path / "backlog.csv").stat().st_size
    with SomadProcess(config) as somad:
        somad.wait_event("ready")
        wait_for(lambda: somad.metric("somad_bytes_total", "backlog") > 0, 30, "learning under way")
        signalled = time.monotonic()
        somad.proc.send_signal(signal.SIGTERM)
        rc = somad.wait_exit(timeout + 30)
        took = time.monotonic() - signalled
        assert rc == 0, somad.log_tail()
        assert somad.has_event("drain_timeout"), "the backlog should outlast the timeout"
        assert took < timeout + EXIT_MARGIN, f"exit took {took:.1f} s with shutdown_timeout {timeout}"
    ckpt = latest_checkpoint(tmp_path, "backlog")
    learned = ckpt.bytes_seen
    assert 0 < learned < size
    # The saved offset is exactly what was learned: a restart resumes there, losing nothing.
    assert ckpt.extra["offset"] == learned


def test_a_second_sigint_during_a_long_drain_exits_at_once_with_a_failure_status(tmp_path):
    config = write_config(tmp_path, backlog_stream(tmp_path, 150_000), shutdown_timeout=300, preset="small")
    with SomadProcess(config) as somad:
        somad.wait_event("ready")
        wait_for(lambda: somad.metric("somad_bytes_total", "backlog") > 0, 30, "learning under way")
        somad.proc.send_signal(signal.SIGINT)
        somad.wait_event("stopping", timeout=10)
        time.sleep(0.5)  # inside the drain now
        assert somad.proc.poll() is None, "the first signal must drain, not exit"
        signalled = time.monotonic()
        somad.proc.send_signal(signal.SIGINT)
        rc = somad.wait_exit(30)
        took = time.monotonic() - signalled
    assert rc == 130, f"rc {rc}"
    assert took < 5.0, f"forced exit took {took:.1f} s"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_before_any_byte_still_exits_zero(tmp_path, sig):
    stream = """  - name: quiet
    source: {type: tcp, listen: "127.0.0.1:0"}"""
    with SomadProcess(write_config(tmp_path, stream, 5.0)) as somad:
        somad.wait_event("ready")
        somad.proc.send_signal(sig)
        assert somad.wait_exit(30) == 0, somad.log_tail()
    assert not list((tmp_path / "state").rglob("*.pt")), "nothing learned: nothing to snapshot"
