"""MQTT sink: alerts (and optionally per-record scores) as JSON, plus a retained online/offline status.

- ``AlertEvent`` -> ``topic`` (a template with ``{device}`` and ``{stream}``), QoS ``qos``
  (1 by default), not retained: an alert is an event, not a state.
- ``RecordScored`` -> ``score_topic`` when one is set (off by default: one message per record).
- ``status_topic`` carries a retained ``online`` after every connect and ``offline`` on a clean
  stop; the broker publishes the same ``offline`` as our last will when the connection dies
  without a goodbye (crash, power loss, network cut).

``send`` never blocks the pipeline. While the broker is away, QoS 1 messages wait in paho's
queue (at most ``max_queued``) and go out after the reconnect; what does not fit, QoS 0 messages
that cannot go out, and whatever is still waiting when ``stop`` gives up are counted as dropped.
``stats()`` always balances: every event handed to ``send`` is sent, dropped or queued.

>>> MqttSink.Options(topic="somad/{site}/alert")
Traceback (most recent call last):
...
ValueError: topic: unknown placeholder {site} (allowed: {device}, {stream})
"""

from __future__ import annotations

import json
import string
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import structlog

from adapters.base import Sink
from adapters.mqtt_common import (
    MqttConnectionOptions,
    connect_in_background,
    default_client_id,
    device_name,
    make_client,
    reason_text,
    stop_client,
    topic_name_problem,
)
from somad.events import AlertEvent, RecordScored

log = structlog.get_logger("somad.adapters.mqtt_sink")

PLACEHOLDERS = ("device", "stream")
ONLINE, OFFLINE = b"online", b"offline"


@dataclass(frozen=True, kw_only=True)
class MqttSinkOptions(MqttConnectionOptions):
    topic: str = "somad/{device}/{stream}/alert"  # where alerts go; {device}, {stream} filled in
    qos: int = 1  # alerts: 1 = delivered at least once, queued while the broker is away
    score_topic: str = ""  # per-record scores go here when set; "" = not published
    score_qos: int = 0  # scores are many and each is soon stale: 0 by default
    status_topic: str = "somad/{device}/status"  # retained online/offline (last will); "" = none
    max_queued: int = 1000  # messages waiting for the broker; more are dropped and counted

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("topic", "score_topic", "status_topic"):
            template = getattr(self, key)
            if template or key == "topic":
                _check_template(key, template)
        for key in ("qos", "score_qos"):
            if getattr(self, key) not in (0, 1):
                raise ValueError(f"{key}: expected 0 or 1, got {getattr(self, key)!r}")
        if self.max_queued < 1:
            raise ValueError(f"max_queued: must be >= 1, got {self.max_queued!r}")


def _check_template(key: str, template: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"{key}: {e} in {template!r}") from None
    for f in fields:
        if f not in PLACEHOLDERS:
            raise ValueError(f"{key}: unknown placeholder {{{f}}} (allowed: {{device}}, {{stream}})")
    problem = topic_name_problem(template.format(device="d", stream="s"))
    if problem:
        raise ValueError(f"{key}: {template!r}: {problem}")


class _Ledger:
    """Where every event handed to ``send`` is: sent, dropped, or queued (still in paho).

    paho calls ``on_publish`` while holding its own lock, sometimes before ``publish`` has even
    returned us the message id; so acknowledgements that arrive first are remembered and
    matched when the id is tracked (never a lock held across ``publish``: that would deadlock).
    """

    def __init__(self):
        self._lock = threading.Condition()
        self._pending: dict[int, tuple[int, bool]] = {}  # mid -> (qos, counted as an event)
        self._acked_early: set[int] = set()
        self.sent = 0
        self.dropped = 0

    def queued(self, events_only: bool = True) -> int:
        with self._lock:
            return sum(1 for _, counted in self._pending.values() if counted or not events_only)

    def drop(self, n: int = 1) -> None:
        with self._lock:
            self.dropped += n

    def track(self, mid: int, qos: int, counted: bool) -> None:
        with self._lock:
            if mid in self._acked_early:
                self._acked_early.discard(mid)
                self.sent += counted
                self._lock.notify_all()
            else:
                self._pending[mid] = (qos, counted)

    def acked(self, mid: int) -> None:
        with self._lock:
            entry = self._pending.pop(mid, None)
            if entry is None:
                self._acked_early.add(mid)
            else:
                self.sent += entry[1]
            self._lock.notify_all()

    def connection_lost(self) -> int:
        """QoS 0 messages not yet written are gone (paho discards them on reconnect)."""
        with self._lock:
            lost = [mid for mid, (qos, _) in self._pending.items() if qos == 0]
            counted = sum(self._pending.pop(mid)[1] for mid in lost)
            self.dropped += counted
            return counted

    def wait_empty(self, timeout: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: not self._pending, timeout)

    def wait_for(self, mid: int, timeout: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: mid not in self._pending, timeout)

    def abandon(self) -> int:
        """Everything still waiting is dropped (the sink stops)."""
        with self._lock:
            counted = sum(c for _, c in self._pending.values())
            self.dropped += counted
            self._pending.clear()
            return counted


