"""sd_notify over a real unix datagram socket standing in for systemd."""

import os
import socket

import pytest

from somad.notify import SystemdNotifier


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(1.0)
    yield path, sock
    sock.close()


def received(sock) -> list[str]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    return out


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_ready_status_watchdog_stopping(notify_socket):
    path, sock = notify_socket
    clock = Clock()
    n = SystemdNotifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, status_every=1.0, clock=clock)
    assert n.watchdog_interval == 1.0
    n.ready("1 streams")
    clock.t = 1.5
    n.tick("1 streams a:10B", progressing=True)
    n.stopping()
    assert received(sock) == ["READY=1\nSTATUS=1 streams", "STATUS=1 streams a:10B", "WATCHDOG=1", "STOPPING=1"]


def test_watchdog_pings_stop_while_wedged(notify_socket):
    path, sock = notify_socket
    clock = Clock()
    n = SystemdNotifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}, clock=clock)
    n.ready()
    pings = []
    for step in range(1, 41):
        clock.t = step * 0.1
        n.tick("", progressing=step <= 20)
        pings += [m for m in received(sock) if m == "WATCHDOG=1"]
        if step == 20:
            before = len(pings)
    assert before >= 3
    assert len(pings) == before  # no ping once progress stopped


def test_watchdog_for_another_pid_is_ignored_and_no_socket_is_a_no_op():
    n = SystemdNotifier(env={"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.watchdog_interval is None
    assert not n.enabled and n.send("READY=1") is False
