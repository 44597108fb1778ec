"""Score files for offline analysis: ``jsonl`` (one JSON object a line) and ``csv``.

Each line is one event's ``to_dict()``. The pipeline's ``send`` only puts the event on a
bounded queue; a writer thread encodes, writes, rotates and flushes, so a slow SD card never
stalls scoring (a full queue drops the event and counts it).

Rotation: before a line would take the file past ``max_bytes``, ``path`` becomes ``path.1``,
``path.1`` becomes ``path.2`` ... up to ``path.<keep>``; older files are deleted. A line is
never split across files. A CSV file always starts with its header row (an existing file with
a different header is rotated out first).

Faults (disk full, directory removed) never reach the pipeline: they are logged once per
episode, counted in ``stats()["errors"]``, the lines that could not be written are counted as
``dropped``, and the file is reopened with capped backoff. ``sent`` counts lines handed to the
OS (counted at each flush).

>>> Options(path="/var/lib/somad/{stream}.jsonl").resolved_path("uart0")
'/var/lib/somad/uart0.jsonl'
>>> Options(path="/tmp/{device}.csv")
Traceback (most recent call last):
...
ValueError: path: unknown placeholder {device} in '/tmp/{device}.csv' (only {stream})
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import queue
import re
import string
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

import structlog

from somad.events import AlertEvent, RecordScored

from .base import Sink

EVENT_TYPES = {"scores": (RecordScored,), "alerts": (AlertEvent,), "both": (RecordScored, AlertEvent)}
RETRY_MIN_S = 1.0  # first reopen attempt after a fault
RETRY_MAX_S = 30.0  # backoff cap between reopen attempts
_STOP = object()  # queue sentinel: the writer drains what is before it, then closes


@dataclass(frozen=True)
class Options:
    path: str  # file to write; "{stream}" becomes the stream's name (relative paths: the daemon's working directory)
    events: str = "both"  # "scores" (one line per record), "alerts" (open/close), or "both"
    max_bytes: int = 64 * 1024 * 1024  # rotate before the file would grow past this (0 = never rotate)
    keep: int = 5  # rotated files kept: path.1 (newest) .. path.<keep> (oldest); 0 = none
    flush_seconds: float = 1.0  # lines reach the OS at most this late (0 = as soon as they are written)
    fsync: bool = False  # fsync at every flush: lines survive power loss, at the price of flash wear
    queue_events: int = 65536  # events waiting for the writer at most; more are dropped and counted

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"path: expected a file path, got {self.path!r}")
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(self.path) if name is not None}
        except ValueError as exc:
            raise ValueError(f"path: {exc} in {self.path!r} (write a literal brace as {{{{ or }}}})") from None
        unknown = sorted(names - {"stream"})
        if unknown:
            raise ValueError(f"path: unknown placeholder {{{unknown[0]}}} in {self.path!r} (only {{stream}})")
        if self.events not in EVENT_TYPES:
            raise ValueError(f"events: expected one of {', '.join(EVENT_TYPES)}, got {self.events!r}")
        _check_number("max_bytes", self.max_bytes, int, 0)
        _check_number("keep", self.keep, int, 0)
        _check_number("flush_seconds", self.flush_seconds, (int, float), 0)
        _check_number("queue_events", self.queue_events, int, 1)
        if not isinstance(self.fsync, bool):
            raise ValueError(f"fsync: expected true or false, got {self.fsync!r}")  # noqa: TRY004 - option errors are ValueErrors

    def resolved_path(self, stream: str) -> str:
        """The path with ``{stream}`` filled in (characters unsafe in a file name become ``_``)."""
        return self.path.format(stream=re.sub(r"[^A-Za-z0-9._-]", "_", stream) or "_")


def _check_number(key: str, value, kinds, minimum) -> None:
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
        kind_names = "an integer" if kinds is int else "a number"
        raise ValueError(f"{key}: expected {kind_names} >= {minimum}, got {value!r}")


class _FileSink(Sink):
    """The queue, writer thread, rotation and fault handling shared by both formats."""

    def __init__(self, options: Options, name: str = ""):
        super().__init__(options, name)
        self.path = Path(options.resolved_path(self.name))
        self._accepts = EVENT_TYPES[options.events]
        self._queue: queue.Queue = queue.Queue(maxsize=options.queue_events)
        self._lock = threading.Lock()  # guards the counters below
        self._counts = {"sent": 0, "dropped": 0, "errors": 0, "rotations": 0}
        self._stopping = threading.Event()  # no more events accepted
        self._abandon = threading.Event()  # stop() ran out of time: the writer stops writing
        self._thread: threading.Thread | None = None
        # Writer-thread state (touched by the writer only, and by stop() once it has exited):
        self._file: io.BufferedWriter | None = None
        self._size = 0  # bytes in the current file
        self._unflushed = 0  # lines written into the buffer since the last successful flush
        self._flush_due = 0.0  # monotonic deadline for the next flush while lines are unflushed
        self._retry_at = 0.0  # monotonic time before which a failed file is not reopened
        self._retry_delay = RETRY_MIN_S
        self._failing = False  # inside a fault episode (logged once, at its start)
        self._log = structlog.get_logger("somad.sink.file", stream=self.name, path=str(self.path))

    # ------------------------------------------------------------------ format hooks

    def _header(self) -> bytes:
        """Bytes every new file starts with."""
        return b""

    def _encode(self, event) -> bytes:
        raise NotImplementedError

    # ------------------------------------------------------------------ Sink contract

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"somad-{self.type_name}-sink-{self.name}", daemon=True)
        self._thread.start()

    def send(self, event) -> None:
        if not isinstance(event, self._accepts):
            return  # not asked for (scores-only file and an alert, or vice versa)
        if self._stopping.is_set():
            self._count("dropped")
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self._count("dropped")

    def stop(self, timeout: float = 2.0) -> None:
        """Write out what is queued within ``timeout`` seconds; what is left is counted as dropped."""
        if self._stopping.is_set() and self._thread is None:
            return
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is None:  # never started: nothing will write the queue
            self._drop_queued()
            return
        try:
            self._queue.put(_STOP, timeout=max(0.0, timeout))
        except queue.Full:
            pass  # the writer also sees _stopping once the queue runs dry
        thread.join(timeout)
        if thread.is_alive():  # a write hung (dead NFS mount): give up on the rest
            self._abandon.set()
            thread.join(0.2)
            self._drop_queued()
            self._log.error("file sink did not finish writing in time", timeout_s=timeout)

    def stats(self) -> dict:
        with self._lock:
            return {**self._counts, "queued": self._queue.qsize()}

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        try:
            while not self._abandon.is_set():
                item = self._next(self._wait_time())
                if item is _STOP or (item is None and self._stopping.is_set() and self._queue.empty()):
                    break
                if item is not None:
                    self._write_event(item)
                if self._unflushed and time.monotonic() >= self._flush_due:
                    self._flush()
        finally:
            self._flush()
            self._close()

    def _next(self, wait: float | None):
        try:
            return self._queue.get(timeout=wait)
        except queue.Empty:
            return None

    def _wait_time(self) -> float:
        if self._stopping.is_set():
            return 0.05  # only waiting for the sentinel or an empty queue
        if self._unflushed:
            return max(0.0, self._flush_due - time.monotonic())
        return 0.5  # idle: wake now and then to notice a stop without its sentinel

    def _write_event(self, event) -> None:
        try:
            line = self._encode(event)
        except Exception as exc:  # noqa: BLE001 - an event we cannot serialise: count it, keep going
            self._count("errors")
            self._count("dropped")
            self._log.error("file sink cannot encode event", event_type=type(event).__name__, error=str(exc))
            return
        if not self._ensure_open():
            self._count("dropped")
            return
        try:
            if self.options.max_bytes and self._size > len(self._header()) and self._size + len(line) > self.options.max_bytes:
                self._rotate()
            self._file.write(line)
            self._size += len(line)
            self._unflushed += 1
            if self._unflushed == 1:
                self._flush_due = time.monotonic() + self.options.flush_seconds
        except OSError as exc:
            self._count("dropped")  # this line; the unflushed ones are counted by _fail
            self._fail("write", exc)

    def _flush(self) -> None:
        if self._file is None or not self._unflushed:
            return
        try:
            self._file.flush()
            if self.options.fsync:
                os.fsync(self._file.fileno())
        except OSError as exc:
            self._fail("flush", exc)
            return
        self._count("sent", self._unflushed)
        self._unflushed = 0

    # ------------------------------------------------------------------ files

    def _ensure_open(self) -> bool:
        if self._file is not None:
            return True
        if time.monotonic() < self._retry_at:
            return False
        try:
            self._open()
        except OSError as exc:
            self._fail("open", exc)
            return False
        if self._failing:
            self._log.info("file sink writing again")
            self._failing = False
        self._retry_delay = RETRY_MIN_S
        return True

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = self._header()
        if header and self.path.exists() and self.path.stat().st_size and not _starts_with(self.path, header):
            self._rotate_files()  # written with other columns: do not mix two headers in one file
        f = open(self.path, "ab")  # noqa: SIM115 - held open across writes, closed by _close
        try:
            size = f.tell()
            if size and not _ends_with_newline(self.path):
                f.write(b"\n")  # a line torn by an earlier fault ends here; the next one starts clean
                size += 1
            if not size and header:
                f.write(header)
                size = len(header)
        except OSError:
            f.close()
            raise
        self._file, self._size = f, size

    def _rotate(self) -> None:
        self._flush()
        self._close()
        self._rotate_files()
        self._open()

    def _rotate_files(self) -> None:
        """path -> path.1 -> ... -> path.<keep>; the oldest falls off the end."""
        keep = self.options.keep
        stale = keep + 1
        while (old := self._rotated(stale)).exists():  # left over from a larger ``keep``
            old.unlink()
            stale += 1
        for i in range(keep - 1, 0, -1):
            if self._rotated(i).exists():
                os.replace(self._rotated(i), self._rotated(i + 1))
        if keep:
            os.replace(self.path, self._rotated(1))
        else:
            self.path.unlink(missing_ok=True)
        self._count("rotations")

    def _rotated(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def _close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError as exc:
                self._fail("close", exc)

    def _fail(self, action: str, exc: OSError) -> None:
        """A file fault: lines not yet flushed are lost, the file is reopened later."""
        self._count("errors")
        if self._unflushed:
            self._count("dropped", self._unflushed)
            self._unflushed = 0
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass  # already failing; the first error is the one reported
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(RETRY_MAX_S, self._retry_delay * 2)
        if not self._failing:
            self._failing = True
            self._log.error("file sink failed; dropping lines until it can write again", action=action, error=str(exc))

    # ------------------------------------------------------------------ counters

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _drop_queued(self) -> None:
        n = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            n += item is not _STOP
        self._count("dropped", n)


class JsonlSink(_FileSink):
    """One JSON object per line (``event.to_dict()``; non-finite numbers become null)."""

    type_name = "jsonl"
    Options = Options

    def _encode(self, event) -> bytes:
        record = event.to_dict()
        try:
            text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except ValueError:  # NaN or Inf somewhere: JSON has no spelling for them
            text = json.dumps(_finite(record), ensure_ascii=False, separators=(",", ":"))
        return text.encode("utf-8") + b"\n"


class CsvSink(_FileSink):
    """A header row, then one row per event; columns are the events' fields (``event`` first)."""

    type_name = "csv"
    Options = Options

    def __init__(self, options: Options, name: str = ""):
        super().__init__(options, name)
        self.columns = csv_columns(options.events)
        self._header_bytes = _csv_row(self.columns)

    def _header(self) -> bytes:
        return self._header_bytes

    def _encode(self, event) -> bytes:
        record = event.to_dict()
        unknown = set(record) - set(self.columns)
        if unknown:  # the columns come from somad.events, so this is a programming error
            raise ValueError(f"fields {sorted(unknown)} have no column in {self.path}")
        return _csv_row([_csv_value(record.get(column)) for column in self.columns])


def csv_columns(events: str) -> list[str]:
    """Column order: ``event`` first, then each event type's fields in declaration order.

    >>> csv_columns("scores")
    ['event', 'stream', 'time', 'index', 'record', 'bits', 'anomaly']
    """
    columns = ["event"]
    for event_type in EVENT_TYPES[events]:
        columns += [f.name for f in fields(event_type) if f.name not in columns]
    return columns


def _csv_row(values) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(values)
    return out.getvalue().encode("utf-8")


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # full precision (str() is the same in Python 3, but say what we mean)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(_finite(value), separators=(",", ":"))
    return str(value)


def _finite(value):
    """``value`` with NaN/Inf floats replaced by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(prefix)) == prefix


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
