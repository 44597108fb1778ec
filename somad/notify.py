"""systemd's notify protocol, without a library: datagrams to ``$NOTIFY_SOCKET``.

- ``READY=1`` once every stream has started;
- ``STATUS=...`` a one-line summary, sent when it changes (at most every ``status_every`` s);
- ``WATCHDOG=1`` at half of ``$WATCHDOG_USEC``, **only while the pipeline progresses**: a
  wedged worker stops the pings and systemd restarts the service;
- ``STOPPING=1`` when shutdown begins.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.

>>> n = SystemdNotifier(env={})
>>> n.enabled, n.watchdog_interval
(False, None)
"""

from __future__ import annotations

import os
import socket
import time


class SystemdNotifier:
    def __init__(self, env=None, status_every: float = 5.0, clock=time.monotonic):
        env = os.environ if env is None else env
        self.address = self._address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = self._watchdog_interval(env)
        self.status_every = status_every
        self.clock = clock
        self._sock: socket.socket | None = None
        self._last_ping = float("-inf")
        self._last_status = ""
        self._last_status_at = float("-inf")
        self.sent: list[str] = []  # kept short: the last few messages, for diagnostics

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @staticmethod
    def _address(path: str):
        if not path:
            return None
        if path.startswith("@"):  # abstract namespace socket
            return "\0" + path[1:]
        return path

    @staticmethod
    def _watchdog_interval(env) -> float | None:
        """Seconds between pings: half the watchdog timeout, if the watchdog is for us."""
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 1e6 / 2.0

    def send(self, message: str) -> bool:
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.sendto(message.encode(), self.address)
        except OSError:
            return False  # systemd gone or socket unusable: never fatal
        self.sent = (self.sent + [message])[-16:]
        return True

    def ready(self, status: str = "") -> None:
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))
        self._last_status, self._last_status_at = status, self.clock()
        self._last_ping = self.clock()

    def tick(self, status: str, progressing: bool) -> None:
        """Called from the main loop: status when it changed, watchdog while progressing."""
        now = self.clock()
        if status != self._last_status and now - self._last_status_at >= self.status_every:
            self.send(f"STATUS={status}")
            self._last_status, self._last_status_at = status, now
        if self.watchdog_interval and progressing and now - self._last_ping >= self.watchdog_interval:
            self.send("WATCHDOG=1")
            self._last_ping = now

    def reloading(self) -> None:
        self.send("RELOADING=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
