"""The MQTT source against a real mosquitto: wildcards, persistent sessions across somad and broker
restarts (kill -9 included), limits, retained replays, authentication and TLS."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from adapters.mqtt_source import MqttSource
from adapters.registry import make_source
from tests.brokers import (
    MOSQUITTO,
    MOSQUITTO_PASSWD,
    Mosquitto,
    add_password,
    free_port,
    wait_until,
)

FAST_RECONNECT = {"reconnect_min_delay": 0.1, "reconnect_max_delay": 0.5}


class Publisher:
    """A test publisher with a persistent session: paho keeps unacknowledged QoS 1 messages
    (and those published while the broker is down) and sends them after reconnecting."""

    def __init__(self, broker: Mosquitto, client_id: str = "test-publisher"):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.max_queued_messages_set(0)  # unlimited: the test must not lose anything here
        self.client.connect_async(broker.host, broker.port)
        self.client.loop_start()
        wait_until(self.client.is_connected, message="publisher connected")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False):
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def publish_acked(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.publish(topic, payload, qos, retain)
        info.wait_for_publish(5.0)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Collector:
    """Reads a source in the background, as the pipeline would."""

    def __init__(self, source):
        self.source = source
        self.chunks = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            got = self.source.read(0.05)
            with self._lock:
                self.chunks.extend(got)

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [c.data for c in self.chunks]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)


def mqtt_source(broker: Mosquitto, name: str = "s", **options) -> MqttSource:
    opts = {"host": broker.host, "port": broker.port, "topics": ["t/#"], **FAST_RECONNECT, **options}
    return make_source("mqtt", opts, name=name)


def read_until(source, count: int, timeout: float = 10.0) -> list:
    chunks = []
    deadline = time.monotonic() + timeout
    while len(chunks) < count and time.monotonic() < deadline:
        chunks.extend(source.read(0.1))
    return chunks


@pytest.fixture
def publisher(mosquitto):
    pub = Publisher(mosquitto)
    yield pub
    pub.close()


def test_wildcard_topics_deliver_one_record_per_message_keyed_by_topic(mosquitto, publisher):
    src = mqtt_source(mosquitto, topics=["plant/+/temp", "alarms/#"])
    src.start()
    try:
        wait_until(lambda: src.status().connected, message="source connected")
        time.sleep(0.1)  # SUBACK
        for topic, payload in [("plant/a/temp", b"21.5\n"), ("other/x", b"no"), ("plant/b/temp", b"19.0\n"),
                               ("alarms/door/3", b"\x00\xffopen"), ("plant/a/humidity", b"no")]:
            publisher.publish_acked(topic, payload)
        chunks = read_until(src, 3)
        assert [(c.key, c.data) for c in chunks] == [
            ("plant/a/temp", b"21.5\n"), ("plant/b/temp", b"19.0\n"), ("alarms/door/3", b"\x00\xffopen")]
        assert all(c.is_record and c.received_at > 0 for c in chunks)
        assert src.read(0.2) == []  # the non-matching topics never arrive
        assert src.stats()["messages"] == 3
    finally:
        src.stop()
    assert not src.status().connected


def test_broker_killed_and_restarted_mid_stream_loses_no_qos1_message(mosquitto, publisher):
    # somad reconnects later than the publisher, so messages the publisher (re)sends after the
    # restart find only our persisted session at the broker, not us: it must have survived.
    src = mqtt_source(mosquitto, reconnect_min_delay=0.8, reconnect_max_delay=1.0)
    src.start()
    collector = Collector(src)
    try:
        wait_until(lambda: src.status().connected, message="source connected")
        time.sleep(0.1)
        sent = [f"{i}\n".encode() for i in range(300)]
        for i, payload in enumerate(sent):
            publisher.publish(f"t/{i % 3}", payload)
            time.sleep(0.002)
            if i == 100:
                wait_until(lambda: len(collector.payloads()) >= 50, message="first messages")
                mosquitto.kill()
                wait_until(lambda: not src.status().connected, message="source sees the broker gone")
            if i == 150:
                mosquitto.start()  # same port, same persistence file
        wait_until(lambda: set(collector.payloads()) >= set(sent), timeout=20, message="every message")
        status = src.status()
        assert status.connected and status.reconnects >= 1 and status.errors >= 1
        assert status.dropped_bytes == 0
    finally:
        collector.close()
        src.stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_messages_published_while_away_reach_the_persistent_session(mosquitto, publisher, protocol):
    first = mqtt_source(mosquitto, name="away", protocol=protocol)
    first.start()
    wait_until(lambda: first.status().connected, message="first connect")
    time.sleep(0.1)  # SUBACK: the subscription now lives in the broker's session
    first.stop()

    while_away = [f"a{i}\n".encode() for i in range(20)]
    for payload in while_away:
        publisher.publish_acked("t/x", payload)
    time.sleep(0.3)  # the broker saves its database after each change, in its main loop
    mosquitto.kill()
    broker_down = [f"b{i}\n".encode() for i in range(20)]
    for payload in broker_down:
        publisher.publish("t/y", payload)  # held by the publisher until the broker returns
    mosquitto.start()

    second = mqtt_source(mosquitto, name="away", protocol=protocol)  # same name -> same client id
    assert second.client_id == first.client_id
    second.start()
    try:
        got = [c.data for c in read_until(second, 40)]
        assert sorted(got) == sorted(while_away + broker_down)
    finally:
        second.stop()


def test_clean_start_keeps_nothing_while_away(mosquitto, publisher):
    first = mqtt_source(mosquitto, name="clean", clean_start=True)
    first.start()
    wait_until(lambda: first.status().connected, message="first connect")
    time.sleep(0.1)
    first.stop()
    publisher.publish_acked("t/x", b"lost\n")
    second = mqtt_source(mosquitto, name="clean", clean_start=True)
    second.start()
    try:
        wait_until(lambda: second.status().connected, message="second connect")
        assert read_until(second, 1, timeout=0.5) == []
    finally:
        second.stop()


def test_start_without_broker_then_connected_follows_the_broker(tmp_path):
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed")
    broker = Mosquitto(tmp_path / "late", port=free_port())
    src = mqtt_source(broker)
    started = time.monotonic()
    src.start()  # no broker yet: must neither raise nor wait
    assert time.monotonic() - started < 1.0
    try:
        wait_until(lambda: src.status().errors >= 1, message="connect failure counted")
        assert not src.status().connected
        assert "cannot reach broker" in src.status().last_error
        broker.start()
        wait_until(lambda: src.status().connected, message="connected once the broker is up")
        assert src.status().reconnects == 0  # the first connection is not a re-connection
        broker.stop()
        wait_until(lambda: not src.status().connected, message="disconnect seen")
        broker.start()
        wait_until(lambda: src.status().connected, message="reconnected")
        assert src.status().reconnects == 1
    finally:
        src.stop()
        broker.kill()


def test_a_failing_callback_does_not_end_the_network_thread(mosquitto, publisher, monkeypatch):
    src = mqtt_source(mosquitto)
    src.start()
    try:
        wait_until(lambda: src.status().connected, message="connected")
        time.sleep(0.1)
        push = src._buffer.push_evicting
        calls = []

        def fail_once(chunk):
            calls.append(chunk)
            if len(calls) == 1:
                raise RuntimeError("injected")
            return push(chunk)

        monkeypatch.setattr(src._buffer, "push_evicting", fail_once)
        publisher.publish_acked("t/a", b"first\n")
        publisher.publish_acked("t/a", b"second\n")
        assert [c.data for c in read_until(src, 1)] == [b"second\n"]
        assert src.status().connected
    finally:
        src.stop()


def test_oversized_messages_are_dropped_and_counted(mosquitto, publisher):
    src = mqtt_source(mosquitto, max_payload_bytes=10)
    src.start()
    try:
        wait_until(lambda: src.status().connected, message="connected")
        time.sleep(0.1)
        publisher.publish_acked("t/a", b"x" * 11)
        publisher.publish_acked("t/a", b"fits\n")
        assert [c.data for c in read_until(src, 1)] == [b"fits\n"]
        assert src.status().dropped_bytes == 11
        assert src.stats()["oversized"] == 1
    finally:
        src.stop()


def test_full_buffer_drops_the_oldest_and_counts_them(mosquitto, publisher):
    src = mqtt_source(mosquitto, max_queued_messages=3)
    src.start()
    try:
        wait_until(lambda: src.status().connected, message="connected")
        time.sleep(0.1)
        payloads = [f"m{i}\n".encode() for i in range(10)]
        for p in payloads:
            publisher.publish_acked("t/a", p)
        wait_until(lambda: src.stats()["messages"] == 10, message="all delivered to the source")
        assert [c.data for c in src.read(0)] == payloads[-3:]
        assert src.status().dropped_bytes == sum(len(p) for p in payloads[:-3])
    finally:
        src.stop()


@pytest.mark.parametrize("skip_retained", [True, False])
def test_retained_replays_are_skipped_unless_asked(mosquitto, publisher, skip_retained):
    publisher.publish_acked("t/config", b"old value\n", retain=True)
    src = mqtt_source(mosquitto, name=f"r{skip_retained}", skip_retained=skip_retained)
    src.start()
    try:
        wait_until(lambda: src.status().connected, message="connected")
        time.sleep(0.1)
        publisher.publish_acked("t/config", b"new value\n")
        expected = [b"new value\n"] if skip_retained else [b"old value\n", b"new value\n"]
        assert [c.data for c in read_until(src, len(expected))] == expected
        assert src.read(0.2) == []
    finally:
        src.stop()


@pytest.fixture
def secured_broker(tmp_path):
    if MOSQUITTO is None or MOSQUITTO_PASSWD is None:
        pytest.skip("mosquitto / mosquitto_passwd are not installed")
    passwords = tmp_path / "passwd"
    add_password(passwords, "sensor", "s3cret")
    broker = Mosquitto(tmp_path / "auth", extra_config=f"allow_anonymous false\npassword_file {passwords}").start()
    yield broker
    broker.kill()


@pytest.mark.parametrize("password, works", [("s3cret", True), ("wrong", False)])
def test_password_file_authentication(secured_broker, tmp_path, password, works):
    secret = tmp_path / "secret"
    secret.write_text(password + "\n")
    src = mqtt_source(secured_broker, username="sensor", password_file=str(secret))
    src.start()
    try:
        if works:
            wait_until(lambda: src.status().connected, message="authenticated")
        else:
            wait_until(lambda: src.status().errors >= 2, message="refusals counted")
            assert not src.status().connected
            assert "refused" in src.status().last_error
    finally:
        src.stop()


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def tls_files(tmp_path):
    """A CA, and a broker certificate for 127.0.0.1 signed by it; plus an unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path / "pki"
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for ca in ("ca", "other_ca"):
        openssl("req", "-x509", *ec, "-keyout", f"{d}/{ca}.key", "-out", f"{d}/{ca}.crt",
                "-days", "2", "-subj", f"/CN=somad test {ca}")
    openssl("req", *ec, "-keyout", f"{d}/server.key", "-out", f"{d}/server.csr", "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.crt", "-CAkey", f"{d}/ca.key",
            "-CAcreateserial", "-out", f"{d}/server.crt", "-days", "2", "-extfile", f"{d}/san.ext")
    return d


