"""What the fault tests share: a somad daemon in another process, seen only from outside.

- ``start_daemon(config, log)``: ``somad run --config FILE`` as a fresh subprocess (the
  console script, a cold start: interpreter, torch, somad);
- ``WarmLauncher``: the same ``somad run --config FILE`` in a process forked from a server
  that has imported somad and torch already: a power-cut test restarts the daemon dozens of
  times, and a cold start costs seconds on a loaded machine. The child runs the real command
  line (``somad.cli.main``) and is killed like any process;
- ``DaemonProcess``: its JSON log (``wait_event``), its ``/metrics`` (address read from the
  ``metrics_listening`` line, ``metric()`` sums samples), its RSS, ``kill()`` (SIGKILL, reaped
  at once: a zombie would still look alive to the checkpoint store's stale-temp check) and
  ``terminate()``;
- ``InProcessDaemon``: a ``Daemon`` on a thread of the test, where a test-only source or a
  hand inside the running model is needed;
- ``AppendingWriter``: a thread that keeps appending fixed-length lines to a file;
- ``mount_tmpfs`` / ``fill_disk`` / ``CreationWatch`` (inotify): disks that fill, and acting
  the moment a file appears;
- ``record_figures``: measured figures into ``bench/out/faults-part1.json`` (merged by section).

Every wait is bounded and says what it waited for when it gives up.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import platform
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Self

from prometheus_client.parser import text_string_to_metric_families

from tests.support import wait_for as wait_until

REPO = Path(__file__).resolve().parents[2]
SOMAD = Path(sys.executable).with_name("somad")  # the console script of this environment
FIGURES = REPO / "bench" / "out" / "faults-part1.json"
CHILD_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------- the log


def parse_log_line(line: str) -> dict:
    """One stderr line of the daemon: its JSON object, or ``{"event": None, "raw": line}``.

    >>> parse_log_line('{"event": "ready", "streams": 1}')["event"]
    'ready'
    >>> parse_log_line("somad: cannot start: boom")["raw"]
    'somad: cannot start: boom'
    """
    try:
        entry = json.loads(line)
    except ValueError:
        return {"event": None, "raw": line}
    return entry if isinstance(entry, dict) else {"event": None, "raw": line}


def event_time(entry: dict) -> float:
    """Unix seconds of a JSON log line (its ISO-8601 UTC ``timestamp``)."""
    return datetime.fromisoformat(entry["timestamp"]).timestamp()


class LogFile:
    """A log file another process appends to, parsed line by line as it grows."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: list[dict] = []
        self._offset = 0
        self._partial = b""

    def refresh(self) -> list[dict]:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.entries
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            if line.strip():
                self.entries.append(parse_log_line(line.decode("utf-8", "replace")))
        return self.entries

    def text(self) -> str:
        return self.path.read_text(errors="replace") if self.path.exists() else ""


# --------------------------------------------------------------------------- the process


