"""Helpers the daemon-level tests share: waiting, a daemon on a thread, CSV-like input, a
test-only source of keyed records."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from adapters.base import Chunk, Source


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


@dataclass(frozen=True)
class KeyedOptions:
    keys: tuple[str, ...] = ("k1", "k2")  # the keys records come under, in turn (starting at the second)
    interval: float = 0.02  # seconds between records


class KeyedSource(Source):
    """Test-only source (register it as ``tests.support:KeyedSource``): CSV records under
    several keys in turn, as MQTT topics would bring them, for split_by_key streams."""

    type_name = "keyed"
    Options = KeyedOptions

    def start(self):
        self._n = 0

    def read(self, timeout):
        time.sleep(self.options.interval)
        self._n += 1
        return [Chunk(f"{self._n % 10},{self._n % 7}\n".encode(), key=self.options.keys[self._n % len(self.options.keys)])]

    def stop(self):
        pass
