"""Logging: structlog for somad's own lines, with the standard library's loggers (paho-mqtt,
warnings, anything else) routed through the same renderer, so every line looks the same.

- ``format="auto"``: a colour console on a TTY, JSON lines otherwise (journald, files, pipes);
- every line carries an ISO-8601 UTC ``timestamp``, ``level``, ``logger`` and the bound context
  (``stream=...``); exceptions are rendered into the line (a ``exception`` field in JSON);
- ``configure_logging`` may be called again (a reload changing ``log.level``): it replaces
  the handler it installed before and leaves anyone else's alone.

>>> import io, json
>>> out = io.StringIO()
>>> configure_logging(level="info", format="json", stream=out)
>>> get_logger("somad.demo", stream="uart0").info("alert opened", peak=0.99)
>>> line = json.loads(out.getvalue())
>>> line["event"], line["stream"], line["level"], line["logger"]
('alert opened', 'uart0', 'info', 'somad.demo')
>>> reset_logging()
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}
FORMATS = ("auto", "json", "console")

# Processors run on every line, ours and the standard library's ("foreign") alike.
_SHARED_PROCESSORS = (
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.stdlib.ExtraAdder(),  # stdlib ``extra={...}`` fields become keys
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
)


class _SomadHandler(logging.StreamHandler):
    """Marks the handler this module installed, so a second call replaces exactly it."""


def configure_logging(level: str = "info", format: str = "auto", stream: TextIO | None = None) -> None:
    """Route structlog and the standard library to ``stream`` (default ``sys.stderr``)."""
    if not isinstance(level, str) or level.lower() not in LEVELS:
        raise ValueError(f"log.level: expected one of {', '.join(k for k in LEVELS if k != 'warn')}, got {level!r}")
    if format not in FORMATS:
        raise ValueError(f"log.format: expected one of {', '.join(FORMATS)}, got {format!r}")
    stream = sys.stderr if stream is None else stream
    handler = _SomadHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=list(_SHARED_PROCESSORS), processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *_renderer(format, stream)]))
    reset_logging()  # idempotent: the handler installed by an earlier call goes (StreamHandler.close leaves the stream open)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(LEVELS[level.lower()])
    logging.captureWarnings(True)  # Python warnings become log lines too
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *_SHARED_PROCESSORS, structlog.stdlib.PositionalArgumentsFormatter(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a logger made at import time (before this call) must follow this config.
        cache_logger_on_first_use=False,
    )


def reset_logging() -> None:
    """Undo ``configure_logging``: remove its handler and restore structlog's defaults."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _SomadHandler)]:
        root.removeHandler(old)
        old.close()
    logging.captureWarnings(False)
    structlog.reset_defaults()


def get_logger(name: str, **context) -> structlog.stdlib.BoundLogger:
    """A named logger with ``context`` bound (``get_logger("somad.daemon", stream="uart0")``).

    It stays lazy (unlike ``structlog.get_logger(name).bind(...)``, which fixes the configuration
    of the moment), so a module-level logger follows a later ``configure_logging``."""
    return structlog.get_logger(name, **context)


def _renderer(format: str, stream: TextIO) -> list:
    is_tty = _is_tty(stream)
    if format == "json" or (format == "auto" and not is_tty):
        return [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(default=str)]
    return [structlog.dev.ConsoleRenderer(colors=is_tty)]


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