@dataclass
class DaemonProcess:
    """A running ``somad run --config`` in another process."""

    handle: object  # subprocess.Popen, or a ForkedChild of the warm launcher (same poll/wait)
    log: LogFile
    started_at: float  # time.time() just before the process was started
    cold: bool  # True: a fresh interpreter; False: forked from the warm server
    _metrics_base: str | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.handle.pid

    def returncode(self) -> int | None:
        """The exit status once it ended (negative: killed by that signal), else None."""
        return self.handle.poll()

    def wait(self, timeout: float) -> int:
        try:
            return self.handle.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"somad (pid {self.pid}) still running after {timeout} s; log tail:\n{self.tail()}") from None

    # ------------------------------------------------------------------ log

    def events(self, name: str | None = None) -> list[dict]:
        entries = self.log.refresh()
        return entries if name is None else [e for e in entries if e.get("event") == name]

    def wait_event(self, name: str, timeout: float = 60.0, where=None, start: int = 0) -> dict:
        """The first log line ``name`` (from entry ``start`` on) for which ``where(entry)`` holds.
        Fails early, with the log's tail, if the process ends first."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.log.refresh()
            for entry in entries[start:]:
                if entry.get("event") == name and (where is None or where(entry)):
                    return entry
            if self.returncode() is not None:
                self.log.refresh()
                found = [e for e in self.log.entries[start:] if e.get("event") == name and (where is None or where(e))]
                if found:
                    return found[0]
                raise AssertionError(f"somad exited ({self.returncode()}) before logging {name!r}; log tail:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name!r} log line within {timeout} s; log tail:\n{self.tail()}")
            time.sleep(0.01)

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.text().splitlines()[-lines:])

    # ------------------------------------------------------------------ metrics

    def metrics_base(self, timeout: float = 60.0) -> str:
        if self._metrics_base is None:
            address = self.wait_event("metrics_listening", timeout)["address"]
            self._metrics_base = f"http://{address}"
        return self._metrics_base

    def scrape(self, timeout: float = 10.0) -> dict[str, list[tuple[dict, float]]]:
        return scrape(self.metrics_base() + "/metrics", timeout)

    def metric(self, name: str, **labels) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
        return metric_value(self.scrape(), name, **labels)

    def wait_metric(self, name: str, predicate, timeout: float = 60.0, **labels) -> float:
        deadline = time.monotonic() + timeout
        while True:
            value = self.metric(name, **labels)
            if predicate(value):
                return value
            if self.returncode() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name}{labels} stayed at {value} (want {predicate.__doc__ or 'condition'}); log tail:\n{self.tail()}")
            time.sleep(0.05)

    # ------------------------------------------------------------------ process

    def rss_bytes(self) -> int:
        """Resident memory from /proc/<pid>/status (VmRSS)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS for pid {self.pid}")

    def kill(self) -> float:
        """SIGKILL (a power cut, as far as this process can tell) and reap; returns when it was sent."""
        at = time.time()
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait(30.0)
        return at

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the orderly shutdown; returns the exit status."""
        if self.returncode() is None:
            os.kill(self.pid, signal.SIGTERM)
        return self.wait(timeout)

    def ensure_dead(self) -> None:
        if self.returncode() is None:
            self.kill()


def scrape(url: str, timeout: float = 10.0) -> dict[str, list[tuple[dict, float]]]:
    """A ``/metrics`` page as {sample name: [(labels, value), ...]}."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def metric_value(samples: dict, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(value for got, value in samples.get(name, []) if all(got.get(k) == v for k, v in labels.items()))


class InProcessDaemon:
    """A ``Daemon`` on a thread of this process, for what a subprocess cannot do: a test-only
    source type, or reaching into a running model. Stopped and joined on leaving the block."""

    def __init__(self, config_text: str):
        from somad.config import parse_config
        from somad.daemon import Daemon

        self.daemon = Daemon(parse_config(config_text))
        self.thread = threading.Thread(target=self._run, name="somad-in-process", daemon=True)
        self.rc: int | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.rc = self.daemon.run()
        except BaseException as err:  # noqa: BLE001 - reported by __exit__
            self.error = err

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.daemon.request_stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the daemon did not stop within 60 s"
        if self.error is not None and exc[0] is None:
            raise self.error

    def model(self, stream: str, key: str = "", timeout: float = 30.0):
        """The running ``stream.Model`` of ``stream`` (once its runner exists)."""
        runner = wait_until(lambda: self.daemon.runners.get(stream), timeout, f"stream {stream!r} to start")
        return wait_until(lambda: runner.pipeline.models.get(key), timeout, f"the model of {stream!r}")

    def metric(self, name: str, **labels) -> float:
        http = wait_until(lambda: self.daemon.http if self.daemon.http is not None and self.daemon.http.port else None, 30, "the metrics server")
        return metric_value(scrape(http.url("/metrics")), name, **labels)


def start_daemon(config: Path, log_path: Path) -> DaemonProcess:
    """``somad run --config`` as a new process (cold start). Its stdout and stderr go through a
    pipe that a thread of this process copies to ``log_path``: the log is written by the
    test, so a file-size limit put on the daemon (``prlimit``) never cuts its log."""
    started = time.time()
    handle = subprocess.Popen(
        [str(SOMAD), "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        env={**os.environ, **CHILD_ENV},
    )
    threading.Thread(target=_copy_lines, args=(handle.stdout, Path(log_path)), name=f"somad-{handle.pid}-log", daemon=True).start()
    return DaemonProcess(handle, LogFile(log_path), started, cold=True)


def _copy_lines(pipe, path: Path) -> None:
    with pipe, path.open("ab") as out:
        for line in pipe:
            out.write(line)
            out.flush()


def _daemon_child(config: str, log_path: str) -> None:
    """In a forked child of the warm server: stdio to the log, then exactly ``somad run --config``."""
    code = 1
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process' own stdio
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        from somad.cli import main

        code = main(["run", "--config", config])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - report it in the log, as the console script would
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)  # never back into the server's loop


