"""TCP, UDP and Unix socket sources with real sockets on 127.0.0.1 and real socket files."""

from __future__ import annotations

import gc
import os
import socket
import stat
import struct
import threading
import time

import pytest

from adapters.registry import make_source
from tests.brokers import wait_until


def open_sockets() -> set[tuple[str, str]]:
    """(fd, "socket:[inode]") of this process's open sockets, after the garbage collector ran
    (so sockets other tests dropped without closing do not blur the count)."""
    gc.collect()
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("socket:"):
            out.add((fd, target))
    return out


def tcp_source(**options):
    return make_source("tcp", {"listen": "127.0.0.1:0", **options}, name="tcp-test")


def connect(source) -> socket.socket:
    family = socket.AF_UNIX if source.type_name == "unix" else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    sock.connect(source.address)
    return sock


def read_all(source, predicate, timeout: float = 10.0) -> list:
    """Read chunks until ``predicate(chunks)`` holds."""
    chunks = []
    deadline = time.monotonic() + timeout
    while not predicate(chunks):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; got {len(chunks)} chunks")
        chunks.extend(source.read(0.05))
    return chunks


def by_key(chunks) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for c in chunks:
        out[c.key] = out.get(c.key, b"") + c.data
    return out


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server closed the connection (EOF or reset), within the socket's timeout."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def started():
    sources = []

    def start(source):
        source.start()
        sources.append(source)
        return source

    yield start
    for s in sources:
        s.stop()


@pytest.mark.parametrize("key_by", ["peer", "host", "none"])
def test_tcp_several_clients_at_once(started, key_by):
    src = started(tcp_source(key_by=key_by))
    clients = [connect(src) for _ in range(3)]
    wait_until(lambda: src.status().clients == 3, message="three clients")
    for round_ in range(3):
        for i, c in enumerate(clients):
            c.sendall(f"c{i} r{round_}\n".encode())
            time.sleep(0.01)  # keep each write its own chunk, so merged order is checkable
    total = sum(len(f"c{i} r{r}\n") for i in range(3) for r in range(3))
    chunks = read_all(src, lambda ch: sum(len(c.data) for c in ch) == total)
    names = [f"127.0.0.1:{c.getsockname()[1]}" for c in clients]
    if key_by == "peer":
        assert by_key(chunks) == {n: f"c{i} r0\nc{i} r1\nc{i} r2\n".encode() for i, n in enumerate(names)}
    elif key_by == "host":
        assert set(by_key(chunks)) == {"127.0.0.1"}
    else:
        assert set(by_key(chunks)) == {""}
        assert b"".join(c.data for c in chunks) == b"".join(
            f"c{i} r{r}\n".encode() for r in range(3) for i in range(3))
    assert all(not c.is_record and c.received_at > 0 for c in chunks)
    for c in clients:
        c.close()
    wait_until(lambda: src.status().clients == 0, message="clients gone")
    assert src.status().connected and src.stats()["accepted"] == 3


def test_tcp_max_clients_refuses_and_counts_the_extra(started):
    src = started(tcp_source(max_clients=2))
    first, second = connect(src), connect(src)
    wait_until(lambda: src.status().clients == 2, message="two clients")
    extra = connect(src)  # the kernel completes the handshake; the source closes it at once
    assert closed_by_server(extra)
    assert src.stats()["refused"] == src.status().refused == 1 and src.status().clients == 2
    first.close()
    wait_until(lambda: src.status().clients == 1, message="a slot frees up")
    again = connect(src)
    again.sendall(b"welcome\n")
    chunks = read_all(src, lambda ch: b"welcome\n" in b"".join(c.data for c in ch))
    assert chunks[-1].key == f"127.0.0.1:{again.getsockname()[1]}"
    for s in (second, extra, again):
        s.close()


def test_tcp_idle_client_is_closed_and_counted(started):
    src = started(tcp_source(idle_timeout=0.4))
    silent, chatty = connect(src), connect(src)
    for _ in range(8):  # 0.8 s of activity on one, silence on the other
        chatty.sendall(b"x\n")
        time.sleep(0.1)
    assert closed_by_server(silent)
    assert src.stats()["idle_closed"] == 1
    chatty.sendall(b"still here\n")
    read_all(src, lambda ch: b"still here\n" in b"".join(c.data for c in ch))
    assert src.status().clients == 1
    silent.close()
    chatty.close()


