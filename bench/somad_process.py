"""``somad run --config`` in its own process, as the daemon benches watch it: from outside only.

Its JSON log goes to ``somad.log`` in the work directory (read on demand, and left there to
look at), /metrics is scraped over HTTP, memory, CPU time and file descriptors come from /proc,
and it is stopped with SIGTERM (killed if it does not exit in time).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .common import log, process_cpu_seconds, process_memory

START_TIMEOUT = 180.0  # seconds for a fresh daemon to import torch and open its streams (loaded machine)
_SCRIPT = Path(sys.executable).with_name("somad")
SOMAD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "somad"]


class SomadProcess:
    """One daemon process running ``config`` (YAML text) in ``workdir``; ``start_timeout``: how
    long ``wait_event`` waits by default."""

    def __init__(self, workdir: Path, config: str, start_timeout: float = START_TIMEOUT):
        self.start_timeout = start_timeout
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "somad.yaml"
        self.config.write_text(config)
        self.log_path = workdir / "somad.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*SOMAD, "run", "--config", str(self.config)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=workdir,
        )  # fmt: skip
        self.pid = self.proc.pid
        self._metrics_address: str | None = None

    def events(self, name: str) -> list[dict]:
        """Every log entry with ``"event": name`` so far, in order."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == name:
                found.append(entry)
        return found

    def wait_event(self, name: str, timeout: float | None = None) -> dict:
        """The first ``name`` event; SystemExit with the log's tail if none comes in time."""
        timeout = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while not (found := self.events(name)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daemon: no {name!r} event within {timeout:.0f} s; log tail:\n{self.tail()}")
            time.sleep(0.1)
        return found[0]

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def samples(self) -> dict[tuple[str, tuple], float]:
        """/metrics as {(sample name, sorted label items): value}."""
        if self._metrics_address is None:
            self._metrics_address = self.wait_event("metrics_listening")["address"]
        text = urllib.request.urlopen(f"http://{self._metrics_address}/metrics", timeout=30).read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def memory(self) -> dict[str, int]:
        """/proc/<pid>/status memory fields in bytes (VmRSS: resident now, VmHWM: its peak)."""
        memory = process_memory(self.pid)
        if "VmRSS" not in memory:
            raise SystemExit(f"daemon: no VmRSS for pid {self.pid}")
        return memory

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_seconds(self) -> float:
        """User + system CPU time of the daemon so far (on a shared machine, its real work)."""
        return process_cpu_seconds(self.pid)

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM, then the exit code (killed after ``timeout``); logs the tail on a failure."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        self._log.close()
        if rc != 0:
            log(f"daemon exited with {rc}; log tail:\n{self.tail()}")
        return rc
