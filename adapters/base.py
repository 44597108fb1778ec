"""The contract every adapter follows (telegraf style: start / read / stop, a registry by name).

A **source** produces bytes; it knows nothing of models, framing or sinks.

- ``start()`` returns quickly and never raises because a device or broker is absent: the
  source connects (and reconnects, with capped backoff) on its own, and says so in
  ``status()``. It raises ``ValueError`` only for options that can never work.
- ``read(timeout)`` waits at most ``timeout`` seconds and returns the chunks that arrived
  (possibly none). Transient faults (unplug, broker down) are logged, counted in
  ``status()`` and retried, never raised. ``SourceEnded`` is raised once a finite source
  (stdin at EOF) has nothing more to give.
- ``stop()`` is idempotent and returns within about a second.

A **sink** receives events (``somad.events``); ``send`` must never block the pipeline (a
network sink queues and counts what it had to drop), ``stop()`` flushes within a bound.

Each adapter module defines a frozen ``Options`` dataclass whose fields are exactly its YAML
keys (the config loader validates against them), and registers its class by type name.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Chunk:
    """Bytes from a source, in arrival order."""

    data: bytes
    key: str = ""  # sub-stream inside the source: MQTT topic, TCP/unix peer ("" = the only one)
    is_record: bool = False  # exactly one record (an MQTT message, a datagram): "message" framing
    offset: int | None = None  # position in the source just past ``data`` (file tail; saved with the checkpoint)
    received_at: float = 0.0  # time.monotonic() when the bytes arrived (for byte-to-score latency)


@dataclass
class SourceStatus:
    """What a source reports about itself (exported as metrics, shown in /healthz)."""

    connected: bool = False
    reconnects: int = 0  # re-connections after a loss (not the first connect)
    errors: int = 0  # faults seen: open failures, read errors, unplugs, broker losses
    dropped_bytes: int = 0  # bytes the source itself had to drop (over limits, full buffers)
    clients: int = 0  # connected peers, for listening sources
    refused: int = 0  # connections a listening source turned away (over max_clients)
    last_error: str = ""

    def copy(self) -> "SourceStatus":
        return SourceStatus(**vars(self))


class SourceEnded(Exception):
    """A finite source (stdin) has delivered everything it will ever deliver."""


class Source(ABC):
    type_name: ClassVar[str]
    Options: ClassVar[type]

    def __init__(self, options: Any, name: str = ""):
        self.options = options
        self.name = name or self.type_name  # the stream's name, for logs
        self._status = SourceStatus()
        self._status_lock = threading.Lock()

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def read(self, timeout: float) -> list[Chunk]: ...

    @abstractmethod
    def stop(self) -> None: ...

    def status(self) -> SourceStatus:
        with self._status_lock:
            return self._status.copy()

    def _update_status(self, **changes) -> None:
        """Set fields; ``+name=n`` style increments go through ``_count``."""
        with self._status_lock:
            for key, value in changes.items():
                setattr(self._status, key, value)

    def _count(self, field: str, n: int = 1) -> None:
        with self._status_lock:
            setattr(self._status, field, getattr(self._status, field) + n)


class Sink(ABC):
    type_name: ClassVar[str]
    Options: ClassVar[type]

    def __init__(self, options: Any, name: str = ""):
        self.options = options
        self.name = name or self.type_name

    def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections or files; must not raise for an absent broker (retry instead)."""

    @abstractmethod
    def send(self, event: Any) -> None: ...

    def stop(self, timeout: float = 2.0) -> None:  # noqa: B027 - optional hook
        """Flush what can be flushed within ``timeout`` seconds, then close."""

    def stats(self) -> dict:
        """Counters for metrics: at least ``sent`` and ``dropped``."""
        return {}
