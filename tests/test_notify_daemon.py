"""The real daemon (``somad run --config`` in a subprocess) under a stand-in for systemd: a unix
datagram socket bound here as ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$STATE_DIRECTORY`` in its
environment, exactly what ``Type=notify``, ``WatchdogSec=`` and ``StateDirectory=`` give it.

The wedge is real too: a sink that breaks the never-block contract (``StallSink`` below) holds the
stream's worker inside ``pipeline.process`` while the process itself keeps running. The daemon
loads it through the adapter registry, added by a ``sitecustomize`` module on ``PYTHONPATH``
(Python imports that at start-up), so the command under test is the installed ``somad`` script.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters.base import Sink

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 120.0  # importing torch on a loaded 2-core machine takes a while
WAIT = 30.0  # any other single wait


# ============================================================================ the stalling sink


@dataclass(frozen=True)
class StallOptions:
    hold: str  # while this file exists, send() does not return
    marker: str  # created when send() starts holding, so the test knows the worker is stuck
    max_seconds: float = 120.0  # a forgotten hold file still cannot hang a test run forever


class StallSink(Sink):
    """A buggy sink: ``send`` blocks (a synchronous write to a dead NFS mount would). It is
    called from inside ``pipeline.process``, so the worker that calls it is wedged there."""

    type_name = "stall"
    Options = StallOptions

    def send(self, event) -> None:
        if not os.path.exists(self.options.hold):
            return
        Path(self.options.marker).touch()
        deadline = time.monotonic() + self.options.max_seconds
        while os.path.exists(self.options.hold) and time.monotonic() < deadline:
            time.sleep(0.05)


SITECUSTOMIZE = """\
# Written by tests/test_notify_daemon.py: registers its test-only sink in the daemon it starts.
import adapters.registry

adapters.registry.SINKS["stall"] = "tests.test_notify_daemon:StallSink"
"""


# ============================================================================ systemd's side


class FakeSystemd:
    """The receiving end of sd_notify: every datagram kept with its arrival time."""

    def __init__(self, directory: Path):
        self.path = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self._messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._messages.append((time.monotonic(), data.decode()))

    def messages(self) -> list[str]:
        with self._lock:
            return [text for _, text in self._messages]

    def count(self, prefix: str) -> int:
        return sum(m.startswith(prefix) for m in self.messages())

    def wait(self, prefix: str, after: int = 0, timeout: float = WAIT, process=None, contains: str = "") -> str:
        """The first message starting with ``prefix`` (and holding ``contains``) among those from
        index ``after`` on; fails early if ``process`` exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for m in self.messages()[after:] if m.startswith(prefix) and contains in m]
            if found:
                return found[0]
            if process is not None and process.poll() is not None:
                raise AssertionError(f"somad exited ({process.returncode}) before sending {prefix!r}:\n{process.log_tail()}")
            time.sleep(0.05)
        raise AssertionError(f"no {prefix!r} within {timeout:.0f} s; received: {self.messages()[after:][-10:]}")

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2.0)
        self.sock.close()


class Somad:
    """``somad run --config FILE`` as systemd starts it, its JSON log captured in a file."""

    def __init__(self, config: Path, env: dict[str, str], log: Path):
        script = Path(sys.executable).with_name("somad")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "somad"]
        self.log = log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen([*command, "run", "--config", str(config)], env=env, cwd=config.parent, stdout=self._log_file, stderr=subprocess.STDOUT)  # fmt: skip

    @property
    def returncode(self):
        return self.proc.returncode

    def poll(self):
        return self.proc.poll()

    def events(self) -> list[dict]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass  # a line being written right now
        return out

    def wait_event(self, name: str, timeout: float = WAIT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events() if e.get("event") == name]
            if found:
                return found[-1]
            if self.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no {name!r} log event within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def health(self) -> dict:
        address = self.wait_event("metrics_listening")["address"]
        try:
            reply = urllib.request.urlopen(f"http://{address}/healthz", timeout=10)
        except urllib.error.HTTPError as unhealthy:  # 503 still carries the report
            reply = unhealthy
        return json.loads(reply.read())

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait; killed (and the test failed) if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"somad did not exit within {timeout:.0f} s of SIGTERM:\n{self.log_tail()}") from None
        finally:
            self._log_file.close()


@pytest.fixture
def short_dir():
    """A short directory: a unix socket path must fit in 108 bytes, pytest's tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="somad-sd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def systemd(short_dir):
    fake = FakeSystemd(short_dir)
    yield fake
    fake.close()


def service_env(systemd: FakeSystemd, tmp_path: Path, watchdog_usec: int, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "NOTIFY_SOCKET", "WATCHDOG_USEC", "STATE_DIRECTORY")}
    env.update(
        NOTIFY_SOCKET=systemd.path,
        WATCHDOG_USEC=str(watchdog_usec),
        STATE_DIRECTORY=str(tmp_path / "state"),
        OMP_NUM_THREADS="1",
        **extra,
    )
    return env


@pytest.fixture
def started():
    """Every daemon a test starts is stopped (and its log shown on failure) at the end."""
    running: list[Somad] = []
    yield running
    for daemon in running:
        if daemon.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)


HEADER = """\
metrics: {listen: "127.0.0.1:0"}
log: {level: info, format: json}
shutdown_timeout: 3
defaults:
  model: {preset: tiny}
  snapshot: {every_seconds: 3600}
