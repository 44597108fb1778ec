"""File source: follow a file as it grows (``tail -F``), through rotation and truncation.

- ``start``: where to begin in the file present at ``start()``: ``beginning``, ``end``, or
  ``saved``: the offset the daemon restored with ``restore(offset)`` (from the checkpoint;
  the beginning when none was saved, and when the saved offset lies past the file's end,
  which means the file was truncated or replaced). A file that appears later, or replaces
  the followed one, is read from its first byte.
- Each ``Chunk`` carries ``offset``: the position in the file just past its bytes. The daemon
  saves the offset of the last byte it learned with the checkpoint and restores it, so that
  a restart neither skips nor repeats.
- Rotation (rename, then a new file at the path) is detected by device and inode: the old
  file is read to its end, then the new one is followed from its first byte. The switch
  waits until the new file has bytes, so lines the writer adds to the old file before it
  reopens are not lost. The path is looked at every ``poll_interval`` even while reading
  a backlog, and a new file is opened at once: a reader behind by several rotations still
  reads every file, in order, as long as each lived at the path for a poll interval.
- Truncation (``copytruncate``, or ``> file``): the file shrank below the position, so
  reading starts again at 0; counted in ``status().truncations``.
- A missing file is waited for; an unreadable one is a fault (logged and counted once per
  fault, retried every ``poll_interval``).

Reads happen in ``read()`` itself (regular files never block); between looks it sleeps at
most ``poll_interval``. Known limit: a file truncated and then regrown past the position
between two looks cannot be told from one that only grew.

>>> FileSource.Options(path="/var/log/sensor.log", start="end").start
'end'
"""

from __future__ import annotations

import os
import stat
import threading
import time
from dataclasses import dataclass

import structlog

from .base import Chunk, Source, SourceStatus

log = structlog.get_logger("somad.adapters.file")

STARTS = ("beginning", "end", "saved")
READ_SIZE = 65536  # bytes per chunk
MAX_OPEN_FILES = 8  # the file being read plus the newer ones opened ahead of it after rotations


@dataclass(frozen=True)
class FileOptions:
    path: str = ""  # the file to follow; it may not exist yet
    start: str = "saved"  # beginning | end | saved (the offset restored from the checkpoint; beginning if none)
    poll_interval: float = 0.25  # seconds between looks for new bytes, rotation and truncation

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path: required (the file to follow)")
        if self.start not in STARTS:
            raise ValueError(f"start: expected one of {', '.join(STARTS)}, got {self.start!r}")
        if self.poll_interval <= 0:
            raise ValueError(f"poll_interval: must be > 0 seconds, got {self.poll_interval}")


@dataclass
class FileSourceStatus(SourceStatus):
    rotations: int = 0  # switches to a new file at the path
    truncations: int = 0  # times the file shrank under the position (reading restarted at 0)

    def copy(self) -> FileSourceStatus:
        return FileSourceStatus(**vars(self))


@dataclass
class OpenFile:
    fd: int
    identity: tuple[int, int]  # (st_dev, st_ino)
    offset: int  # position just past the last byte returned


