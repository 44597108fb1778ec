"""somad.metrics and somad.http: the /metrics text scraped over real HTTP, parsed with the
client's parser and linted by promtool; counters fed from cumulative figures; /healthz."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.base import SourceStatus
from somad.http import MetricsServer, parse_listen
from somad.learner import SomaLearner
from somad.metrics import BITS_BUCKETS, FIXED_NAMES, Metrics
from somad.model import preset

HTTP_TIMEOUT_S = 5.0


class FakeClock:
    """Unix time the test moves by hand (the checkpoint age is computed at scrape time)."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def metrics(clock):
    return Metrics(build_version="9.9.9-test", clock=clock)


@pytest.fixture
def health_state():
    return {"uart0": {"alive": True, "bytes": 10}}


@pytest.fixture
def server(metrics, health_state):
    srv = MetricsServer("127.0.0.1:0", metrics.registry, health=lambda: health_state)
    srv.start()
    yield srv
    srv.stop()


def get(url: str, headers: dict | None = None, method: str = "GET"):
    """(status, headers, body) of one request; HTTP errors are answers too."""
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def scrape(server) -> str:
    status, _, body = get(server.url("/metrics"))
    assert status == 200
    return body.decode()


def samples_of(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels) -> float | None:
    found = [s.value for s in samples_of(text) if s.name == name and s.labels == labels]
    assert len(found) <= 1, f"{name}{labels} appears {len(found)} times"
    return found[0] if found else None


def one_batch(handle, learner_stats: dict) -> None:
    """What the daemon does for one processed batch and one poll of its parts."""
    handle.observe_batch(bytes=600, records=120, bits=[0.5] * 590 + [9.0] * 10, anomaly=0.42, latency_seconds=[0.003, 0.02], dropped_bytes=7, cut_records=1)
    handle.set_source(SourceStatus(connected=True, reconnects=2, errors=3, dropped_bytes=5, refused=4))
    handle.set_learner(learner_stats)
    handle.set_sink("0:jsonl", {"sent": 120, "dropped": 1, "errors": 0})
    handle.snapshot(duration=0.25, ok=True)
    handle.alert_opened()


@pytest.fixture(scope="module")
def learner_stats() -> dict:
    learner = SomaLearner(preset("tiny"))
    learner.learn(b"12.5\n13.0\n" * 60)
    return learner.stats()


# ---------------------------------------------------------------------------- names and format


def test_all_fixed_names_present_with_stream_label_after_one_batch(metrics, server, learner_stats):
    one_batch(metrics.stream("uart0"), learner_stats)
    text = scrape(server)
    by_name = {}
    for s in samples_of(text):
        by_name.setdefault(s.name, []).append(s.labels)
    for name in FIXED_NAMES:
        if name == "somad_build_info":
            assert by_name[name] == [{"version": "9.9.9-test", "python": by_name[name][0]["python"], "torch": by_name[name][0]["torch"]}]
            continue
        sample_names = [n for n in by_name if n == name or n in (f"{name}_bucket", f"{name}_count", f"{name}_sum")]
        assert sample_names, f"{name} missing from /metrics"
        for n in sample_names:
            assert all(labels.get("stream") == "uart0" for labels in by_name[n]), (n, by_name[n])
    assert value(text, "process_resident_memory_bytes") > 0


def test_values_after_one_batch(metrics, server, learner_stats, clock):
    one_batch(metrics.stream("uart0"), learner_stats)
    clock.now += 12.5
    text = scrape(server)
    s = {"stream": "uart0"}
    assert value(text, "somad_bytes_total", **s) == 600
    assert value(text, "somad_records_total", **s) == 120
    assert value(text, "somad_dropped_bytes_total", **s) == 7 + 5  # queue drops + source drops
    assert value(text, "somad_cut_records_total", **s) == 1
    assert value(text, "somad_anomaly_score", **s) == pytest.approx(0.42)
    assert value(text, "somad_alerts_open", **s) == 1
    assert value(text, "somad_alerts_total", **s) == 1
    assert value(text, "somad_decimation_band", **s) == pytest.approx(learner_stats["d"])
    assert value(text, "somad_observations_total", **s) == learner_stats["observations"] > 0
    assert value(text, "somad_observations_per_byte", **s) == pytest.approx(learner_stats["cost_per_byte"])
    assert value(text, "somad_spectral_efficiency", **s) == pytest.approx(learner_stats["efficiency"])
    assert value(text, "somad_learning_rate", **s) == pytest.approx(learner_stats["eta"])
    assert value(text, "somad_source_connected", **s) == 1
    assert value(text, "somad_source_reconnects_total", **s) == 2
    assert value(text, "somad_source_errors_total", **s) == 3
    assert value(text, "somad_source_refused_connections_total", **s) == 4
    assert value(text, "somad_sink_sent_total", **s) == 120
    assert value(text, "somad_sink_dropped_total", **s) == 1
    assert value(text, "somad_snapshot_duration_seconds", **s) == 0.25
    assert value(text, "somad_snapshots_total", **s) == 1
    assert value(text, "somad_checkpoint_age_seconds", **s) == pytest.approx(12.5)
    assert value(text, "somad_bits_per_byte_count", **s) == 600
    assert value(text, "somad_bits_per_byte_sum", **s) == pytest.approx(590 * 0.5 + 10 * 9.0)
    assert value(text, "somad_score_latency_seconds_count", **s) == 2