def serve_forks() -> None:
    """The warm server's main loop (run by ``WarmLauncher`` in its own process): one JSON
    request per line on stdin, one JSON answer per line on stdout.

    ``{"start": CONFIG, "log": PATH}`` -> ``{"pid": N}``; ``{"poll": N, "timeout": S}`` ->
    ``{"status": exit status or null}`` (it reaps the child: the server is its parent).
    """
    for module in WarmLauncher.PRELOAD:
        importlib.import_module(module)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "start" in request:
            pid = os.fork()
            if pid == 0:
                _daemon_child(request["start"], request["log"])
            answer = {"pid": pid}
        else:
            answer = {"status": _reap(request["poll"], request.get("timeout", 0.0))}
        print(json.dumps(answer), flush=True)


def _reap(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return _REAPED.get(pid)
        if done:
            _REAPED[pid] = os.waitstatus_to_exitcode(status)
            return _REAPED[pid]
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.005)


_REAPED: dict[int, int] = {}  # in the server: exit statuses of children already reaped


class ForkedChild:
    """A child of the warm server, with the part of ``subprocess.Popen``'s interface used here."""

    def __init__(self, launcher: WarmLauncher, pid: int):
        self.launcher = launcher
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.launcher.request({"poll": self.pid, "timeout": 0.0})["status"]
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"somad (forked pid {self.pid})", timeout)
            self.returncode = self.launcher.request({"poll": self.pid, "timeout": min(0.5, max(0.0, deadline - time.monotonic()))})["status"]
        return self.returncode


class WarmLauncher:
    """Starts ``somad run --config`` as forks of a server process that imported somad and torch
    once (a cold start costs seconds on a loaded machine; a fork, tens of milliseconds). The
    server is a plain subprocess of the test, so nothing of pytest's state is forked."""

    PRELOAD = ("torch", "somad.cli", "somad.daemon", "somad.config", "somad.stream", "somad.checkpoint", "somad.metrics", "somad.http", "adapters.file_source", "adapters.file_sink")

    def __init__(self, timeout: float = 120.0):
        self._lock = threading.Lock()
        self.server = subprocess.Popen(
            [sys.executable, "-c", "from tests.faults.harness import serve_forks; serve_forks()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, **CHILD_ENV},
        )
        self._read_answer(timeout)

    def _read_answer(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.server.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"the warm launcher did not answer within {timeout} s")
        line = self.server.stdout.readline()
        if not line:
            raise AssertionError(f"the warm launcher ended (status {self.server.poll()})")
        return json.loads(line)

    def request(self, request: dict, timeout: float = 60.0) -> dict:
        with self._lock:
            self.server.stdin.write((json.dumps(request) + "\n").encode())
            self.server.stdin.flush()
            return self._read_answer(timeout + request.get("timeout", 0.0))

    def start(self, config: Path, log_path: Path) -> DaemonProcess:
        started = time.time()
        pid = self.request({"start": str(config), "log": str(log_path)})["pid"]
        return DaemonProcess(ForkedChild(self, pid), LogFile(log_path), started, cold=False)

    def close(self) -> None:
        if self.server.poll() is None:
            self.server.stdin.close()
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(10)


# --------------------------------------------------------------------------- inputs


def fixed_line(index: int, width: int) -> bytes:
    """Line ``index`` of a sensor-like stream, exactly ``width`` bytes with its newline.

    >>> fixed_line(3, 16)
    b'000003,21,4.3  \\n'
    """
    text = f"{index:06d},{(index * 7) % 40},{(index % 9) + 0.3 * (index % 4):.1f}"
    return text.ljust(width - 1)[: width - 1].encode() + b"\n"


class Periodic:
    """A test's helper thread: ``tick()`` every ``period`` seconds from ``start()`` (or the
    with-block's start) until ``stop()`` (its end); a tick that returns False ends it early."""

    def __init__(self, name: str, period: float):
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def tick(self) -> bool | None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            if self.tick() is False:
                return

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class AppendingWriter(Periodic):
    """A thread appending ``fixed_line``s to ``path`` at about ``rate`` bytes/s, in whole lines
    (one ``write`` each batch, so that a reader sees whole lines almost always)."""

    def __init__(self, path: Path, rate: float, width: int = 16, period: float = 0.02):
        super().__init__("appending-writer", period)
        self.path = Path(path)
        self.width = width
        self.lines_per_tick = max(1, round(rate * period / width))
        self.lines = 0

    def write_lines(self, n: int) -> None:
        data = b"".join(fixed_line(self.lines + i, self.width) for i in range(n))
        with self.path.open("ab") as f:
            f.write(data)
        self.lines += n

    def tick(self) -> None:
        self.write_lines(self.lines_per_tick)

    def stop(self, timeout: float = 10.0) -> int:
        """Stop appending; returns the file's size."""
        super().stop(timeout)
        return self.path.stat().st_size


def mount_tmpfs(where: Path, size: str, read_only: bool = False) -> str | None:
    """Mount a tmpfs of ``size`` at ``where``; None when done, else why it could not be
    (not root, no mount permission in this container...)."""
    if os.geteuid() != 0:
        return "not root"
    options = f"size={size},mode=0755" + (",ro" if read_only else "")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "somad-faults", str(where)], capture_output=True, text=True, timeout=30, check=False)
    return None if result.returncode == 0 else (result.stderr.strip() or f"mount exited {result.returncode}")


