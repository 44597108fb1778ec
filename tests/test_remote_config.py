"""Remote configuration (issue 6) through a real mosquitto and a real HTTP server on 127.0.0.1:
signed documents applied, unsigned / forged / invalid ones rejected with the state saying why
(the last good config staying in force), the accepted document surviving a restart, a local
reload keeping it in force, and HTTP polling with ETag (304: nothing applied) and backoff."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import paho.mqtt.client as mqtt
import pytest
import structlog

from somad.config import config_version, parse_config
from somad.daemon import Daemon
from somad.metrics import Metrics
from somad.remote import (
    DOCUMENT_FILE,
    RemoteRejected,
    RemoteStore,
    config_in_force,
    make_envelope,
    open_envelope,
    persisted_document,
    sign,
)
from tests.brokers import wait_until
from tests.support import DaemonThread

ROOT = Path(__file__).resolve().parent.parent
SECRET = "0123456789abcdef0123456789abcdef"  # as remote.secret_file holds it (32 hex digits)
DEVICE = "dev1"
SET_TOPIC, STATE_TOPIC = f"somad/{DEVICE}/config/set", f"somad/{DEVICE}/config/state"


# --------------------------------------------------------------------------- helpers


def lines(n: int) -> bytes:
    return b"".join(f"{i % 31},{i % 7}\n".encode() for i in range(n))


def stream(tmp_path: Path, name: str) -> str:
    data = tmp_path / f"{name}.csv"
    if not data.exists():  # never rewritten: a stream may be reading it
        data.write_bytes(lines(60))
    return f"""  - name: {name}
    source: {{type: file, path: "{tmp_path / (name + '.csv')}", poll_interval: 0.05}}
"""


def document(tmp_path: Path, *names: str, extra: str = "") -> str:
    """A remote document: streams and settings only (device, state_dir and remote come from the device)."""
    return f"""metrics: {{listen: "127.0.0.1:0"}}
shutdown_timeout: 20
{extra}defaults:
  model: {{preset: tiny}}
  snapshot: {{every_seconds: 3600}}
streams:
{''.join(stream(tmp_path, n) for n in names)}"""


def local_file(tmp_path: Path, remote: str, *names: str) -> Path:
    """The device's own config file, with its remote: section (written again when called again)."""
    (tmp_path / "hmac").write_text(SECRET + "\n")
    path = tmp_path / "somad.yaml"
    path.write_text(f"device: {DEVICE}\nstate_dir: \"{tmp_path / 'state'}\"\n{remote}" + document(tmp_path, *names))
    return path


def mqtt_remote(tmp_path: Path, broker) -> str:
    return (
        f"remote:\n  mqtt: {{host: {broker.host}, port: {broker.port}, reconnect_min_delay: 0.1, reconnect_max_delay: 0.5}}\n"
        f"  secret_file: \"{tmp_path / 'hmac'}\"\n"
    )


class Running(DaemonThread):
    """A daemon started as ``somad run --config`` starts it (the accepted remote document
    first, if any), its main loop on a thread; stopped by the context manager."""

    def __init__(self, config_file: Path):
        local = parse_config(config_file.read_text(), str(config_file))
        config, remote_document = config_in_force(local, persisted_document(local.state_dir))
        self.metrics = Metrics()
        super().__init__(Daemon(config, metrics=self.metrics, config_path=config_file, remote_document=remote_document))

    def __enter__(self) -> Self:
        super().__enter__()
        return self

    def reloads(self) -> tuple[float, float]:
        get = self.metrics.registry.get_sample_value
        return get("somad_config_reloads_total"), get("somad_config_reload_failures_total")


