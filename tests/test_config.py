"""The configuration loader: examples, every kind of problem (at its path, all at once),
secrets, defaults, cross-stream checks, and ``somad check`` as a user runs it."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import pytest
import yaml

from somad.check import check_command
from somad.config import (
    SECTIONS,
    Catalog,
    Config,
    ConfigError,
    ModelConfig,
    QueueConfig,
    SourceConfig,
    StreamConfig,
    diff_streams,
    dump_config,
    load_config,
    parse_config,
    parse_listen,
    to_plain,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# --------------------------------------------------------------------------- a catalog of stand-ins
# Adapters' Options as small local dataclasses (same key names as DESIGN.md §4), so these
# tests do not move when an adapter adds an option. The sections are the real ones.


@dataclass(frozen=True)
class SerialStandIn:
    port: str
    baudrate: int = 115200
    parity: Literal["N", "E", "O"] = "N"

    def __post_init__(self) -> None:
        if self.baudrate <= 0:
            raise ValueError(f"baudrate must be > 0, got {self.baudrate}")


@dataclass(frozen=True)
class FileStandIn:
    path: str
    start: Literal["beginning", "end", "saved"] = "saved"


@dataclass(frozen=True)
class ListenStandIn:
    listen: str


@dataclass(frozen=True)
class NothingStandIn:
    pass


@dataclass(frozen=True)
class FaultStandIn:
    kind: str
    at_line: int
    length: int = 1


@dataclass(frozen=True)
class SimulateStandIn:
    rate: float = 10.0
    faults: tuple[FaultStandIn, ...] = ()
    device: str = ""


@dataclass(frozen=True)
class MqttStandIn:
    """Keeps password_file as a field (reads it again at start), like adapters.mqtt_common."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: str = ""
    password_file: str = ""
    topics: tuple[str, ...] = ()
    tls: dict | None = None


@dataclass(frozen=True)
class MqttSinkStandIn:
    """Has only ``password``: ``password_file`` is then the loader's key (the file's first line)."""

    host: str = "127.0.0.1"
    topic: str = "somad/{device}/{stream}/alert"
    password: str | None = None


@dataclass(frozen=True)
class JsonlStandIn:
    path: str


CATALOG = Catalog(
    sections=SECTIONS,
    sources={
        "serial": SerialStandIn,
        "file": FileStandIn,
        "tcp": ListenStandIn,
        "udp": ListenStandIn,
        "unix": ListenStandIn,
        "stdin": NothingStandIn,
        "simulate": SimulateStandIn,
        "mqtt": MqttStandIn,
    },
    sinks={"mqtt": MqttSinkStandIn, "jsonl": JsonlStandIn},
)


def parse(text: str, environ: dict | None = None, catalog: Catalog = CATALOG) -> Config:
    return parse_config(textwrap.dedent(text), "test.yaml", environ=environ or {}, catalog=catalog)


def problems(text: str, environ: dict | None = None, catalog: Catalog = CATALOG) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, environ, catalog)
    return info.value.problems


MINIMAL = """
streams:
  - name: s
    source: {type: stdin}
"""

# --------------------------------------------------------------------------- the examples

EXAMPLES = ["pi-serial.yaml", "mqtt-gateway.yaml", "logfile.yaml", "socket.yaml", "simulate.yaml"]


def test_every_example_is_tested():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXAMPLES)


@pytest.fixture
def example_env(tmp_path):
    secret = tmp_path / "mqtt.password"
    secret.write_text("s3cret-from-file\n")
    hmac_key = tmp_path / "config.hmac"
    hmac_key.write_text("fleet-hmac-key-from-file\n")
    return {"SOMAD_MQTT_PASSWORD_FILE": str(secret), "SOMAD_CONFIG_SECRET_FILE": str(hmac_key)}


def load_example(name: str, environ: dict) -> Config:
    """An example through the real catalog; skipped while an adapter it uses has not landed."""
    try:
        return load_config(CONFIGS / name, environ=environ)
    except ConfigError as exc:
        missing = [p for p in exc.problems if "is not available here" in p]
        if missing and len(missing) == len(exc.problems):
            pytest.skip(f"{name}: adapter not available yet: {missing[0]}")
        raise


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_loads_and_round_trips(name, example_env):
    config = load_example(name, example_env)
    assert config.streams
    again = parse_config(dump_config(config, mask_secrets=False), environ=example_env)
    assert again == config  # the effective config is a complete, faithful description


