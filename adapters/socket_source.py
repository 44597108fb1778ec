"""Listening socket sources: ``tcp``, ``udp`` and ``unix`` (stream), all served by one
background thread with ``selectors`` (never a thread per client).

- **tcp** / **unix**: several clients at once, each its own sub-stream (``Chunk.key``) or merged
  (``key_by: none``). ``max_clients`` bounds the connections (extra ones are closed at once and
  counted), ``idle_timeout`` closes clients that stay silent (and catches half-open
  connections whose peer vanished), and ``max_buffered_bytes`` bounds what waits for ``read``:
  when it is full the thread stops reading, so TCP flow control slows the senders and nothing
  is lost.
- **udp**: each datagram is one record (``is_record=True``). Datagrams cannot be pushed back,
  so when the buffer is full the oldest are dropped and counted (``status().dropped_bytes``).

Keys (``key_by``): ``peer`` = one sub-stream per connection or sender (``ip:port``; for unix
sockets ``pid:N`` of the writing process), ``host`` = per sending address (``ip``; tcp and udp),
``none`` = everything merged under ``""``; merge only writers that send whole records.

Addresses (``listen``): ``PORT`` (on 127.0.0.1: nothing is exposed unless asked), ``HOST:PORT``,
``[IPv6]:PORT``; for unix a socket file path, or ``@name`` for Linux's abstract namespace.

>>> parse_listen("9000"), parse_listen("0.0.0.0:9000"), parse_listen("[::1]:9000")
(('127.0.0.1', 9000), ('0.0.0.0', 9000), ('::1', 9000))
>>> parse_listen("localhost")
Traceback (most recent call last):
...
ValueError: listen: expected host:port (e.g. 127.0.0.1:9464 or [::1]:9464), got 'localhost'
"""

from __future__ import annotations

import errno
import os
import select
import selectors
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass

import structlog

from adapters.base import Chunk, Source
from adapters.chunk_buffer import ChunkBuffer

from .addresses import parse_listen as parse_address

log = structlog.get_logger("somad.adapters.socket_source")

RECV_BYTES = 65536  # at most this much per recv() call
MAX_DATAGRAM = 65535  # the largest UDP payload
DATAGRAMS_PER_WAKE = 256  # then look at the other sockets and at stop() again
BIND_RETRY_MIN, BIND_RETRY_MAX = 0.5, 30.0  # seconds between attempts to bind a busy address


def parse_listen(text: str) -> tuple[str, int]:
    """The shared listen-address rules (``adapters.addresses``), errors naming the ``listen`` key."""
    try:
        return parse_address(text)
    except ValueError as exc:
        raise ValueError(f"listen: {exc}") from None


def _check_common(opts, key_choices: tuple[str, ...]) -> None:
    if opts.key_by not in key_choices:
        raise ValueError(f"key_by: expected one of {', '.join(key_choices)}, got {opts.key_by!r}")
    if opts.max_buffered_bytes < RECV_BYTES:
        raise ValueError(f"max_buffered_bytes: must be >= {RECV_BYTES}, got {opts.max_buffered_bytes!r}")


def _check_stream(opts) -> None:
    if opts.max_clients < 1:
        raise ValueError(f"max_clients: must be >= 1, got {opts.max_clients!r}")
    if opts.idle_timeout < 0:
        raise ValueError(f"idle_timeout: must be >= 0 (0 = never), got {opts.idle_timeout!r}")


@dataclass(frozen=True)
class TcpOptions:
    listen: str  # "PORT", "HOST:PORT" or "[IPv6]:PORT"; a bare port listens on 127.0.0.1
    key_by: str = "peer"  # sub-stream per "peer" (ip:port), per "host" (ip), or "none" (merged)
    max_clients: int = 16  # connections at once; more are closed on arrival and counted
    idle_timeout: float = 300.0  # seconds without data before a client is closed; 0 = never
    max_buffered_bytes: int = 1024 * 1024  # waiting for read(); when full, reading pauses (TCP pushes back)

    def __post_init__(self) -> None:
        parse_listen(self.listen)
        _check_common(self, ("peer", "host", "none"))
        _check_stream(self)


@dataclass(frozen=True)
class UnixOptions:
    listen: str  # socket file path, or "@name" for the abstract namespace (no file)
    key_by: str = "peer"  # sub-stream per "peer" (pid:N of the writing process) or "none" (merged)
    max_clients: int = 16  # connections at once; more are closed on arrival and counted
    idle_timeout: float = 300.0  # seconds without data before a client is closed; 0 = never
    max_buffered_bytes: int = 1024 * 1024  # waiting for read(); when full, reading pauses
    mode: int | None = None  # permissions of the socket file, e.g. 0o660; None = the umask decides

    def __post_init__(self) -> None:
        if not self.listen or len(os.fsencode(self.listen)) > 107:
            raise ValueError(f"listen: expected a socket path of 1..107 bytes, got {self.listen!r}")
        _check_common(self, ("peer", "none"))
        _check_stream(self)
        if self.mode is not None and not 0 <= self.mode <= 0o777:
            raise ValueError(f"mode: expected permission bits 0..0o777, got {self.mode!r}")