class FileSource(Source):
    type_name = "file"
    Options = FileOptions

    def __init__(self, options: FileOptions, name: str = ""):
        super().__init__(options, name)
        self._status = FileSourceStatus()
        self.log = log.bind(stream=self.name, path=options.path)
        self._lock = threading.Lock()  # read() and stop() never use a descriptor at the same time
        self._wake = threading.Event()
        # The file being read first, then files that appeared at the path since (rotations not
        # reached yet): opening them at once keeps them even if they are rotated away again.
        self._files: list[OpenFile] = []
        self._resume: tuple[tuple[int, int], int] | None = None  # (identity, offset) of a file closed by a fault
        self._restored: int | None = None
        self._start_applies = False  # the next open is of the file present at start(): honour ``start``
        self._started = False
        self._stopped = False
        self._watched_at = -1e9  # time.monotonic() of the last look at the path
        self._in_fault = False
        self._waiting_logged = False
        self._behind_logged = False

    # ------------------------------------------------------------------ contract

    def restore(self, offset: int) -> None:
        """Resume at ``offset`` (from the checkpoint) when ``start`` is ``saved``; call before ``start``."""
        if self._started:
            raise RuntimeError("restore(offset) must be called before start()")
        if offset < 0:
            raise ValueError(f"restore: offset must be >= 0, got {offset}")
        self._restored = offset

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._start_applies = os.path.exists(self.options.path)
        with self._lock:
            self._watch_path(force=True)

    def read(self, timeout: float) -> list[Chunk]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._stopped:
                    return []
                self._watch_path(force=False)
                chunk = self._read_once()
                if chunk is not None:
                    return [chunk]
                moved = self._at_end()
            if moved:
                continue  # another file or position: read again at once
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._wake.wait(min(self.options.poll_interval, remaining))

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            while self._files:
                self._close_current()
        self._wake.set()

    # ------------------------------------------------------------------ reading

    def _read_once(self) -> Chunk | None:
        if not self._files:
            return None
        current = self._files[0]
        try:
            data = os.read(current.fd, READ_SIZE)
        except OSError as err:
            self._fault("file_read_failed", err)
            self._resume = (current.identity, current.offset)  # reopening the same file goes on there
            self._close_current()
            return None
        if not data:
            return None
        current.offset += len(data)
        self._in_fault = False
        return Chunk(data, offset=current.offset, received_at=time.monotonic())

    def _at_end(self) -> bool:
        """The current file has no more bytes: rewind it, move to the next file, or open one.
        True when there may be bytes to read right away."""
        opened = self._watch_path(force=True)
        if not self._files:
            return opened
        current = self._files[0]
        if len(self._files) > 1:
            # The next file is looked at before the current one: if it already had bytes and
            # the current one has none past our position, the writer had finished with it.
            next_size = os.fstat(self._files[1].fd).st_size
            size = os.fstat(current.fd).st_size
            if size > current.offset:
                return True  # the writer added to the old file before reopening: finish it
            if size == current.offset and next_size > 0:
                self.log.info("file_rotated", finished_offset=current.offset)
                self._count("rotations")
                self._close_current()
                return True
        size = os.fstat(current.fd).st_size
        if size < current.offset:
            self.log.warning("file_truncated", offset=current.offset, size=size)
            self._count("truncations")
            os.lseek(current.fd, 0, os.SEEK_SET)
            current.offset = 0
            return True
        return opened

    # ------------------------------------------------------------------ the path

    def _watch_path(self, force: bool) -> bool:
        """Open the file at the path if it is not one we hold (it appeared, or replaced ours).
        Looks at most once per poll interval unless ``force``. True when a file was opened."""
        now = time.monotonic()
        if not force and now - self._watched_at < self.options.poll_interval:
            return False
        self._watched_at = now
        try:
            info = os.stat(self.options.path)
        except FileNotFoundError:
            self._waiting()
            return False  # moved away and not replaced yet: the open file may still grow
        except OSError as err:
            self._fault("file_open_failed", err)
            return False
        if any(f.identity == (info.st_dev, info.st_ino) for f in self._files):
            return False
        if len(self._files) >= MAX_OPEN_FILES:
            # Far behind: the oldest must be finished first, and the newest may be rotated
            # away before we get to it. Said once per episode, counted as a fault.
            if not self._behind_logged:
                self._behind_logged = True
                self._count("errors")
                self.log.warning("file_too_far_behind", open_files=len(self._files))
            return False
        self._behind_logged = False
        opened = self._open()
        if opened is None:
            return False
        if any(f.identity == opened.identity for f in self._files):
            os.close(opened.fd)  # the path changed back between stat and open: one we hold
            return False
        self._files.append(opened)
        return True

    def _open(self) -> OpenFile | None:
        path = self.options.path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # NONBLOCK: a FIFO must not hang us
        except FileNotFoundError:
            self._waiting()
            return None
        except OSError as err:
            self._fault("file_open_failed", err)
            return None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            self._fault("file_open_failed", OSError(f"{path} is not a regular file"))
            return None
        position = self._position_for(info)
        os.lseek(fd, position, os.SEEK_SET)
        self._in_fault = self._waiting_logged = False
        self._update_status(connected=True)
        self.log.info("file_opened", offset=position, size=info.st_size, inode=info.st_ino)
        return OpenFile(fd, (info.st_dev, info.st_ino), position)

    def _position_for(self, info: os.stat_result) -> int:
        """Where to start reading a file just opened."""
        identity = (info.st_dev, info.st_ino)
        if self._resume is not None and self._resume[0] == identity:
            wanted = self._resume[1]  # the same file again, after a fault: go on where we were
            self._resume = None
        elif not self._start_applies:
            return 0  # a file that appeared or replaced the followed one: all of it is new
        else:
            self._start_applies = False
            start = self.options.start
            if start == "end":
                return info.st_size
            if start == "beginning" or self._restored is None:
                return 0
            wanted = self._restored
        if wanted > info.st_size:
            self.log.warning("file_truncated", offset=wanted, size=info.st_size)
            self._count("truncations")
            return 0
        return wanted

    def _close_current(self) -> None:
        os.close(self._files.pop(0).fd)
        if not self._files:
            self._update_status(connected=False)

    # ------------------------------------------------------------------ faults

    def _waiting(self) -> None:
        if self._files:
            return  # still reading what we hold; the path will come back or it will not
        self._update_status(connected=False)
        if not self._waiting_logged:
            self._waiting_logged = True
            self.log.info("file_waiting")

    def _fault(self, event: str, err: OSError) -> None:
        self._update_status(connected=bool(self._files), last_error=f"{event}: {err}")
        if not self._in_fault:
            self._in_fault = True
            self._count("errors")
            self.log.warning(event, error=str(err))