def test_pi_serial_example(example_env):
    config = load_example("pi-serial.yaml", example_env)
    uart = config.stream("uart0")
    assert (config.device, uart.source.type, uart.source.options.baudrate) == ("greenhouse-pi", "serial", 115200)
    assert uart.scoring.detector == "novelty" and uart.alerts.threshold == 0.999 and uart.queue_policy == "drop_oldest"
    assert [s.type for s in uart.sinks] == ["mqtt", "jsonl"]
    assert uart.sinks[0].options.device == "greenhouse-pi"  # handed to adapters with a device option


def test_mqtt_gateway_example_merges_defaults(example_env):
    config = load_example("mqtt-gateway.yaml", example_env)
    telemetry, syslog = config.stream("telemetry"), config.stream("gateway-syslog")
    assert telemetry.split_by_key and telemetry.max_substreams == 64
    assert telemetry.model.preset == "tiny" and syslog.model.preset == "small"  # the stream's own key wins
    assert telemetry.metabolism.budget == syslog.metabolism.budget == 0.1
    assert [s.type for s in telemetry.sinks] == ["mqtt"] and syslog.sinks == ()  # [] replaces the defaults' list
    assert telemetry.source.options.password_file == example_env["SOMAD_MQTT_PASSWORD_FILE"]
    assert telemetry.source.options.topics == ("sensors/+/telemetry",)


def test_logfile_and_socket_examples(example_env):
    log = load_example("logfile.yaml", example_env).stream("nginx-access")
    assert log.source.options.start == "saved" and log.queue_policy == "block"
    assert log.scoring.detector == "surprise" and log.alerts.n_of_m == (3, 10) and log.snapshot.every_bytes == 64 << 20
    sockets = load_example("socket.yaml", example_env)
    assert [s.source.type for s in sockets.streams] == ["tcp", "udp"]
    assert sockets.stream("meters-udp").framing.type == "message"


def test_simulate_example(example_env):
    config = load_example("simulate.yaml", example_env)
    sim = config.stream("sim")
    assert sim.source.type == "simulate" and len(sim.source.options.faults) == 4
    assert config.state_dir.startswith("/tmp")


# --------------------------------------------------------------------------- a table of bad configs

# "Billion laughs": five lines, each list ten aliases of the previous one: 10^5 nodes once expanded.
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcd", "bcde"))

