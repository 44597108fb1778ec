"""The MQTT sink against a real mosquitto and a real subscriber: alerts and scores as JSON,
the retained online/offline status (clean stop and last will), queueing while the broker is away,
and counting whatever cannot be delivered."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from adapters.mqtt_sink import MqttSink
from adapters.registry import make_sink
from somad.events import AlertEvent, RecordScored, Timescale
from tests.brokers import Mosquitto, wait_until

ROOT = Path(__file__).resolve().parent.parent


class Subscriber:
    """A real MQTT subscriber recording (topic, payload, retain, qos) of everything it receives."""

    def __init__(self, broker: Mosquitto, topic: str = "somad/#", client_id: str = "", persistent: bool = False):
        self.messages: list[tuple[str, bytes, bool, int]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect_async(broker.host, broker.port)
        self.client.loop_start()
        assert self.subscribed.wait(10), "subscriber did not subscribe"

    def _on_message(self, client, userdata, msg):
        with self._lock:
            self.messages.append((msg.topic, msg.payload, msg.retain, msg.qos))

    def on(self, topic: str) -> list[bytes]:
        with self._lock:
            return [m[1] for m in self.messages if m[0] == topic]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def alert(stream: str = "uart0", n: int = 0) -> AlertEvent:
    return AlertEvent(kind="open", stream=stream, alert_id=f"a{n}", started_at=1700000000.0 + n,
                      time=1700000001.0 + n, peak_anomaly=0.999, peak_bits=7.5, records=1,
                      record=b"99.9,\xff\n", timescales=(Timescale(band=3, tau_bytes=21.5, share=0.6),))


def score(stream: str = "uart0", n: int = 0) -> RecordScored:
    return RecordScored(stream=stream, time=1700000000.0 + n, index=n, record=b"12.5\n", bits=2.0, anomaly=0.5)


def mqtt_sink(broker: Mosquitto, **options) -> MqttSink:
    opts = {"host": broker.host, "port": broker.port, "device": "dev1",
            "reconnect_min_delay": 0.1, "reconnect_max_delay": 0.5, **options}
    return make_sink("mqtt", opts, name="uart0")


def balanced(stats: dict, handed: int) -> bool:
    return stats["sent"] + stats["dropped"] + stats["queued"] == handed


@pytest.fixture
def subscriber(mosquitto):
    sub = Subscriber(mosquitto)
    yield sub
    sub.close()


@pytest.fixture
def sink_factory():
    sinks = []

    def make(broker, **options):
        sink = mqtt_sink(broker, **options)
        sinks.append(sink)
        return sink

    yield make
    for s in sinks:
        s.stop(timeout=0.5)


def test_alert_arrives_with_its_fields_qos1_not_retained(mosquitto, subscriber, sink_factory):
    sink = sink_factory(mosquitto)
    sink.start()
    wait_until(lambda: sink.stats()["connected"], message="sink connected")
    sink.send(alert())
    sink.send(score())  # scores are off by default
    payloads = wait_until(lambda: subscriber.on("somad/dev1/uart0/alert"), message="alert")
    body = json.loads(payloads[0])
    assert body == {
        "event": "alert_open", "kind": "open", "stream": "uart0", "alert_id": "a0",
        "started_at": 1700000000.0, "time": 1700000001.0, "peak_anomaly": 0.999, "peak_bits": 7.5,
        "records": 1, "record": "99.9,\\xff\\n",
        "timescales": [{"band": 3, "tau_bytes": 21.5, "share": 0.6}],
    }
    _, _, retain, qos = next(m for m in subscriber.messages if m[0].endswith("/alert"))
    assert (retain, qos) == (False, 1)
    wait_until(lambda: sink.stats()["sent"] == 1, message="acknowledged")
    assert sink.stats() == {"sent": 1, "dropped": 0, "queued": 0, "connected": True}
    assert not [m for m in subscriber.messages if "score" in m[0]]


def test_scores_published_when_a_score_topic_is_set(mosquitto, subscriber, sink_factory):
    sink = sink_factory(mosquitto, score_topic="somad/{device}/{stream}/score", topic="somad/alerts/{stream}")
    sink.start()
    wait_until(lambda: sink.stats()["connected"], message="sink connected")
    for i in range(5):
        sink.send(score(n=i))
    sink.send(alert(stream="pump"))
    got = wait_until(lambda: len(subscriber.on("somad/dev1/uart0/score")) == 5 and subscriber.on("somad/dev1/uart0/score"),
                     message="five scores")
    assert [json.loads(p)["index"] for p in got] == [0, 1, 2, 3, 4]
    assert json.loads(got[0])["event"] == "score"
    wait_until(lambda: subscriber.on("somad/alerts/pump"), message="alert on its own topic")
    wait_until(lambda: sink.stats()["sent"] == 6, message="all counted as sent")


def test_status_is_retained_online_then_offline_after_a_clean_stop(mosquitto, sink_factory):
    sink = sink_factory(mosquitto)
    sink.start()
    wait_until(lambda: sink.stats()["connected"], message="sink connected")
    late = Subscriber(mosquitto, topic="somad/dev1/status")  # subscribes after the fact
    try:
        wait_until(lambda: late.on("somad/dev1/status") == [b"online"], message="retained online")
        assert late.messages[0][2] is True  # delivered as a retained message
        sink.stop()
        wait_until(lambda: late.on("somad/dev1/status") == [b"online", b"offline"], message="offline on stop")
    finally:
        late.close()
    later = Subscriber(mosquitto, topic="somad/dev1/status")
    try:
        wait_until(lambda: later.on("somad/dev1/status") == [b"offline"], message="retained offline")
    finally:
        later.close()


def test_last_will_says_offline_when_the_process_dies(mosquitto, subscriber):
    code = (
        "import time\n"
        "from adapters.registry import make_sink\n"
        f"s = make_sink('mqtt', {{'port': {mosquitto.port}, 'device': 'dev1'}}, name='uart0')\n"
        "s.start()\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        wait_until(lambda: subscriber.on("somad/dev1/status") == [b"online"], message="child online")
        child.kill()  # kill -9: no DISCONNECT, no offline message from the sink itself
        child.wait(5)
        wait_until(lambda: subscriber.on("somad/dev1/status") == [b"online", b"offline"], message="last will")
    finally:
        child.kill()
        child.wait(5)


def test_abrupt_connection_loss_fires_the_will_then_online_again(mosquitto, subscriber, sink_factory):
    sink = sink_factory(mosquitto)
    sink.start()
    wait_until(lambda: subscriber.on("somad/dev1/status") == [b"online"], message="online")
    sink._client.socket().close()  # the connection dies without a goodbye, as on a network cut
    wait_until(lambda: subscriber.on("somad/dev1/status")[:2] == [b"online", b"offline"], message="will")
    wait_until(lambda: subscriber.on("somad/dev1/status")[-1:] == [b"online"]
               and len(subscriber.on("somad/dev1/status")) == 3, message="online again after reconnecting")
    sink.send(alert())
    wait_until(lambda: subscriber.on("somad/dev1/uart0/alert"), message="alert after reconnect")


def test_alerts_sent_while_the_broker_is_down_are_delivered_when_it_returns(mosquitto, sink_factory):
    sub = Subscriber(mosquitto, client_id="persistent-sub", persistent=True)
    sink = sink_factory(mosquitto)
    sink.start()
    wait_until(lambda: sink.stats()["connected"], message="sink connected")
    mosquitto.stop()  # graceful: the subscriber's session is saved
    wait_until(lambda: not sink.stats()["connected"], message="sink sees the broker gone")
    for i in range(5):
        sink.send(alert(n=i))  # must return at once
    assert sink.stats() == {"sent": 0, "dropped": 0, "queued": 5, "connected": False}
    mosquitto.start()
    try:
        got = wait_until(lambda: len(sub.on("somad/dev1/uart0/alert")) >= 5 and sub.on("somad/dev1/uart0/alert"),
                         message="queued alerts delivered")
        assert sorted(json.loads(p)["alert_id"] for p in got) == [f"a{i}" for i in range(5)]
        wait_until(lambda: sink.stats()["sent"] == 5, message="acknowledged")
        assert sink.stats()["dropped"] == 0 and sink.stats()["queued"] == 0
    finally:
        sub.close()


def test_what_cannot_be_delivered_is_counted_never_silent(mosquitto, sink_factory):
    sink = sink_factory(mosquitto, max_queued=3, score_topic="somad/{device}/{stream}/score")
    sink.send(alert())  # before start: dropped, not lost silently
    assert sink.stats()["dropped"] == 1
    sink.start()
    wait_until(lambda: sink.stats()["connected"], message="sink connected")
    mosquitto.kill()
    wait_until(lambda: not sink.stats()["connected"], message="broker gone")
    for i in range(5):
        sink.send(alert(n=i))
    sink.send(score())  # QoS 0 cannot wait for the broker
    assert sink.stats() == {"sent": 0, "dropped": 1 + 2 + 1, "queued": 3, "connected": False}
    assert balanced(sink.stats(), 7)
    sink.stop(timeout=0.5)  # the broker never returns: the three queued alerts are given up
    assert sink.stats() == {"sent": 0, "dropped": 7, "queued": 0, "connected": False}


def test_stream_name_that_cannot_be_a_topic_is_dropped_and_counted(mosquitto, sink_factory):
    sink = sink_factory(mosquitto)
    sink.start()
    wait_until(lambda: sink.stats()["connected"], message="sink connected")
    sink.send(alert(stream="bad/#"))
    assert sink.stats()["dropped"] == 1


@pytest.mark.parametrize("options, message", [
    ({"topic": "somad/{site}"}, "topic: unknown placeholder"),
    ({"topic": "somad/+/{stream}"}, "topic: .*wildcards"),
    ({"topic": ""}, "topic: .*empty"),
    ({"score_topic": "s/{stream"}, "score_topic"),
    ({"qos": 2}, "qos"),
    ({"score_qos": -1}, "score_qos"),
    ({"max_queued": 0}, "max_queued"),
    ({"port": 99999}, "port"),
])
def test_bad_options_are_rejected_naming_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        make_sink("mqtt", options)


def test_stop_before_start_and_twice_is_harmless(mosquitto):
    sink = mqtt_sink(mosquitto)
    sink.stop()
    sink.start()
    sink.stop(timeout=0.5)
    sink.stop(timeout=0.5)
