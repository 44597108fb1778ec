"""The embedded default: ``somad run`` with no config — a simulated sensor, learned live.

The same daemon as ``somad run --config``, on a built-in config: one ``simulate`` stream (a
periodic CSV sensor with a spike, a stuck reading, a noise burst and a level shift injected),
metrics on a free loopback port, state in ``$XDG_STATE_HOME/somad-embedded`` (so learning
survives restarts here too), a status line every two seconds and one log line per alert.
No broker, device or file is needed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# Faults the embedded sensor injects (line numbers), so alerts show up without hardware.
EMBEDDED_FAULTS = """
        - {kind: spike, at_line: 3000}
        - {kind: stuck, at_line: 4500, length: 40}
        - {kind: noise, at_line: 6000, length: 60}
        - {kind: shift, at_line: 8000, length: 200, magnitude: 2.0}"""

EMBEDDED_CONFIG = """
device: embedded
state_dir: "{state_dir}"
metrics: {{listen: "127.0.0.1:0"}}
log: {{level: info, format: {log_format}}}
streams:
  - name: sensor
    source:
      type: simulate
      rate: {rate}
      realtime: {realtime}
      clock_start: {clock_start}  # the wall clock: a restarted demo's time stamps go on (a clock that repeats looks like news)
      faults:{faults}
    model: {{preset: {preset}}}
    scoring: {{novelty_repeats: true}}  # the simulated sensor is noisy: a repeated reading is the stuck fault
    snapshot: {{every_seconds: 30}}
"""


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "somad-embedded"


def embedded_config_text(preset: str = "small", rate: float = 200.0, realtime: bool = True, state_dir: str | Path | None = None, log_format: str = "auto") -> str:
    """The built-in config as YAML (``somad check`` accepts it as it is).

    >>> from somad.config import parse_config
    >>> cfg = parse_config(embedded_config_text(preset="tiny", state_dir="/tmp/x"))
    >>> cfg.streams[0].source.type, cfg.streams[0].model.preset
    ('simulate', 'tiny')
    """
    return EMBEDDED_CONFIG.format(
        state_dir=state_dir or default_state_dir(),
        rate=rate,
        realtime="true" if realtime else "false",
        clock_start=int(time.time()),
        preset=preset,
        faults=EMBEDDED_FAULTS,
        log_format=log_format,
    )


def run_embedded(preset: str = "small", rate: float = 200.0, realtime: bool = True, seconds: float | None = None, state_dir: str | None = None, summary_json: bool = False) -> int:
    from .config import parse_config
    from .daemon import serve

    config = parse_config(embedded_config_text(preset, rate, realtime, state_dir), "<embedded default>")
    return serve(config, seconds=seconds, summary_json=summary_json, status_every=2.0)
