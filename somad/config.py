"""The configuration: YAML into frozen dataclasses, every problem named at its path, all at once.

Shape (DESIGN.md §4 holds the contract for the key names)::

    device, state_dir, metrics, log, shutdown_timeout, on_bad_checkpoint, remote
    defaults:  model, metabolism, scoring, alerts, snapshot, queue, sinks   (merged under each stream)
    streams:   - name, source {type, <adapter options>}, framing, model, metabolism, scoring,
                 alerts, snapshot, queue, split_by_key, max_substreams, sinks [{type, <options>}]

Sections are dataclasses that live with their owners (``MetabolismConfig`` in metabolism,
``ScoringConfig``/``AlertConfig`` in scoring, ``FramingConfig`` in framing, each adapter's
``Options``); they are imported lazily through a ``Catalog`` and built generically from their
fields and type hints (bool, int, float, str, bytes, Literal choices, tuples, lists, dicts,
Optional/unions, enums, nested dataclasses). A ``ValueError`` raised by a dataclass's
``__post_init__`` becomes a problem at that section's path (at the field it names, when it
names exactly one).

Loading order: YAML (syntax errors with line and column; duplicate keys, alias bombs and
runaway nesting refused) -> ``${ENV}`` / ``${ENV:-default}`` substitution in string values
(``$$`` is a literal ``$``) -> ``<secret>_file`` keys read (``password_file``, ``secret_file``,
``token_file``: the file's content becomes the secret) -> ``defaults`` merged under each
stream (mappings merged key by key, ``sinks`` replaced as a whole) -> sections built ->
cross-stream checks (unique names; one reader per serial port, listen address, file, stdin;
no sink writing a file a stream reads). Relative paths stay relative to the daemon's
working directory.

Everything is frozen and compares by value, so a reload can diff two ``Config``s stream by
stream (``diff_streams``).

>>> parse_listen("[::1]:9464"), parse_listen("0.0.0.0:80")
(('::1', 9464), ('0.0.0.0', 80))
>>> try:
...     parse_config("- just\\n- a list\\n", origin="x.yaml")
... except ConfigError as e:
...     print(e)
x.yaml: 1 problem
  expected a mapping at the top level (with at least 'streams'), got a list
>>> try:
...     parse_config("streams: [\\n", origin="y.yaml")
... except ConfigError as e:
...     print(e.problems)
["YAML syntax error at line 2, column 1: expected the node content, but found '<stream end>'"]
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import enum
import functools
import hashlib
import importlib
import math
import os
import re
import socket
import string
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Literal

import yaml

from adapters.addresses import parse_listen

if TYPE_CHECKING:  # imported lazily at run time: a missing module is a config error, not an ImportError
    from adapters.mqtt_common import MqttConnectionOptions

    from .framing import FramingConfig
    from .learner import LearnerConfig
    from .metabolism import MetabolismConfig
    from .model import SomaConfig
    from .scoring import AlertConfig, ScoringConfig

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # stream and device names: safe in file names and MQTT topics
SECRET_FIELDS = ("password", "secret", "token", "api_key")  # masked in output; "<name>_file" may hold them (see _read_secret_files)
MASK = "***"
MAX_CONFIG_BYTES = 1 << 20  # a config larger than this is refused (it is a mistake, or an attack on a remote path)
MAX_SECRET_FILE_BYTES = 64 << 10  # a secret file larger than this is not a secret
MAX_NODES = 100_000  # YAML nodes after alias expansion (a "billion laughs" document expands to far more)
MAX_DEPTH = 64  # YAML nesting depth (the schema needs about 6)
WILDCARD_HOSTS = ("", "*", "0.0.0.0", "::")  # listen hosts that mean "every interface"


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration: where (dotted path, YAML line/column) and what."""

    path: str  # e.g. "streams[2].source.baudrate"; "" for the document as a whole
    message: str
    line: int | None = None  # 1-based, when the YAML says where the path is
    column: int | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def located(self, origin: str) -> str:
        """Compiler-style ``origin:line:column: path: message``, for terminals and editors."""
        where = f"{origin}:{self.line}:{self.column}" if self.line else origin
        return f"{where}: {self}"


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` lists every problem found, in document order."""

    def __init__(self, issues: list[Problem | str], origin: str = "<string>"):
        self.issues = tuple(p if isinstance(p, Problem) else Problem("", str(p)) for p in issues)
        self.origin = origin
        self.problems = [str(p) for p in self.issues]  # each "path: message"
        count = f"{len(self.problems)} problem" + ("s" if len(self.problems) != 1 else "")
        super().__init__("\n".join([f"{origin}: {count}", *("  " + p for p in self.problems)]))


# --------------------------------------------------------------------------- helpers used by the schema


def default_device() -> str:
    """This machine's host name, cut to what a device name may hold (it goes into MQTT topics)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64].strip(".")
    return name or "somad"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _require_choice(value: Any, choices: tuple, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {_quoted(choices)}, got {value!r}{_did_you_mean(value, choices)}")


def _require_name(value: Any, what: str) -> None:
    _require(
        isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None and value not in (".", ".."),
        f"{what}: expected 1 to 64 of A-Z a-z 0-9 _ . - (not '.' or '..'), got {value!r}",
    )


def _quoted(choices) -> str:
    return ", ".join(repr(c) for c in choices)


def _did_you_mean(value: Any, candidates) -> str:
    if not isinstance(value, str):
        return ""
    names = [c for c in candidates if isinstance(c, str)]
    lowered = {c.lower(): c for c in names}
    close = difflib.get_close_matches(value.lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""


def _lazy_default(target: str) -> Callable[[], Any]:
    """A default_factory importing ``module:Class`` on first use (keeps torch and adapters out of import time)."""

    def make():
        return _import(target)()

    return make


# --------------------------------------------------------------------------- schema: global sections


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9464"  # host:port of /metrics and /healthz (port 0: any free port)
    enabled: bool = True  # false: no HTTP endpoint at all

    def __post_init__(self) -> None:
        try:
            parse_listen(self.listen)
        except ValueError as exc:
            raise ValueError(f"listen: {exc}") from None


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a TTY, JSON otherwise

    def __post_init__(self) -> None:
        _require_choice(self.level, ("debug", "info", "warning", "error"), "level")
        _require_choice(self.format, ("auto", "json", "console"), "format")


@dataclass(frozen=True)
class RemoteConfig:
    """Remote configuration (``somad.remote``): config documents from a fleet, over MQTT
    (``<topic>/set`` in, the result retained on ``<topic>/state``) and/or an HTTP(S) URL polled
    with ETag / If-Modified-Since. Taken from the local file only: a remote document may not
    change it (nor ``device`` or ``state_dir``).

    >>> RemoteConfig(url="https://fleet.example/gw.yaml").topics("gw-1")
    ('somad/gw-1/config/set', 'somad/gw-1/config/state')
    >>> RemoteConfig(url="https://x/c", topic="somad/+/config")
    Traceback (most recent call last):
    ...
    ValueError: topic: wildcards are not allowed, got 'somad/+/config'
    """

    mqtt: MqttConnectionOptions | None = None  # broker carrying <topic>/set and <topic>/state (host, port, username, password_file, tls, ...); None: no MQTT channel
    topic: str = "somad/{device}/config"  # documents arrive on <topic>/set; results go, retained, to <topic>/state; {device} is filled in
    secret: str | None = None  # HMAC-SHA256 key (YAML: or secret_file); when set, unsigned or wrongly signed documents are rejected
    url: str | None = None  # HTTP(S) URL polled with ETag / If-Modified-Since (None: no polling); user:password@ becomes basic auth
    poll_seconds: float = 60.0  # interval between polls of ``url`` (failures back off from here, doubling, up to 15 minutes)
    ca_certs: str = ""  # PEM file of the CAs trusted for an https ``url``; "" = the system's CAs

    def __post_init__(self) -> None:
        _require(self.mqtt is not None or self.url is not None, "needs mqtt or url (or leave remote out)")
        _require(self.poll_seconds > 0, f"poll_seconds must be > 0, got {self.poll_seconds}")
        _require(self.url is None or re.match(r"https?://[^/\s]", self.url) is not None, f"url must start with http:// or https://, got {self.url!r}")
        _require(self.secret is None or self.secret != "", "secret: must not be empty (leave it out for unsigned documents)")
        self._check_topic()

    def _check_topic(self) -> None:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.topic) if f is not None]
        except ValueError as exc:
            raise ValueError(f"topic: {exc} in {self.topic!r}") from None
        _require(all(f == "device" for f in fields), f"topic: the only placeholder is {{device}}, got {self.topic!r}")
        _require("+" not in self.topic and "#" not in self.topic, f"topic: wildcards are not allowed, got {self.topic!r}")
        _require(bool(self.topic.strip("/")) and not self.topic.endswith("/"), f"topic: expected a topic prefix like 'somad/{{device}}/config', got {self.topic!r}")

    def topics(self, device: str) -> tuple[str, str]:
        """(set topic, state topic) for this device."""
        prefix = self.topic.format(device=device)
        return f"{prefix}/set", f"{prefix}/state"


# --------------------------------------------------------------------------- schema: per-stream sections


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "small"  # tiny | small | base | seed (somad.model.PRESETS)
    n_bands: int | None = None  # architecture overrides of the preset (None: the preset's value)
    hidden_dim: int | None = None
    base: float | None = None
    features: str | None = None  # "traces" | "bandpass"
    activation: str | None = None  # "tanh" | "relu"
    direct_readout: bool | None = None
    seed: int | None = None  # initialisation seed (same seed, same model)
    lr: float = 0.1  # learning rate of the "sgd" rule
    rule: str = "sgd"  # "sgd" | "seed" (eta = 1 with a weight bound)
    weight_bound: float = 0.0  # |w| <= bound after each update (0 = none; "seed" needs one)
    batch: int = 32  # observations per weight update (as LearnerConfig)
    max_chunk: int = 128  # bytes scored together at most (as LearnerConfig)
    kernel: str = "auto"  # forward path: "auto" (native where a C compiler builds it) | "native" | "torch" (as LearnerConfig)

    def __post_init__(self) -> None:
        from .model import PRESETS

        _require_choice(self.preset, tuple(PRESETS), "preset")
        self.soma_config()  # the architecture overrides, checked by SomaConfig
        self.learner_config()  # rule, lr, weight_bound, batch, max_chunk, kernel, checked by LearnerConfig

    def overrides(self) -> dict[str, Any]:
        """The architecture fields set here (not None), as ``preset(name, **overrides)`` takes them."""
        names = ("n_bands", "hidden_dim", "base", "features", "activation", "direct_readout", "seed")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def soma_config(self) -> SomaConfig:
        from .model import preset

        return preset(self.preset, **self.overrides())

    def learner_config(self, metabolism: MetabolismConfig | None = None) -> LearnerConfig:
        from .learner import LearnerConfig
        from .metabolism import MetabolismConfig

        return LearnerConfig(
            rule=self.rule,
            lr=self.lr,
            weight_bound=self.weight_bound,
            batch=self.batch,
            max_chunk=self.max_chunk,
            kernel=self.kernel,
            metabolism=metabolism if metabolism is not None else MetabolismConfig(),
        )


@dataclass(frozen=True)
class SnapshotConfig:
    every_seconds: float = 300.0  # checkpoint at least this often (0 = not on a timer)
    every_bytes: int = 0  # and after this many bytes learned (0 = off)
    keep: int = 3  # checkpoints kept per stream (older ones deleted)

    def __post_init__(self) -> None:
        _require(self.every_seconds >= 0, f"every_seconds must be >= 0 (0 = off), got {self.every_seconds}")
        _require(self.every_bytes >= 0, f"every_bytes must be >= 0 (0 = off), got {self.every_bytes}")
        _require(self.keep >= 1, f"keep must be >= 1, got {self.keep}")


FINITE_SOURCES = ("file", "stdin", "simulate")  # sources that can wait: "auto" queues block for them


@dataclass(frozen=True)
class QueueConfig:
    # Bytes queued between the source and the learner at most. Default: 1 MiB for live feeds
    # (drop_oldest: absorbs bursts) and 64 KiB under block (the source waits anyway; a small
    # queue keeps shutdown's drain short — a file resumes from its saved offset).
    max_bytes: int | None = None
    policy: Literal["auto", "block", "drop_oldest"] = "auto"  # auto: block for file/stdin/simulate, drop_oldest for live feeds

    def __post_init__(self) -> None:
        _require(self.max_bytes is None or self.max_bytes >= 1024, f"max_bytes must be >= 1024, got {self.max_bytes}")
        _require_choice(self.policy, ("auto", "block", "drop_oldest"), "policy")

    def resolved_max_bytes(self, source_type: str) -> int:
        """
        >>> QueueConfig().resolved_max_bytes("file"), QueueConfig().resolved_max_bytes("mqtt")
        (65536, 1048576)
        """
        if self.max_bytes is not None:
            return self.max_bytes
        return 1 << 16 if self.resolved_policy(source_type) == "block" else 1 << 20

    def resolved_policy(self, source_type: str) -> str:
        """``block`` or ``drop_oldest``: what ``auto`` means for this source type.

        >>> QueueConfig().resolved_policy("file"), QueueConfig().resolved_policy("serial")
        ('block', 'drop_oldest')
        """
        if self.policy != "auto":
            return self.policy
        return "block" if source_type in FINITE_SOURCES else "drop_oldest"


@dataclass(frozen=True)
class SourceConfig:
    type: str  # adapter type name (adapters.registry.SOURCES)
    options: Any  # that adapter's Options instance (YAML: the other keys of ``source:``, flat)


@dataclass(frozen=True)
class SinkConfig:
    type: str  # adapter type name (adapters.registry.SINKS)
    options: Any  # that adapter's Options instance


@dataclass(frozen=True, kw_only=True)
class StreamDefaults:
    """The ``defaults:`` section: merged under every stream (a stream's own keys win)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    metabolism: MetabolismConfig = field(default_factory=_lazy_default("somad.metabolism:MetabolismConfig"))
    scoring: ScoringConfig = field(default_factory=_lazy_default("somad.scoring:ScoringConfig"))
    alerts: AlertConfig = field(default_factory=_lazy_default("somad.scoring:AlertConfig"))
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    sinks: tuple[SinkConfig, ...] = ()  # used by streams that have no ``sinks:`` of their own


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    name: str  # [A-Za-z0-9_.-]{1,64}, unique: names the checkpoints, metrics label and topics
    source: SourceConfig
    framing: FramingConfig = field(default_factory=_lazy_default("somad.framing:FramingConfig"))
    model: ModelConfig = field(default_factory=ModelConfig)
    metabolism: MetabolismConfig = field(default_factory=_lazy_default("somad.metabolism:MetabolismConfig"))
    scoring: ScoringConfig = field(default_factory=_lazy_default("somad.scoring:ScoringConfig"))
    alerts: AlertConfig = field(default_factory=_lazy_default("somad.scoring:AlertConfig"))
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    split_by_key: bool = False  # one model per Chunk.key (MQTT topic, TCP peer) instead of one merged model
    max_substreams: int = 32  # keys beyond this many share the merged model (bounded memory)
    sinks: tuple[SinkConfig, ...] = ()

    def __post_init__(self) -> None:
        _require_name(self.name, "name")
        _require(self.max_substreams >= 1, f"max_substreams must be >= 1, got {self.max_substreams}")

    @property
    def queue_policy(self) -> str:
        """The queue's policy with ``auto`` resolved for this stream's source."""
        return self.queue.resolved_policy(self.source.type)


@dataclass(frozen=True, kw_only=True)
class Config:
    device: str = field(default_factory=default_device)  # {device} in MQTT topics; defaults to the host name
    state_dir: str = "/var/lib/somad"  # checkpoints, offsets, accepted remote config; unset: $STATE_DIRECTORY if set
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    shutdown_timeout: float = 10.0  # seconds to drain and snapshot on SIGTERM before giving up
    on_bad_checkpoint: Literal["fresh", "exit"] = "fresh"  # fresh: start a new model beside it; exit: refuse to start
    defaults: StreamDefaults = field(default_factory=StreamDefaults)
    remote: RemoteConfig | None = None  # config documents from a fleet (MQTT and/or HTTP); None: local file only
    watch_config: bool = False  # reload when the config file changes (its mtime, size and inode, checked every 2 s), as on SIGHUP
    streams: tuple[StreamConfig, ...]  # at least one

    def __post_init__(self) -> None:
        _require_name(self.device, "device")
        _require(bool(self.state_dir), "state_dir: must not be empty")
        _require(self.shutdown_timeout > 0, f"shutdown_timeout must be > 0, got {self.shutdown_timeout}")
        _require_choice(self.on_bad_checkpoint, ("fresh", "exit"), "on_bad_checkpoint")
        _require(len(self.streams) >= 1, "streams: at least one stream is needed")
        names = [s.name for s in self.streams]
        _require(len(set(names)) == len(names), f"streams: names must be unique, got {names}")

    def stream(self, name: str) -> StreamConfig:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(f"no stream named {name!r} (streams: {', '.join(s.name for s in self.streams)})")


@dataclass(frozen=True)
class StreamChanges:
    """What a reload has to do, stream by stream (names)."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]  # same name, different settings: restart that stream only
    unchanged: tuple[str, ...]  # keep model, traces and connections untouched


def diff_streams(old: Config, new: Config) -> StreamChanges:
    """Compare two configs stream by stream (by name; order does not matter).

    >>> from dataclasses import replace
    >>> a = Config(streams=(StreamConfig(name="x", source=SourceConfig("stdin", None)),))
    >>> b = replace(a, streams=(replace(a.streams[0], split_by_key=True),))
    >>> diff_streams(a, b).changed, diff_streams(a, a).unchanged
    (('x',), ('x',))
    """
    before = {s.name: s for s in old.streams}
    after = {s.name: s for s in new.streams}
    return StreamChanges(
        added=tuple(n for n in after if n not in before),
        removed=tuple(n for n in before if n not in after),
        changed=tuple(n for n in after if n in before and after[n] != before[n]),
        unchanged=tuple(n for n in after if n in before and after[n] == before[n]),
    )


def config_version(text: str) -> str:
    """The version of a config document: the first 16 hex digits of its SHA-256.

    >>> config_version("a")
    'ca978112ca1bbdca'
    """
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- where section classes come from


def _import(target: str | type) -> type:
    """``"module:Class"`` -> the class (a class passes through)."""
    if isinstance(target, type):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Catalog:
    """Where the loader finds the classes it builds (imported on first use).

    Values are ``"module:Class"`` strings or classes; for adapters, the adapter class (its
    ``Options`` is used) or the ``Options`` dataclass itself. Tests pass their own catalog.
    """

    sections: Mapping[str, str | type]  # framing, metabolism, scoring, alerts -> section dataclass
    sources: Mapping[str, str | type]  # source type name -> adapter class
    sinks: Mapping[str, str | type]  # sink type name -> adapter class


SECTIONS = {
    "framing": "somad.framing:FramingConfig",
    "metabolism": "somad.metabolism:MetabolismConfig",
    "scoring": "somad.scoring:ScoringConfig",
    "alerts": "somad.scoring:AlertConfig",
}


def default_catalog() -> Catalog:
    """The real sections and the adapters of ``adapters.registry``."""
    from adapters import registry

    return Catalog(sections=SECTIONS, sources=registry.SOURCES, sinks=registry.SINKS)


# --------------------------------------------------------------------------- the loader's state


class _Invalid:
    """Marker for "this value had problems" (already reported)."""

    def __repr__(self) -> str:
        return "<invalid>"


INVALID = _Invalid()


class _EnvText(str):
    """A string that came out of ``${...}`` substitution: may be read as a number or boolean."""


class _Rejected(Exception):
    """The YAML document cannot be taken any further (the reason is already a problem)."""


@dataclass
class _Context:
    catalog: Catalog
    environ: Mapping[str, str]
    device: str = ""  # the document's device name, handed to adapters that have a ``device`` option
    fallback_device: str | None = None  # the device name when the document names none (None: the host name)
    problems: list[Problem] = field(default_factory=list)
    marks: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (line, column) of its value in the YAML
    key_marks: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (line, column) of its key
    classes: dict[str, tuple[type | None, str]] = field(default_factory=dict)  # catalog entry -> (class, why not)
    reported: set[str] = field(default_factory=set)  # catalog entries whose absence this context reported

    def problem(self, path: str, message: str, at_key: bool = False) -> None:
        """Record a problem, located at the path's value (or at its key, for problems with the key)."""
        line, column = self.key_marks[path] if at_key and path in self.key_marks else self.locate(path)
        self.problems.append(Problem(path, message, line, column))

    def locate(self, path: str) -> tuple[int | None, int | None]:
        """The YAML position of ``path``, or of its nearest ancestor present in the document."""
        while path:
            if path in self.marks:
                return self.marks[path]
            path = _parent(path)
        return (None, None)

    def scratch(self) -> _Context:
        """A context whose problems are thrown away (to try a value without reporting)."""
        return _Context(self.catalog, self.environ, self.device, self.fallback_device, [], self.marks, self.key_marks, self.classes)

    def resolve(self, kind: str, key: str, target: str | type, path: str) -> type | None:
        """A catalog class, or None after reporting (once per context) why it is unavailable."""
        cache_key = f"{kind}:{key}"
        if cache_key not in self.classes:
            self.classes[cache_key] = _resolve(kind, key, target)
        cls, why = self.classes[cache_key]
        if cls is None and cache_key not in self.reported:
            self.reported.add(cache_key)
            self.problem(path, why)
        return cls


def _resolve(kind: str, key: str, target: str | type) -> tuple[type | None, str]:
    try:
        cls = _import(target)
        cls = getattr(cls, "Options", cls) if kind != "section" else cls
        if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
            raise TypeError(f"{cls!r} is not a dataclass")
        return cls, ""
    except Exception as exc:  # noqa: BLE001 - ImportError, a missing dependency, a bug in the module: all "unavailable"
        what = f"the {key!r} {kind}" if kind != "section" else f"the {key!r} section ({target})"
        return None, f"{what} is not available here: {type(exc).__name__}: {exc}"


def _parent(path: str) -> str:
    """``streams[2].source.port`` -> ``streams[2].source`` -> ``streams[2]`` -> ``streams`` -> ``""``."""
    match = re.search(r"(\.[^.\[\]]*|\[\d+\])$", path)
    return path[: match.start()] if match else ""


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _describe(value: Any) -> str:
    """A value as an error message shows it (YAML spelling for null and booleans)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, (set, frozenset)):
        return "a set"
    if isinstance(value, bytes):
        return "binary data"
    if hasattr(value, "isoformat"):
        return f"a date ({value.isoformat()})"
    text = repr(str(value) if isinstance(value, _EnvText) else value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- YAML


def _read_yaml(text: str, ctx: _Context) -> Any:
    """Parse one YAML document, recording each path's position; raise _Rejected on fatal problems."""
    if len(text) > MAX_CONFIG_BYTES:
        ctx.problem("", f"the configuration is {len(text)} characters, more than the {MAX_CONFIG_BYTES} allowed")
        raise _Rejected
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            ctx.problem("", "the configuration is empty (expected a mapping with at least 'streams')")
            raise _Rejected
        _inspect_nodes(node, ctx)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f"{exc.context}: " if exc.context and exc.problem and not exc.context.startswith("while") else ""
        ctx.problem("", f"YAML syntax error{where}: {context}{exc.problem or exc.context}{_flow_hint(text, mark)}")
        raise _Rejected from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        ctx.problem("", f"YAML does not allow the character {exc.character:#06x} (line {line}, column {column}): {exc.reason}")
        raise _Rejected from None
    except RecursionError:
        ctx.problem("", f"YAML nested too deeply (more than {MAX_DEPTH} levels)")
        raise _Rejected from None
    except _Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - YAMLError without a mark, a bad timestamp (ValueError), ...
        ctx.problem("", f"YAML cannot be read: {type(exc).__name__}: {exc}")
        raise _Rejected from None
    finally:
        if loader is not None:
            loader.dispose()


def _flow_hint(text: str, mark: Any) -> str:
    """``{port: ${PORT}}`` is a YAML error (braces inside a flow mapping): say how to write it."""
    lines = text.splitlines()
    line = lines[mark.line] if mark and mark.line < len(lines) else ""
    return ' (inside [...] or {...}, quote values that hold ${...}: "${NAME}")' if "${" in line else ""


MERGE_TAG = "tag:yaml.org,2002:merge"


def _inspect_nodes(root: yaml.Node, ctx: _Context) -> None:
    """Record positions; refuse duplicate keys, cycles, too deep or too large (after aliases) documents."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def walk(node: yaml.Node, path: str | None, depth: int) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            ctx.problem(path or "", "a YAML alias refers to the node that contains it (a cycle)")
            raise _Rejected
        if depth > MAX_DEPTH:
            ctx.problem(path or "", f"YAML nested too deeply (more than {MAX_DEPTH} levels)")
            raise _Rejected
        if path is not None:
            ctx.marks.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        active.add(id(node))
        size = 1
        if isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                size += walk(child, None if path is None else f"{path}[{i}]", depth + 1)
        elif isinstance(node, yaml.MappingNode):
            size += _walk_mapping(node, path, depth, walk)
        active.discard(id(node))
        sizes[id(node)] = size
        if size > MAX_NODES:
            ctx.problem(path or "", f"the document expands to more than {MAX_NODES} YAML nodes (through aliases?)")
            raise _Rejected
        return size

    def _walk_mapping(node: yaml.MappingNode, path: str | None, depth: int, walk) -> int:
        size = 0
        first_line: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            size += walk(key, None, depth + 1)
            if key.tag == MERGE_TAG:  # "<<: *base": the merged keys belong to this mapping
                size += walk(value, path, depth + 1)
                continue
            child = _join(path, key.value) if path is not None and isinstance(key, yaml.ScalarNode) else None
            if isinstance(key, yaml.ScalarNode):
                if child is not None:
                    ctx.key_marks.setdefault(child, (key.start_mark.line + 1, key.start_mark.column + 1))
                ident = (key.tag, key.value)
                if ident in first_line:
                    ctx.problems.append(
                        Problem(child or "", f"duplicate key {key.value!r} (first at line {first_line[ident]})", key.start_mark.line + 1, key.start_mark.column + 1)
                    )
                first_line.setdefault(ident, key.start_mark.line + 1)
            size += walk(value, child, depth + 1)
        return size

    walk(root, "", 0)


# --------------------------------------------------------------------------- ${ENV} substitution

_REFERENCE = re.compile(r"\$\$|\$\{([^}]*)\}")
_NAME_AND_DEFAULT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


def substitute(text: str, environ: Mapping[str, str]) -> str:
    """``${NAME}``, ``${NAME:-default}`` (default when unset or empty) and ``$$`` (a literal ``$``).

    >>> substitute("${HOST:-localhost}:${PORT}", {"PORT": "1883"})
    'localhost:1883'
    >>> substitute("cost: $$5", {})
    'cost: $5'
    >>> substitute("${NOPE}", {})
    Traceback (most recent call last):
    ...
    ValueError: environment variable 'NOPE' is not set (write ${NOPE:-default} for a default)
    """

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        inner = match.group(1)
        parsed = _NAME_AND_DEFAULT.fullmatch(inner)
        if not parsed:
            raise ValueError(f"bad reference ${{{inner}}}: expected ${{NAME}} or ${{NAME:-default}}")
        name, default = parsed.group(1), parsed.group(2)
        if default is not None and "${" in default:
            raise ValueError(f"bad reference ${{{inner}}}: references inside a default are not supported")
        value = environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise ValueError(f"environment variable {name!r} is not set (write ${{{name}:-default}} for a default)")
            return default
        return value

    return _REFERENCE.sub(replace, text)


def _substitute_tree(value: Any, path: str, ctx: _Context) -> Any:
    """Substitute in every string value (never in keys); a string with a reference becomes _EnvText."""
    if isinstance(value, dict):
        return {k: _substitute_tree(v, _join(path, k), ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_tree(v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
    if isinstance(value, str) and "$" in value:
        try:
            result = substitute(value, ctx.environ)
        except ValueError as exc:
            ctx.problem(path, str(exc))
            return INVALID
        return _EnvText(result) if "${" in value else result
    return value


# --------------------------------------------------------------------------- values by type hint


def _convert(tp: Any, value: Any, path: str, ctx: _Context) -> Any:
    """``value`` (from YAML) as type ``tp``, or INVALID after reporting at ``path``."""
    if value is INVALID:
        return INVALID
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return _plain(value)
    if origin is Literal:
        return _convert_choice(typing.get_args(tp), value, path, ctx)
    if origin is typing.Union or origin is types.UnionType:
        return _convert_union(typing.get_args(tp), value, path, ctx)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return build_dataclass(tp, {} if value is None else value, path, ctx)
    if tp in (bool, int, float):
        return _convert_number(tp, value, path, ctx)
    if tp is str:
        return _convert_str(value, path, ctx)
    if tp is bytes:
        return _convert_bytes(value, path, ctx)
    if tp is type(None):
        return None if value is None else _expected("null", value, path, ctx)
    if origin in (tuple, list, collections.abc.Sequence) or tp in (tuple, list):
        return _convert_sequence(tp, value, path, ctx)
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        return _convert_mapping(tp, value, path, ctx)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _convert_enum(tp, value, path, ctx)
    if isinstance(tp, type) and issubclass(tp, PurePath):
        text = _convert_str(value, path, ctx)
        return INVALID if text is INVALID else tp(text)
    ctx.problem(path, f"cannot read a value of type {tp!r} (a schema bug: tell the developers)")
    return INVALID


def _expected(what: str, value: Any, path: str, ctx: _Context, hint: str = "") -> _Invalid:
    if value is not INVALID:  # INVALID: already reported where it went wrong
        ctx.problem(path, f"expected {what}, got {_describe(value)}{hint}")
    return INVALID


def _plain(value: Any) -> Any:
    """Strip the _EnvText marker from a free-form value (so it dumps and pickles as a str)."""
    if isinstance(value, _EnvText):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return "one of " + _quoted(typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if typing.get_origin(tp) in (tuple, list, collections.abc.Sequence) or tp in (tuple, list):
        return "a list"
    if typing.get_origin(tp) in (dict, collections.abc.Mapping) or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", repr(tp))


def _from_env_text(value: Any) -> Any:
    """A substituted string read as YAML reads a scalar ("8080" -> 8080, "true" -> True)."""
    if not isinstance(value, _EnvText):
        return value
    try:
        parsed = yaml.safe_load(value)
    except Exception:  # noqa: BLE001 - not YAML ("[", "2024-13-45"): it stays text, and the type check says so
        return value
    return parsed if isinstance(parsed, (bool, int, float)) else value


def _convert_number(tp: type, value: Any, path: str, ctx: _Context) -> Any:
    raw, value = value, _from_env_text(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        return _expected("bool (true or false)", raw, path, ctx)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = " (write numbers without quotes)" if isinstance(value, str) and re.fullmatch(r"\s*[-+]?[\d.eE_]+\s*", value) else ""
        return _expected(tp.__name__, raw, path, ctx, hint)
    if isinstance(value, float) and not math.isfinite(value):
        return _expected(f"a finite {tp.__name__}", raw, path, ctx)
    if tp is int:
        if isinstance(value, float):
            if not value.is_integer():
                return _expected("int", raw, path, ctx)
            return int(value)
        return value
    try:
        return float(value)
    except OverflowError:
        return _expected("a float in range", raw, path, ctx)


def _convert_str(value: Any, path: str, ctx: _Context) -> Any:
    if isinstance(value, str):
        return str(value)
    hint = ""
    if isinstance(value, bool):
        hint = " (YAML reads yes/no/on/off/true/false as booleans: quote the text)"
    elif isinstance(value, (int, float)) or hasattr(value, "isoformat"):
        hint = " (quote it to make it text)"
    return _expected("str", value, path, ctx, hint)


def _convert_bytes(value: Any, path: str, ctx: _Context) -> Any:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        text = str(value)
        # characters below 256 are bytes as written ("\xff" is the byte 0xff); anything else is UTF-8
        return text.encode("latin-1") if all(ord(c) < 256 for c in text) else text.encode("utf-8")
    return _expected("bytes (a string)", value, path, ctx)


def _convert_choice(choices: tuple, value: Any, path: str, ctx: _Context) -> Any:
    readings = [_plain(value), _from_env_text(value)]  # "1" from ${VAR} may mean the text or the number
    for choice in choices:
        if any(r == choice and type(r) is type(choice) for r in readings):
            return choice
    return _expected(f"one of {_quoted(choices)}", value, path, ctx, _did_you_mean(value, choices))


def _convert_union(arms: tuple, value: Any, path: str, ctx: _Context) -> Any:
    nullable = type(None) in arms
    others = [a for a in arms if a is not type(None)]
    if value is None and nullable:
        return None
    if nullable and isinstance(value, _EnvText) and not value.strip() and str not in others:
        return None  # ${VAR:-} for an optional number: unset means "none"
    for arm in others:
        trial = ctx.scratch()
        result = _convert(arm, value, path, trial)
        if result is not INVALID:
            return result
    if len(others) == 1 and (dataclasses.is_dataclass(others[0]) or typing.get_origin(others[0]) in (tuple, list, dict)):
        return _convert(others[0], value, path, ctx)  # report the inner problems, which say more
    return _expected(" or ".join(_type_name(a) for a in arms), value, path, ctx)


def _convert_sequence(tp: Any, value: Any, path: str, ctx: _Context) -> Any:
    origin = typing.get_origin(tp) or tp
    args = typing.get_args(tp)
    if isinstance(value, str) and args and args[-1] is Ellipsis and args[0] is str:
        value = [value]  # a list of strings may be written as one string: topics: "sensors/#"
    if not isinstance(value, (list, tuple)):
        return _expected("a list", value, path, ctx)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            return _expected(f"a list of {len(args)} items", value, path, ctx, f" of {len(value)}")
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(value)
    items = [_convert(t, v, f"{path}[{i}]", ctx) for i, (t, v) in enumerate(zip(item_types, value))]
    if any(item is INVALID for item in items):
        return INVALID
    return list(items) if origin is list else tuple(items)


def _convert_mapping(tp: Any, value: Any, path: str, ctx: _Context) -> Any:
    if not isinstance(value, dict):
        return _expected("a mapping", value, path, ctx)
    key_type, value_type = (typing.get_args(tp) + (Any, Any))[:2]
    out = {}
    for k, v in value.items():
        key = _convert(key_type, k, path, ctx)
        out[key] = _convert(value_type, v, _join(path, k), ctx)
        if key is INVALID or out[key] is INVALID:
            out[INVALID] = INVALID
    return INVALID if INVALID in out else out


def _convert_enum(tp: type[enum.Enum], value: Any, path: str, ctx: _Context) -> Any:
    for member in tp:
        if _from_env_text(value) == member.value or value == member.name:
            return member
    names = [m.value for m in tp]
    return _expected(f"one of {_quoted(names)}", value, path, ctx, _did_you_mean(value, [str(n) for n in names]))


# --------------------------------------------------------------------------- dataclasses


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Type hints of a dataclass's fields; a hint that cannot be evaluated maps to None."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - names only imported under TYPE_CHECKING: evaluate field by field
        namespace = dict(vars(sys.modules[cls.__module__]))
        hints = {}
        for f in dataclasses.fields(cls):
            try:
                hints[f.name] = eval(f.type, namespace) if isinstance(f.type, str) else f.type  # a type hint, as get_type_hints evaluates it
            except Exception:  # noqa: BLE001 - reported as a schema bug if the key is ever given
                hints[f.name] = None
        return hints


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


Converter = Callable[[Any, str, _Context], Any]


def build_dataclass(
    cls: type,
    data: Any,
    path: str,
    ctx: _Context,
    converters: Mapping[str, Converter] | None = None,
    misplaced: Callable[[str], str | None] | None = None,
) -> Any:
    """Build ``cls`` from a YAML mapping: unknown keys, missing keys, wrong types, then __post_init__.

    ``converters`` overrides how given fields are read; ``misplaced(key)`` may explain where an
    unknown key belongs. Returns the instance, or INVALID once every problem below is reported.
    """
    if not isinstance(data, dict):
        return _expected("a mapping", data, path, ctx)
    known = _init_fields(cls)
    data, ok = _read_secret_files(known, data, path, ctx)
    converters = converters or {}
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if not isinstance(key, str) or key not in known:
            _unknown_key(key, known, path, ctx, misplaced)
            ok = False
            continue
        convert = converters.get(key) or functools.partial(_convert, _field_types(cls).get(key))
        value = convert(raw, _join(path, key), ctx)
        if value is INVALID:
            ok = False
        else:
            values[key] = value
    for name, f in known.items():
        if _is_required(f) and name not in data:
            ctx.problem(_join(path, name), "required key missing")
            ok = False
    return construct(cls, values, path, ctx) if ok else INVALID


def _unknown_key(key: Any, known: Mapping[str, Any], path: str, ctx: _Context, misplaced) -> None:
    if not isinstance(key, str):
        ctx.problem(path, f"keys must be text, got {_describe(key)}")
        return
    hint = _did_you_mean(key, list(known))
    if not hint and misplaced:
        where = misplaced(key)
        hint = f" (it belongs under {where})" if where else ""
    ctx.problem(_join(path, key), f"unknown key{hint}; known here: {', '.join(known)}", at_key=True)


def construct(cls: type, values: Mapping[str, Any], path: str, ctx: _Context) -> Any:
    """``cls(**values)``; a ValueError/TypeError from __post_init__ becomes a problem at the field it names."""
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        field_name, message = _blame(cls, str(exc))
        ctx.problem(_join(path, field_name) if field_name else path, message)
    except Exception as exc:  # noqa: BLE001 - a bug in the section's own checks: still a clean config error
        ctx.problem(path, f"{cls.__name__} refused these settings: {type(exc).__name__}: {exc}")
    return INVALID


def _blame(cls: type, message: str) -> tuple[str | None, str]:
    """Which field a __post_init__ message is about: its leading word (``"lr must be..."``,
    ``"delimiter: required..."``, ``"scoring.budget must..."``), else the only field it names."""
    names = list(_init_fields(cls))
    lead = re.match(r"(?:[A-Za-z_]+\.)?([A-Za-z_][A-Za-z0-9_]*)(:?)\s", message)
    if lead and lead.group(1) in names:
        return lead.group(1), message[lead.end() :]  # the path names the field: do not say it twice
    mentioned = [n for n in names if re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", message)]
    return (mentioned[0], message) if len(mentioned) == 1 else (None, message)


def _read_secret_files(known: Mapping[str, Any], data: dict, path: str, ctx: _Context) -> tuple[dict, bool]:
    """``<secret>_file: PATH``, read at load time (a missing or empty file is a config error).

    If the section has a ``<secret>_file`` field, it keeps the path (and reads the file again
    when it starts, picking up a rotated secret); if it only has ``<secret>``, the key is the
    loader's: the file's first line becomes ``<secret>``. Returns the mapping to build from
    and whether every secret file could be read."""
    out = dict(data)
    ok = True
    for secret in SECRET_FIELDS:
        key = f"{secret}_file"
        if key not in data or (secret not in known and key not in known):
            continue  # not a secret this section has: left to the unknown-key check
        file_path = data[key]
        if key not in known:
            del out[key]  # a loader-only key: the section holds the secret itself
        if file_path is None or file_path == "":  # "" is how some Options say "no file"
            continue
        if not isinstance(file_path, str):
            _expected("str (a file path)", file_path, _join(path, key), ctx)
            ok = False
        elif data.get(secret) not in (None, ""):
            ctx.problem(_join(path, key), f"give {secret} or {key}, not both")
            ok = False
        else:
            content = _read_secret(str(file_path), _join(path, key), ctx)
            ok = ok and content is not INVALID
            if content is not INVALID and key not in known:
                out[secret] = content
    return out, ok


def _read_secret(file_path: str, path: str, ctx: _Context) -> Any:
    try:
        with open(os.path.expanduser(file_path), "rb") as f:
            raw = f.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        ctx.problem(path, f"cannot read {file_path!r}: {exc.strerror or exc}")
        return INVALID
    if len(raw) > MAX_SECRET_FILE_BYTES:
        ctx.problem(path, f"{file_path!r} is larger than {MAX_SECRET_FILE_BYTES} bytes: not a secret file?")
        return INVALID
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        ctx.problem(path, f"{file_path!r} is not UTF-8 text")
        return INVALID
    text = text.splitlines()[0] if text else ""  # the first line: editors add a newline that is not the secret
    if not text:
        ctx.problem(path, f"{file_path!r} is empty (the secret is its first line)")
        return INVALID
    return text


# --------------------------------------------------------------------------- streams

SOURCE_KEYS = ("port", "baudrate", "bytesize", "parity", "stopbits", "path", "start", "listen", "host", "topics", "qos", "rate", "faults")
STREAM_SECTIONS = ("model", "metabolism", "scoring", "alerts", "snapshot", "queue")  # mergeable from defaults
LOCAL_SECTIONS = {"model": ModelConfig, "snapshot": SnapshotConfig, "queue": QueueConfig}


def _section_class(name: str, path: str, ctx: _Context) -> type | None:
    if name in LOCAL_SECTIONS:
        return LOCAL_SECTIONS[name]
    target = ctx.catalog.sections.get(name)
    if target is None:
        ctx.problem(path, f"no {name!r} section in the catalog (a schema bug)")
        return None
    return ctx.resolve("section", name, target, path)


def _section_converter(name: str) -> Converter:
    def convert(value: Any, path: str, ctx: _Context) -> Any:
        cls = _section_class(name, path, ctx)
        return INVALID if cls is None else build_dataclass(cls, {} if value is None else value, path, ctx)

    return convert


def _adapter_converter(kind: str, wrapper: type) -> Converter:
    """``{type: NAME, ...options}`` -> SourceConfig / SinkConfig with that adapter's Options."""

    def convert(value: Any, path: str, ctx: _Context) -> Any:
        if not isinstance(value, dict):
            return _expected(f"a mapping with 'type' and the {kind}'s options", value, path, ctx)
        table = ctx.catalog.sources if kind == "source" else ctx.catalog.sinks
        type_name = value.get("type")
        if "type" not in value:
            ctx.problem(_join(path, "type"), f"required key missing (one of: {', '.join(sorted(table))})")
            return INVALID
        type_name = _from_env_text(type_name)
        if not isinstance(type_name, str) or type_name not in table:
            hint = _did_you_mean(type_name, table)
            ctx.problem(_join(path, "type"), f"unknown {kind} type {_describe(type_name)}{hint} (known: {', '.join(sorted(table))})")
            return INVALID
        options_cls = ctx.resolve(kind, type_name, table[type_name], _join(path, "type"))
        if options_cls is None:
            return INVALID
        given = {k: v for k, v in value.items() if k != "type"}
        if "device" in _init_fields(options_cls) and "device" not in given and ctx.device:
            given["device"] = ctx.device  # the adapter names this device in client ids and topics
        options = build_dataclass(options_cls, given, path, ctx)
        return INVALID if options is INVALID else wrapper(str(type_name), options)

    return convert


def _sinks_converter(value: Any, path: str, ctx: _Context) -> Any:
    if value is None:
        return ()
    if not isinstance(value, list):
        return _expected("a list of sinks ({type: ..., ...})", value, path, ctx)
    convert = _adapter_converter("sink", SinkConfig)
    sinks = [convert(v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
    return INVALID if any(s is INVALID for s in sinks) else tuple(sinks)


def _name_converter(what: str) -> Converter:
    def convert(value: Any, path: str, ctx: _Context) -> Any:
        text = _convert_str(value, path, ctx)
        if text is INVALID:
            return INVALID
        try:
            _require_name(text, what)
        except ValueError as exc:
            ctx.problem(path, str(exc).removeprefix(f"{what}: "))
            return INVALID
        return text

    return convert


def _merge_under(defaults: Any, own: Any) -> Any:
    """Deep-merge mappings, ``own`` winning; anything else in ``own`` replaces the default."""
    if isinstance(defaults, dict) and isinstance(own, dict):
        merged = dict(defaults)
        for key, value in own.items():
            merged[key] = _merge_under(defaults[key], value) if key in defaults else value
        return merged
    return own


def _with_defaults(stream: dict, defaults: dict) -> dict:
    merged = dict(stream)
    for key, value in defaults.items():
        if key == "sinks":
            merged.setdefault("sinks", value)  # a stream's own list replaces the defaults' list
        elif key in merged and merged[key] is not None:
            merged[key] = _merge_under(value, merged[key])
        else:
            merged[key] = value
    return merged


def _align_scoring_base(stream: dict, path: str, ctx: _Context) -> None:
    """The scorer names timescales r^k with the model's r: take it from the model unless given."""
    cls = _section_class("scoring", path, ctx.scratch())
    if cls is None or "base" not in _init_fields(cls):
        return
    model = build_dataclass(ModelConfig, stream.get("model") or {}, "", ctx.scratch())
    scoring = stream.get("scoring") or {}
    if model is INVALID or not isinstance(scoring, dict):
        return
    base = model.soma_config().base
    given = _from_env_text(scoring.get("base"))
    if "base" not in scoring:
        stream["scoring"] = {**scoring, "base": base}
    elif isinstance(given, (int, float)) and not isinstance(given, bool) and not math.isclose(given, base):
        ctx.problem(_join(path, "scoring.base"), f"{given} differs from the model's base {base} (leave it out to follow the model)")


def _stream_misplaced(ctx: _Context) -> Callable[[str], str | None]:
    """For an unknown stream key: the section whose field it is (``budget`` -> ``metabolism:``)."""

    def where(key: str) -> str | None:
        for name in ("framing", *STREAM_SECTIONS):
            cls = _section_class(name, "", ctx.scratch())
            if cls is not None and key in _init_fields(cls):
                return f"{name}:"
        return "source:" if key in SOURCE_KEYS else None

    return where


@dataclass
class _Endpoints:
    """What one stream reads and writes, kept even when other parts of the stream are invalid
    (so that two streams on one port are reported together with everything else)."""

    index: int
    name: str | None  # None when the stream's name is missing or not text
    source: Any = INVALID
    sinks: Any = INVALID

    @property
    def label(self) -> str:
        return repr(self.name) if self.name is not None else f"#{self.index}"


def _recording(convert: Converter, endpoints: _Endpoints, attribute: str) -> Converter:
    def record(value: Any, path: str, ctx: _Context) -> Any:
        result = convert(value, path, ctx)
        setattr(endpoints, attribute, result)
        return result

    return record


def _build_stream(value: Any, path: str, ctx: _Context, defaults: dict, endpoints: _Endpoints) -> Any:
    if not isinstance(value, dict):
        return _expected("a mapping (a stream with at least name and source)", value, path, ctx)
    stream = _with_defaults(value, defaults)
    for section in ("framing", *STREAM_SECTIONS):
        stream.setdefault(section, {})  # built through the catalog even when left out (defaults checked too)
    _align_scoring_base(stream, path, ctx)
    converters = {
        "name": _name_converter("name"),
        "source": _recording(_adapter_converter("source", SourceConfig), endpoints, "source"),
        "sinks": _recording(_sinks_converter, endpoints, "sinks"),
        "split_by_key": functools.partial(_convert, bool),
        "max_substreams": functools.partial(_convert, int),
        **{name: _section_converter(name) for name in ("framing", *STREAM_SECTIONS)},
    }
    return build_dataclass(StreamConfig, stream, path, ctx, converters, _stream_misplaced(ctx))


def _build_defaults(value: Any, path: str, ctx: _Context) -> tuple[Any, dict]:
    """The typed ``defaults`` and the raw mapping to merge under streams ({} if it had problems)."""
    if value is None:
        value = {}
    if value is INVALID:
        return INVALID, {}
    before = len(ctx.problems)
    converters = {"sinks": _sinks_converter, **{name: _section_converter(name) for name in STREAM_SECTIONS}}
    filled = {name: {} for name in STREAM_SECTIONS} | value if isinstance(value, dict) else value
    typed = build_dataclass(StreamDefaults, filled, path, ctx, converters)
    clean = typed is not INVALID and len(ctx.problems) == before
    return typed, (value if clean else {})


def _build_streams(value: Any, path: str, ctx: _Context, defaults: dict) -> Any:
    if value is None or (isinstance(value, list) and not value):
        ctx.problem(path, "at least one stream is needed")
        return INVALID
    if not isinstance(value, list):
        return _expected("a list of streams", value, path, ctx)
    endpoints = [_Endpoints(i, _raw_name(v)) for i, v in enumerate(value)]
    streams = [_build_stream(v, f"{path}[{i}]", ctx, defaults, e) for i, (v, e) in enumerate(zip(value, endpoints))]
    _check_unique_names(value, path, ctx)
    _check_claims(endpoints, path, ctx)
    _check_feedback(endpoints, path, ctx)
    return INVALID if INVALID in streams else tuple(streams)


def _raw_name(raw: Any) -> str | None:
    name = raw.get("name") if isinstance(raw, dict) else None
    return str(name) if isinstance(name, str) else None


def _check_unique_names(raw: list, path: str, ctx: _Context) -> None:
    first: dict[str, int] = {}
    for i, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            continue
        if name in first:
            ctx.problem(f"{path}[{i}].name", f"duplicate stream name {name!r} (also {path}[{first[name]}])")
        first.setdefault(name, i)


# --------------------------------------------------------------------------- one reader per resource

# source type -> (option naming the resource, kind of resource). These option names are part
# of DESIGN.md §4's contract for the adapters.
CLAIMED_BY = {
    "serial": ("port", "serial port"),
    "file": ("path", "file"),
    "tcp": ("listen", "tcp"),
    "udp": ("listen", "udp"),
    "unix": ("listen", "unix socket"),
    "stdin": (None, "stdin"),
}


def _real_path(text: str) -> str:
    return os.path.realpath(os.path.expanduser(text))


def _claim(source: SourceConfig) -> tuple[str, str, str | None] | None:
    """(kind, identity, option) of what a source reads exclusively, if anything."""
    if source.type not in CLAIMED_BY:
        return None
    option, kind = CLAIMED_BY[source.type]
    if option is None:
        return (kind, "-", None)
    value = getattr(source.options, option, None)
    if source.type == "unix" and value is None:
        option, value = "path", getattr(source.options, "path", None)
    if not isinstance(value, str) or not value:
        return None
    if kind in ("tcp", "udp") or value.startswith("@"):  # addresses, and abstract unix sockets, are not files
        return (kind, value, option)
    return (kind, _real_path(value), option)


def _listen_overlap(a: str, b: str) -> bool:
    try:
        (host_a, port_a), (host_b, port_b) = parse_listen(a), parse_listen(b)
    except ValueError:
        return a == b
    if port_a != port_b or port_a == 0:  # port 0: each gets its own free port
        return False
    return host_a == host_b or host_a in WILDCARD_HOSTS or host_b in WILDCARD_HOSTS


def _check_claims(streams: list[_Endpoints], path: str, ctx: _Context) -> None:
    """One reader per serial port, file, listen address, unix socket and stdin."""
    taken: list[tuple[str, str, _Endpoints]] = []
    for stream in streams:
        claim = _claim(stream.source) if stream.source is not INVALID else None
        if claim is None:
            continue
        kind, identity, option = claim
        where = f"{path}[{stream.index}].source" + (f".{option}" if option else "")
        for other_kind, other_identity, other in taken:
            same = _listen_overlap(identity, other_identity) if kind in ("tcp", "udp") else identity == other_identity
            if kind == other_kind and same:
                what = f"{kind} {other_identity!r}" if kind != "stdin" else "stdin"
                ctx.problem(where, f"{what} is already read by stream {other.label} ({path}[{other.index}]): one reader per {kind}")
                break
        taken.append((kind, identity, stream))


def _check_feedback(streams: list[_Endpoints], path: str, ctx: _Context) -> None:
    """A sink writing the file a stream reads would feed the daemon its own output."""
    read = {}
    for s in streams:
        if s.source is not INVALID and s.source.type == "file" and isinstance(getattr(s.source.options, "path", None), str):
            read.setdefault(_real_path(s.source.options.path), s.label)
    for s in streams:
        for j, sink in enumerate(s.sinks if s.sinks is not INVALID else ()):
            target = getattr(sink.options, "path", None)
            if not isinstance(target, str) or not target:
                continue
            written = _real_path(target.replace("{stream}", s.name or ""))  # file sinks fill in {stream}
            if written in read:
                ctx.problem(f"{path}[{s.index}].sinks[{j}].path", f"writes {written!r}, which stream {read[written]} reads (a feedback loop)")


# --------------------------------------------------------------------------- the document


def _build_config(data: Any, ctx: _Context) -> Any:
    if not isinstance(data, dict):
        ctx.problem("", f"expected a mapping at the top level (with at least 'streams'), got {_describe(data)}")
        return INVALID
    device = _from_env_text(data.get("device"))
    fallback = ctx.fallback_device or default_device()
    ctx.device = str(device) if isinstance(device, str) and NAME_PATTERN.fullmatch(device) else fallback
    if "device" not in data and ctx.fallback_device:
        data = {"device": ctx.fallback_device, **data}
    if data.get("state_dir") is None and ctx.environ.get("STATE_DIRECTORY"):
        # systemd's StateDirectory= (and the launchd plist) name the one writable place: use it
        # when the config does not say. Several directories come ':'-separated; the first is ours.
        data = {**data, "state_dir": ctx.environ["STATE_DIRECTORY"].split(":")[0]}
    defaults_typed, defaults_raw = _build_defaults(data.get("defaults"), "defaults", ctx)
    converters = {
        "device": _name_converter("device"),
        "defaults": lambda value, path, ctx: defaults_typed,
        "streams": lambda value, path, ctx: _build_streams(value, path, ctx, defaults_raw),
        "remote": _build_remote,
    }
    return build_dataclass(Config, {**data, "defaults": data.get("defaults")}, "", ctx, converters)


REMOTE_MQTT = "adapters.mqtt_common:MqttConnectionOptions"  # remote.mqtt: the same connection keys as the MQTT adapters


def _build_remote(value: Any, path: str, ctx: _Context) -> Any:
    """``remote:`` with its ``mqtt:`` connection built from the MQTT adapters' options (imported on use)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return _expected("a mapping (remote: {mqtt: {...}, url: ..., secret_file: ...})", value, path, ctx)

    def mqtt(options: Any, mqtt_path: str, ctx: _Context) -> Any:
        if options is None:
            return None
        cls = ctx.resolve("section", "remote.mqtt", REMOTE_MQTT, mqtt_path)
        if cls is None:
            return INVALID
        if isinstance(options, dict) and "device" in _init_fields(cls) and "device" not in options and ctx.device:
            options = {**options, "device": ctx.device}  # client id and topics name this device
        return build_dataclass(cls, options, mqtt_path, ctx)

    return build_dataclass(RemoteConfig, value, path, ctx, {"mqtt": mqtt})


def parse_config(
    text: str,
    origin: str = "<string>",
    *,
    environ: Mapping[str, str] | None = None,
    catalog: Catalog | None = None,
    device: str | None = None,
) -> Config:
    """A ``Config`` from YAML text, or ``ConfigError`` listing every problem found.

    ``environ`` (default ``os.environ``) resolves ``${NAME}``; ``catalog`` (default: the real
    sections and adapters) says which classes the sections are built from; ``device`` is the
    device name for a document that names none (default: the host name; a remote document
    runs under the local file's name).
    """
    ctx = _Context(catalog or default_catalog(), os.environ if environ is None else environ, fallback_device=device)
    config: Any = INVALID
    try:
        data = _read_yaml(text, ctx)
        data = _substitute_tree(data, "", ctx)
        config = _build_config(data, ctx)
    except _Rejected:
        pass
    except RecursionError:
        ctx.problem("", f"the document is nested too deeply (more than {MAX_DEPTH} levels)")
    if ctx.problems or config is INVALID:
        if not ctx.problems:
            ctx.problem("", "the configuration is invalid (no reason was recorded: a loader bug)")
        raise ConfigError(_in_document_order(ctx.problems), origin)
    return config


def _in_document_order(problems: list[Problem]) -> list[Problem]:
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (p.line or 0, p.column or 0))


def load_config(path: str | os.PathLike, *, environ: Mapping[str, str] | None = None, catalog: Catalog | None = None) -> Config:
    """Read and parse a YAML config file (see ``parse_config``)."""
    origin = os.fspath(path)
    try:
        with open(origin, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read {origin!r}: {exc.strerror or exc}")], origin) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([Problem("", f"the file is larger than {MAX_CONFIG_BYTES} bytes")], origin)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem("", f"not UTF-8 text: {exc}")], origin) from None
    return parse_config(text, origin, environ=environ, catalog=catalog)


# --------------------------------------------------------------------------- back to plain data


def is_secret_field(name: str) -> bool:
    """
    >>> is_secret_field("password"), is_secret_field("mqtt_password"), is_secret_field("password_file")
    (True, True, False)
    """
    return name in SECRET_FIELDS or any(name.endswith("_" + s) for s in SECRET_FIELDS)


_URL_PASSWORD = re.compile(r"(?<=://)([^:/@\s]*):([^@/\s]+)@")


def to_plain(value: Any, mask_secrets: bool = True) -> Any:
    """A config (or any part of it) as YAML/JSON-ready data in the YAML's own shape.

    Sources and sinks come back flat (``{type: serial, port: ...}``). With ``mask_secrets``,
    secret fields and passwords inside URLs read ``***``; without, a secret that came from
    ``<secret>_file`` is left out when the file path is kept (so the output parses back).

    >>> to_plain(RemoteConfig(url="https://u:pw@example.com/c", secret="k"))["url"]
    'https://u:***@example.com/c'
    """
    if isinstance(value, (SourceConfig, SinkConfig)):
        return {"type": value.type, **to_plain(value.options, mask_secrets)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _dataclass_to_plain(value, mask_secrets)
    if isinstance(value, (list, tuple)):
        return [to_plain(v, mask_secrets) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v, mask_secrets) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("latin-1")  # the inverse of how the loader reads bytes
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, str):
        return _URL_PASSWORD.sub(rf"\1:{MASK}@", str(value)) if mask_secrets else str(value)
    return value


def _dataclass_to_plain(obj: Any, mask_secrets: bool) -> dict:
    out = {}
    names = _init_fields(type(obj))
    for name in names:
        value = getattr(obj, name)
        if is_secret_field(name) and value not in (None, ""):
            if mask_secrets:
                out[name] = MASK
                continue
            if getattr(obj, f"{name}_file", None):
                continue  # the file is named: it will be read again
        out[name] = to_plain(value, mask_secrets)
    return out


def dump_config(config: Config, mask_secrets: bool = True) -> str:
    """The effective configuration as YAML (parses back to an equal Config when unmasked)."""
    return yaml.safe_dump(to_plain(config, mask_secrets), sort_keys=False, default_flow_style=False, allow_unicode=True)


__all__ = [
    "Catalog",
    "Config",
    "ConfigError",
    "LogConfig",
    "MetricsConfig",
    "ModelConfig",
    "Problem",
    "QueueConfig",
    "RemoteConfig",
    "SinkConfig",
    "SnapshotConfig",
    "SourceConfig",
    "StreamChanges",
    "StreamConfig",
    "StreamDefaults",
    "config_version",
    "default_catalog",
    "diff_streams",
    "dump_config",
    "load_config",
    "parse_config",
    "parse_listen",
    "substitute",
    "to_plain",
]
