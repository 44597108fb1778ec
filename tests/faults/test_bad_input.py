"""Hostile input through a running ``somad run --config`` process: random bytes, a 10 MB line,
a NUL flood, invalid UTF-8, oversized MQTT payloads, half-open TCP connections and thousands
of connect/disconnects.

The daemon runs as its own process (as under systemd), seen only from outside: its /metrics,
its JSON log, /proc/<pid>/status (RSS, sampled all along) and /proc/<pid>/fd. Two streams:

- ``tcpin``: a TCP source (lines, ``max_record_bytes`` 4096, a 1-second idle timeout) with a
  small ``drop_oldest`` queue, so a flood is dropped and counted rather than learned for
  minutes; every record's score goes to a JSONL file. The queue (128 KiB) holds two of the
  source's 64 KiB reads, so at least the last 64 KiB of each flood reach the framer and every
  flood longer than a record is cut (with 16 KiB, a small last read could push out the rest);
- ``mqttin``: an MQTT source with ``max_payload_bytes`` 4096 on a real mosquitto.

Checked: the process never dies and exits 0 on SIGTERM; every byte sent over TCP is either
learned or counted as dropped (``somad_bytes_total + somad_dropped_bytes_total`` == bytes
sent); the 10 MB line and the NUL flood are cut and counted (``somad_cut_records_total``);
invalid UTF-8 comes out as valid JSON; oversized MQTT payloads are dropped and counted to the
byte while normal ones around them are scored; silent connections are closed by the idle
timeout (seen from the client: EOF); after thousands of connections the process holds the
same file descriptors as before; RSS stays within a bound after warm-up.
"""

from __future__ import annotations

import ast
import json
import os
import random
import socket
import struct
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from tests.brokers import Mosquitto
from tests.faults.figures import record
from tests.faults.harness import DaemonProcess, Periodic, start_daemon, wait_until

STORM_CONNECTIONS = 3000  # connect/disconnect cycles
HALF_OPEN = 20  # connections that send part of a line and then stay silent
IDLE_TIMEOUT = 1.0  # seconds (the tcp source's idle_timeout in this test)
RSS_GROWTH_BOUND = 100 << 20  # bytes of RSS growth after warm-up that would mean unbounded memory
MQTT_LIMIT = 4096  # max_payload_bytes of the mqtt stream


def config(tmp_path: Path, broker: Mosquitto) -> str:
    return f"""
state_dir: "{tmp_path / 'state'}"
metrics: {{listen: "127.0.0.1:0"}}
log: {{level: info, format: json}}
shutdown_timeout: 10
defaults:
  model: {{preset: tiny}}
  snapshot: {{every_seconds: 3600}}
streams:
  - name: tcpin
    source: {{type: tcp, listen: "127.0.0.1:0", max_clients: 64, idle_timeout: {IDLE_TIMEOUT}, max_buffered_bytes: 65536}}
    framing: {{type: lines, max_record_bytes: 4096}}
    queue: {{max_bytes: 131072, policy: drop_oldest}}
    sinks:
      - {{type: jsonl, path: "{tmp_path / 'tcpin.jsonl'}", events: scores, flush_seconds: 0.2}}
  - name: mqttin
    source: {{type: mqtt, host: {broker.host}, port: {broker.port}, topics: ["bad/#"], qos: 1, client_id: faults-bad-input, max_payload_bytes: {MQTT_LIMIT}}}
    framing: {{type: message}}
"""


class RssSampler(Periodic):
    """Samples the daemon's RSS every 0.1 s in a thread."""

    def __init__(self, daemon: DaemonProcess):
        super().__init__("rss-sampler", 0.1)
        self.daemon = daemon
        self.samples: list[tuple[float, int]] = []  # (time.monotonic(), bytes)

    def tick(self) -> bool:
        try:
            self.samples.append((time.monotonic(), self.daemon.rss_bytes()))
        except (OSError, AssertionError):
            return False  # the process is gone: the test will say so
        return True

    def peak_since(self, since: float) -> int:
        return max((rss for at, rss in self.samples if at >= since), default=0)


