"""Overload: a TCP sender far faster than the learner (``small`` model).

What should happen, from ``adapters/socket_source.py`` and ``somad/chunk_queue.py``: the tcp
source stops reading when its own buffer is full (TCP flow control then slows the sender,
nothing lost there), but the daemon's reader moves chunks on into the stream's queue, whose
policy for a live feed is ``drop_oldest``: the newest bytes are learned, the oldest dropped
and counted. So: memory stays flat (RSS sampled from /proc over the flood), the drops show in
``somad_dropped_bytes_total``, and every byte sent is accounted for — learned or counted as
dropped, none silently lost — once the sender stops and the queue has drained. Nothing
crashes or restarts.
"""

from __future__ import annotations

import ast
import socket
import statistics
import threading
import time
import urllib.request
from pathlib import Path

from tests.faults.harness import (
    fixed_line,
    record_figures,
    start_daemon,
    summarize,
    wait_until,
)

FLOOD_SECONDS = 12.0
WARM_UP_SECONDS = 5.0  # RSS growth is measured after this (allocator, model and first snapshot warm-up)
SEND_RATE = 16 << 20  # bytes/s offered: ~1000x what the small model learns here; keeping even a
# quarter of what is dropped would grow RSS past the limit within the measured window
RSS_GROWTH_LIMIT = 32 << 20  # typical RSS (median) growth allowed after warm-up: unbounded buffering of the 200 MB flood would be far above; a loaded machine measured 12 MiB once
RSS_PEAK_LIMIT = 64 << 20  # a moment's peak above the level after warm-up (snapshots)
QUEUE_BYTES = 16384


def config_text(tmp: Path) -> str:
    return f"""
state_dir: "{tmp / 'state'}"
metrics: {{listen: "127.0.0.1:0"}}
log: {{level: info, format: json}}
streams:
  - name: flood
    source: {{type: tcp, listen: "127.0.0.1:0", max_buffered_bytes: 65536}}
    framing: {{type: lines}}
    model: {{preset: small}}
    queue: {{max_bytes: {QUEUE_BYTES}}}
    snapshot: {{every_seconds: 2}}
"""


class Flood(threading.Thread):
    """A client sending lines at ``rate`` bytes/s (in 64 KiB writes) until stopped."""

    def __init__(self, address: tuple[str, int], rate: float):
        super().__init__(name="flood", daemon=True)
        self.sock = socket.create_connection(address, timeout=10)
        self.block = b"".join(fixed_line(i, 16) for i in range(4096))  # 64 KiB of whole lines
        self.rate = rate
        self.sent = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        try:
            while not self._halt.is_set():
                ahead = self.sent / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
                    continue
                self.sock.sendall(self.block)  # blocks while TCP pushes back
                self.sent += len(self.block)
        except OSError as err:
            self.error = err

    def finish(self) -> int:
        self._halt.set()
        self.join(30)
        self.sock.close()
        return self.sent


def test_a_flooding_sender_keeps_memory_flat_and_every_byte_is_counted(tmp_path):
    config = tmp_path / "somad.yaml"
    config.write_text(config_text(tmp_path))
    daemon = start_daemon(config, tmp_path / "somad.log")
    try:
        listening = daemon.wait_event("tcp source listening", timeout=120)
        host, port = ast.literal_eval(listening["address"])
        daemon.wait_event("ready", timeout=60)
        flood = Flood((host, port), SEND_RATE)
        flood.start()
        began = time.monotonic()
        samples = []  # (seconds since the flood began, RSS bytes)
        while time.monotonic() - began < FLOOD_SECONDS:
            samples.append((time.monotonic() - began, daemon.rss_bytes()))
            time.sleep(0.25)
        dropped_during = daemon.metric("somad_dropped_bytes_total", stream="flood")
        learned_during = daemon.metric("somad_bytes_total", stream="flood")
        sent = flood.finish()
        assert flood.error is None, f"the sender failed: {flood.error}"

        # Every byte sent is learned or counted as dropped, once the queue has drained.
        accounted = lambda: daemon.metric("somad_bytes_total", stream="flood") + daemon.metric("somad_dropped_bytes_total", stream="flood")
        wait_until(lambda: accounted() >= sent, timeout=90, what=f"{sent} bytes to be learned or counted as dropped")
        time.sleep(1.5)  # the io metrics are published once a second: nothing more may come
        learned = daemon.metric("somad_bytes_total", stream="flood")
        dropped = daemon.metric("somad_dropped_bytes_total", stream="flood")
        assert learned + dropped == sent, f"sent {sent}, learned {learned}, dropped {dropped}"
        assert dropped_during > 0 and dropped > 0
        assert daemon.metric("somad_stream_restarts_total", stream="flood") == 0
        with urllib.request.urlopen(daemon.metrics_base() + "/healthz", timeout=10) as health:
            assert health.status == 200
        assert daemon.returncode() is None
        assert daemon.terminate(timeout=60) == 0
    finally:
        daemon.ensure_dead()

    # A snapshot of the small model costs ~20 MiB for a moment (write, then read back): compare
    # the typical RSS at the start and at the end of the window, and bound the peaks apart.
    late = [(t, rss) for t, rss in samples if t >= WARM_UP_SECONDS]
    third = len(late) // 3
    start_rss = statistics.median(rss for _, rss in late[:third])
    end_rss = statistics.median(rss for _, rss in late[-third:])
    growth = end_rss - start_rss
    peak = max(rss for _, rss in late) - start_rss
    assert growth < RSS_GROWTH_LIMIT, f"typical RSS grew by {growth / 2**20:.1f} MiB within {late[-1][0] - late[0][0]:.0f} s of flood"
    assert peak < RSS_PEAK_LIMIT, f"RSS peaked {peak / 2**20:.1f} MiB above its level after warm-up"
    duration = samples[-1][0]
    mean_t = sum(t for t, _ in late) / len(late)
    mean_rss = sum(rss for _, rss in late) / len(late)
    slope = sum((t - mean_t) * (rss - mean_rss) for t, rss in late) / sum((t - mean_t) ** 2 for t, _ in late)
    record_figures(
        "overload",
        {
            "source": "tcp, one client",
            "preset": "small",
            "offered_bytes_per_s": round(sent / FLOOD_SECONDS),
            "flood_seconds": FLOOD_SECONDS,
            "bytes_sent": sent,
            "bytes_learned": learned,
            "bytes_dropped_counted": dropped,
            "bytes_unaccounted": sent - learned - dropped,
            "learned_during_flood_bytes_per_s": round(learned_during / duration),
            "dropped_share": round(dropped / sent, 4),
            "rss_mib": summarize([rss / 2**20 for _, rss in samples], 1),
            "rss_median_growth_after_warm_up_mib": round(growth / 2**20, 2),
            "rss_peak_above_level_mib": round(peak / 2**20, 1),
            "rss_slope_after_warm_up_mib_per_s": round(slope / 2**20, 3),
            "rss_warm_up_s": WARM_UP_SECONDS,
            "queue_policy": "drop_oldest (auto for tcp)",
            "queue_max_bytes": QUEUE_BYTES,
        },
    )