def unmount(where: Path) -> None:
    if subprocess.run(["umount", str(where)], capture_output=True, timeout=30, check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30, check=False)  # busy: detach now, free when unused


def fill_disk(directory: Path, block: int = 1 << 16) -> Path:
    """A file that takes every free byte of ``directory``'s file system (ENOSPC ends it)."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        for size in (block, 4096, 512, 1):  # big blocks, then what remains, to the last byte
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
    return filler


class CreationWatch:
    """Names created in a directory, as the kernel reports them (Linux inotify): a test can act
    within microseconds of a file's appearance, e.g. kill a daemon while its snapshot's temp
    file is being written (it exists for a few milliseconds)."""

    IN_CREATE = 0x100
    IN_NONBLOCK_CLOEXEC = 0o4000 | 0o2000000

    def __init__(self, directory: Path):
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(self.IN_NONBLOCK_CLOEXEC)
        if self.fd < 0 or self._libc.inotify_add_watch(self.fd, os.fsencode(directory), self.IN_CREATE) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {directory}")

    def wait(self, match, timeout: float) -> str | None:
        """The first created name for which ``match(name)`` holds, or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            if not select.select([self.fd], [], [], remaining)[0]:
                return None
            data = os.read(self.fd, 65536)
            position = 0
            while position < len(data):
                _, _, _, length = struct.unpack_from("iIII", data, position)
                name = data[position + 16 : position + 16 + length].rstrip(b"\0").decode(errors="replace")
                position += 16 + length
                if match(name):
                    return name
        return None

    def close(self) -> None:
        os.close(self.fd)


# --------------------------------------------------------------------------- figures


def summarize(values: list[float], digits: int = 3) -> dict:
    """Count, mean, median, max (and min) of a list of measurements.

    >>> summarize([1.0, 2.0, 6.0])
    {'n': 3, 'mean': 3.0, 'median': 2.0, 'min': 1.0, 'max': 6.0}
    """
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {"n": len(values), "mean": round(sum(values) / len(values), digits), "median": round(median, digits), "min": round(ordered[0], digits), "max": round(ordered[-1], digits)}


def record_figures(section: str, figures: dict, path: Path = FIGURES) -> None:
    """Merge ``figures`` under ``section`` into the suite's JSON report (gitignored)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        report = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        report = {}
    report["meta"] = {
        "written": datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "command": "OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/faults -q",
    }
    report[section] = figures
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    os.replace(temp, path)
