"""MQTT client set-up shared by the MQTT source and sink: options, validation, TLS, credentials,
capped reconnect backoff, and a stop that never hangs.

Both adapters use paho-mqtt 2.x with ``CallbackAPIVersion.VERSION2`` and its own network
thread (``loop_start``): paho reconnects by itself with a delay that doubles from
``reconnect_min_delay`` up to ``reconnect_max_delay`` and resets after a successful CONNACK.

>>> topic_filter_problem("plant/+/temp"), topic_filter_problem("a/#/b")
('', "'#' must be the last level")
>>> topic_name_problem("somad/dev1/uart0/alert"), topic_name_problem("a/+")
('', 'wildcards are not allowed in a topic name')
>>> default_client_id("uart 0", device="edge-7", role="sink")
'somad-edge-7-uart_0-sink'
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

PROTOCOLS = {"3.1.1": mqtt.MQTTv311, "5": mqtt.MQTTv5}
MAX_TOPIC_BYTES = 65535  # MQTT strings carry a 16-bit length


@dataclass(frozen=True)
class TlsOptions:
    ca_certs: str = ""  # PEM file of the CAs to trust; "" = the system's default CAs
    certfile: str = ""  # client certificate (PEM) for brokers that require one
    keyfile: str = ""  # its private key (PEM)
    insecure: bool = False  # skip the host name check (the chain is still verified); tests only

    def __post_init__(self) -> None:
        if self.keyfile and not self.certfile:
            raise ValueError("tls.keyfile: given without tls.certfile")


@dataclass(frozen=True, kw_only=True)
class MqttConnectionOptions:
    """How to reach the broker; the MQTT source and sink add their own keys to these."""

    host: str = "127.0.0.1"  # broker host name or address
    port: int = 1883  # 8883 is the usual TLS port
    client_id: str = ""  # fixed id; "" = derived from device and stream name (stable across restarts)
    protocol: str = "3.1.1"  # "3.1.1" or "5"
    username: str = ""  # "" = anonymous
    password: str = ""  # inline password; prefer password_file
    password_file: str = ""  # file whose first line is the password (kept out of the config)
    tls: TlsOptions | None = None  # None = plain TCP; {} = TLS with the system CAs
    keepalive: int = 60  # seconds between pings when idle; the broker drops us after 1.5x silence
    reconnect_min_delay: float = 1.0  # seconds before the first reconnect attempt
    reconnect_max_delay: float = 60.0  # cap of the doubling reconnect delay, seconds
    device: str = ""  # name of this device in client ids and topics; "" = the host name

    def __post_init__(self) -> None:
        if isinstance(self.tls, dict):  # straight from YAML
            object.__setattr__(self, "tls", TlsOptions(**self.tls))
        if not self.host:
            raise ValueError("host: must not be empty")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port: expected 1..65535, got {self.port!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.password and self.password_file:
            raise ValueError("password, password_file: give one, not both")
        if (self.password or self.password_file) and not self.username:
            raise ValueError("username: required when a password is given")
        if not 5 <= self.keepalive <= 65535:
            raise ValueError(f"keepalive: expected 5..65535 seconds, got {self.keepalive!r}")
        if not 0 < self.reconnect_min_delay <= self.reconnect_max_delay:
            raise ValueError(
                "reconnect_min_delay, reconnect_max_delay: need 0 < min <= max, "
                f"got {self.reconnect_min_delay!r}, {self.reconnect_max_delay!r}"
            )
        if len(self.client_id.encode()) > MAX_TOPIC_BYTES:
            raise ValueError("client_id: too long")


def device_name(device: str = "") -> str:
    """The configured device name, or this machine's host name."""
    return device or socket.gethostname()


def default_client_id(stream: str, device: str = "", role: str = "") -> str:
    """A client id that is the same on every start, so a persistent session is found again, and
    differs between devices and streams, so two clients never kick each other off the broker."""
    parts = ["somad", device_name(device), stream] + ([role] if role else [])
    return "-".join(re.sub(r"[^A-Za-z0-9_.-]", "_", p) for p in parts)


