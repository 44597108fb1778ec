"""Listen addresses, parsed one way everywhere (metrics endpoint, tcp/udp sources, config checks).

>>> parse_listen("9464"), parse_listen(":9464"), parse_listen("[::1]:0")
(('127.0.0.1', 9464), ('', 9464), ('::1', 0))
>>> parse_listen("localhost")
Traceback (most recent call last):
...
ValueError: expected host:port (e.g. 127.0.0.1:9464 or [::1]:9464), got 'localhost'
"""

from __future__ import annotations

import re

_LISTEN = re.compile(r"\[([0-9A-Fa-f:.%\w]*)\]:(\d{1,5})|([^:\[\]\s]*):(\d{1,5})|(\d{1,5})")


def parse_listen(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``PORT`` (on ``default_host``: loopback), ``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (every
    interface: host ``""``) -> (host, port). Port 0 asks the system for a free port."""
    match = _LISTEN.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:9464 or [::1]:9464), got {text!r}")
    if match.group(5) is not None:
        host, port = default_host, int(match.group(5))
    else:
        host = match.group(1) if match.group(1) is not None else match.group(3)
        port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ValueError(f"port must be in 0..65535, got {port} in {text!r}")
    return host, port
