"""Helpers the daemon-level tests share: waiting, a daemon on a thread, CSV-like input."""

from __future__ import annotations

import threading
import time


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:  # checked after a last look, so a slow predicate still counts
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def csv_lines(start: int, n: int) -> bytes:
    """``n`` short CSV rows (a periodic pattern a model learns quickly), numbered from ``start``."""
    return b"".join(f"{i % 97},{(i * 7) % 13}.{i % 10}\n".encode() for i in range(start, start + n))


def learned_bytes(daemon, name: str) -> int:
    """Bytes the models of stream ``name`` have learned (0 while it is not running)."""
    runner = daemon.runners.get(name)
    return sum(m.learner.bytes_seen for m in list(runner.pipeline.models.values())) if runner else 0


class DaemonThread:
    """A ``Daemon``'s main loop on a background thread, as ``somad run`` has it; leaving the
    context stops it and checks that it stopped."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.thread = threading.Thread(target=daemon.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self.daemon

    def __exit__(self, *exc):
        self.daemon.request_stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "daemon did not stop"