class Fleet:
    """The fleet side on the broker: publishes to the set topic, records what the device reports."""

    def __init__(self, broker):
        self.states: list[dict] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fleet")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(STATE_TOPIC, qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(10), "fleet did not subscribe"

    def _on_message(self, client, userdata, message):
        with self._lock:
            self.states.append(json.loads(message.payload))

    def send(self, payload: bytes, retain: bool = True) -> None:
        self.client.publish(SET_TOPIC, payload, qos=1, retain=retain).wait_for_publish(10)

    def state(self, **expected) -> dict | None:
        """The newest state message matching ``expected`` (None yet)."""
        with self._lock:
            return next((s for s in reversed(self.states) if all(s.get(k) == v for k, v in expected.items())), None)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fleet(mosquitto):
    side = Fleet(mosquitto)
    yield side
    side.close()


# --------------------------------------------------------------------------- the envelope


def test_envelope_rules():
    text = "streams: [{name: s, source: {type: stdin}}]\n"
    assert open_envelope(make_envelope(text, SECRET), SECRET) == text
    assert open_envelope(make_envelope(text, SECRET).replace(b'"hmac": "', b'"hmac": "  '), SECRET) == text  # hex, spaces ignored
    assert open_envelope(text.encode(), None) == text  # raw YAML without a secret
    assert open_envelope(b"{streams: [{name: s, source: {type: stdin}}]}", None).startswith("{streams")  # a flow mapping is YAML
    assert open_envelope(make_envelope(text), None) == text
    cases = {
        text.encode(): "unsigned document",
        make_envelope(text): "unsigned document",
        make_envelope(text, "another secret"): "wrong signature",
        json.dumps({"config": text + "# tampered\n", "hmac": sign(text, SECRET)}).encode(): "wrong signature",
        json.dumps({"config": text, "hmac": sign(text, SECRET), "expires": 1}).encode(): "unknown envelope key(s) 'expires'",
        json.dumps({"config": 5, "hmac": "00"}).encode(): "'config' must hold the YAML document",
        json.dumps({"config": text, "hmac": ["x"]}).encode(): "wrong signature",
        b"\xff\xfe": "not UTF-8",
        b"x" * (4 * (1 << 20) + 1): "more than",
    }
    for payload, reason in cases.items():
        with pytest.raises(RemoteRejected, match=reason.replace("(", r"\(").replace(")", r"\)")):
            open_envelope(payload, SECRET)


# --------------------------------------------------------------------------- MQTT


def test_a_signed_document_is_applied_saved_reported_and_survives_a_restart(tmp_path, mosquitto, fleet):
    config = local_file(tmp_path, mqtt_remote(tmp_path, mosquitto), "a")
    wanted = document(tmp_path, "a", "b")
    version = config_version(wanted)
    with Running(config) as run:
        wait_until(lambda: fleet.state(status="local", source="local"), timeout=20, message="the device's first state")
        a = wait_until(lambda: run.daemon.runners.get("a"), message="stream a")
        fleet.send(make_envelope(wanted, SECRET))  # retained: a device that is away gets it later
        state = wait_until(lambda: fleet.state(status="applied", version=version), timeout=30, message="applied state")
        assert state["error"] is None and state["in_force"] == version and state["source"] == "remote"
        assert sorted(run.daemon.runners) == ["a", "b"] and run.daemon.runners["a"] is a  # a untouched
        assert run.reloads() == (1.0, 0.0)
        assert run.daemon.config.device == DEVICE and run.daemon.config.remote.secret == SECRET  # the device's own
    saved = tmp_path / "state" / DOCUMENT_FILE
    assert saved.read_text() == wanted and (saved.stat().st_mode & 0o777) == 0o600  # it may hold secrets
    assert RemoteStore(tmp_path / "state").metadata()["version"] == version

    with structlog.testing.capture_logs() as logs, Running(config) as run:  # the restart
        wait_until(lambda: sorted(run.daemon.runners) == ["a", "b"], timeout=20, message="the saved document's streams")
        # the retained document comes again on subscribe: recognised, not applied twice
        wait_until(lambda: any(e["event"] == "remote_config_unchanged" for e in logs), timeout=20, message="retained document seen again")
        assert run.reloads() == (0.0, 0.0)
    assert next(e for e in logs if e["event"] == "config_in_force")["source"] == "remote"