@dataclass(frozen=True)
class UdpOptions:
    listen: str  # "PORT", "HOST:PORT" or "[IPv6]:PORT"; a bare port listens on 127.0.0.1
    key_by: str = "peer"  # sub-stream per "peer" (ip:port), per "host" (ip), or "none" (merged)
    max_buffered_bytes: int = 1024 * 1024  # waiting for read(); beyond, the oldest datagrams are dropped

    def __post_init__(self) -> None:
        parse_listen(self.listen)
        _check_common(self, ("peer", "host", "none"))


class _Peer:
    """One accepted connection."""

    __slots__ = ("key", "last_active", "paused", "sock")

    def __init__(self, sock: socket.socket, key: str):
        self.sock = sock
        self.key = key
        self.last_active = time.monotonic()
        self.paused = False  # not being read because the buffer is full


class _SelectorSource(Source):
    """The shared machinery: bind (retrying a busy address with backoff), one selector thread,
    a wake-up socket pair for stop() and for "the reader made room", counters."""

    COUNTERS: tuple[str, ...] = ()

    def __init__(self, options, name: str = ""):
        super().__init__(options, name)
        self._log = log.bind(stream=self.name, source=self.type_name, listen=options.listen)
        self._stats = dict.fromkeys(self.COUNTERS, 0)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._buffer = ChunkBuffer(options.max_buffered_bytes, max_chunks=4096)
        self._listener: socket.socket | None = None
        self.address = None  # what we are bound to (the real port when port 0 was asked)

    # -- contract ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._buffer = ChunkBuffer(self.options.max_buffered_bytes, max_chunks=4096, on_space=self._wake)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        self._bind_delay = BIND_RETRY_MIN
        self._next_bind = 0.0
        self._try_bind()  # at once, so the address is known when start() returns
        self._thread = threading.Thread(target=self._run, name=f"somad-{self.type_name}-{self.name}", daemon=True)
        self._thread.start()

    def read(self, timeout: float) -> list[Chunk]:
        return self._buffer.take(timeout)

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        self._wake()
        thread.join(2.0)
        self._close_all()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        self._buffer.close()
        self._update_status(connected=False, clients=0)
        self._log.info(f"{self.type_name} source stopped", **self.stats())

    def stats(self) -> dict:
        """Counters beside ``status()`` (connections accepted, refused, closed for idleness...)."""
        with self._status_lock:
            return dict(self._stats)

    # -- to be provided by each kind ----------------------------------------------------------

    def _open(self) -> socket.socket:
        """A bound, non-blocking listening (or datagram) socket; OSError when not now."""
        raise NotImplementedError

    def _on_listener_ready(self) -> None:
        raise NotImplementedError

    def _housekeeping(self, now: float) -> float:
        """Periodic work in the thread; returns the longest the next select may sleep."""
        return 1.0

    def _close_all(self) -> None:
        self._close_listener()

    def _drop_after_error(self, sock: socket.socket) -> None:
        """Forget a socket whose handler failed, so a fault cannot spin the loop; the listener
        is closed and bound again after the usual retry delay."""
        if sock is self._listener:
            self._close_listener()
            self._update_status(connected=False)
            self._next_bind = time.monotonic() + self._bind_delay

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            if self._listener is None and now >= self._next_bind:
                self._try_bind()
            wait = self._housekeeping(now)
            if self._listener is None:
                wait = min(wait, max(0.0, self._next_bind - now))
            try:
                events = self._selector.select(wait)
            except OSError as e:  # a socket closed under us: count and go on
                self._fault(f"select failed: {e}")
                continue
            for key, _ in events:
                if self._stop.is_set():
                    break
                try:
                    key.data(key.fileobj)  # the handler registered with the socket
                except Exception as e:  # noqa: BLE001 - a bug must not end the thread every client needs
                    self._fault(f"internal error: {e!r}")
                    self._log.exception("socket source handler failed")
                    self._drop_after_error(key.fileobj)

    def _try_bind(self) -> None:
        try:
            sock = self._open()
        except OSError as e:
            self._next_bind = time.monotonic() + self._bind_delay
            self._fault(f"cannot listen on {self.options.listen}: {e.strerror or e}; retrying in {self._bind_delay:.1f} s")
            self._bind_delay = min(self._bind_delay * 2, BIND_RETRY_MAX)
            return
        self._listener = sock
        self.address = sock.getsockname()
        self._selector.register(sock, selectors.EVENT_READ, lambda s: self._on_listener_ready())
        self._update_status(connected=True)
        self._log.info(f"{self.type_name} source listening", address=str(self.address))

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._unregister(self._listener)
            self._listener.close()
            self._listener = None

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already woken (buffer full of wake bytes) or closed by stop()

    def _drain_wake(self, sock: socket.socket) -> None:
        try:
            while sock.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _unregister(self, sock: socket.socket) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    # -- bookkeeping --------------------------------------------------------------------------

    def _bump(self, key: str, n: int = 1) -> int:
        with self._status_lock:
            self._stats[key] += n
            return self._stats[key]

    def _fault(self, message: str) -> None:
        with self._status_lock:
            self._status.errors += 1
            self._status.last_error = message
        self._log.warning(message)

    def _note(self, counter: str, message: str, **context) -> None:
        """Count an expected event (refusal, idle close); log the 1st, 2nd, 4th, 8th... so a
        flood stays visible without flooding the log."""
        times = self._bump(counter)
        if times & (times - 1) == 0:
            self._log.info(message, times=times, **context)


