"""Fuzz the configuration loader: whatever the text, ``parse_config`` returns a ``Config`` or
raises ``ConfigError`` (with at least one problem), never anything else.

Four sources of input, each bounded: raw YAML-ish text; random documents built from the
schema's own vocabulary; character-level mutations of the example configs; and value-level
mutations of the examples (a random node replaced by a random value, then dumped again).
Examples run through the real catalog (real sections and adapters), the generated
documents through both the real catalog and the test stand-ins.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from somad.config import Config, ConfigError, parse_config
from tests.test_config import CATALOG

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = {p.name: p.read_text() for p in sorted((ROOT / "configs").glob("*.yaml"))}
ENVIRON = {"SOMAD_MQTT_PASSWORD_FILE": "/etc/hostname", "SOMAD_CONFIG_SECRET_FILE": "/etc/hostname", "HOME": "/root", "EMPTY": "", "PORT": "1883"}

# SOMAD_FUZZ_EXAMPLES=5000 for a deeper run on demand; the default keeps the suite fast.
FUZZ = settings(max_examples=int(os.environ.get("SOMAD_FUZZ_EXAMPLES", "150")), deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# The schema's vocabulary, so that generated documents get past the first key check.
KEYS = [
    "streams", "name", "source", "type", "framing", "model", "metabolism", "scoring", "alerts", "snapshot",
    "queue", "sinks", "defaults", "device", "state_dir", "metrics", "listen", "log", "level", "format",
    "remote", "url", "secret_file", "password_file", "password", "port", "baudrate", "path", "topics",
    "preset", "budget", "threshold", "n_of_m", "every_seconds", "max_bytes", "policy", "split_by_key",
    "faults", "kind", "at_line", "rate", "delimiter", "max_record_bytes", "host", "tls", "<<",
]
WORDS = [
    "serial", "mqtt", "file", "tcp", "udp", "unix", "stdin", "simulate", "jsonl", "csv", "lines", "message",
    "fixed", "tiny", "small", "auto", "block", "drop_oldest", "info", "json", "fresh", "exit", "spike",
    "127.0.0.1:0", "0.0.0.0:7070", "/dev/ttyUSB0", "/tmp/x.log", "${PORT}", "${NOPE}", "${EMPTY:-d}", "$$",
    "${", "\\x00", "\\n", "a/#", "",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS),
    st.text(max_size=12),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6) | st.integers(-3, 3), children, max_size=5),
    ),
    max_leaves=30,
)
STREAM_SHAPED = st.fixed_dictionaries(
    {"streams": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["a", "b", "a b"]), "source": documents}, optional={k: documents for k in KEYS[3:12]}), max_size=3)},
    optional={k: documents for k in ("device", "state_dir", "metrics", "log", "defaults", "remote")},
)
YAML_CHARS = st.sampled_from(list(":-[]{}&*!|>'\"%@`#,?\n\t ") + ["  ", "- ", ": ", "&a ", "*a", "<<: ", "!!", "---\n", "${X}", "\\u0000", "\xff", "\x00"])
YAML_TEXT = st.lists(YAML_CHARS | st.sampled_from(KEYS) | st.sampled_from(WORDS) | st.text(max_size=4), max_size=60).map("".join)


def assert_clean(text: str, catalog=None) -> None:
    try:
        result = parse_config(text, "fuzz.yaml", environ=ENVIRON, catalog=catalog)
    except ConfigError as error:
        assert error.problems and all(isinstance(p, str) and p for p in error.problems)
        str(error)
        return
    assert isinstance(result, Config)


@FUZZ
@given(YAML_TEXT)
def test_yaml_ish_text(text):
    assert_clean(text, CATALOG)


@FUZZ
@given(st.one_of(documents, STREAM_SHAPED), st.booleans())
def test_generated_documents(document, real_catalog):
    text = yaml.safe_dump(document, allow_unicode=True, default_flow_style=None)
    assert_clean(text, None if real_catalog else CATALOG)


@st.composite
def mutated_text(draw):
    text = draw(st.sampled_from(sorted(EXAMPLES.values())))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        edit = draw(st.sampled_from(["delete", "insert", "swap_line", "indent"]))
        if edit == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 40)) :]
        elif edit == "insert":
            text = text[:at] + draw(YAML_CHARS | st.sampled_from(WORDS)) + text[at:]
        elif edit == "swap_line":
            lines = text.splitlines(keepends=True)
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "".join(lines)
        else:
            lines = text.splitlines(keepends=True)
            i = draw(st.integers(0, len(lines) - 1))
            lines[i] = draw(st.sampled_from(["", " ", "  ", "\t"])) + lines[i].lstrip(" ")
            text = "".join(lines)
    return text


@FUZZ
@given(mutated_text())
def test_character_mutations_of_the_examples(text):
    assert_clean(text)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


@st.composite
def mutated_document(draw):
    document = yaml.safe_load(draw(st.sampled_from(sorted(EXAMPLES.values()))))
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(list(_paths(document))[1:]))
        parent = document
        for key in target[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[target[-1]]
        else:
            parent[target[-1]] = draw(documents)
    return yaml.safe_dump(document, allow_unicode=True)


@FUZZ
@given(mutated_document())
def test_value_mutations_of_the_examples(text):
    assert_clean(text)


ENV_DOCUMENT = """
device: ${V}
state_dir: ${V:-/tmp/x}
log: {level: "${V}"}
remote: {url: "${V}", poll_seconds: "${V}"}
streams:
  - name: s
    source: {type: tcp, listen: "${V}", max_clients: "${V}"}
    split_by_key: ${V}
    model: {n_bands: "${V}", direct_readout: "${V}"}
    alerts: {n_of_m: ["${V}", 2]}
"""


@FUZZ
@given(st.text(max_size=20) | st.sampled_from(["1", "-1", "0x10", "1e3", "1.5", "true", "no", "null", "", "[", "{a: 1}", "2024-13-45", "~", ".inf", "[" * 200]))
def test_values_from_the_environment(value):
    for catalog in (None, CATALOG):
        try:
            parse_config(ENV_DOCUMENT, "env.yaml", environ={"V": value}, catalog=catalog)
        except ConfigError as error:
            assert error.problems


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_unmutated_examples_load(name):
    """The fuzz starting points are valid (else the mutations would prove little)."""
    assert isinstance(parse_config(EXAMPLES[name], name, environ=ENVIRON), Config)