class MqttSink(Sink):
    type_name = "mqtt"
    Options = MqttSinkOptions

    def __init__(self, options: MqttSinkOptions, name: str = ""):
        super().__init__(options, name)
        self.device = device_name(options.device)
        self.client_id = options.client_id or default_client_id(self.name, options.device, role="sink")
        self.status_topic = self._fill(options.status_topic, self.name) if options.status_topic else ""
        self._topics: dict[tuple[str, str], str] = {}  # (template, stream) -> topic, filled once
        self._ledger = _Ledger()
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._stopping = False
        self._log = log.bind(sink="mqtt", stream=self.name, client_id=self.client_id)

    # -- contract -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._client is not None:
            return
        self._stopping = False
        client = make_client(self.options, self.client_id, persistent=False)
        # Headroom over max_queued for the status messages, which are not events.
        client.max_queued_messages_set(self.options.max_queued + 2)
        if self.status_topic:
            client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client
        connect_in_background(client, self.options, persistent=False)
        self._log.info("mqtt sink started", host=self.options.host, port=self.options.port)

    def send(self, event) -> None:
        if isinstance(event, AlertEvent):
            template, qos = self.options.topic, self.options.qos
        elif isinstance(event, RecordScored) and self.options.score_topic:
            template, qos = self.options.score_topic, self.options.score_qos
        else:
            return  # not an event this sink was asked to publish
        client = self._client
        if client is None or self._ledger.queued(events_only=False) >= self.options.max_queued:
            self._dropped("not started" if client is None else "queue full")
            return
        topic = self._topic(template, event.stream)
        if not topic:
            self._dropped(f"stream name {event.stream!r} does not make a valid topic")
            return
        if qos == 0 and not self._connected.is_set():
            self._dropped("broker away (QoS 0 is not queued)")
            return
        self._publish(client, topic, json.dumps(event.to_dict()).encode(), qos, retain=False, counted=True)

    def stop(self, timeout: float = 2.0) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        deadline = time.monotonic() + timeout
        # Give queued events the time we have (a reconnect may still happen within it).
        self._ledger.wait_empty(max(0.0, deadline - time.monotonic() - 0.2))
        if self.status_topic and self._connected.is_set():
            # A clean disconnect does not fire the last will, so say offline ourselves.
            info = client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
            self._ledger.track(info.mid, 1, counted=False)
            self._ledger.wait_for(info.mid, max(0.1, deadline - time.monotonic()))
        self._stopping = True
        stop_client(client, timeout=max(0.2, deadline - time.monotonic()))
        self._connected.clear()
        lost = self._ledger.abandon()
        if lost:
            self._log.warning("mqtt sink stopped with undelivered events", dropped=lost)
        self._log.info("mqtt sink stopped", **self.stats())

    def stats(self) -> dict:
        return {
            "sent": self._ledger.sent,
            "dropped": self._ledger.dropped,
            "queued": self._ledger.queued(),
            "connected": self._connected.is_set(),
        }

    # -- paho callbacks (paho's network thread) ---------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._log.warning("mqtt sink connection refused", reason=reason_text(reason_code))
            return
        self._connected.set()
        if self.status_topic:
            self._publish(client, self.status_topic, ONLINE, qos=1, retain=True, counted=False)
        self._log.info("mqtt sink connected")

    def _on_connect_fail(self, client, userdata) -> None:
        self._log.warning("mqtt sink cannot reach broker", host=self.options.host, port=self.options.port)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        lost = self._ledger.connection_lost()
        if not self._stopping:
            self._log.warning("mqtt sink connection lost", reason=reason_text(reason_code), qos0_lost=lost)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._ledger.acked(mid)

    # -- helpers ------------------------------------------------------------------------------

    def _publish(self, client: mqtt.Client, topic: str, payload: bytes, qos: int, retain: bool, counted: bool) -> None:
        info = client.publish(topic, payload, qos=qos, retain=retain)
        queued_for_later = qos > 0 and info.rc == mqtt.MQTT_ERR_NO_CONN  # paho resends it after reconnect
        if info.rc == mqtt.MQTT_ERR_SUCCESS or queued_for_later:
            self._ledger.track(info.mid, qos, counted)
        elif counted:
            self._dropped(mqtt.error_string(info.rc))

    def _dropped(self, why: str) -> None:
        self._ledger.drop()
        times = self._ledger.dropped
        # Log the 1st, 2nd, 4th, 8th... drop: visible at once, yet a flood cannot flood the log.
        if times & (times - 1) == 0:
            self._log.warning("mqtt sink dropped an event", reason=why, dropped_total=times)

    def _fill(self, template: str, stream: str) -> str:
        return template.format(device=self.device, stream=stream)

    def _topic(self, template: str, stream: str) -> str:
        """The topic for ``stream`` ("" when the stream's name cannot be part of a topic)."""
        key = (template, stream)
        topic = self._topics.get(key)
        if topic is None:
            filled = self._fill(template, stream)
            topic = "" if topic_name_problem(filled) else filled
            if len(self._topics) < 1024:  # stream names are few; never grow without bound
                self._topics[key] = topic
        return topic