class _StreamSource(_SelectorSource):
    """Connections: accept, read, pause when the buffer is full, close on EOF, error or idleness."""

    COUNTERS = ("accepted", "refused", "closed", "idle_closed", "reset", "paused")

    def __init__(self, options, name: str = ""):
        super().__init__(options, name)
        self._peers: dict[socket.socket, _Peer] = {}
        self._next_idle_scan = 0.0  # no peer can be idle for idle_timeout before this time

    def _peer_key(self, sock: socket.socket, address) -> str:
        raise NotImplementedError

    def _tune(self, sock: socket.socket) -> None:
        """Per-connection socket options (TCP keepalive)."""

    def _on_listener_ready(self) -> None:
        while True:
            try:
                sock, address = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as e:  # EMFILE and friends: the connection stays in the backlog
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._fault(f"cannot accept: {e.strerror}")
                return
            if len(self._peers) >= self.options.max_clients:
                self._finish_ended_peers()
            if len(self._peers) >= self.options.max_clients:
                self._note("refused", "connection refused: max_clients reached", max_clients=self.options.max_clients)
                self._count("refused")  # in status() too, for the metric
                sock.close()  # counted first: whoever sees the close may look at the counters
                continue
            sock.setblocking(False)
            self._tune(sock)
            peer = _Peer(sock, self._peer_key(sock, address))
            self._peers[sock] = peer
            self._selector.register(sock, selectors.EVENT_READ, self._on_peer)
            self._bump("accepted")
            self._update_status(clients=len(self._peers))

    def _on_peer(self, sock: socket.socket) -> None:
        peer = self._peers.get(sock)
        if peer is None:
            return
        room = self._buffer.room()
        if room == 0:
            self._pause(peer)
            return
        try:
            data = sock.recv(min(RECV_BYTES, room))
        except BlockingIOError:
            return
        except OSError:  # reset by the peer, or another socket error: the connection is over
            self._close_peer(peer, "reset")
            return
        if not data:  # orderly EOF (or a half-close: the client is done sending)
            self._close_peer(peer, "closed")
            return
        peer.last_active = time.monotonic()
        # Fits: only this thread adds, and room was measured just before.
        self._buffer.offer(Chunk(data=data, key=peer.key, received_at=peer.last_active))

    def _finish_ended_peers(self) -> None:
        """At ``max_clients``, before refusing a newcomer: read the peers whose last bytes and
        EOF are already waiting, and close them. Short-lived senders (connect, send a line,
        close) come and go faster than the selector reports them; without this, a burst of
        them fills every slot with connections that have already ended, and the newcomers
        refused for their sake lose their data unseen (the fault suite's connection storm)."""
        poller = select.poll()
        by_fd = {peer.sock.fileno(): peer.sock for peer in self._peers.values() if not peer.paused}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll(0):
            for _ in range(2):  # the waiting bytes, then the EOF behind them
                if by_fd[fd] not in self._peers:
                    break
                self._on_peer(by_fd[fd])

    def _pause(self, peer: _Peer) -> None:
        if not peer.paused:
            peer.paused = True
            self._unregister(peer.sock)
            self._note("paused", "reading paused: buffer full (senders are slowed, nothing lost)")

    def _housekeeping(self, now: float) -> float:
        wait = 1.0
        paused = [p for p in self._peers.values() if p.paused]
        if paused and self._buffer.room() > 0:
            for peer in paused:
                peer.paused = False
                peer.last_active = now  # the pause was ours, not the client's silence
                self._selector.register(peer.sock, selectors.EVENT_READ, self._on_peer)
        timeout = self.options.idle_timeout
        if timeout <= 0:
            return wait
        if now < self._next_idle_scan:  # activity only moves deadlines later: nothing due yet
            return min(wait, self._next_idle_scan - now)
        next_due = now + timeout  # a peer accepted from now on is due no earlier than this
        for peer in list(self._peers.values()):
            due = peer.last_active + timeout
            if peer.paused:
                continue
            if due <= now:
                self._close_peer(peer, "idle_closed")
            else:
                next_due = min(next_due, due)
        self._next_idle_scan = next_due
        return min(wait, next_due - now)

    def _close_peer(self, peer: _Peer, counter: str) -> None:
        self._peers.pop(peer.sock, None)
        if not peer.paused:
            self._unregister(peer.sock)
        # Counted before the close: whoever sees the close may look at the counters.
        self._update_status(clients=len(self._peers))
        if counter == "idle_closed":
            self._note(counter, "client closed: idle", key=peer.key, idle_timeout=self.options.idle_timeout)
        else:
            self._bump(counter)
        peer.sock.close()

    def _drop_after_error(self, sock: socket.socket) -> None:
        peer = self._peers.get(sock)
        if peer is not None:
            self._close_peer(peer, "closed")
        else:
            super()._drop_after_error(sock)

    def _close_all(self) -> None:
        for peer in list(self._peers.values()):
            self._close_peer(peer, "closed")
        super()._close_all()


