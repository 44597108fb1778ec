"""``watch_config: true``: notice that the config file changed, so the daemon reloads it as on SIGHUP.

Polled, not inotify: a stat every ``interval`` seconds costs nothing and works on every file
system (NFS, overlays, bind mounts into containers). The file's identity is (device, inode,
size, mtime): an editor that writes in place changes size or mtime; one that writes a new
file and renames it over the old one (vim, ``install``, configuration management) changes
the inode. A change counts once it has held for one whole interval, so a file caught half
written is not reloaded (and counted as a failed reload) before the writer is done.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "somad.yaml"
>>> _ = path.write_text("a: 1\\n")
>>> now = [0.0]
>>> watch = ConfigFileWatch(path, interval=2.0, clock=lambda: now[0])
>>> _ = path.write_text("a: 22\\n")
>>> now[0] = 2.0; watch.changed()   # seen, not yet settled
False
>>> now[0] = 4.0; watch.changed()   # unchanged for an interval: reload
True
>>> now[0] = 6.0; watch.changed()
False
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

WATCH_INTERVAL = 2.0  # seconds between checks of the config file


def file_identity(path: Path) -> tuple | None:
    """(device, inode, size, mtime in ns) of ``path``; None while it does not exist or cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ConfigFileWatch:
    """Says when the file differs from what was last read (``mark_read``) and has settled."""

    def __init__(self, path: str | os.PathLike, interval: float = WATCH_INTERVAL, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.interval = interval
        self.clock = clock
        self._read = file_identity(self.path)  # what the daemon runs (as of its last read)
        self._seen = self._read  # what the previous check saw
        self._next_check = clock() + interval

    def mark_read(self) -> None:
        """The daemon has just read the file (SIGHUP, or a reload this watch triggered)."""
        self._read = self._seen = file_identity(self.path)

    def changed(self) -> bool:
        """True once per settled change; cheap to call often (checks at most every ``interval``)."""
        now = self.clock()
        if now < self._next_check:
            return False
        self._next_check = now + self.interval
        identity = file_identity(self.path)
        settled = identity == self._seen
        self._seen = identity
        if settled and identity != self._read:
            self._read = identity  # the caller reloads it now
            return True
        return False
