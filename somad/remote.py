"""Remote configuration: documents from a fleet, applied through the daemon's own
validate-then-swap, kept on disk so they survive restarts, and reported back (desired /
reported, as in device-shadow systems).

Channels (the local file's ``remote:`` section; either or both):

- **MQTT**: a document published to ``somad/<device>/config/set`` (publish it *retained*, so a
  device that was away picks it up when it comes back); the result goes, retained, to
  ``somad/<device>/config/state``. An empty message (clearing the retained one) is ignored.
- **HTTP(S)**: ``url`` fetched every ``poll_seconds`` with ``If-None-Match`` /
  ``If-Modified-Since``; 304, or a body identical to the last one fetched, applies nothing.
  Failures are logged and retried after a delay that doubles up to 15 minutes; never fatal.

**The envelope** (the payload on either channel):

- with ``secret`` set: JSON ``{"config": "<YAML text>", "hmac": "<hex HMAC-SHA256 under the
  secret of the YAML text's UTF-8 bytes>"}``; raw YAML, a missing or a wrong ``hmac`` is
  rejected (``make_envelope`` builds one; ``python -m somad.remote envelope`` prints one);
- without a secret: the same JSON (``hmac`` optional, not checked) or the raw YAML itself.

A document's **version** is the first 16 hex digits of the SHA-256 of its YAML text (as for
a local file). A document is a whole configuration, not a patch, with one rule: ``device``,
``state_dir``, ``remote`` and ``watch_config`` belong to the device and always come from its
local file (a document may leave them out or repeat them; a different value is rejected).
``${ENV}`` and ``*_file`` keys in a document are resolved on the device: without a secret,
anyone who may publish to the set topic can make the device read a file into a password and
send it to a broker of their choosing, so set a secret wherever others can publish.

**Never bricked**: a document is applied only once it parses and validates (and the metrics
listener, if it moves, could bind); otherwise the configuration in force stays and the state
says why. An applied document is written atomically to ``<state_dir>/remote-config.yaml``
(``remote-config.json`` beside it says when and from where); at start it is run instead of
the local file's settings while it is still valid, and the log says which one is in force.
Remove that file and send SIGHUP (or restart) to return to the local file.

**State message** (JSON, retained on the state topic): ``version`` (the document this message is
about), ``status`` (``applied``, ``rejected``, or ``local`` before any document arrived while
the local file is in force), ``error`` (null or why), ``at`` (UTC, ISO 8601), ``origin``,
``in_force`` (version of the remote document running now; null: the local file) and ``source``
(``remote`` or ``local``).

>>> text = "streams: [{name: s, source: {type: stdin}}]\\n"
>>> payload = make_envelope(text, secret="k")
>>> open_envelope(payload, secret="k") == text
True
>>> open_envelope(text.encode(), secret=None) == text
True
>>> open_envelope(make_envelope(text, secret="not k"), secret="k")
Traceback (most recent call last):
...
somad.remote.RemoteRejected: wrong signature: 'hmac' is not the HMAC-SHA256 of 'config' under this device's secret
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import http.client
import json
import os
import random
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import structlog
import yaml

from .config import MAX_CONFIG_BYTES, Config, ConfigError, Problem, RemoteConfig, config_version, parse_config, to_plain

DOCUMENT_FILE = "remote-config.yaml"  # the accepted document, verbatim, under state_dir
METADATA_FILE = "remote-config.json"  # its version, origin and time (for people; the version is recomputed)
LOCAL_ONLY = ("device", "state_dir", "remote", "watch_config")  # how this device gets its config: the local file decides
ENVELOPE_KEYS = ("config", "hmac")
MAX_PAYLOAD_BYTES = 4 * MAX_CONFIG_BYTES  # a JSON envelope escapes the YAML; the YAML itself is limited by the loader
HTTP_TIMEOUT = 20.0  # seconds one poll may take (connect and read)
MAX_POLL_BACKOFF = 900.0  # seconds between polls at most while the URL keeps failing
STATE_PUBLISH_WAIT = 1.0  # seconds ``stop`` waits for the last state message to reach the broker

log = structlog.get_logger("somad.remote")


# --------------------------------------------------------------------------- the envelope


class RemoteRejected(ValueError):
    """A payload that is not an acceptable document (unsigned, forged, not text, too large)."""

    def __init__(self, message: str, document: str | None = None):
        super().__init__(message)
        self.document = document  # the YAML text, when the payload held one (names the version in the state)


def sign(text: str, secret: str) -> str:
    """Hex HMAC-SHA256 of the document's UTF-8 bytes under ``secret``."""
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def make_envelope(text: str, secret: str | None = None) -> bytes:
    """The payload a fleet sends: ``{"config": text, "hmac": ...}`` (no ``hmac`` without a secret)."""
    body = {"config": text, **({"hmac": sign(text, secret)} if secret else {})}
    return json.dumps(body).encode()