def process_events(path: Path) -> list[dict]:
    events = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else ():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return events


def test_somad_run_starts_with_the_applied_document_after_a_restart(tmp_path, mosquitto, fleet):
    """The same through two real ``somad run --config`` processes (the start path of the CLI)."""
    config = local_file(tmp_path, mqtt_remote(tmp_path, mosquitto), "a")
    wanted = document(tmp_path, "a", "b")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NOTIFY_SOCKET": ""}
    for run in ("first", "second"):
        stderr = tmp_path / f"{run}.log"
        with stderr.open("wb") as err:
            proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "somad"), "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            def events(name: str, log: Path = stderr) -> list[dict]:
                return [e for e in process_events(log) if e.get("event") == name]

            wait_until(lambda p=proc: events("ready") or p.poll() is not None, timeout=90, interval=0.1, message=f"{run} somad ready")
            assert proc.poll() is None, stderr.read_text()[-3000:]
            if run == "first":
                assert events("config_in_force")[0]["source"] == "local"
                fleet.send(make_envelope(wanted, SECRET))
                wait_until(lambda: fleet.state(status="applied", version=config_version(wanted)), timeout=60, message="applied")
            else:
                assert events("config_in_force")[0] == {**events("config_in_force")[0], "source": "remote", "version": config_version(wanted)}
            wait_until(lambda e=events: any(x.get("stream") == "b" for x in e("stream_started")), timeout=60, message=f"stream b in the {run} run")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.mark.parametrize(
    "payload, reason",
    [
        (lambda text: text.encode(), "unsigned document"),
        (lambda text: make_envelope(text), "unsigned document"),
        (lambda text: make_envelope(text, "a forger's guess at the secret"), "wrong signature"),
        (lambda text: json.dumps({"config": text.replace("a", "b"), "hmac": sign(text, SECRET)}).encode(), "wrong signature"),
    ],
    ids=["raw-yaml", "no-hmac", "forged", "tampered"],
)
def test_unsigned_and_forged_documents_are_rejected_and_reported(tmp_path, mosquitto, fleet, payload, reason):
    config = local_file(tmp_path, mqtt_remote(tmp_path, mosquitto), "a")
    evil = document(tmp_path, "a", "evil")
    with Running(config) as run:
        wait_until(lambda: fleet.state(status="local"), timeout=20, message="the device's first state")
        before = run.daemon.config
        fleet.send(payload(evil))
        state = wait_until(lambda: fleet.state(status="rejected"), timeout=30, message="rejected state")
        assert reason in state["error"] and state["in_force"] is None and state["source"] == "local"
        assert run.daemon.config is before and sorted(run.daemon.runners) == ["a"]
        assert run.reloads() == (1.0, 1.0)
    assert not (tmp_path / "state" / DOCUMENT_FILE).exists()


def test_a_bad_signed_document_leaves_the_last_good_one_in_force(tmp_path, mosquitto, fleet):
    config = local_file(tmp_path, mqtt_remote(tmp_path, mosquitto), "a")
    good = document(tmp_path, "a", "b")
    bad_documents = {
        document(tmp_path, "a").replace("shutdown_timeout", "shutdown_timout"): "shutdown_timout: unknown key (did you mean 'shutdown_timeout'?)",
        "device: someone-else\n" + document(tmp_path, "a"): "device: belongs to the device's local config file (here 'dev1', the document says 'someone-else')",
        f"state_dir: {tmp_path / 'elsewhere'}\n" + document(tmp_path, "a"): "state_dir: belongs to the device's local config file",
        "remote: {url: 'https://attacker.example/c'}\n" + document(tmp_path, "a"): "remote: belongs to the device's local config file",
        "streams: [\n": "YAML syntax error",
    }
    with Running(config) as run:
        fleet.send(make_envelope(good, SECRET))
        wait_until(lambda: fleet.state(status="applied", version=config_version(good)), timeout=30, message="good document applied")
        in_force, runners = run.daemon.config, dict(run.daemon.runners)
        for i, (bad, reason) in enumerate(bad_documents.items()):
            fleet.send(make_envelope(bad, SECRET))
            version = config_version(bad)
            state = wait_until(lambda v=version: fleet.state(status="rejected", version=v), timeout=30, message=f"rejection of {reason}")
            assert reason in state["error"], state["error"]
            assert state["in_force"] == config_version(good) and state["source"] == "remote"
            assert run.reloads() == (2.0 + i, 1.0 + i)
        assert run.daemon.config is in_force and run.daemon.runners == runners  # never bricked: still the good one
    assert (tmp_path / "state" / DOCUMENT_FILE).read_text() == good


