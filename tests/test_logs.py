"""somad.logs: JSON lines off a TTY, colour console on a real pty, stdlib loggers routed through
the same renderer, idempotent reconfiguration."""

from __future__ import annotations

import io
import json
import logging
import os
import select
import time
import warnings
from datetime import datetime

import pytest

from somad.logs import configure_logging, get_logger, reset_logging

ANSI_ESCAPE = "\x1b["


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    level = root.level
    yield
    reset_logging()
    root.setLevel(level)


def json_lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def read_pty(fd: int, until: bytes, timeout: float = 5.0) -> bytes:
    """Read from a pty master until ``until`` shows up (or the timeout passes)."""
    data, deadline = b"", time.monotonic() + timeout
    while until not in data and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            data += os.read(fd, 4096)
    return data


@pytest.fixture
def pty_stream():
    """A real terminal: the slave end as a text stream, and the master fd to read what it shows."""
    master, slave = os.openpty()
    stream = os.fdopen(slave, "w", buffering=1)
    yield stream, master
    stream.close()
    os.close(master)


def test_json_lines_carry_timestamp_level_logger_and_bound_stream():
    out = io.StringIO()
    configure_logging(level="info", format="auto", stream=out)  # a StringIO is not a TTY
    get_logger("somad.daemon", stream="uart0").info("alert opened", peak=0.97)
    get_logger("somad.daemon").debug("not shown at info")
    [line] = json_lines(out)
    assert line["event"] == "alert opened"
    assert line["stream"] == "uart0"
    assert line["peak"] == 0.97
    assert line["level"] == "info"
    assert line["logger"] == "somad.daemon"
    stamp = datetime.fromisoformat(line["timestamp"])
    assert stamp.utcoffset().total_seconds() == 0


def test_stdlib_loggers_go_through_the_same_renderer():
    out = io.StringIO()
    configure_logging(level="info", format="json", stream=out)
    logging.getLogger("paho.mqtt.client").warning("connection lost: %s", "broker gone", extra={"rc": 7})
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old option", DeprecationWarning, stacklevel=1)
    first, second = json_lines(out)
    assert first == {**first, "event": "connection lost: broker gone", "logger": "paho.mqtt.client", "level": "warning", "rc": 7}
    assert "timestamp" in first
    assert second["logger"] == "py.warnings" and "old option" in second["event"]


def test_exceptions_are_rendered_into_the_json_line():
    out = io.StringIO()
    configure_logging(format="json", stream=out)
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        get_logger("somad.learner", stream="s").exception("numerical fault")
    [line] = json_lines(out)
    assert "ZeroDivisionError: boom" in line["exception"] and "Traceback" in line["exception"]


def test_auto_on_a_terminal_is_colour_console(pty_stream):
    stream, master = pty_stream
    configure_logging(level="info", format="auto", stream=stream)
    get_logger("somad.daemon", stream="uart0").info("stream started")
    shown = read_pty(master, b"stream started").decode()
    assert "stream started" in shown
    assert ANSI_ESCAPE in shown
    assert not shown.lstrip().startswith("{")
    assert "uart0" in shown


def test_console_off_a_terminal_has_no_colour_codes():
    out = io.StringIO()
    configure_logging(format="console", stream=out)
    get_logger("somad.daemon", stream="uart0").warning("queue full", dropped=12)
    text = out.getvalue()
    assert "queue full" in text and "dropped=12" in text and "stream=uart0" in text
    assert ANSI_ESCAPE not in text
    assert "[somad.daemon]" in text


def test_json_forced_on_a_terminal(pty_stream):
    stream, master = pty_stream
    configure_logging(format="json", stream=stream)
    get_logger("somad.daemon").info("hello")
    shown = read_pty(master, b"\n").decode()
    assert json.loads(shown)["event"] == "hello"


def test_calling_again_replaces_only_its_own_handler():
    foreign = logging.NullHandler()
    logging.getLogger().addHandler(foreign)
    try:
        first, second = io.StringIO(), io.StringIO()
        configure_logging(level="info", format="json", stream=first)
        configure_logging(level="warning", format="json", stream=second)  # a reload
        log = get_logger("somad.daemon")
        log.info("dropped at warning")
        log.warning("kept")
        assert first.getvalue() == ""
        assert [line["event"] for line in json_lines(second)] == ["kept"]  # once, not twice
        assert foreign in logging.getLogger().handlers
    finally:
        logging.getLogger().removeHandler(foreign)


def test_a_logger_made_before_configuration_follows_it():
    early = get_logger("somad.early", stream="s")  # e.g. a module-level logger
    out = io.StringIO()
    configure_logging(format="json", stream=out)
    early.info("after")
    assert json_lines(out)[0]["logger"] == "somad.early"


@pytest.mark.parametrize(
    "kwargs, message",
    [({"level": "loud"}, "log.level: expected one of debug, info, warning, error, critical, got 'loud'"), ({"format": "xml"}, "log.format: expected one of auto, json, console, got 'xml'")],
)
def test_bad_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        configure_logging(**kwargs)


def test_level_names_are_case_insensitive():
    out = io.StringIO()
    configure_logging(level="DEBUG", format="json", stream=out)
    get_logger("somad.x").debug("shown")
    assert json_lines(out)[0]["level"] == "debug"
