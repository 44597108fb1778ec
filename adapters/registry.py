"""Adapters by type name. Modules are imported on first use, so a device that only reads a
serial port never imports the MQTT client.

>>> sorted(SOURCES)
['file', 'mqtt', 'serial', 'simulate', 'stdin', 'tcp', 'udp', 'unix']
>>> source_class("nope")
Traceback (most recent call last):
...
ValueError: unknown source type 'nope' (known: file, mqtt, serial, simulate, stdin, tcp, udp, unix)
"""

from __future__ import annotations

import importlib

# type name -> "module:Class"
SOURCES = {
    "serial": "adapters.serial_source:SerialSource",
    "mqtt": "adapters.mqtt_source:MqttSource",
    "file": "adapters.file_source:FileSource",
    "tcp": "adapters.socket_source:TcpSource",
    "udp": "adapters.socket_source:UdpSource",
    "unix": "adapters.socket_source:UnixSource",
    "stdin": "adapters.stdin_source:StdinSource",
    "simulate": "adapters.simulate:SimulateSource",
}

SINKS = {
    "mqtt": "adapters.mqtt_sink:MqttSink",
    "jsonl": "adapters.file_sink:JsonlSink",
    "csv": "adapters.file_sink:CsvSink",
}


def _load(table: dict, kind: str, type_name: str):
    try:
        target = table[type_name]
    except KeyError:
        raise ValueError(f"unknown {kind} type {type_name!r} (known: {', '.join(sorted(table))})") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def source_class(type_name: str):
    return _load(SOURCES, "source", type_name)


def sink_class(type_name: str):
    return _load(SINKS, "sink", type_name)


def make_source(type_name: str, options: dict | None = None, name: str = ""):
    """Build a source from plain options (the config loader passes a validated Options)."""
    cls = source_class(type_name)
    opts = options if isinstance(options, cls.Options) else cls.Options(**(options or {}))
    return cls(opts, name=name)


def make_sink(type_name: str, options: dict | None = None, name: str = ""):
    cls = sink_class(type_name)
    opts = options if isinstance(options, cls.Options) else cls.Options(**(options or {}))
    return cls(opts, name=name)