def test_a_local_reload_keeps_the_remote_document_until_remote_is_switched_off(tmp_path, mosquitto, fleet):
    config = local_file(tmp_path, mqtt_remote(tmp_path, mosquitto), "a")
    wanted = document(tmp_path, "b")
    with Running(config) as run:
        fleet.send(make_envelope(wanted, SECRET))
        wait_until(lambda: fleet.state(status="applied"), timeout=30, message="applied")
        assert sorted(run.daemon.runners) == ["b"]

        run.daemon.request_reload()  # SIGHUP: the local file is read again, the fleet's document stays in force
        wait_until(lambda: run.reloads()[0] == 2.0, message="local reload")
        assert sorted(run.daemon.runners) == ["b"] and run.daemon.remote_document == wanted

        local_file(tmp_path, "", "a")  # the operator switches remote configuration off
        run.daemon.request_reload()  # no remote: section any more: the local file rules, the channel closes
        wait_until(lambda: run.reloads()[0] == 3.0, message="reload without remote")
        assert run.reloads()[1] == 0.0
        assert sorted(run.daemon.runners) == ["a"] and run.daemon.remote is None and run.daemon.remote_document is None


def test_an_invalid_saved_document_falls_back_to_the_local_file(tmp_path, mosquitto):
    config = local_file(tmp_path, mqtt_remote(tmp_path, mosquitto), "a")
    (tmp_path / "state").mkdir()
    RemoteStore(tmp_path / "state").save("streams: [\n", origin="test")
    with structlog.testing.capture_logs() as logs, Running(config) as run:
        wait_until(lambda: "a" in run.daemon.runners, timeout=20, message="stream a")
        assert sorted(run.daemon.runners) == ["a"] and run.daemon.remote_document is None
    assert [e["event"] for e in logs if e["event"] in ("remote_config_invalid", "config_in_force")] == ["remote_config_invalid", "config_in_force"]
    assert next(e for e in logs if e["event"] == "config_in_force")["source"] == "local"


# --------------------------------------------------------------------------- HTTP


