"""The daemon with each real adapter, end to end: a pty serial port, a real mosquitto (source
and alert sink), TCP / UDP / unix sockets, and stdin piped into ``somad run --config``.

Each test runs a whole daemon (in-process unless the process itself is under test) on the
``tiny`` preset and checks what comes out the far end: score lines in a JSONL file, alert and
score messages on the broker, checkpoints on disk.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from somad.checkpoint import CheckpointStore
from somad.config import parse_config
from somad.metrics import Metrics
from somad.stream import safe_name
from tests.brokers import Mosquitto, wait_until
from tests.test_daemon import running, score_events
from tests.test_serial_source import PtyDevice
from tests.test_shutdown import SOMAD

WAIT = 60.0  # seconds any single end-to-end condition may take on a loaded 2-core machine


def csv_line(i: int) -> bytes:
    """A sensor reading as the device prints it: a counter-like field and a periodic value."""
    return f"{i % 60},{20 + (i * 7) % 13}.{i % 10}".encode()


def config_text(tmp_path: Path, stream: str, device: str = "dev1") -> str:
    return f"""
device: {device}
state_dir: "{tmp_path / 'state'}"
metrics: {{enabled: false}}
shutdown_timeout: 20
defaults:
  model: {{preset: tiny}}
  snapshot: {{every_seconds: 3600}}