class TcpSource(_StreamSource):
    type_name = "tcp"
    Options = TcpOptions

    def _open(self) -> socket.socket:
        host, port = parse_listen(self.options.listen)
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while old sockets linger
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _tune(self, sock: socket.socket) -> None:
        # Keepalive probes find peers that vanished without a FIN even when idle_timeout is 0.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 5)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)

    def _peer_key(self, sock: socket.socket, address) -> str:
        return _ip_key(self.options.key_by, address)


class UnixSource(_StreamSource):
    type_name = "unix"
    Options = UnixOptions

    def __init__(self, options, name: str = ""):
        super().__init__(options, name)
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we created

    @property
    def _abstract(self) -> bool:
        return self.options.listen.startswith("@")

    def start(self) -> None:
        path = self.options.listen
        if not self._abstract and os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ValueError(f"listen: {path} exists and is not a socket; refusing to replace it")
        super().start()

    def _open(self) -> socket.socket:
        path = "\0" + self.options.listen[1:] if self._abstract else self.options.listen
        if not self._abstract:
            _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            if not self._abstract:
                st = os.stat(path)
                self._identity = (st.st_dev, st.st_ino)
                if self.options.mode is not None:
                    os.chmod(path, self.options.mode)
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _close_all(self) -> None:
        super()._close_all()
        if self._identity is not None:
            try:  # remove the file only if it is still ours (not a successor's socket)
                st = os.stat(self.options.listen)
                if (st.st_dev, st.st_ino) == self._identity:
                    os.unlink(self.options.listen)
            except FileNotFoundError:
                pass
            self._identity = None

    def _peer_key(self, sock: socket.socket, address) -> str:
        if self.options.key_by == "none":
            return ""
        try:  # Linux: the writer's pid, a stable name for a process that keeps one connection
            pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return f"pid:{pid}"
        except (AttributeError, OSError):
            return f"conn:{self._stats['accepted'] + 1}"


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a crashed process blocks bind; remove it unless someone listens."""
    if not os.path.lexists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: stale
        return
    except OSError:
        return  # let bind report what is wrong
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another process is listening on this socket")


class UdpSource(_SelectorSource):
    type_name = "udp"
    Options = UdpOptions
    COUNTERS = ("datagrams", "evicted")

    def _open(self) -> socket.socket:
        host, port = parse_listen(self.options.listen)
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.bind(address)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _on_listener_ready(self) -> None:
        for _ in range(DATAGRAMS_PER_WAKE):
            try:
                data, address = self._listener.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as e:  # ICMP errors surface here on some systems; not fatal
                self._fault(f"receive failed: {e.strerror or e}")
                return
            self._bump("datagrams")
            chunk = Chunk(data=data, key=_ip_key(self.options.key_by, address), is_record=True,
                          received_at=time.monotonic())
            dropped = self._buffer.push_evicting(chunk)
            if dropped:
                self._count("dropped_bytes", dropped)
                self._note("evicted", "datagrams dropped: buffer full", nbytes=dropped)


def _ip_key(key_by: str, address) -> str:
    """Sub-stream key of an IP peer address.

    >>> _ip_key("peer", ("10.0.0.7", 5000)), _ip_key("host", ("::1", 5000, 0, 0)), _ip_key("none", ("10.0.0.7", 1))
    ('10.0.0.7:5000', '::1', '')
    """
    if key_by == "none":
        return ""
    host, port = address[0], address[1]
    if key_by == "host":
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