def open_envelope(payload: bytes, secret: str | None) -> str:
    """The YAML text of a payload, checked against ``secret``; ``RemoteRejected`` says why not."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise RemoteRejected(f"the payload is {len(payload)} bytes, more than the {MAX_PAYLOAD_BYTES} allowed")
    try:
        text = payload.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise RemoteRejected(f"the payload is not UTF-8 text: {err}") from None
    envelope = _envelope(text)
    if envelope is None:
        if secret:
            raise RemoteRejected('unsigned document: a secret is set, send {"config": "<yaml>", "hmac": "<hex HMAC-SHA256>"}', document=text)
        return text
    unknown = sorted(set(envelope) - set(ENVELOPE_KEYS))
    if unknown:
        raise RemoteRejected(f"unknown envelope key(s) {', '.join(map(repr, unknown))}; known: {', '.join(ENVELOPE_KEYS)}")
    document = envelope.get("config")
    if not isinstance(document, str):
        raise RemoteRejected("'config' must hold the YAML document as a JSON string")
    if not secret:
        return document
    mac = envelope.get("hmac")
    if mac is None:
        raise RemoteRejected("unsigned document: a secret is set and the envelope has no 'hmac'", document=document)
    if not isinstance(mac, str) or not hmac.compare_digest(mac.strip().lower().encode(), sign(document, secret).encode()):
        raise RemoteRejected("wrong signature: 'hmac' is not the HMAC-SHA256 of 'config' under this device's secret", document=document)
    return document


def _envelope(text: str) -> dict | None:
    """The JSON envelope, or None when the payload is a bare YAML document."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None  # a YAML flow mapping: "{streams: [...]}"
    return value if isinstance(value, dict) and any(k in value for k in ENVELOPE_KEYS) else None


# --------------------------------------------------------------------------- documents and the local file


def parse_remote_document(text: str, origin: str, local: Config) -> Config:
    """A remote document as the configuration to run: parsed under the local file's device
    name, with the local file's ``device``, ``state_dir``, ``remote`` and ``watch_config``.
    ``ConfigError`` when it is invalid or sets one of those to another value."""
    config = parse_config(text, origin, device=local.device)
    given = yaml.safe_load(text)  # parsed and checked above already (size, aliases, depth)
    problems = []
    for key in LOCAL_ONLY:
        if key in given and getattr(config, key) != getattr(local, key):
            shown = f" (here {getattr(local, key)!r}, the document says {getattr(config, key)!r})" if key in ("device", "state_dir", "watch_config") else ""
            problems.append(Problem(key, f"belongs to the device's local config file{shown}; leave it out of remote documents"))
    if problems:
        raise ConfigError(problems, origin)
    return replace(config, **{key: getattr(local, key) for key in LOCAL_ONLY})


def config_in_force(local: Config, document: str | None, origin: str = DOCUMENT_FILE) -> tuple[Config, str | None]:
    """(configuration to run, remote document in force or None): the accepted remote document
    when remote configuration is on and the document is still valid, else the local file.
    Logs which one is in force, and why when a document is set aside."""
    if document is not None and local.remote is None:
        log.warning("remote_config_ignored", reason="the local config file has no remote: section", version=config_version(document))
    elif document is not None:
        try:
            config = parse_remote_document(document, origin, local)
        except ConfigError as err:
            log.error("remote_config_invalid", version=config_version(document), problems=err.problems, kept="the local config file")
        else:
            log.info("config_in_force", source="remote", version=config_version(document))
            return config, document
    log.info("config_in_force", source="local")
    return local, None


