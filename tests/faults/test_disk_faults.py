"""Disk faults under the checkpoint store: a full disk while running, a read-only one at start.

Full disk, two ways (each where this machine allows it):

- ``tmpfs``: the state directory is a small tmpfs mount that a filler file fills to the last
  byte (root with mount permission, as on the CI runners and this machine);
- ``fsize-limit``: the daemon's file-size limit is lowered below a checkpoint's size with
  ``prlimit`` (any user), so every snapshot write fails with EFBIG.

Either way: the snapshot fails cleanly (no temp file left, the previous checkpoint loadable
and still the newest), ``somad_snapshot_failures_total`` counts each attempt, a
``snapshot_failed`` log line says why, ingestion goes on (``somad_bytes_total`` keeps
growing); once space returns, snapshots succeed again and nothing was lost.

Read-only state directory at start: **somad refuses to start** (exit 1, one line naming the
directory and the reason). Running on would learn for months and lose it all at the next
restart, with nothing but a counter to say so; a read-only state directory at start is a
deployment fault (mount, owner, unit file) that an operator must see at once. A disk that
fills or turns read-only *while running* is the transient case above: somad keeps scoring.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import pytest

from somad.checkpoint import CheckpointStore
from somad.config import load_config
from somad.stream import architecture_tag
from tests.faults.harness import (
    AppendingWriter,
    fill_disk,
    mount_tmpfs,
    record_figures,
    start_daemon,
    unmount,
    wait_until,
)

LINE = 16
FSIZE_LIMIT = 64 * 1024  # bytes: far below a tiny model's checkpoint (~600 kB)


def config_text(tmp: Path, state: Path) -> str:
    return f"""
state_dir: "{state}"
metrics: {{listen: "127.0.0.1:0"}}
log: {{level: info, format: json}}
shutdown_timeout: 30
streams:
  - name: disk
    source: {{type: file, path: "{tmp / 'sensor.log'}", start: saved, poll_interval: 0.05}}
    framing: {{type: lines}}
    model: {{preset: tiny}}
    alerts: {{threshold: 0.9999}}
    snapshot: {{every_seconds: 0.3, keep: 2}}
