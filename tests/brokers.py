"""A real mosquitto for tests: a free 127.0.0.1 port, a temporary config, stop / kill -9 /
restart on the same port, persistence on (saved after every change) so QoS 1 sessions and
their queued messages survive a restart, even a kill -9.

Also ``wait_until``, the bounded polling every asynchronous test needs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support import wait_for

MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bind to port 0 and ask which one we got)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):
    """``tests.support.wait_for`` with this module's argument order (broker tests' default 10 s)."""
    return wait_for(predicate, timeout, message, interval)


class PortTaken(Exception):
    """The port we picked was taken before mosquitto could bind it."""


class Mosquitto:
    """One broker process in ``workdir``. ``extra_config`` lines are appended to the listener's
    config (TLS files, ``password_file``, ``allow_anonymous false``)."""

    def __init__(self, workdir: Path, port: int | None = None, extra_config: str = ""):
        if MOSQUITTO is None:
            raise RuntimeError("mosquitto is not installed")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._may_move = port is None  # a port we picked may be taken before mosquitto binds it
        self.extra_config = extra_config
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def _write_config(self) -> None:
        anonymous = "" if "allow_anonymous" in self.extra_config else "allow_anonymous true\n"
        self.config_path.write_text(
            f"listener {self.port} {self.host}\n"
            f"{anonymous}"
            f"{self.extra_config}\n"
            # Run as ourselves: as root mosquitto would switch to user 'mosquitto', which
            # cannot write the persistence file in our temporary directory.
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            # Save after every change (subscription, queued message): a kill -9 loses nothing
            # the broker acknowledged before its last save.
            "autosave_on_changes true\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            f"log_dest file {self.log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "connection_messages true\n"
        )

    def start(self, timeout: float = 10.0) -> Mosquitto:
        for _ in range(3 if self._may_move else 1):
            try:
                return self._start(timeout)
            except PortTaken:
                self.port = free_port()
        raise RuntimeError(f"mosquitto found no free port\n{self.log_tail()}")

    def _start(self, timeout: float) -> Mosquitto:
        self._write_config()
        runs_before = self._log_count(" running")
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                proc, self.proc = self.proc, None
                err = proc.stderr.read().decode(errors="replace")
                proc.stderr.close()
                if "in use" in err + self.log_tail() and self._may_move:
                    raise PortTaken(self.port)
                raise RuntimeError(f"mosquitto exited with {proc.returncode}: {err}\n{self.log_tail()}")
            # "running" is logged once every listener is open (a bare connect could reach
            # whoever else holds the port, before mosquitto gives up on it).
            if self._log_count(" running") > runs_before:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                self._may_move = False  # from now on restarts must keep this port
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout} s\n{self.log_tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop (SIGTERM): the broker saves its database."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """kill -9: no goodbye to clients, no last save."""
        self._end(signal.SIGKILL, 5.0)

    def restart(self, kill: bool = True, down_for: float = 0.0) -> None:
        """Stop (kill -9 by default), stay down ``down_for`` seconds, start again on the same port."""
        self.kill() if kill else self.stop()
        time.sleep(down_for)
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _log_count(self, text: str) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(text)
        except OSError:
            return 0

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no mosquitto log)"

    def _end(self, sig: int, timeout: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)
        finally:
            proc.stderr.close()


def add_password(path: Path, username: str, password: str) -> None:
    """Add a user to a mosquitto password file (hashed by mosquitto_passwd)."""
    if MOSQUITTO_PASSWD is None:
        raise RuntimeError("mosquitto_passwd is not installed")
    args = [MOSQUITTO_PASSWD, "-b"] + ([] if path.exists() else ["-c"]) + [str(path), username, password]
    subprocess.run(args, check=True, capture_output=True, timeout=10)