class TcpFeed:
    """Connections to the daemon's tcp source; counts every byte it sends."""

    def __init__(self, address: tuple[str, int]):
        self.address = address
        self.sent = 0

    def connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=30)
        return sock

    def send(self, data: bytes, sock: socket.socket | None = None) -> None:
        own = sock is None
        sock = sock or self.connect()
        try:
            sock.sendall(data)
            self.sent += len(data)
        finally:
            if own:
                sock.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tcp_address(daemon: DaemonProcess) -> tuple[str, int]:
    entry = daemon.wait_event("tcp source listening", 60)
    host, port = ast.literal_eval(entry["address"])[:2]
    return host, port


def wait_accounted(daemon: DaemonProcess, feed: TcpFeed, timeout: float = 60.0) -> None:
    """Until every byte sent is learned or counted as dropped (nothing vanishes silently)."""
    def accounted():
        return daemon.metric("somad_bytes_total", stream="tcpin") + daemon.metric("somad_dropped_bytes_total", stream="tcpin")

    wait_until(lambda: accounted() == feed.sent, timeout, f"{feed.sent} bytes sent to be learned or counted (at {accounted()})", interval=0.1)
    assert accounted() == feed.sent


def publish_all(broker: Mosquitto, payloads: list[bytes]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="faults-bad-publisher")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for i, payload in enumerate(payloads):
            info = client.publish(f"bad/{i % 4}", payload, qos=1)
            info.wait_for_publish(60)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def test_hostile_input_never_crashes_loses_nothing_silently_and_keeps_memory_bounded(tmp_path, mosquitto):
    cfg = tmp_path / "somad.yaml"
    cfg.write_text(config(tmp_path, mosquitto))
    daemon = start_daemon(cfg, tmp_path / "somad.log")
    try:
        daemon.wait_event("ready", 120)
        feed = TcpFeed(tcp_address(daemon))
        rng = random.Random(5)
        with RssSampler(daemon) as rss:
            # Warm-up: ordinary lines, so that the baseline holds a running model.
            feed.send(b"".join(b"%d,%0.1f\n" % (i % 50, 20 + i % 7) for i in range(3000)))
            wait_accounted(daemon, feed)
            warm = time.monotonic()
            baseline = rss.peak_since(warm - 1.0) or daemon.rss_bytes()
            fds_before = open_fds(daemon.pid)
            cut_before = daemon.metric("somad_cut_records_total", stream="tcpin")

            # One after the other: the small queue keeps the newest bytes of each flood (the
            # rest is dropped and counted), so the learner sees the end of every one of them.
            invalid_utf8 = [b"\xff\xfe\xfd\n", b"\xc0\x80 overlong\n", b"\xed\xa0\x80 surrogate\n", b"\x80\x80\x80 lone\n", b"ok \xe2\x82\n"]
            hostile = {
                "random bytes": rng.randbytes(512 * 1024),
                "NUL flood": b"\x00" * (2 << 20) + b"\n",
                "10 MB line": b"x" * (10 << 20) + b"\n",
                "invalid UTF-8": b"".join(invalid_utf8 * 50),
            }
            for data in hostile.values():
                feed.send(data)
                wait_accounted(daemon, feed)
            cut = daemon.metric("somad_cut_records_total", stream="tcpin") - cut_before
            assert cut >= 2, f"the NUL flood and the 10 MB line should each be cut and counted, got {cut}"

            # Half-open: part of a line, then silence; the idle timeout closes them.
            silent = [feed.connect() for _ in range(HALF_OPEN)]
            for sock in silent:
                feed.send(b"partial-no-newline", sock)
            sent_at = time.monotonic()
            closed_after = []
            for sock in silent:
                sock.settimeout(IDLE_TIMEOUT + 30)
                assert sock.recv(1) == b"", "the server sent data instead of closing"
                closed_after.append(time.monotonic() - sent_at)
                sock.close()

            # A storm of connections: plain, silent, reset (RST) and half-closed ones.
            for i in range(STORM_CONNECTIONS):
                sock = feed.connect()
                kind = i % 4
                if kind == 0:
                    feed.send(b"storm %d\n" % i, sock)
                elif kind == 2:  # nothing sent: a reset discards unread data, and TCP owes no delivery
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
                elif kind == 3:
                    sock.shutdown(socket.SHUT_WR)  # half-close: we are done sending
                sock.close()
            wait_accounted(daemon, feed)
            wait_until(lambda: open_fds(daemon.pid) <= fds_before, 30, f"fds back to {fds_before} (now {open_fds(daemon.pid)})", interval=0.1)
            fds_after = open_fds(daemon.pid)

            # MQTT: payloads over the limit are dropped and counted; the ones around them scored.
            dropped_before = daemon.metric("somad_dropped_bytes_total", stream="mqttin")
            records_before = daemon.metric("somad_records_total", stream="mqttin")
            oversized = [b"o" * (MQTT_LIMIT + 1), os.urandom(100_000), b"\x00" * (1 << 20), b"y" * (8 << 20)]
            normal = [b"21.5", b"\xff\xfe invalid utf-8", b"\x00" * 100, b"", b"22.0"]
            publish_all(mosquitto, [normal[0], *oversized[:2], *normal[1:4], *oversized[2:], normal[4]])
            daemon.wait_metric("somad_records_total", lambda v: v >= records_before + len(normal), 60, stream="mqttin")
            dropped = daemon.wait_metric("somad_dropped_bytes_total", lambda v: v >= dropped_before + sum(map(len, oversized)), 30, stream="mqttin") - dropped_before
            assert dropped == sum(map(len, oversized)), "oversized payloads must be counted to the byte"
            assert daemon.metric("somad_records_total", stream="mqttin") == records_before + len(normal)
            peak = rss.peak_since(warm)
        assert daemon.returncode() is None, f"somad died; log tail:\n{daemon.tail()}"
        end_rss = daemon.rss_bytes()
        tcp_dropped = daemon.metric("somad_dropped_bytes_total", stream="tcpin")
        records = daemon.metric("somad_records_total", stream="tcpin")
        assert daemon.terminate(60) == 0
    finally:
        daemon.ensure_dead()

    assert peak - baseline < RSS_GROWTH_BOUND, f"RSS grew {(peak - baseline) >> 20} MiB after warm-up"
    lines = (tmp_path / "tcpin.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["event"] == "score" for line in lines)  # every record, valid JSON
    assert any("\\xff\\xfe\\xfd" in json.loads(line)["record"] for line in lines)  # invalid UTF-8 kept, escaped

    record("bad_input", {
        "tcp_bytes_sent": feed.sent,
        "tcp_bytes_dropped_counted": tcp_dropped,
        "tcp_records_scored": records,
        "cut_records_counted": cut,
        "inputs": ["512 KiB random", "2 MiB NUL flood", "10 MiB line", "invalid UTF-8 x250", f"{HALF_OPEN} half-open", f"{STORM_CONNECTIONS} connect/disconnect", "4 oversized MQTT payloads (to 8 MiB)"],
        "idle_close_after_s": {"min": round(min(closed_after), 3), "max": round(max(closed_after), 3), "idle_timeout": IDLE_TIMEOUT},
        "fds_before": fds_before,
        "fds_after": fds_after,
        "mqtt_oversized_bytes_dropped_counted": dropped,
        "rss_baseline_mib": round(baseline / 2**20, 1),
        "rss_peak_mib": round(peak / 2**20, 1),
        "rss_end_mib": round(end_rss / 2**20, 1),
        "rss_samples": len(rss.samples),
        "process_survived": True,
    })