streams:
"""  # no state_dir: the daemon takes $STATE_DIRECTORY, as under systemd


def wait_until(predicate, what: str, daemon: Somad, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert daemon.poll() is None, f"somad exited ({daemon.returncode}) waiting for {what}:\n{daemon.log_tail()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ============================================================================ the tests


def test_ready_status_watchdog_reload_and_stopping_from_the_real_daemon(tmp_path, systemd, started):
    (tmp_path / "log.csv").write_bytes(b"".join(f"{i},{i % 13}.{i % 7}\n".encode() for i in range(3000)))
    config = tmp_path / "somad.yaml"
    config.write_text(
        HEADER
        + "  - {name: sim, source: {type: simulate, rate: 100}}\n"
        + f'  - {{name: log, source: {{type: file, path: "{tmp_path / "log.csv"}", start: beginning, poll_interval: 0.05}}}}\n'
    )
    daemon = Somad(config, service_env(systemd, tmp_path, watchdog_usec=1_000_000), tmp_path / "somad.log")
    started.append(daemon)

    # READY=1, once every stream has started: its status names both, the log started both first.
    ready = systemd.wait("READY=1", timeout=START_TIMEOUT, process=daemon)
    assert systemd.messages()[0] == ready, "nothing may come before READY=1"
    status = ready.split("\n")[1]
    assert status.startswith("STATUS=2 streams sim:") and " log:" in status, ready
    names = [e.get("event") for e in daemon.events()]
    assert names.index("ready") > max(i for i, n in enumerate(names) if n == "stream_started")
    assert sorted(e["stream"] for e in daemon.events() if e.get("event") == "stream_started") == ["log", "sim"]
    health = daemon.health()["streams"]
    assert health["sim"]["alive"] and health["log"]["alive"] and not health["sim"]["wedged"]

    # WATCHDOG=1 again and again (every 0.5 s: half of WATCHDOG_USEC) while both streams progress,
    # and a fresh STATUS= once the summary changed.
    for _ in range(4):
        systemd.wait("WATCHDOG=1", after=len(systemd.messages()), process=daemon)
    update = systemd.wait("STATUS=", after=1, process=daemon)
    assert update.startswith("STATUS=2 streams sim:") and update != status

    # systemctl reload = ExecReload's SIGHUP: RELOADING=1, then READY=1 when the new config is in.
    before = len(systemd.messages())
    daemon.signal(signal.SIGHUP)
    systemd.wait("RELOADING=1", after=before, process=daemon)
    systemd.wait("READY=1", after=before, process=daemon)
    daemon.wait_event("reloaded")

    # systemctl stop = SIGTERM: STOPPING=1 first, then a clean exit with every stream snapshotted
    # in $STATE_DIRECTORY (the config names no state_dir).
    assert daemon.stop() == 0, daemon.log_tail()
    messages = systemd.messages()
    stopping = messages.index("STOPPING=1")
    assert "WATCHDOG=1" not in messages[stopping:]
    for stream in ("sim", "log"):
        assert list((tmp_path / "state" / stream).glob("*.pt")), f"no checkpoint for {stream} in $STATE_DIRECTORY"
    assert [e["event"] for e in daemon.events()][-1] == "stopped"


def test_watchdog_pings_stop_while_a_worker_is_wedged_and_resume_after(tmp_path, systemd, started):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    hold, marker = tmp_path / "hold", tmp_path / "blocked"
    config = tmp_path / "somad.yaml"
    config.write_text(
        HEADER
        + "  - name: sim\n"
        + "    source: {type: simulate, rate: 100}\n"
        + f'    sinks: [{{type: stall, hold: "{hold}", marker: "{marker}"}}]\n'
    )
    # Pings every 1 s; a worker silent for 2 s (stall_limit: the ping interval, at least 2 s) is wedged.
    env = service_env(systemd, tmp_path, watchdog_usec=2_000_000, PYTHONPATH=os.pathsep.join([str(hooks), str(REPO)]))
    daemon = Somad(config, env, tmp_path / "somad.log")
    started.append(daemon)
    systemd.wait("READY=1", timeout=START_TIMEOUT, process=daemon)
    for _ in range(2):
        systemd.wait("WATCHDOG=1", after=len(systemd.messages()), process=daemon)

    # Wedge the worker inside pipeline.process: the pings stop, the process lives on.
    hold.touch()
    wait_until(marker.exists, "the stalling sink to hold the worker", daemon)
    wedged = daemon.wait_event("stream_wedged")
    assert wedged["stream"] == "sim" and wedged["limit_seconds"] == 2.0
    time.sleep(0.5)  # a ping already on its way when the wedge was noticed
    pings = systemd.count("WATCHDOG=1")
    time.sleep(3.5)  # three ping intervals and more
    assert systemd.count("WATCHDOG=1") == pings, "watchdog pings went on while the worker was wedged"
    assert daemon.poll() is None
    health = daemon.health()
    assert health["streams"]["sim"]["wedged"] is True and health["status"] == "unhealthy"  # /healthz answered 503
    assert systemd.wait("STATUS=", after=1, contains="WEDGED", process=daemon).startswith("STATUS=1 streams sim:")

    # Released: the worker comes back and the pings resume.
    hold.unlink()
    systemd.wait("WATCHDOG=1", after=len(systemd.messages()), process=daemon)
    daemon.wait_event("stream_unwedged")

    # Wedged again, then stopped: the daemon still exits on SIGTERM (not only on systemd's
    # SIGKILL), without snapshotting a model its worker is in the middle of.
    marker.unlink()
    hold.touch()
    wait_until(marker.exists, "the stalling sink to hold the worker again", daemon)
    assert daemon.stop() == 0, daemon.log_tail()
    assert "STOPPING=1" in systemd.messages()
    assert daemon.wait_event("final_snapshot_skipped")["stream"] == "sim"
    hold.unlink()