BAD = [
    ("", "the configuration is empty"),
    ("# only a comment\n", "the configuration is empty"),
    ("- a\n- b\n", "expected a mapping at the top level (with at least 'streams'), got a list"),
    ("streams: [\n", "YAML syntax error at line 2, column 1"),
    ("a: b: c\n", "YAML syntax error at line 1, column 5: mapping values are not allowed here"),
    ("state_dir: /x\n", "streams: required key missing"),
    ("streams: []\n", "streams: at least one stream is needed"),
    ("streams: {name: s}\n", "streams: expected a list of streams, got a mapping"),
    ("streams:\n  - name: s\n", "streams[0].source: required key missing"),
    ("streams:\n  - source: {type: stdin}\n", "streams[0].name: required key missing"),
    ("streams:\n  - {name: 'a b', source: {type: stdin}}\n", "streams[0].name: expected 1 to 64 of A-Z a-z 0-9 _ . -"),
    ("streams:\n  - {name: '..', source: {type: stdin}}\n", "streams[0].name: expected 1 to 64"),
    ("streams:\n  - {name: s, source: {port: /dev/x}}\n", "streams[0].source.type: required key missing"),
    ("streams:\n  - {name: s, source: {type: seria, port: /dev/x}}\n", "streams[0].source.type: unknown source type 'seria' (did you mean 'serial'?)"),
    ("streams:\n  - {name: s, source: {type: serial}}\n", "streams[0].source.port: required key missing"),
    ("streams:\n  - {name: s, source: {type: serial, port: /dev/x, baudrate: fast}}\n", "streams[0].source.baudrate: expected int, got 'fast'"),
    ("streams:\n  - {name: s, source: {type: serial, port: /dev/x, baudrate: '9600'}}\n", "streams[0].source.baudrate: expected int, got '9600' (write numbers without quotes)"),
    ("streams:\n  - {name: s, source: {type: serial, port: /dev/x, baudrate: 9600.5}}\n", "streams[0].source.baudrate: expected int, got 9600.5"),
    ("streams:\n  - {name: s, source: {type: serial, port: /dev/x, baudrate: -1}}\n", "streams[0].source.baudrate: must be > 0, got -1"),
    ("streams:\n  - {name: s, source: {type: serial, port: /dev/x, baudrat: 9600}}\n", "streams[0].source.baudrat: unknown key (did you mean 'baudrate'?)"),
    ("streams:\n  - {name: s, source: {type: serial, port: /dev/x, parity: X}}\n", "streams[0].source.parity: expected one of 'N', 'E', 'O', got 'X'"),
    ("streams:\n  - {name: s, source: {type: serial, port: 5}}\n", "streams[0].source.port: expected str, got 5 (quote it to make it text)"),
    ("streams:\n  - {name: s, source: {type: file, path: no}}\n", "streams[0].source.path: expected str, got false (YAML reads yes/no/on/off/true/false as booleans"),
    ("streams:\n  - {name: s, source: {type: stdin}, budget: 0.5}\n", "streams[0].budget: unknown key (it belongs under metabolism:)"),
    ("streams:\n  - {name: s, source: {type: stdin}, baudrate: 9600}\n", "streams[0].baudrate: unknown key (it belongs under source:)"),
    ("streams:\n  - {name: s, source: {type: stdin}, framing: {type: line}}\n", "streams[0].framing.type: expected one of lines, delimiter, fixed, message, got 'line'"),
    ("streams:\n  - {name: s, source: {type: stdin}, framing: {type: delimiter}}\n", "streams[0].framing.delimiter: required for type \"delimiter\""),
    ("streams:\n  - {name: s, source: {type: stdin}, model: {preset: smal}}\n", "streams[0].model.preset: expected one of 'tiny', 'small', 'base', 'seed', got 'smal' (did you mean 'small'?)"),
    ("streams:\n  - {name: s, source: {type: stdin}, model: {hidden_dim: 0}}\n", "streams[0].model.hidden_dim: must be in 1..65536, got 0"),
    ("streams:\n  - {name: s, source: {type: stdin}, model: {lr: 0}}\n", "streams[0].model.lr: must be in (0, 10], got 0.0"),
    ("streams:\n  - {name: s, source: {type: stdin}, model: {rule: seed}}\n", "streams[0].model: the seed rule (eta = 1) needs weight_bound > 0"),
    ("streams:\n  - {name: s, source: {type: stdin}, model: {kernel: gpu}}\n", "streams[0].model.kernel: must be one of auto, native, torch, got 'gpu'"),
    ("streams:\n  - {name: s, source: {type: stdin}, metabolism: {budget: 2}}\n", "streams[0].metabolism.budget: must be a share of bytes in (0, 1], got 2.0"),
    ("streams:\n  - {name: s, source: {type: stdin}, metabolism: {fast_bytes: 100, slow_bytes: 50}}\n", "streams[0].metabolism: need 0 < fast_bytes < slow_bytes"),
    ("streams:\n  - {name: s, source: {type: stdin}, metabolism: {budget: .nan}}\n", "streams[0].metabolism.budget: expected a finite float, got nan"),
    ("streams:\n  - {name: s, source: {type: stdin}, alerts: {n_of_m: [3]}}\n", "streams[0].alerts.n_of_m: expected a list of 2 items, got a list of 1"),
    ("streams:\n  - {name: s, source: {type: stdin}, alerts: {n_of_m: [3, 2]}}\n", "streams[0].alerts.n_of_m: needs 1 <= n <= m <= 10000, got [3, 2]"),
    ("streams:\n  - {name: s, source: {type: stdin}, alerts: {learn_while_open: maybe}}\n", "streams[0].alerts.learn_while_open: must be one of normal, reduced, frozen, got 'maybe'"),
    ("streams:\n  - {name: s, source: {type: stdin}, scoring: {record_score: median}}\n", "streams[0].scoring.record_score: must be one of mean, max, sum"),
    ("streams:\n  - {name: s, source: {type: stdin}, scoring: {base: 2.0}}\n", "streams[0].scoring.base: 2.0 differs from the model's base"),
    ("streams:\n  - {name: s, source: {type: stdin}, snapshot: {keep: 0}}\n", "streams[0].snapshot.keep: must be >= 1, got 0"),
    ("streams:\n  - {name: s, source: {type: stdin}, queue: {policy: drop_newest}}\n", "streams[0].queue.policy: expected one of 'auto', 'block', 'drop_oldest', got 'drop_newest' (did you mean 'drop_oldest'?)"),
    ("streams:\n  - {name: s, source: {type: stdin}, split_by_key: 1}\n", "streams[0].split_by_key: expected bool (true or false), got 1"),
    ("streams:\n  - {name: s, source: {type: stdin}, max_substreams: 0}\n", "streams[0].max_substreams: must be >= 1, got 0"),
    ("streams:\n  - {name: s, source: {type: stdin}, sinks: {type: jsonl}}\n", "streams[0].sinks: expected a list of sinks"),
    ("streams:\n  - {name: s, source: {type: stdin}, sinks: [{type: kafka}]}\n", "streams[0].sinks[0].type: unknown sink type 'kafka'"),
    ("streams:\n  - {name: s, source: {type: stdin}, sinks: [{type: jsonl}]}\n", "streams[0].sinks[0].path: required key missing"),
    ("streams:\n  - {name: s, source: {type: simulate, faults: [{kind: spike}]}}\n", "streams[0].source.faults[0].at_line: required key missing"),
    ("log: {level: loud}\n" + MINIMAL, "log.level: expected one of 'debug', 'info', 'warning', 'error', got 'loud'"),
    ("log: {level: INFO}\n" + MINIMAL, "(did you mean 'info'?)"),
    ("metrics: {listen: localhost}\n" + MINIMAL, "metrics.listen: expected host:port"),
    ("metrics: {listen: '1.2.3.4:99999'}\n" + MINIMAL, "metrics.listen: port must be in 0..65535, got 99999"),
    ("metrics: []\n" + MINIMAL, "metrics: expected a mapping, got a list"),
    ("shutdown_timeout: 0\n" + MINIMAL, "shutdown_timeout: must be > 0, got 0.0"),
    ("on_bad_checkpoint: ignore\n" + MINIMAL, "on_bad_checkpoint: expected one of 'fresh', 'exit', got 'ignore'"),
    ("device: 'my/device'\n" + MINIMAL, "device: expected 1 to 64 of A-Z a-z 0-9 _ . -"),
    ("state_dir: ''\n" + MINIMAL, "state_dir: must not be empty"),
    ("stat_dir: /x\n" + MINIMAL, "stat_dir: unknown key (did you mean 'state_dir'?)"),
    ("1: x\n" + MINIMAL, "keys must be text, got 1"),
    ("remote: {}\n" + MINIMAL, "remote: needs mqtt or url"),
    ("remote: {url: 'ftp://x'}\n" + MINIMAL, "remote.url: must start with http:// or https://, got 'ftp://x'"),
    ("defaults: {model: {lr: -1}}\n" + MINIMAL, "defaults.model.lr: must be in (0, 10], got -1.0"),
    ("defaults: {framing: {type: lines}}\n" + MINIMAL, "defaults.framing: unknown key; known here: model, metabolism"),
    ("state_dir: /a\nstate_dir: /b\n" + MINIMAL, "state_dir: duplicate key 'state_dir' (first at line 1)"),
    ("state_dir: 2024-01-01\n" + MINIMAL, "state_dir: expected str, got a date (2024-01-01) (quote it to make it text)"),
    (ALIAS_BOMB, "expands to more than 100000 YAML nodes"),
    ("a: &a [*a]\n", "a YAML alias refers to the node that contains it"),
    ("x: " + "[" * 80 + "]" * 80 + "\n", "nested too deeply"),
    ("--- {a: 1}\n--- {b: 2}\n", "YAML syntax error at line 2, column 1: expected a single document in the stream: but found another document"),
    ("a: !!python/object:os.system {}\n", "YAML syntax error at line 1, column 4: could not determine a constructor for the tag"),
    ("a: 2024-13-45\n", "YAML cannot be read: ValueError"),
    ("streams:\n\t- name: s\n", "YAML syntax error at line 2, column 1: found character '\\t' that cannot start any token"),
]