def test_tcp_half_closed_client_delivers_everything_and_is_closed(started):
    src = started(tcp_source())
    c = connect(src)
    c.sendall(b"last words\nno newline")
    c.shutdown(socket.SHUT_WR)  # done sending, still able to receive
    chunks = read_all(src, lambda ch: b"".join(x.data for x in ch) == b"last words\nno newline")
    assert closed_by_server(c)  # the source closed its side in turn
    wait_until(lambda: src.status().clients == 0, message="connection released")
    assert src.stats()["closed"] == 1 and chunks
    c.close()


def test_tcp_reset_by_peer_is_counted_not_an_error(started):
    src = started(tcp_source())
    c = connect(src)
    c.sendall(b"abc")
    read_all(src, lambda ch: ch)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close -> RST
    c.close()
    wait_until(lambda: src.status().clients == 0, message="reset seen")
    assert src.status().errors == 0


def test_tcp_full_buffer_pauses_reading_and_loses_nothing(started):
    src = started(tcp_source(max_buffered_bytes=65536))
    payload = bytes(range(256)) * 4096  # 1 MiB, far more than the buffer
    c = connect(src)
    c.settimeout(10.0)
    sender = threading.Thread(target=c.sendall, args=(payload,), daemon=True)
    sender.start()
    wait_until(lambda: src.stats()["paused"] >= 1, message="reading paused")
    assert src._buffer.queued_bytes <= 65536
    got = b"".join(c.data for c in read_all(src, lambda ch: sum(len(x.data) for x in ch) >= len(payload)))
    assert got == payload
    sender.join(5.0)
    c.close()


def test_thousand_connects_and_disconnects_leak_no_descriptor(started):
    src = started(tcp_source(max_clients=1000))
    connect(src).close()
    wait_until(lambda: src.stats()["closed"] + src.stats()["reset"] == 1, message="warm-up")
    before = open_sockets()
    for i in range(1000):
        c = connect(src)
        c.sendall(b"%d\n" % i)
        if i % 2:  # half of them end with a reset instead of a FIN
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    wait_until(lambda: src.stats()["closed"] + src.stats()["reset"] == 1001, message="all connections closed")
    assert src.status().clients == 0 and src.stats()["accepted"] == 1001
    assert open_sockets() - before == set()
    src.stop()
    assert len(before - open_sockets()) >= 3  # listener and wake pair released too


def test_tcp_busy_address_is_retried_until_free(started):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    src = started(tcp_source(listen=f"127.0.0.1:{port}"))  # must not raise
    assert not src.status().connected and src.status().errors == 1
    assert "cannot listen" in src.status().last_error
    blocker.close()
    wait_until(lambda: src.status().connected, timeout=5, message="bound after the port was freed")
    c = connect(src)
    c.sendall(b"ok\n")
    read_all(src, lambda ch: ch)
    c.close()


def test_internal_fault_closes_that_client_only_and_is_reported(started, monkeypatch):
    src = started(tcp_source())
    offer = src._buffer.offer
    calls = []

    def fail_once(chunk):
        calls.append(chunk)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return offer(chunk)

    monkeypatch.setattr(src._buffer, "offer", fail_once)
    victim = connect(src)
    victim.sendall(b"boom")
    assert closed_by_server(victim)
    assert src.status().errors == 1 and "injected" in src.status().last_error
    survivor = connect(src)  # the thread lives on
    survivor.sendall(b"fine\n")
    assert read_all(src, lambda ch: ch)[0].data == b"fine\n"
    victim.close()
    survivor.close()


def test_stop_with_connected_clients_is_quick_and_idempotent():
    src = tcp_source()
    src.start()
    clients = [connect(src) for _ in range(5)]
    wait_until(lambda: src.status().clients == 5, message="clients")
    started = time.monotonic()
    src.stop()
    src.stop()
    assert time.monotonic() - started < 2.0
    assert all(closed_by_server(c) for c in clients)
    assert not src.status().connected and src.status().clients == 0
    for c in clients:
        c.close()


def test_unix_socket_keyed_by_pid_with_mode_and_removed_on_stop(tmp_path, started):
    path = tmp_path / "in.sock"
    src = started(make_source("unix", {"listen": str(path), "mode": 0o600}, name="u"))
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
    c = connect(src)
    c.sendall(b"via unix\n")
    chunks = read_all(src, lambda ch: b"".join(x.data for x in ch) == b"via unix\n")
    assert chunks[0].key == f"pid:{os.getpid()}"
    c.close()
    src.stop()
    assert not path.exists()