def test_naming_conventions(metrics, server, learner_stats):
    one_batch(metrics.stream("uart0"), learner_stats)
    metrics.config_reloaded(ok=True)
    families = list(text_string_to_metric_families(scrape(server)))
    # ``*_created`` gauges are the client's own creation timestamps for counters and histograms.
    ours = [f for f in families if f.name.startswith("somad_") and not f.name.endswith("_created")]
    assert len(ours) >= 25
    for family in ours:
        assert family.documentation, f"{family.name} has no HELP"
        names = {s.name for s in family.samples}
        if family.type == "counter":
            assert all(n.endswith(("_total", "_created")) for n in names), names
        else:
            assert not any(n.endswith("_total") for n in names), f"{family.type} {family.name} must not end in _total"
        for s in family.samples:
            labels = set(s.labels) - {"le"}  # histogram buckets
            if family.name == "somad_build_info":
                assert labels == {"version", "python", "torch"}
            elif family.name.startswith("somad_config_reload"):
                assert labels == set()
            else:
                assert labels == {"stream"}, f"{s.name} labels {labels}"
        timed = any(word in family.name for word in ("age", "duration", "latency", "seconds"))
        assert not timed or family.name.endswith("_seconds"), f"{family.name}: time in base unit seconds"
        assert not any(bad in family.name for bad in ("_ms", "milliseconds", "_kb", "_mb", "kilobytes")), family.name


def test_promtool_accepts_the_scrape(metrics, server, learner_stats):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    one_batch(metrics.stream("uart0"), learner_stats)
    one_batch(metrics.stream("mqtt/temps"), learner_stats)
    result = subprocess.run([promtool, "check", "metrics"], check=False, input=scrape(server), capture_output=True, text=True, timeout=30)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    # The one name promtool frowns on is fixed by issue 5: these are bits of information per
    # byte of input (a loss), not a data size, so "use base unit bytes" does not apply.
    allowed = ['somad_bits_per_byte use base unit "bytes" instead of "bits"']
    assert [p for p in problems if p not in allowed] == [], result.stdout + result.stderr