"""


def temp_files(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(".tmp")] if directory.exists() else []


class Tmpfs:
    """The state directory on a 4 MiB tmpfs; 'full' = a filler file takes every free byte."""

    name = "tmpfs"
    reason = "No space left on device"

    def __init__(self, tmp: Path):
        self.state = tmp / "state"
        self.state.mkdir()
        why = mount_tmpfs(self.state, "4m")
        if why:
            pytest.skip(f"cannot mount a tmpfs here ({why}); the fsize-limit case covers a failing writer")
        self.filler = None

    def fill(self, daemon) -> None:
        self.filler = fill_disk(self.state)

    def free(self, daemon) -> None:
        self.filler.unlink()

    def close(self) -> None:
        unmount(self.state)


class FsizeLimit:
    """The daemon's RLIMIT_FSIZE lowered below a checkpoint's size (writes fail with EFBIG)."""

    name = "fsize-limit"
    reason = "File too large"

    def __init__(self, tmp: Path):
        self.state = tmp / "state"
        self.saved = None

    def fill(self, daemon) -> None:
        self.saved = resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE, (FSIZE_LIMIT, self.saved[1]))

    def free(self, daemon) -> None:
        resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE, self.saved)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("disk_kind", [Tmpfs, FsizeLimit], ids=lambda k: k.name)
def test_a_full_disk_fails_snapshots_cleanly_and_ingestion_goes_on(tmp_path, disk_kind):
    disk = disk_kind(tmp_path)
    try:
        run_full_disk(tmp_path, disk)
    finally:
        disk.close()


def run_full_disk(tmp_path: Path, disk) -> None:
    config = tmp_path / "somad.yaml"
    config.write_text(config_text(tmp_path, disk.state))
    stream = load_config(config).streams[0]
    store_dir = disk.state / "disk"
    store = lambda: CheckpointStore(store_dir, prefix=architecture_tag(stream.model.soma_config()))  # a fresh look each time
    writer = AppendingWriter(tmp_path / "sensor.log", rate=3000, width=LINE)
    writer.write_lines(100)
    writer.start()
    daemon = start_daemon(config, tmp_path / "somad.log")
    try:
        daemon.wait_event("ready", timeout=120)
        daemon.wait_metric("somad_snapshots_total", lambda v: v >= 1, timeout=120, stream="disk")

        disk.fill(daemon)
        filled_at = time.monotonic()
        failures = daemon.wait_metric("somad_snapshot_failures_total", lambda v: v >= 1, timeout=60, stream="disk")
        # From the first failure on, nothing may be written (a snapshot under way at the fill may have made it).
        snapshots = daemon.metric("somad_snapshots_total", stream="disk")
        kept = store().latest()
        learned_at_first_failure = daemon.metric("somad_bytes_total", stream="disk")
        failures = daemon.wait_metric("somad_snapshot_failures_total", lambda v: v >= failures + 3, timeout=60, stream="disk")

        # Clean failures: the previous checkpoint is still the newest and loads; nothing half-written.
        during = store()
        assert during.latest().checkpoint_id == kept.checkpoint_id
        assert not during.skipped, [str(e) for e in during.skipped]
        assert daemon.metric("somad_snapshots_total", stream="disk") == snapshots
        assert not temp_files(store_dir), f"a failed snapshot left {temp_files(store_dir)}"
        lines = daemon.events("snapshot_failed")
        assert lines and disk.reason in lines[-1]["error"], lines[-1:] or daemon.tail()
        assert lines[-1]["model"] == "disk"
        # Ingestion goes on.
        learned_during = daemon.wait_metric("somad_bytes_total", lambda v: v > learned_at_first_failure + 2 * LINE, timeout=60, stream="disk")
        assert daemon.returncode() is None

        disk.free(daemon)
        freed_at = time.monotonic()
        snapshots = daemon.metric("somad_snapshots_total", stream="disk")
        daemon.wait_metric("somad_snapshots_total", lambda v: v > snapshots, timeout=60, stream="disk")
        recovered_s = time.monotonic() - freed_at
        after = store().latest()
        assert after.bytes_seen > kept.bytes_seen and after.extra["offset"] == after.bytes_seen
        failures_total = daemon.metric("somad_snapshot_failures_total", stream="disk")

        size = writer.stop()
        wait_until(lambda: daemon.metric("somad_bytes_total", stream="disk") >= size, timeout=120, what="learning to the end of the file")
        assert daemon.terminate(timeout=60) == 0
    finally:
        writer.stop()
        daemon.ensure_dead()
    final = store().latest()
    assert final.bytes_seen == final.extra["offset"] == size, "bytes lost or repeated across the full disk"
    record_figures(
        f"disk_full_{disk.name}",
        {
            "fault": "tmpfs filled to the last byte" if disk.name == "tmpfs" else f"RLIMIT_FSIZE {FSIZE_LIMIT} bytes on the daemon",
            "snapshot_failures_counted": failures_total,
            "seconds_full": round(freed_at - filled_at, 2),
            "bytes_learned_while_full": learned_during - learned_at_first_failure,
            "seconds_to_next_snapshot_after_space_returned": round(recovered_s, 2),
            "snapshot_every_s": 0.3,
            "bytes_lost": size - final.bytes_seen,
            "log_error": lines[-1]["error"],
        },
    )


def read_only_state_dir(tmp_path: Path) -> Path:
    """A state directory this process cannot write: a read-only tmpfs as root (root ignores
    permission bits), mode 0555 otherwise."""
    state = tmp_path / "state"
    state.mkdir()
    if os.geteuid() == 0:
        why = mount_tmpfs(state, "1m", read_only=True)
        if why:
            pytest.skip(f"root, and cannot mount a read-only tmpfs here ({why})")
    else:
        state.chmod(0o555)
    return state


def test_a_read_only_state_dir_at_start_is_a_clear_error(tmp_path):
    state = read_only_state_dir(tmp_path)
    try:
        with pytest.raises(OSError):
            (state / "probe").write_bytes(b"")  # the premise: nothing can be written there
        config = tmp_path / "somad.yaml"
        config.write_text(config_text(tmp_path, state))
        (tmp_path / "sensor.log").write_bytes(b"1,2\n" * 10)
        daemon = start_daemon(config, tmp_path / "somad.log")
        try:
            rc = daemon.wait(60)
        finally:
            daemon.ensure_dead()
    finally:
        if os.geteuid() == 0:
            unmount(state)
        else:
            state.chmod(0o755)
    output = daemon.log.text()
    assert rc == 1, output
    assert not daemon.events("ready"), "it must not report ready"
    (failure,) = daemon.events("start_failed")
    assert str(state) in failure["error"] and "not writable" in failure["error"], failure
    last = output.strip().splitlines()[-1]
    assert last.startswith("somad: cannot start:") and str(state) in last, last
    record_figures("read_only_state_dir_at_start", {"behaviour": "exit 1", "message": last, "log": json.dumps(failure)})