def persisted_document(state_dir: str | os.PathLike) -> str | None:
    """The accepted remote document under ``state_dir``, or None (absent or unreadable: logged)."""
    try:
        return RemoteStore(state_dir).load()
    except (OSError, UnicodeDecodeError) as err:
        log.error("remote_config_unreadable", file=str(Path(state_dir) / DOCUMENT_FILE), error=str(err), kept="the local config file")
        return None


class RemoteStore:
    """The accepted document on disk: ``remote-config.yaml`` verbatim (mode 0600: it may hold
    secrets) and ``remote-config.json`` (version, origin, time), each written atomically."""

    def __init__(self, state_dir: str | os.PathLike):
        self.path = Path(state_dir) / DOCUMENT_FILE
        self.metadata_path = Path(state_dir) / METADATA_FILE

    def save(self, text: str, origin: str) -> None:
        _write_atomic(self.path, text.encode())
        metadata = {"version": config_version(text), "origin": origin, "applied_at": _now()}
        _write_atomic(self.metadata_path, (json.dumps(metadata, indent=2) + "\n").encode())

    def load(self) -> str | None:
        """The document (None when there is none); OSError / UnicodeDecodeError when unreadable."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return raw.decode("utf-8")

    def metadata(self) -> dict:
        try:
            return json.loads(self.metadata_path.read_text())
        except (OSError, ValueError):
            return {}


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file beside ``path``, fsync, rename over it, fsync the directory: the old file or the new, never half."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is done either way
    finally:
        os.close(directory)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- the service


class RemoteConfigService:
    """The channels of one ``remote:`` section, feeding documents to ``daemon.submit_config``.

    The daemon side it uses: ``config`` (device, state_dir: the local file's), ``metrics``,
    ``remote_document`` (the remote document in force, or None) and
    ``submit_config(text, origin, reply, remote=True)``.
    """

    def __init__(self, daemon, options: RemoteConfig):
        self.daemon = daemon
        self.options = options
        self.set_topic, self.state_topic = options.topics(daemon.config.device)
        self.store = RemoteStore(daemon.config.state_dir)
        self.log = log.bind(device=daemon.config.device)
        self.mqtt = MqttChannel(options.mqtt, self.set_topic, self.state_topic, self.offer) if options.mqtt else None
        self.poller = HttpPoller(options.url, options.poll_seconds, options.ca_certs, self.offer) if options.url else None
        in_force = self._in_force()
        self.state = self._state(in_force, "applied" if in_force else "local", None, "start")

    def start(self) -> None:
        if self.options.secret is not None and len(self.options.secret) < 16:
            self.log.warning("remote_secret_short", length=len(self.options.secret), advice="use 32 random bytes, e.g. openssl rand -hex 32")
        if self.mqtt:
            self.mqtt.publish_state(json.dumps(self.state).encode())
            self.mqtt.start()
        if self.poller:
            self.poller.start()
        self.log.info(
            "remote_config_listening", set_topic=self.set_topic if self.mqtt else None,
            url=to_plain(self.options.url) if self.options.url else None, signed=self.options.secret is not None,
        )

    def stop(self, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        if self.poller:
            self.poller.stop(timeout=max(0.1, deadline - time.monotonic()))
        if self.mqtt:
            self.mqtt.stop(timeout=max(0.1, deadline - time.monotonic()))

    # ------------------------------------------------------------------ documents

    def offer(self, payload: bytes, origin: str) -> None:
        """A payload from a channel (any thread): opened here, applied by the daemon's main loop."""
        try:
            text = open_envelope(payload, self.options.secret)
        except RemoteRejected as err:
            self.daemon.metrics.config_reloaded(False)
            version = config_version(err.document) if err.document is not None else hashlib.sha256(payload).hexdigest()[:16]
            self.log.error("remote_config_rejected", origin=origin, version=version, error=str(err), kept="the running config")
            self._report(version, "rejected", str(err), origin)
            return
        version = config_version(text)
        if text == self.daemon.remote_document:  # a retained message again, or an unchanged poll
            self.log.info("remote_config_unchanged", origin=origin, version=version)
            self._report(version, "applied", None, origin)
            return
        self.daemon.submit_config(text, origin, reply=lambda ok, detail: self._applied(text, version, origin, ok, detail), remote=True)

    def _applied(self, text: str, version: str, origin: str, ok: bool, detail: str) -> None:
        """Called by the daemon's main loop once the document was applied or rejected."""
        if not ok:
            self._report(version, "rejected", detail, origin)
            return
        error = None
        try:
            self.store.save(text, origin)
        except OSError as err:
            error = f"applied, but not saved (the local file's settings return at restart): {err}"
            self.log.error("remote_config_not_saved", file=str(self.store.path), error=str(err))
        self._report(version, "applied", error, origin)

    def _report(self, version: str | None, status: str, error: str | None, origin: str) -> None:
        self.state = self._state(version, status, error, origin)
        if self.mqtt:
            self.mqtt.publish_state(json.dumps(self.state).encode())

    def _state(self, version: str | None, status: str, error: str | None, origin: str) -> dict:
        in_force = self._in_force()
        return {
            "version": version, "status": status, "error": error, "at": _now(), "origin": origin,
            "in_force": in_force, "source": "remote" if in_force else "local",
        }

    def _in_force(self) -> str | None:
        document = self.daemon.remote_document
        return config_version(document) if document is not None else None


class MqttChannel:
    """Subscribes to the set topic (QoS 1, again on every connect); keeps the latest state
    message published, retained, also after a reconnect (the broker may have lost it)."""

    def __init__(self, options, set_topic: str, state_topic: str, on_document):
        from adapters.mqtt_common import default_client_id  # paho only where remote MQTT is used

        self.options = options
        self.set_topic = set_topic
        self.state_topic = state_topic
        self.on_document = on_document
        self.client_id = options.client_id or default_client_id("config", options.device, role="remote")
        self.connected = threading.Event()
        self.log = log.bind(channel="mqtt", client_id=self.client_id)
        self._client = None
        self._state: bytes | None = None
        self._last_publish = None

    def start(self) -> None:
        from adapters.mqtt_common import connect_in_background, make_client

        client = make_client(self.options, self.client_id, persistent=False)
        client.on_connect = self._on_connect
        client.on_connect_fail = lambda client, userdata: self.log.warning("remote_mqtt_unreachable", host=self.options.host, port=self.options.port)
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        connect_in_background(client, self.options, persistent=False)

    def stop(self, timeout: float = 2.0) -> None:
        from adapters.mqtt_common import stop_client

        client, self._client = self._client, None
        if client is None:
            return
        info = self._last_publish
        if info is not None and self.connected.is_set():
            try:
                info.wait_for_publish(min(STATE_PUBLISH_WAIT, timeout / 2))
            except (RuntimeError, ValueError):
                pass  # not sent (connection lost meanwhile): the state is republished at the next start
        stop_client(client, timeout=max(0.1, timeout / 2))
        self.connected.clear()

    def publish_state(self, payload: bytes) -> None:
        """Publish (retained) now if connected; in any case again after every connect."""
        self._state = payload
        client = self._client
        if client is not None and self.connected.is_set():
            self._last_publish = client.publish(self.state_topic, payload, qos=1, retain=True)

    # -- paho callbacks (paho's network thread)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        from adapters.mqtt_common import reason_text

        if reason_code.is_failure:
            self.log.warning("remote_mqtt_refused", reason=reason_text(reason_code))
            return
        self.connected.set()
        client.subscribe(self.set_topic, qos=1)
        while True:  # the latest state, even if publish_state ran while we were publishing
            state = self._state
            if state is None:
                break
            self._last_publish = client.publish(self.state_topic, state, qos=1, retain=True)
            if self._state is state:
                break
        self.log.info("remote_mqtt_connected", set_topic=self.set_topic)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        from adapters.mqtt_common import reason_text

        self.connected.clear()
        if self._client is not None:
            self.log.warning("remote_mqtt_connection_lost", reason=reason_text(reason_code))

    def _on_message(self, client, userdata, message) -> None:
        if message.topic != self.set_topic:
            return
        if not message.payload:
            self.log.info("remote_config_cleared", topic=message.topic, kept="the config in force")
            return
        self.on_document(bytes(message.payload), f"mqtt:{self.set_topic}")


class HttpPoller:
    """Fetches ``url`` every ``poll_seconds`` (the first time at once) with the validators of the
    last answer; hands new bodies to ``on_document``. A failing URL is retried after a delay
    that doubles from ``poll_seconds`` up to ``MAX_POLL_BACKOFF`` (with jitter: a fleet does
    not come back in step)."""

    def __init__(self, url: str, poll_seconds: float, ca_certs: str, on_document, timeout: float = HTTP_TIMEOUT):
        self.url, self._authorization = _split_credentials(url)
        self.shown_url = to_plain(url)  # password masked, for logs and origins
        self.poll_seconds = poll_seconds
        self.on_document = on_document
        self.timeout = timeout
        self.etag: str | None = None
        self.last_modified: str | None = None
        self.failures = 0  # consecutive failed polls
        self.polls = 0  # polls answered (200 or 304)
        self._last_body: bytes | None = None
        self._context = ssl.create_default_context(cafile=ca_certs or None) if self.url.startswith("https:") else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.log = log.bind(channel="http", url=self.shown_url)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="remote-config-poll", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)  # a poll in flight ends within HTTP_TIMEOUT by itself (daemon thread)

    def _run(self) -> None:
        delay = 0.0
        while not self._stop.wait(delay):
            try:
                body = self.poll_once()
            except (OSError, http.client.HTTPException, ValueError) as err:  # URLError and timeouts are OSErrors
                self.failures += 1
                delay = self.retry_delay()
                self.log.warning("remote_poll_failed", error=str(err) or type(err).__name__, failures=self.failures, retry_in=round(delay, 2))
                continue
            if self.failures:
                self.log.info("remote_poll_recovered", after_failures=self.failures)
            self.failures = 0
            delay = self.poll_seconds
            if body is not None:
                self.on_document(body, f"http:{self.shown_url}")

    def retry_delay(self) -> float:
        """Seconds before the next try after ``failures`` consecutive failures."""
        ceiling = max(self.poll_seconds, MAX_POLL_BACKOFF)
        return min(ceiling, self.poll_seconds * 2 ** (self.failures - 1)) * random.uniform(0.8, 1.0)

    def poll_once(self) -> bytes | None:
        """One conditional GET: the body when it is new, None when nothing changed (304, or
        the same bytes as last time). Raises on network and HTTP errors."""
        request = urllib.request.Request(self.url, headers=self._headers())
        if self._authorization:  # never forwarded to where a redirect points (another host)
            request.add_unredirected_header("Authorization", self._authorization)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._context) as response:
                body = response.read(MAX_PAYLOAD_BYTES + 1)
                etag, last_modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
        except urllib.error.HTTPError as err:
            if err.code == 304:
                self.polls += 1
                return None
            raise OSError(f"HTTP {err.code} {err.reason}") from None
        self.polls += 1
        self.etag, self.last_modified = etag, last_modified
        if body == self._last_body:
            return None  # a server without validators: the same document again
        self._last_body = body
        return body

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": "somad-remote-config", "Accept": "application/json, application/yaml, text/yaml, */*"}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers


def _split_credentials(url: str) -> tuple[str, str | None]:
    """``https://user:pw@host/p`` -> (``https://host/p``, ``Basic ...``); urllib does not send URL credentials itself.

    >>> _split_credentials("https://fleet:pa55@cfg.example/gw.yaml")
    ('https://cfg.example/gw.yaml', 'Basic ZmxlZXQ6cGE1NQ==')
    """
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), f"Basic {token}"


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """``python -m somad.remote envelope FILE [--secret-file F]``: the payload to publish for FILE."""
    parser = argparse.ArgumentParser(prog="python -m somad.remote", description="Build remote configuration payloads.")
    sub = parser.add_subparsers(dest="command", required=True)
    envelope = sub.add_parser("envelope", help="print the JSON envelope of a YAML config (signed with --secret-file)")
    envelope.add_argument("file", help="the YAML config document")
    envelope.add_argument("--secret-file", help="file whose first line is the shared secret (as remote.secret_file)")
    args = parser.parse_args(argv)
    try:
        text = Path(args.file).read_text(encoding="utf-8")
        secret = Path(args.secret_file).read_text(encoding="utf-8").splitlines()[0] if args.secret_file else None
    except (OSError, UnicodeDecodeError, IndexError) as err:
        print(f"somad.remote: {err or 'empty secret file'}", file=sys.stderr)
        return 1
    sys.stdout.write(make_envelope(text, secret).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
