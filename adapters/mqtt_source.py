"""MQTT source: subscribe to topics (wildcards allowed); each message is one record, keyed by its topic.

Delivery guarantees come from the broker-side session: with QoS 1 and a persistent session
(``clean_start: false``, the default) under a fixed client id, the broker keeps our
subscriptions and queues QoS 1 messages while we are away (somad restarting, network down);
paho acknowledges a message only after ``on_message`` has put it in our buffer, so a message
the broker counts as delivered is in somad's hands. We resubscribe on every connect anyway, in
case the broker lost the session.

Between paho's thread and ``read`` sits a bounded buffer; when the pipeline falls behind, the
oldest messages are dropped and counted (``status().dropped_bytes``), as are messages larger
than ``max_payload_bytes``. Retained messages that the broker replays on (re)subscribe are old
values, not new stream data, and are skipped by default.

>>> MqttSource.Options(topics=["plant/+/temp"]).topics
('plant/+/temp',)
>>> MqttSource.Options(topics=["a/#/b"])
Traceback (most recent call last):
...
ValueError: topics[0]: 'a/#/b': '#' must be the last level
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import structlog

from adapters.base import Chunk, Source
from adapters.chunk_buffer import ChunkBuffer
from adapters.mqtt_common import (
    MqttConnectionOptions,
    connect_in_background,
    default_client_id,
    make_client,
    reason_text,
    stop_client,
    topic_filter_problem,
)

log = structlog.get_logger("somad.adapters.mqtt_source")


@dataclass(frozen=True, kw_only=True)
class MqttSourceOptions(MqttConnectionOptions):
    topics: tuple[str, ...]  # subscription filters; '+' and '#' wildcards allowed; the topic keys the record
    qos: int = 1  # 0 or 1; 1 (with a persistent session) loses nothing while we are connected or away
    clean_start: bool = False  # true = no persistent session: messages sent while away are not kept
    session_expiry: int = 604800  # MQTT 5 only: seconds the broker keeps our session while we are away
    max_payload_bytes: int = 65536  # larger messages are dropped and counted
    max_queued_bytes: int = 4 * 1024 * 1024  # buffer between paho and read(); oldest dropped beyond
    max_queued_messages: int = 10000  # same, in messages (bounds empty payloads too)
    skip_retained: bool = True  # drop retained values the broker replays on (re)subscribe

    def __post_init__(self) -> None:
        super().__post_init__()
        topics = (self.topics,) if isinstance(self.topics, str) else tuple(self.topics)
        object.__setattr__(self, "topics", topics)
        if not topics:
            raise ValueError("topics: at least one topic filter is required")
        for i, topic in enumerate(topics):
            problem = topic_filter_problem(topic) if isinstance(topic, str) else "expected a string"
            if problem:
                raise ValueError(f"topics[{i}]: {topic!r}: {problem}")
        if self.qos not in (0, 1):
            raise ValueError(f"qos: expected 0 or 1, got {self.qos!r}")
        for key in ("session_expiry", "max_payload_bytes", "max_queued_bytes", "max_queued_messages"):
            if getattr(self, key) < (0 if key == "session_expiry" else 1):
                raise ValueError(f"{key}: must be positive, got {getattr(self, key)!r}")
        if self.max_payload_bytes > self.max_queued_bytes:
            raise ValueError("max_payload_bytes: must not exceed max_queued_bytes")


class MqttSource(Source):
    type_name = "mqtt"
    Options = MqttSourceOptions

    def __init__(self, options: MqttSourceOptions, name: str = ""):
        super().__init__(options, name)
        self.client_id = options.client_id or default_client_id(self.name, options.device)
        self._client: mqtt.Client | None = None
        self._buffer = self._new_buffer()
        self._ever_connected = False
        self._stopping = False
        self._log = log.bind(stream=self.name, source="mqtt", client_id=self.client_id)
        self._stats_lock = threading.Lock()
        self._stats = {"messages": 0, "oversized": 0, "evicted": 0, "retained_skipped": 0}

    # -- contract ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._client is not None:
            return
        self._stopping = False
        self._buffer = self._new_buffer()
        persistent = not self.options.clean_start
        client = make_client(self.options, self.client_id, persistent)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        connect_in_background(client, self.options, persistent, self.options.session_expiry)
        self._log.info("mqtt source started", host=self.options.host, port=self.options.port,
                       topics=list(self.options.topics))

    def read(self, timeout: float) -> list[Chunk]:
        return self._buffer.take(timeout)

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        self._stopping = True
        if not stop_client(client, timeout=1.0):
            self._log.warning("mqtt network thread still busy after stop; left to end on its own")
        self._update_status(connected=False)
        self._buffer.close()
        self._log.info("mqtt source stopped", **self.stats())

    def stats(self) -> dict:
        """Counters beside ``status()``: messages received, oversized and evicted drops, skipped retained."""
        with self._stats_lock:
            return dict(self._stats)

    # -- paho callbacks (paho's network thread) ---------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._fault(f"connection refused: {reason_text(reason_code)}")
            return
        with self._status_lock:
            if self._ever_connected:
                self._status.reconnects += 1
            self._status.connected = True
        self._ever_connected = True
        # Resubscribe every time: the broker may have lost the session (restart without
        # persistence, session expiry); a duplicate subscription is harmless.
        client.subscribe([(topic, self.options.qos) for topic in self.options.topics])
        self._log.info("mqtt connected", session_present=flags.session_present)

    def _on_connect_fail(self, client, userdata) -> None:
        self._fault(f"cannot reach broker {self.options.host}:{self.options.port}")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._status_lock:
            was_connected, self._status.connected = self._status.connected, False
        # A refused CONNECT also ends in a disconnect; the refusal was already counted.
        if was_connected and not self._stopping:
            self._fault(f"connection lost: {reason_text(reason_code)}")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [t for t, rc in zip(self.options.topics, reason_codes) if rc.is_failure]
        if refused:
            self._fault(f"subscription refused for {', '.join(refused)}")

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        payload = message.payload
        if message.retain and self.options.skip_retained:
            self._bump("retained_skipped")
            return
        self._bump("messages")
        if len(payload) > self.options.max_payload_bytes:
            self._drop("oversized", len(payload), topic=message.topic)
            return
        chunk = Chunk(data=payload, key=message.topic, is_record=True, received_at=time.monotonic())
        evicted = self._buffer.push_evicting(chunk)
        if evicted:
            self._drop("evicted", evicted)

    # -- bookkeeping --------------------------------------------------------------------------

    def _new_buffer(self) -> ChunkBuffer:
        return ChunkBuffer(self.options.max_queued_bytes, self.options.max_queued_messages)

    def _fault(self, message: str) -> None:
        with self._status_lock:
            self._status.errors += 1
            self._status.last_error = message
        self._log.warning("mqtt " + message)

    def _bump(self, key: str, n: int = 1) -> int:
        with self._stats_lock:
            self._stats[key] += n
            return self._stats[key]

    def _drop(self, reason: str, nbytes: int, **context) -> None:
        self._count("dropped_bytes", nbytes)
        times = self._bump(reason)
        # Log the 1st, 2nd, 4th, 8th... drop: visible at once, yet a flood cannot flood the log.
        if times & (times - 1) == 0:
            self._log.warning("mqtt messages dropped", reason=reason, times=times, nbytes=nbytes, **context)