def test_openmetrics_by_content_negotiation(server, metrics):
    metrics.stream("uart0").observe_batch(bytes=1)
    status, headers, body = get(server.url("/metrics"), headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    status, headers, _ = get(server.url("/metrics"))
    assert headers["Content-Type"].startswith("text/plain")


# ---------------------------------------------------------------------------- counters from totals


def test_source_totals_become_increases_and_survive_a_source_restart(metrics):
    handle = metrics.stream("uart0")
    reg = metrics.registry
    handle.set_source(SourceStatus(connected=True, errors=3))
    handle.set_source(SourceStatus(connected=True, errors=3))  # polled again, nothing new
    handle.set_source(SourceStatus(connected=False, errors=5, reconnects=1))
    assert reg.get_sample_value("somad_source_errors_total", {"stream": "uart0"}) == 5
    assert reg.get_sample_value("somad_source_connected", {"stream": "uart0"}) == 0
    handle.set_source(SourceStatus(connected=True, errors=1))  # a new source object counts from 0
    assert reg.get_sample_value("somad_source_errors_total", {"stream": "uart0"}) == 6
    assert reg.get_sample_value("somad_source_reconnects_total", {"stream": "uart0"}) == 1


def test_learner_rollback_and_restore_do_not_recount_observations(metrics, learner_stats):
    handle = metrics.stream("uart0")
    reg = metrics.registry

    def observations():
        return reg.get_sample_value("somad_observations_total", {"stream": "uart0"})

    handle.set_learner({**learner_stats, "observations": 1000})
    handle.set_learner({**learner_stats, "observations": 400})  # rolled back to a checkpoint
    handle.set_learner({**learner_stats, "observations": 450})
    assert observations() == 1050
    handle.learner_restored({**learner_stats, "observations": 10_000})  # resumed from disk
    handle.set_learner({**learner_stats, "observations": 10_020})
    assert observations() == 1070


def test_several_sinks_add_up_and_a_replaced_sink_counts_from_zero(metrics):
    handle = metrics.stream("uart0")
    handle.set_sink("0:jsonl", {"sent": 10, "dropped": 0})
    handle.set_sink("1:mqtt", {"sent": 4, "dropped": 2})
    handle.set_sink("0:jsonl", {"sent": 15, "dropped": 0})
    handle.forget_sink("1:mqtt")
    handle.set_sink("1:mqtt", {"sent": 3, "dropped": 0})
    assert metrics.registry.get_sample_value("somad_sink_sent_total", {"stream": "uart0"}) == 15 + 4 + 3
    assert metrics.registry.get_sample_value("somad_sink_dropped_total", {"stream": "uart0"}) == 2


def test_bits_histogram_buckets_are_cumulative_and_inclusive(metrics):
    handle = metrics.stream("s")
    handle.observe_batch(bytes=5, bits=[0.0, 1.0, 1.0000001, 8.0, 40.0, math.nan])
    reg = metrics.registry

    def bucket(le: str) -> float:
        return reg.get_sample_value("somad_bits_per_byte_bucket", {"stream": "s", "le": le})

    assert bucket("0.05") == 1  # 0.0
    assert bucket("1.0") == 2  # a value on a bound belongs to it (le means <=)
    assert bucket("1.5") == 3
    assert bucket("8.0") == 4
    assert bucket("16.0") == 4
    assert bucket("+Inf") == 5  # NaN is not a loss: not counted
    assert reg.get_sample_value("somad_bits_per_byte_count", {"stream": "s"}) == 5
    assert [float(b) for b in BITS_BUCKETS] == sorted(BITS_BUCKETS) and BITS_BUCKETS[-1] > 8


def test_torch_tensor_of_bits_is_accepted(metrics):
    learner = SomaLearner(preset("tiny"))
    bits = learner.learn(b"0123456789\n" * 10)
    metrics.stream("s").observe_batch(bytes=len(bits), bits=bits)
    assert metrics.registry.get_sample_value("somad_bits_per_byte_sum", {"stream": "s"}) == pytest.approx(float(bits.double().sum()), rel=1e-6)


def test_bad_batch_counts_are_rejected_with_the_stream_named(metrics):
    with pytest.raises(ValueError, match="stream 'uart0'.*bytes=-1"):
        metrics.stream("uart0").observe_batch(bytes=-1)
    with pytest.raises(ValueError, match="non-empty"):
        metrics.stream("")


# ---------------------------------------------------------------------------- checkpoints, alerts, reloads


def test_checkpoint_age_is_computed_at_scrape_time(metrics, server, clock):
    handle = metrics.stream("uart0")
    clock.now += 30
    assert value(scrape(server), "somad_checkpoint_age_seconds", stream="uart0") == 30  # since start, nothing saved
    handle.snapshot(duration=0.1, ok=True)
    clock.now += 5
    assert value(scrape(server), "somad_checkpoint_age_seconds", stream="uart0") == 5
    handle.snapshot(duration=2.0, ok=False)  # a failed snapshot saves nothing: the age keeps growing
    clock.now += 5
    text = scrape(server)
    assert value(text, "somad_checkpoint_age_seconds", stream="uart0") == 10
    assert value(text, "somad_snapshot_failures_total", stream="uart0") == 1
    assert value(text, "somad_snapshot_duration_seconds", stream="uart0") == 2.0
    handle.checkpoint_loaded(saved_at=clock.now - 3600)
    assert value(scrape(server), "somad_checkpoint_age_seconds", stream="uart0") == 3600


def test_alerts_open_never_goes_negative(metrics):
    handle = metrics.stream("s")
    handle.alert_opened()
    handle.alert_opened()
    handle.alert_closed()
    handle.alert_closed()
    handle.alert_closed()
    reg = metrics.registry
    assert reg.get_sample_value("somad_alerts_open", {"stream": "s"}) == 0
    assert reg.get_sample_value("somad_alerts_total", {"stream": "s"}) == 2


def test_faults_restarts_and_reloads(metrics):
    handle = metrics.stream("s")
    handle.numerical_fault(rolled_back=True)
    handle.numerical_fault(rolled_back=False)
    handle.restarted()
    metrics.config_reloaded(ok=True)
    metrics.config_reloaded(ok=False)
    reg = metrics.registry
    assert reg.get_sample_value("somad_numerical_faults_total", {"stream": "s"}) == 2
    assert reg.get_sample_value("somad_rollbacks_total", {"stream": "s"}) == 1
    assert reg.get_sample_value("somad_stream_restarts_total", {"stream": "s"}) == 1
    assert reg.get_sample_value("somad_config_reloads_total") == 2
    assert reg.get_sample_value("somad_config_reload_failures_total") == 1


def test_removing_a_stream_removes_every_series_of_it(metrics, server, learner_stats):
    one_batch(metrics.stream("gone"), learner_stats)
    one_batch(metrics.stream("kept"), learner_stats)
    metrics.remove_stream("gone")
    metrics.remove_stream("never-existed")  # harmless
    text = scrape(server)
    streams = {s.labels.get("stream") for s in samples_of(text)}
    assert "gone" not in streams and "kept" in streams
    assert metrics.stream_names() == ["kept"]
    fresh = metrics.stream("gone")  # re-added by a later reload: starts from zero
    fresh.observe_batch(bytes=3)
    assert metrics.registry.get_sample_value("somad_bytes_total", {"stream": "gone"}) == 3


def test_each_instance_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.stream("x").observe_batch(bytes=5)
    assert b.registry.get_sample_value("somad_bytes_total", {"stream": "x"}) is None


# ---------------------------------------------------------------------------- /healthz and the server


def test_healthz_ok_when_every_stream_is_alive(server, health_state):
    status, headers, body = get(server.url("/healthz"))
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"status": "ok", "streams": {"uart0": {"alive": True, "bytes": 10}}}