class ConfigServer:
    """A config server on 127.0.0.1 with ETag validators; ``fail`` answers 500 that many times."""

    def __init__(self):
        self.body, self.etag, self.fail = b"", '"v0"', 0
        self.requests: list[dict] = []
        server_side = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server_side.requests.append({"path": self.path, "if_none_match": self.headers.get("If-None-Match"), "auth": self.headers.get("Authorization")})
                if server_side.fail:
                    server_side.fail -= 1
                    self.send_error(500, "broken on purpose")
                    return
                if self.headers.get("If-None-Match") == server_side.etag:
                    self.send_response(304)
                    self.send_header("ETag", server_side.etag)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("ETag", server_side.etag)
                self.send_header("Content-Length", str(len(server_side.body)))
                self.end_headers()
                self.wfile.write(server_side.body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://fleet:pa55@127.0.0.1:{self.httpd.server_address[1]}/{DEVICE}.yaml"

    def publish(self, payload: bytes, etag: str) -> None:
        self.body, self.etag = payload, etag

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def config_server():
    server = ConfigServer()
    yield server
    server.close()


def test_http_polling_applies_new_documents_once_and_304_applies_nothing(tmp_path, config_server):
    first, second = document(tmp_path, "a", "b"), document(tmp_path, "a", "c")
    config_server.publish(make_envelope(first, SECRET), '"v1"')
    config_server.fail = 2  # the server is broken at first: logged, retried, never fatal
    config = local_file(tmp_path, f"remote:\n  url: \"{config_server.url}\"\n  poll_seconds: 0.2\n  secret_file: \"{tmp_path / 'hmac'}\"\n", "a")
    with structlog.testing.capture_logs() as logs, Running(config) as run:
        wait_until(lambda: "b" in run.daemon.runners, timeout=30, message="the first document applied")
        assert run.reloads() == (1.0, 0.0)
        polls = len(config_server.requests)
        wait_until(lambda: len(config_server.requests) >= polls + 4, timeout=30, message="more polls")
        assert all(r["if_none_match"] == '"v1"' for r in config_server.requests[polls:])  # conditional GETs
        assert run.reloads() == (1.0, 0.0)  # 304: nothing applied
        assert config_server.requests[0]["auth"] == "Basic ZmxlZXQ6cGE1NQ=="  # fleet:pa55 from the URL

        config_server.publish(make_envelope(second, SECRET), '"v2"')
        wait_until(lambda: "c" in run.daemon.runners, timeout=30, message="the second document applied")
        assert sorted(run.daemon.runners) == ["a", "c"] and run.reloads() == (2.0, 0.0)

        config_server.publish(make_envelope(document(tmp_path, "a", "x"), "not the secret"), '"v3"')
        wait_until(lambda: any(e["event"] == "remote_config_rejected" for e in logs), timeout=30, message="forged document rejected")
        assert sorted(run.daemon.runners) == ["a", "c"] and run.reloads() == (3.0, 1.0)
    failures = [e for e in logs if e["event"] == "remote_poll_failed"]
    assert len(failures) == 2 and "HTTP 500" in failures[0]["error"] and failures[1]["retry_in"] > failures[0]["retry_in"] * 1.2
    assert "pa55" not in json.dumps(logs, default=str)  # the URL's password never reaches a log line
    assert (tmp_path / "state" / DOCUMENT_FILE).read_text() == second


def test_an_unreachable_url_backs_off_and_the_streams_run_on(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = local_file(tmp_path, f"remote:\n  url: \"http://127.0.0.1:{port}/nothing-listens-here\"\n  poll_seconds: 0.1\n", "a")
    with structlog.testing.capture_logs() as logs, Running(config) as run:
        wait_until(lambda: len([e for e in logs if e["event"] == "remote_poll_failed"]) >= 3, timeout=30, message="three failed polls")
        size = (tmp_path / "a.csv").stat().st_size
        wait_until(lambda: sum(m.learner.bytes_seen for m in run.daemon.runners["a"].pipeline.models.values()) == size, message="a learned")
        poller = run.daemon.remote.poller
        assert poller.failures >= 3 and poller.polls == 0 and run.reloads() == (0.0, 0.0)
    delays = [e["retry_in"] for e in logs if e["event"] == "remote_poll_failed"][:3]
    assert delays[1] > delays[0] and delays[2] > delays[1]  # doubling (with jitter of at most 20 %)


def test_the_gateway_example_has_a_signed_mqtt_channel(tmp_path):
    from somad.config import load_config

    (tmp_path / "mqtt.password").write_text("pw\n")
    (tmp_path / "config.hmac").write_text(SECRET + "\n")
    environ = {"SOMAD_MQTT_PASSWORD_FILE": str(tmp_path / "mqtt.password"), "SOMAD_CONFIG_SECRET_FILE": str(tmp_path / "config.hmac")}
    remote = load_config(ROOT / "configs" / "mqtt-gateway.yaml", environ=environ).remote
    assert remote.secret == SECRET and remote.mqtt.tls is not None and remote.mqtt.device == "gateway-01"
    assert remote.topics("gateway-01") == ("somad/gateway-01/config/set", "somad/gateway-01/config/state")