@pytest.mark.parametrize("text, expected", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_config_names_the_problem(text, expected):
    found = problems(text)
    assert any(expected in p for p in found), f"{expected!r} not in {found}"


def test_every_problem_at_once_in_document_order():
    text = """\
        state_dir: 3
        log: {level: loud}
        streams:
          - name: uart0
            source: {type: serial, port: /dev/ttyUSB0, baudrate: fast}
            metabolism: {budget: 2}
          - name: uart0
            source: {type: stdin}
            model: {preset: huge}
    """
    with pytest.raises(ConfigError) as info:
        parse(text)
    error = info.value
    assert error.problems == [
        "state_dir: expected str, got 3 (quote it to make it text)",
        "log.level: expected one of 'debug', 'info', 'warning', 'error', got 'loud'",
        "streams[0].source.baudrate: expected int, got 'fast'",
        "streams[0].metabolism.budget: must be a share of bytes in (0, 1], got 2.0",
        "streams[1].name: duplicate stream name 'uart0' (also streams[0])",
        "streams[1].model.preset: expected one of 'tiny', 'small', 'base', 'seed', got 'huge'",
    ]
    assert [(p.line, p.column) for p in error.issues] == [(1, 12), (2, 14), (5, 58), (6, 26), (7, 11), (9, 21)]
    assert str(error).splitlines()[0] == "test.yaml: 6 problems"
    assert error.issues[2].located("test.yaml") == "test.yaml:5:58: streams[0].source.baudrate: expected int, got 'fast'"


def test_nothing_but_config_error_for_a_broken_section_class():
    @dataclass(frozen=True)
    class Broken:
        x: int = 0

        def __post_init__(self):
            raise RuntimeError("a bug in the section")

    catalog = replace(CATALOG, sources={**CATALOG.sources, "broken": Broken, "absent": "no_such_module:Thing"})
    text = "streams:\n  - {name: a, source: {type: broken}}\n  - {name: b, source: {type: absent}}\n  - {name: c, source: {type: absent}}\n"
    found = problems(text, catalog=catalog)
    assert "streams[0].source: Broken refused these settings: RuntimeError: a bug in the section" in found
    absent = [p for p in found if "is not available here" in p]
    assert absent == ["streams[1].source.type: the 'absent' source is not available here: ModuleNotFoundError: No module named 'no_such_module'"]


def test_a_missing_section_module_is_reported_once():
    catalog = replace(CATALOG, sections={**SECTIONS, "framing": "somad.no_framing_here:FramingConfig"})
    found = problems(MINIMAL + "  - {name: t, source: {type: stdin}}\n", catalog=catalog)
    assert len([p for p in found if "framing" in p]) == 1
    assert "the 'framing' section (somad.no_framing_here:FramingConfig) is not available here" in found[0]


# --------------------------------------------------------------------------- one reader per resource


def test_two_streams_on_one_serial_port_even_through_a_symlink(tmp_path):
    device = tmp_path / "ttyUSB0"
    device.touch()
    (tmp_path / "by-id").symlink_to(device)
    found = problems(f"""
        streams:
          - {{name: a, source: {{type: serial, port: {device}}}}}
          - {{name: b, source: {{type: serial, port: {tmp_path / 'by-id'}}}}}
          - {{name: c, source: {{type: serial, port: /dev/ttyACM0}}}}
    """)
    assert found == [f"streams[1].source.port: serial port {str(device)!r} is already read by stream 'a' (streams[0]): one reader per serial port"]


@pytest.mark.parametrize(
    "first, second, clash",
    [
        ("{type: tcp, listen: '127.0.0.1:7070'}", "{type: tcp, listen: '127.0.0.1:7070'}", True),
        ("{type: tcp, listen: '0.0.0.0:7070'}", "{type: tcp, listen: '127.0.0.1:7070'}", True),
        ("{type: tcp, listen: '7070'}", "{type: tcp, listen: '127.0.0.1:7070'}", True),
        ("{type: tcp, listen: '127.0.0.1:7070'}", "{type: udp, listen: '127.0.0.1:7070'}", False),
        ("{type: tcp, listen: '127.0.0.1:7070'}", "{type: tcp, listen: '127.0.0.2:7070'}", False),
        ("{type: tcp, listen: '127.0.0.1:0'}", "{type: tcp, listen: '127.0.0.1:0'}", False),
        ("{type: udp, listen: '[::]:514'}", "{type: udp, listen: '[::1]:514'}", True),
        ("{type: file, path: /var/log/a.log}", "{type: file, path: /var/log/../log/a.log}", True),
        ("{type: unix, listen: /run/somad.sock}", "{type: unix, listen: /run/somad.sock}", True),
        ("{type: stdin}", "{type: stdin}", True),
        ("{type: mqtt, topics: [a]}", "{type: mqtt, topics: [a]}", False),
    ],
)
def test_exclusive_sources(first, second, clash):
    text = f"streams:\n  - {{name: a, source: {first}}}\n  - {{name: b, source: {second}}}\n"
    if clash:
        found = problems(text)
        assert len(found) == 1 and found[0].startswith("streams[1].source") and "is already read by stream 'a' (streams[0])" in found[0]
    else:
        assert len(parse(text).streams) == 2


def test_a_clash_is_reported_beside_other_problems():
    found = problems("""
        streams:
          - {name: a, source: {type: stdin}, model: {lr: 0}}
          - {name: b, source: {type: stdin}}
    """)
    assert len(found) == 2 and "is already read by stream 'a'" in found[1]


def test_a_sink_writing_the_file_a_stream_reads_is_a_loop():
    found = problems("""
        streams:
          - name: app
            source: {type: file, path: /tmp/somad-test/app.log}
            sinks: [{type: jsonl, path: "/tmp/somad-test/{stream}.log"}]
          - name: logs
            source: {type: stdin}
            sinks: [{type: jsonl, path: "/tmp/somad-test/{stream}.log"}]
    """)
    assert found == ["streams[0].sinks[0].path: writes '/tmp/somad-test/app.log', which stream 'app' reads (a feedback loop)"]
    found = problems("""
        streams:
          - name: app
            source: {type: file, path: /tmp/somad-test/app.log}
          - name: other
            source: {type: stdin}
            sinks: [{type: jsonl, path: /tmp/somad-test/app.log}]
    """)
    assert found == ["streams[1].sinks[0].path: writes '/tmp/somad-test/app.log', which stream 'app' reads (a feedback loop)"]


# --------------------------------------------------------------------------- environment and secrets


def test_environment_substitution_and_typed_values():
    config = parse(
        """
        device: ${DEVICE}
        state_dir: ${STATE:-/tmp/somad}
        streams:
          - name: s
            source:
              type: serial
              port: ${PORT_PATH}
              baudrate: ${BAUD}
            split_by_key: ${SPLIT}
            sinks:
              - type: mqtt
                topic: "cost/$$5/${DEVICE}"
        """,
        {"DEVICE": "pi-7", "PORT_PATH": "/dev/ttyS0", "BAUD": "9600", "SPLIT": "true"},
    )
    stream = config.streams[0]
    assert (config.device, config.state_dir) == ("pi-7", "/tmp/somad")
    assert stream.source.options.port == "/dev/ttyS0" and stream.source.options.baudrate == 9600
    assert stream.split_by_key is True and stream.sinks[0].options.topic == "cost/$5/pi-7"
    assert type(stream.source.options.port) is str  # no marker class leaks out (it would not dump)
    yaml.safe_dump(to_plain(config))


def test_environment_problems_are_config_problems():
    found = problems(
        """
        state_dir: ${NOT_SET}
        streams:
          - name: s
            source: {type: serial, port: "${1BAD}", baudrate: "${BAUD}"}
        """,
        {"BAUD": "fast"},
    )
    assert found == [
        "state_dir: environment variable 'NOT_SET' is not set (write ${NOT_SET:-default} for a default)",
        "streams[0].source.port: bad reference ${1BAD}: expected ${NAME} or ${NAME:-default}",
        "streams[0].source.baudrate: expected int, got 'fast'",
    ]


def test_a_reference_in_a_flow_mapping_gets_a_hint():
    found = problems("streams:\n  - {name: s, source: {type: serial, port: ${P}}}\n", {"P": "/dev/x"})
    assert "quote values that hold ${...}" in found[0]


def test_password_file_is_read_at_load_time_and_masked(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("hunter2\nsecond line ignored\n")
    text = f"""
        streams:
          - name: s
            source: {{type: mqtt, username: u, password_file: {secret}, topics: [a/#]}}
            sinks:
              - {{type: mqtt, password_file: {secret}}}
              - {{type: mqtt, password: inline-secret}}
    """
    config = parse(text)
    source, sink, inline = config.streams[0].source.options, config.streams[0].sinks[0].options, config.streams[0].sinks[1].options
    assert (source.password, source.password_file) == ("", str(secret))  # the adapter keeps the path (and rereads it)
    assert sink.password == "hunter2"  # no password_file field: the loader reads the first line
    assert inline.password == "inline-secret"
    shown = dump_config(config)
    assert "hunter2" not in shown and "inline-secret" not in shown and shown.count("password: '***'") == 2
    assert str(secret) in shown


@pytest.mark.parametrize(
    "sink, expected",
    [
        ("{type: mqtt, password_file: /nonexistent/pw}", "streams[0].sinks[0].password_file: cannot read '/nonexistent/pw': No such file or directory"),
        ("{type: mqtt, password_file: EMPTY}", "streams[0].sinks[0].password_file: 'EMPTY' is empty (the secret is its first line)"),
        ("{type: mqtt, password: x, password_file: EMPTY}", "streams[0].sinks[0].password_file: give password or password_file, not both"),
        ("{type: mqtt, password_file: 5}", "streams[0].sinks[0].password_file: expected str (a file path), got 5"),
        ("{type: jsonl, path: /x, password_file: /y}", "streams[0].sinks[0].password_file: unknown key"),
    ],
)
def test_secret_file_problems(tmp_path, sink, expected):
    empty = tmp_path / "empty"
    empty.write_text("")
    found = problems(f"streams:\n  - name: s\n    source: {{type: stdin}}\n    sinks: [{sink.replace('EMPTY', str(empty))}]\n")
    assert any(p.startswith(expected.replace("EMPTY", str(empty))) for p in found), found


def test_remote_secret_file_and_url_password_are_masked(tmp_path):
    (tmp_path / "hmac").write_text("k3y\n")
    config = parse(f"remote: {{url: 'https://fleet:pa55@cfg.example/somad.yaml', secret_file: {tmp_path / 'hmac'}}}\n" + MINIMAL)
    assert config.remote.secret == "k3y"
    shown = dump_config(config)
    assert "k3y" not in shown and "pa55" not in shown and "https://fleet:***@cfg.example/somad.yaml" in shown


# --------------------------------------------------------------------------- defaults and derived values


def test_defaults_merge_key_by_key_and_streams_win():
    config = parse("""
        defaults:
          model: {preset: tiny, lr: 0.05}
          alerts: {threshold: 0.95}
          sinks: [{type: jsonl, path: "/tmp/{stream}.jsonl"}]
        streams:
          - name: a
            source: {type: stdin}
            model: {lr: 0.2}
          - name: b
            source: {type: tcp, listen: "127.0.0.1:0"}
            sinks: []
    """)
    a, b = config.streams
    assert (a.model.preset, a.model.lr, b.model.lr) == ("tiny", 0.2, 0.05)
    assert a.alerts.threshold == b.alerts.threshold == 0.95
    assert [s.options.path for s in a.sinks] == ["/tmp/{stream}.jsonl"] and b.sinks == ()
    assert config.defaults.model.preset == "tiny"


def test_a_bad_default_is_reported_once_not_per_stream():
    found = problems("defaults: {metabolism: {budget: 5}}\n" + MINIMAL + "  - {name: t, source: {type: simulate}}\n")
    assert found == ["defaults.metabolism.budget: must be a share of bytes in (0, 1], got 5.0"]


def test_scoring_follows_the_models_base():
    config = parse(MINIMAL + "    model: {base: 2.0}\n")
    assert config.streams[0].scoring.base == 2.0 and config.streams[0].model.soma_config().base == 2.0


def test_null_sections_mean_defaults_and_empty_keys_are_fine():
    config = parse("metrics:\nstreams:\n  - name: s\n    source: {type: stdin}\n    model:\n    sinks:\n")
    assert config.metrics.listen == "127.0.0.1:9464" and config.streams[0].model == ModelConfig()


def test_model_config_builds_the_learner():
    model = ModelConfig(preset="tiny", hidden_dim=16, rule="seed", weight_bound=0.5, kernel="torch")
    soma = model.soma_config()
    assert (soma.n_bands, soma.hidden_dim, soma.direct_readout) == (16, 16, False)
    from somad.metabolism import MetabolismConfig

    learner = model.learner_config(MetabolismConfig(budget=0.5))
    assert (learner.rule, learner.eta, learner.weight_bound, learner.metabolism.budget, learner.kernel) == ("seed", 1.0, 0.5, 0.5, "torch")
    with pytest.raises(ValueError, match="preset"):
        ModelConfig(preset="huge")


def test_queue_policy_auto_depends_on_the_source():
    assert QueueConfig().resolved_policy("stdin") == "block"
    assert QueueConfig().resolved_policy("mqtt") == "drop_oldest"
    assert QueueConfig(policy="block").resolved_policy("mqtt") == "block"
    stream = parse(MINIMAL).streams[0]
    assert stream.queue_policy == "block"


def test_listen_addresses():
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[fe80::1%eth0]:80") == ("fe80::1%eth0", 80)
    for bad in ("", "host:", "1.2.3.4:70000", "a:b:c", "[::1]"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_direct_construction_validates_too():
    with pytest.raises(ValueError, match="unique"):
        Config(streams=(StreamConfig(name="a", source=SourceConfig("stdin", None)),) * 2)
    with pytest.raises(ValueError, match="at least one"):
        Config(streams=())


# --------------------------------------------------------------------------- reload can diff configs


def test_configs_compare_by_value_so_reload_can_diff_stream_by_stream():
    text = MINIMAL + "  - {name: t, source: {type: serial, port: /dev/x}}\n  - {name: u, source: {type: file, path: /tmp/u}}\n"
    old = parse(text)
    assert parse(text) == old and hash(parse(text).streams[1]) == hash(old.streams[1])
    new = parse(text.replace("/dev/x", "/dev/y").replace("  - {name: u, source: {type: file, path: /tmp/u}}\n", "  - {name: v, source: {type: simulate}}\n"))
    changes = diff_streams(old, new)
    assert (changes.unchanged, changes.changed, changes.removed, changes.added) == (("s",), ("t",), ("u",), ("v",))


# --------------------------------------------------------------------------- files and `somad check`


def test_load_config_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="cannot read .*No such file or directory"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="Is a directory"):
        load_config(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes(b"state_dir: /tmp/\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(tmp_path / "latin1.yaml")
    (tmp_path / "huge.yaml").write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(tmp_path / "huge.yaml")


def run_check(path, as_json=False) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = check_command(argparse.Namespace(config=str(path), json=as_json), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def write_config(tmp_path, text: str) -> Path:
    path = tmp_path / "somad.yaml"
    path.write_text(textwrap.dedent(text))
    return path


VALID_WITH_SECRET = """
    device: bench
    streams:
      - name: sim
        source: {type: tcp, listen: "127.0.0.1:0"}
        sinks:
          - {type: jsonl, path: /tmp/somad-check-test.jsonl}
"""


def test_check_valid_prints_the_effective_config(tmp_path):
    code, out, err = run_check(write_config(tmp_path, VALID_WITH_SECRET))
    assert (code, err) == (0, "")
    assert out.startswith(f"# {tmp_path / 'somad.yaml'}: valid, 1 stream(s): sim.")
    shown = yaml.safe_load(out)
    assert shown["device"] == "bench" and shown["streams"][0]["source"]["type"] == "tcp"
    assert shown["streams"][0]["metabolism"]["budget"] == 0.25  # defaults filled in: the *effective* config
    code, out, err = run_check(write_config(tmp_path, VALID_WITH_SECRET), as_json=True)
    assert code == 0 and json.loads(out)["valid"] is True and json.loads(out)["config"]["device"] == "bench"


def test_check_invalid_lists_problems_on_stderr(tmp_path):
    path = write_config(tmp_path, "streams:\n  - name: s\n    source: {type: tcp, listen: nowhere}\n    model: {lr: 0}\n")
    code, out, err = run_check(path)
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f"{path}:3:33: streams[0].source.listen: expected host:port (e.g. 127.0.0.1:9464 or [::1]:9464), got 'nowhere'",
        f"{path}:4:17: streams[0].model.lr: must be in (0, 10], got 0.0",
    ]
    code, out, err = run_check(path, as_json=True)
    report = json.loads(out)
    assert code == 1 and report["valid"] is False and [p["line"] for p in report["problems"]] == [3, 4]


def test_check_in_a_subprocess_exit_codes(tmp_path):
    """``python -m somad.check`` as a user (or CI) runs it: real catalog, real exit codes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    good = write_config(tmp_path, "streams:\n  - {name: s, source: {type: tcp, listen: '127.0.0.1:0'}}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("streams:\n  - {name: s, source: {type: serial, port: /dev/x, baudrate: fast}}\n")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "somad.check", *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    ok = run("--config", str(good))
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["streams"][0]["name"] == "s"
    invalid = run("--config", str(bad))
    assert invalid.returncode == 1 and invalid.stderr.strip() == f"{bad}:2:62: streams[0].source.baudrate: expected int, got 'fast'"
    assert run().returncode == 2
    assert run("--bogus").returncode == 2


def test_an_unknown_key_is_located_at_the_key_a_bad_value_at_the_value():
    with pytest.raises(ConfigError) as info:
        parse("streams:\n  - name: s\n    source: {type: serial, port: /dev/x, baudrate: fast}\n    budget: 0.5\n")
    assert [(p.path, p.line, p.column) for p in info.value.issues] == [("streams[0].source.baudrate", 3, 52), ("streams[0].budget", 4, 5)]