@pytest.mark.parametrize("ca, works", [("ca", True), ("other_ca", False)])
def test_tls_verifies_the_broker(tmp_path, tls_files, ca, works):
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed")
    broker = Mosquitto(tmp_path / "tls", extra_config=(
        f"cafile {tls_files}/ca.crt\ncertfile {tls_files}/server.crt\nkeyfile {tls_files}/server.key")).start()
    src = mqtt_source(broker, tls={"ca_certs": str(tls_files / f"{ca}.crt")})
    src.start()
    try:
        if works:
            wait_until(lambda: src.status().connected, message="TLS connection")
            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tls-pub")
            pub.tls_set(ca_certs=str(tls_files / "ca.crt"))
            pub.connect(broker.host, broker.port)
            pub.loop_start()
            time.sleep(0.1)
            pub.publish("t/secure", b"over tls\n", qos=1).wait_for_publish(5)
            pub.disconnect()
            pub.loop_stop()
            assert [c.data for c in read_until(src, 1)] == [b"over tls\n"]
        else:
            wait_until(lambda: src.status().errors >= 1, message="TLS failure counted")
            time.sleep(0.3)
            assert not src.status().connected
    finally:
        src.stop()
        broker.kill()


@pytest.mark.parametrize("options, message", [
    ({}, "topics"),
    ({"topics": []}, "topics: at least one"),
    ({"topics": ["a/#/b"]}, "topics[0]"),
    ({"topics": ["a"], "qos": 2}, "qos"),
    ({"topics": ["a"], "port": 0}, "port"),
    ({"topics": ["a"], "protocol": "4"}, "protocol"),
    ({"topics": ["a"], "username": "u", "password": "p", "password_file": "/x"}, "password, password_file"),
    ({"topics": ["a"], "password": "p"}, "username"),
    ({"topics": ["a"], "reconnect_min_delay": 5, "reconnect_max_delay": 1}, "reconnect_min_delay"),
    ({"topics": ["a"], "tls": {"keyfile": "k.pem"}}, "tls.keyfile"),
])
def test_bad_options_are_rejected_naming_the_key(options, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("[", r"\[").replace("]", r"\]")):
        make_source("mqtt", options)


def test_unreadable_password_file_is_a_clear_error(tmp_path):
    src = make_source("mqtt", {"topics": ["a"], "username": "u", "password_file": str(tmp_path / "none")})
    with pytest.raises(ValueError, match="password_file: cannot read"):
        src.start()
    src.stop()  # idempotent, and fine after a failed start