streams:
{stream}
"""


def jsonl_sink(tmp_path: Path) -> str:
    return f'[{{type: jsonl, path: "{tmp_path / "scores.jsonl"}", events: both, flush_seconds: 0}}]'


def scores(tmp_path: Path) -> list[dict]:
    return [e for e in score_events(tmp_path / "scores.jsonl") if e["event"] == "score"]


def wait_scores(tmp_path: Path, n: int) -> list[dict]:
    return wait_until(lambda: len(scores(tmp_path)) >= n and scores(tmp_path), timeout=WAIT, message=f"{n} score lines")


def latency_count(metrics: Metrics, stream: str) -> float:
    return metrics.registry.get_sample_value("somad_score_latency_seconds_count", {"stream": stream}) or 0.0


def runner_of(daemon, name: str):
    return wait_until(lambda: daemon.runners.get(name), timeout=WAIT, message=f"stream {name} running")


# ---------------------------------------------------------------------------------- serial


def test_serial_pty_lines_are_scored_in_order_across_an_unplug(tmp_path):
    device = PtyDevice(tmp_path / "usb-somad-test-if00")
    device.plug()
    stream = f"""  - name: uart0
    source: {{type: serial, port: "{device.link}", baudrate: 115200, timeout: 0.05, reconnect_initial: 0.02, reconnect_max: 0.2}}
    sinks: {jsonl_sink(tmp_path)}"""
    metrics = Metrics()
    first = [csv_line(i) + b"\n" for i in range(300)]
    second = [csv_line(i) + b"\n" for i in range(300, 500)]
    try:
        with running(parse_config(config_text(tmp_path, stream)), metrics=metrics) as daemon:
            runner = runner_of(daemon, "uart0")
            wait_until(lambda: runner.source.status().connected, timeout=WAIT, message="port open")
            device.send(b"".join(first))
            wait_scores(tmp_path, len(first))
            device.unplug()  # the adapter vanishes; the same path comes back with a new pty
            device.plug()
            wait_until(lambda: runner.source.status().reconnects == 1 and runner.source.status().connected, timeout=WAIT, message="reopened")
            device.send(b"".join(second))
            events = wait_scores(tmp_path, len(first) + len(second))
            assert daemon.runners["uart0"] is runner, "an unplug is the source's business, not a stream restart"
    finally:
        if device.master is not None:
            device.unplug()
    assert [e["record"] for e in events] == [line.decode().replace("\n", "\\n") for line in first + second]
    assert [e["index"] for e in events] == list(range(len(events)))
    assert latency_count(metrics, "uart0") > 0  # arrival stamps reach the latency histogram
    assert list((tmp_path / "state" / "uart0").glob("*.pt"))


# ---------------------------------------------------------------------------------- MQTT


class Subscriber:
    """A real MQTT client: subscribes (waiting for the broker's SUBACK) and records messages."""

    def __init__(self, broker: Mosquitto, topics: list[str], client_id: str = "", persistent: bool = False):
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(WAIT), "no SUBACK from the broker"

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload))

    def on(self, topic: str) -> list[dict]:
        with self._lock:
            return [json.loads(payload) for t, payload in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def reserve_session(broker: Mosquitto, client_id: str, topics: list[str]) -> None:
    """Create the daemon's persistent session (its client id, its subscriptions) before it
    starts: what is published from now on is kept for it, with no race against its SUBACK."""
    Subscriber(broker, topics, client_id=client_id, persistent=True).close()


def publish_all(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-sensors")
    client.max_queued_messages_set(0)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(WAIT)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def mqtt_stream(broker: Mosquitto, extra: str = "", sinks: str = "[]") -> str:
    return f"""  - name: telemetry
    source: {{type: mqtt, host: {broker.host}, port: {broker.port}, client_id: somad-telemetry, topics: ["sensors/+/telemetry"], qos: 1, reconnect_min_delay: 0.1, reconnect_max_delay: 0.5}}
    framing: {{type: message}}
{extra}    sinks: {sinks}"""


def test_mqtt_source_to_mqtt_sink_alerts_on_a_garbage_burst_and_publishes_scores(tmp_path, mosquitto):
    reserve_session(mosquitto, "somad-telemetry", ["sensors/+/telemetry"])
    alert_topic, score_topic = "somad/dev1/telemetry/alert", "somad/dev1/telemetry/score"
    sinks = (f'[{{type: mqtt, host: {mosquitto.host}, port: {mosquitto.port}, topic: "somad/{{device}}/{{stream}}/alert", '
             f'score_topic: "somad/{{device}}/{{stream}}/score", reconnect_min_delay: 0.1, reconnect_max_delay: 0.5}}]')
    extra = "    scoring: {detector: surprise, onset_records: 0, grace_period: 150}\n    alerts: {threshold: 0.99, n_of_m: [1, 1]}\n"
    cfg = parse_config(config_text(tmp_path, mqtt_stream(mosquitto, extra, sinks)))
    rng = random.Random(7)
    normal = [("sensors/s1/telemetry", csv_line(i)) for i in range(400)]
    garbage = [("sensors/s1/telemetry", rng.randbytes(24)) for _ in range(10)]
    subscriber = Subscriber(mosquitto, ["somad/#"])
    try:
        with running(cfg) as daemon:
            runner = runner_of(daemon, "telemetry")
            wait_until(lambda: runner.sinks[0].stats()["connected"], timeout=WAIT, message="sink connected")  # QoS 0 scores need it
            publish_all(mosquitto, normal + garbage)
            alert = wait_until(lambda: subscriber.on(alert_topic), timeout=WAIT, message="an alert on the broker")[0]
            wait_until(lambda: len(subscriber.on(score_topic)) == len(normal) + len(garbage), timeout=WAIT, message="every record's score")
    finally:
        subscriber.close()
    assert alert["event"] == "alert_open" and alert["stream"] == "telemetry"
    assert alert["timescales"], "an alert names the timescales where the surprise lives"
    assert all({"band", "tau_bytes", "share"} <= set(t) for t in alert["timescales"])
    assert any(t["share"] > 0 for t in alert["timescales"])
    record_texts = [csv_line(i).decode() + "\\n" for i in range(len(normal))]
    assert alert["record"] not in record_texts, "the alert must come from the garbage burst"
    published_scores = subscriber.on(score_topic)
    assert [s["index"] for s in published_scores] == list(range(len(normal) + len(garbage)))
    assert max(s["anomaly"] for s in published_scores[len(normal):]) >= 0.99


def test_mqtt_split_by_key_keeps_one_checkpoint_set_per_topic(tmp_path, mosquitto):
    reserve_session(mosquitto, "somad-telemetry", ["sensors/+/telemetry"])
    cfg = parse_config(config_text(tmp_path, mqtt_stream(mosquitto, "    split_by_key: true\n    max_substreams: 4\n")))
    topics = ["sensors/a/telemetry", "sensors/b/telemetry", "sensors/c/telemetry"]
    messages = [(topics[i % 3], csv_line(i) * (1 + i % 3)) for i in range(300)]  # sizes differ per topic
    sent = {t: sum(len(p) + 1 for topic, p in messages if topic == t) for t in topics}  # + the "\n" separator
    with running(cfg) as daemon:
        runner = runner_of(daemon, "telemetry")
        publish_all(mosquitto, messages)
        learned = lambda: {m.name: m.learner.bytes_seen for m in list(runner.pipeline.models.values())}
        wait_until(lambda: learned() == {f"telemetry/{t}": n for t, n in sent.items()}, timeout=WAIT, message="every topic learned")
    state = tmp_path / "state" / "telemetry"
    assert sorted(p.name for p in state.iterdir()) == sorted(safe_name(t) for t in topics)
    for topic in topics:
        files = list((state / safe_name(topic)).glob("*.pt"))
        assert len(files) == 1, files
        ckpt = CheckpointStore(state / safe_name(topic), prefix=files[0].name.rsplit("-", 2)[0]).latest()
        assert ckpt.bytes_seen == sent[topic]
        assert ckpt.extra["stream"] == f"telemetry/{topic}"


# ---------------------------------------------------------------------------------- sockets


def socket_stream(kind: str, tmp_path: Path) -> str:
    listen = tmp_path / "feed.sock" if kind == "unix" else "127.0.0.1:0"
    framing = "{type: message}" if kind == "udp" else "{type: lines}"
    return f"""  - name: feed
    source: {{type: {kind}, listen: "{listen}", key_by: none}}
    framing: {framing}
    sinks: {jsonl_sink(tmp_path)}"""


def send_over(kind: str, address, lines: list[bytes], on_batch) -> None:
    """TCP / unix: one connection, the lines as a byte stream. UDP: one datagram per line, in
    batches that the daemon must have scored before the next (a loopback socket buffer holds a
    few hundred small datagrams at most; this test is about the daemon, not UDP loss)."""
    if kind == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for start in range(0, len(lines), 50):
                for line in lines[start : start + 50]:
                    sock.sendto(line.rstrip(b"\n"), address)
                on_batch(min(len(lines), start + 50))
        return
    family = socket.AF_UNIX if kind == "unix" else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAIT)
        sock.connect(address)
        sock.sendall(b"".join(lines))
        on_batch(len(lines))


@pytest.mark.parametrize("kind", ["tcp", "udp", "unix"])
def test_socket_sources_feed_the_daemon(tmp_path, kind):
    metrics = Metrics()
    lines = [csv_line(i) + b"\n" for i in range(300)]
    with running(parse_config(config_text(tmp_path, socket_stream(kind, tmp_path))), metrics=metrics) as daemon:
        runner = runner_of(daemon, "feed")
        address = wait_until(lambda: runner.source.address, timeout=WAIT, message="listening")
        send_over(kind, address, lines, on_batch=lambda n: wait_scores(tmp_path, n))
        events = wait_scores(tmp_path, len(lines))
    assert [e["record"] for e in events] == [line.decode().replace("\n", "\\n") for line in lines]
    assert latency_count(metrics, "feed") > 0
    assert list((tmp_path / "state" / "feed").glob("*.pt"))


# ---------------------------------------------------------------------------------- stdin


def test_stdin_pipe_into_somad_run_exits_zero_at_end_of_input_with_a_checkpoint(tmp_path):
    data = tmp_path / "input.csv"
    data.write_bytes(b"".join(csv_line(i) + b"\n" for i in range(2000)))
    config = tmp_path / "somad.yaml"
    config.write_text(config_text(tmp_path, """  - name: piped
    source: {type: stdin}""") + "log: {level: info, format: json}\n")
    # A pipe, as in `sensor-reader | somad run --config ...`: end of input is the writer closing it.
    done = subprocess.run([*SOMAD, "run", "--config", str(config), "--json"], check=False, input=data.read_bytes(),
                          capture_output=True, timeout=180, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    summary = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert summary["streams"]["piped"]["bytes"] == data.stat().st_size
    assert summary["streams"]["piped"]["records"] == 2000
    (ckpt_file,) = (tmp_path / "state" / "piped").glob("*.pt")
    ckpt = CheckpointStore(ckpt_file.parent, prefix=ckpt_file.name.rsplit("-", 2)[0]).latest()
    assert ckpt.bytes_seen == data.stat().st_size
    assert b"all_sources_ended" in done.stderr