def test_healthz_503_when_a_stream_is_dead(server, health_state):
    health_state["mqtt0"] = {"alive": False, "last_error": "broker down"}
    status, _, body = get(server.url("/healthz"))
    assert status == 503
    report = json.loads(body)
    assert report["status"] == "unhealthy"
    assert report["streams"]["mqtt0"]["last_error"] == "broker down"
    health_state["mqtt0"] = {"last_error": "no alive key"}  # unknown means not alive
    assert get(server.url("/healthz"))[0] == 503


def test_healthz_503_when_the_health_callback_fails(metrics):
    def broken():
        raise RuntimeError("lock poisoned")

    srv = MetricsServer("127.0.0.1:0", metrics.registry, health=broken)
    srv.start()
    try:
        status, _, body = get(srv.url("/healthz"))
    finally:
        srv.stop()
    assert status == 503
    assert json.loads(body)["error"] == "RuntimeError: lock poisoned"


def test_head_and_unknown_paths(server):
    status, headers, body = get(server.url("/healthz"), method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    assert get(server.url("/"))[0] == 404
    assert get(server.url("/metrics/extra"))[0] == 404
    assert get(server.url("/healthz"), method="POST")[0] == 405


def test_requests_are_not_logged_to_stderr(server, capfd):
    capfd.readouterr()
    for path in ("/metrics", "/healthz", "/nope"):
        get(server.url(path))
    assert capfd.readouterr().err == ""


def test_stop_closes_the_socket_and_is_idempotent(metrics):
    srv = MetricsServer("127.0.0.1:0", metrics.registry, health=dict)
    srv.start()
    port = srv.port
    assert srv.address == f"127.0.0.1:{port}" and port > 0
    assert get(srv.url("/healthz"))[0] == 200
    srv.stop()
    srv.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S).close()


def test_a_busy_port_is_a_clear_error(metrics):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(OSError, match=f"cannot serve /metrics on '{listen}'"):
            MetricsServer(listen, metrics.registry, health=dict).start()


def test_ipv6_loopback(metrics):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    srv = MetricsServer("[::1]:0", metrics.registry, health=dict)
    try:
        srv.start()
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    try:
        assert get(srv.url("/healthz"))[0] == 200
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "listen, message",
    [("localhost", "expected host:port"), ("localhost:http", "expected host:port"), ("::1:9464", r"\[::1\]:9464"), ("127.0.0.1:70000", "0..65535"), (None, "expected host:port")],
)
def test_bad_listen_addresses_name_the_key(listen, message):
    with pytest.raises(ValueError, match=f"metrics.listen: .*{message}"):
        parse_listen(listen)