def topic_filter_problem(topic: str) -> str:
    """Why ``topic`` is not a valid subscription filter ("" when it is)."""
    if not topic:
        return "must not be empty"
    if len(topic.encode()) > MAX_TOPIC_BYTES or "\x00" in topic:
        return "too long or contains NUL"
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be the last level"
        if "+" in level and level != "+":
            return "'+' must fill a whole level"
    return ""


def topic_name_problem(topic: str) -> str:
    """Why ``topic`` is not a valid topic to publish to ("" when it is)."""
    if "+" in topic or "#" in topic:
        return "wildcards are not allowed in a topic name"
    return topic_filter_problem(topic)


def read_password(opts: MqttConnectionOptions) -> str | None:
    """The password to send, read from ``password_file`` at start so a rotated secret is picked up."""
    if opts.password_file:
        try:
            with open(opts.password_file, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as e:
            raise ValueError(f"password_file: cannot read {opts.password_file}: {e.strerror}") from None
    return opts.password or None


def make_client(opts: MqttConnectionOptions, client_id: str, persistent: bool) -> mqtt.Client:
    """A configured, not yet connected paho client. ``persistent`` keeps the broker-side session
    (subscriptions and queued QoS 1 messages) while we are away."""
    protocol = PROTOCOLS[opts.protocol]
    kwargs = {} if protocol == mqtt.MQTTv5 else {"clean_session": not persistent}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kwargs)
    if opts.username:
        client.username_pw_set(opts.username, read_password(opts))
    if opts.tls is not None:
        _set_tls(client, opts.tls)
    client.reconnect_delay_set(opts.reconnect_min_delay, opts.reconnect_max_delay)
    # A failing callback must not end the network thread (and with it every reconnect);
    # paho logs it instead, through the standard logging module.
    client.suppress_exceptions = True
    client.enable_logger(logging.getLogger("somad.paho"))
    return client


def _set_tls(client: mqtt.Client, tls: TlsOptions) -> None:
    for key in ("ca_certs", "certfile", "keyfile"):
        path = getattr(tls, key)
        if path:
            try:
                open(path, "rb").close()
            except OSError as e:
                raise ValueError(f"tls.{key}: cannot read {path}: {e.strerror}") from None
    try:
        client.tls_set(
            ca_certs=tls.ca_certs or None,
            certfile=tls.certfile or None,
            keyfile=tls.keyfile or None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    except ssl.SSLError as e:  # unreadable PEM, key not matching the certificate
        raise ValueError(f"tls: {e}") from None
    client.tls_insecure_set(tls.insecure)


def connect_in_background(
    client: mqtt.Client, opts: MqttConnectionOptions, persistent: bool, session_expiry: int = 0
) -> None:
    """Start paho's network thread; it connects, and reconnects with capped backoff, on its own,
    so an absent broker never makes ``start()`` fail or wait."""
    if PROTOCOLS[opts.protocol] == mqtt.MQTTv5:
        props = Properties(PacketTypes.CONNECT)
        # MQTT 5 ends a session at disconnect unless an expiry interval says otherwise.
        props.SessionExpiryInterval = session_expiry if persistent else 0
        client.connect_async(opts.host, opts.port, opts.keepalive, clean_start=not persistent, properties=props)
    else:
        client.connect_async(opts.host, opts.port, opts.keepalive)
    client.loop_start()


def stop_client(client: mqtt.Client, timeout: float = 1.0) -> bool:
    """Disconnect cleanly and stop the network thread, waiting at most ``timeout`` seconds
    (paho's own ``loop_stop`` waits without a bound, e.g. behind a 5 s connect attempt).
    Returns whether the thread ended in time; a late one is a daemon thread and ends by itself."""
    client.disconnect()
    stopper = threading.Thread(target=client.loop_stop, name="mqtt-stop", daemon=True)
    stopper.start()
    stopper.join(timeout)
    return not stopper.is_alive()


def reason_text(reason_code) -> str:
    """Readable text of a paho reason code (``ReasonCode`` or ``MQTTErrorCode``)."""
    if isinstance(reason_code, mqtt.MQTTErrorCode):
        return mqtt.error_string(reason_code)
    return str(reason_code)