def test_unix_stale_socket_file_is_replaced_but_a_regular_file_is_not(tmp_path, started):
    path = tmp_path / "stale.sock"
    crashed = socket.socket(socket.AF_UNIX)
    crashed.bind(str(path))  # bound, never listening, then gone: what a crash leaves behind
    crashed.close()
    src = started(make_source("unix", {"listen": str(path), "key_by": "none"}))
    assert src.status().connected
    c = connect(src)
    c.sendall(b"x")
    assert read_all(src, lambda ch: ch)[0].key == ""
    c.close()

    regular = tmp_path / "data.txt"
    regular.write_text("precious")
    with pytest.raises(ValueError, match="not a socket"):
        make_source("unix", {"listen": str(regular)}).start()
    assert regular.read_text() == "precious"


def test_unix_second_listener_on_a_live_socket_waits_instead_of_stealing_it(tmp_path, started):
    path = tmp_path / "live.sock"
    first = started(make_source("unix", {"listen": str(path)}, name="first"))
    second = started(make_source("unix", {"listen": str(path)}, name="second"))
    assert first.status().connected and not second.status().connected
    assert "another process is listening" in second.status().last_error
    c = connect(first)
    c.sendall(b"still first\n")
    read_all(first, lambda ch: ch)
    c.close()


def test_unix_abstract_namespace(started):
    name = f"@somad-test-{os.getpid()}-{time.monotonic_ns()}"
    src = started(make_source("unix", {"listen": name}))
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(5)
    c.connect("\0" + name[1:])
    c.sendall(b"abstract\n")
    assert b"".join(x.data for x in read_all(src, lambda ch: ch)) == b"abstract\n"
    c.close()


def udp_send(port: int, payloads: list[bytes]) -> tuple[str, int]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i, p in enumerate(payloads):
            s.sendto(p, ("127.0.0.1", port))
            if i % 10 == 9:
                time.sleep(0.005)  # a burst larger than the kernel's receive buffer would be dropped there
        return s.getsockname()


@pytest.mark.parametrize("key_by", ["peer", "host", "none"])
def test_udp_each_datagram_is_one_record(started, key_by):
    src = started(make_source("udp", {"listen": "0", "key_by": key_by}))
    port = src.address[1]
    a = udp_send(port, [b"t=1\n", b"", b"t=2"])
    b = udp_send(port, [b"\x00\x01binary"])
    chunks = read_all(src, lambda ch: len(ch) == 4)
    assert [c.data for c in chunks] == [b"t=1\n", b"", b"t=2", b"\x00\x01binary"]
    assert all(c.is_record for c in chunks)
    expected = {"peer": [f"127.0.0.1:{a[1]}"] * 3 + [f"127.0.0.1:{b[1]}"], "host": ["127.0.0.1"] * 4, "none": [""] * 4}
    assert [c.key for c in chunks] == expected[key_by]


def test_udp_full_buffer_drops_the_oldest_and_counts_them(started):
    src = started(make_source("udp", {"listen": "127.0.0.1:0", "max_buffered_bytes": 65536}))
    payloads = [b"%04d" % i + b"." * 996 for i in range(100)]  # 100 x 1000 bytes
    udp_send(src.address[1], payloads)
    wait_until(lambda: src.stats()["datagrams"] == 100, message="all datagrams received")
    kept = [c.data for c in src.read(0)]
    assert kept == payloads[-len(kept):] and len(kept) == 65
    assert src.status().dropped_bytes == 35 * 1000


@pytest.mark.parametrize("kind, options, message", [
    ("tcp", {"listen": "localhost"}, "listen"),
    ("tcp", {"listen": "127.0.0.1:70000"}, "listen"),
    ("tcp", {"listen": "9000", "key_by": "topic"}, "key_by"),
    ("tcp", {"listen": "9000", "max_clients": 0}, "max_clients"),
    ("tcp", {"listen": "9000", "idle_timeout": -1}, "idle_timeout"),
    ("tcp", {"listen": "9000", "max_buffered_bytes": 10}, "max_buffered_bytes"),
    ("udp", {"listen": "9000", "key_by": "pid"}, "key_by"),
    ("unix", {"listen": ""}, "listen"),
    ("unix", {"listen": "/x/" + "y" * 120}, "listen"),
    ("unix", {"listen": "/tmp/a.sock", "key_by": "host"}, "key_by"),
    ("unix", {"listen": "/tmp/a.sock", "mode": 0o1777}, "mode"),
])
def test_bad_options_are_rejected_naming_the_key(kind, options, message):
    with pytest.raises(ValueError, match=f"^{message}:"):
        make_source(kind, options)
