"""``somad run --config FILE``: every configured stream, learned, scored and snapshotted.

Lifecycle (uvicorn style: signal handlers only set flags, the main loop acts on them):

    start: logging -> metrics/health server -> each stream (resume from its checkpoint,
           start its source) -> READY
    run:   the main loop supervises streams (a failed stream is restarted with backoff,
           never taking the others down), reloads on SIGHUP, pings the watchdog
    stop:  SIGTERM/SIGINT -> stop sources -> drain queues within ``shutdown_timeout`` ->
           final snapshots -> stop sinks -> exit 0; a second signal exits at once.

Threads: per stream, a reader (source -> queue) and a worker (queue -> learner -> scorer ->
sinks, snapshots). Torch runs with one thread per process: edge devices have few cores and
streams are parallel already.
"""

from __future__ import annotations

import errno
import os
import queue
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import structlog
import torch

from adapters.base import SourceEnded
from adapters.registry import make_sink, make_source

from .chunk_queue import ChunkQueue
from .config import config_version
from .stream import StreamPipeline

READ_TIMEOUT = 0.2  # seconds a reader waits on its source before checking for stop
WORK_BATCH_BYTES = 1 << 14  # bytes a worker takes from its queue at once
WORK_PIECE_BYTES = 2048  # bytes learned per step at most: a stop is seen within one piece, even mid-chunk
GATHER_SECONDS = 0.02  # a trickle smaller than a piece waits this long for more before a learner call
DRAIN_SHARE = 0.8  # of shutdown_timeout spent draining; the rest covers the piece in flight, final snapshots, sinks
RESTART_BACKOFF = (1.0, 60.0)  # first and largest delay before restarting a failed stream
MIN_STALL_SECONDS = 2.0  # a worker is never called wedged sooner (a GC pause, a loaded CPU)
DEFAULT_STALL_SECONDS = 30.0  # without a systemd watchdog: half of the units' WatchdogSec=60s


def stall_limit(watchdog_interval: float | None) -> float:
    """Seconds a stream's worker may go without a sign of life before the stream counts as
    wedged: the watchdog's ping interval (half of ``WatchdogSec=``), so raising ``WatchdogSec=``
    for a slow device (a large model's snapshot on an SD card) raises this bound with it.

    >>> stall_limit(30.0), stall_limit(0.5), stall_limit(None)
    (30.0, 2.0, 30.0)
    """
    return max(MIN_STALL_SECONDS, watchdog_interval or DEFAULT_STALL_SECONDS)


def coalesce(chunks) -> list:
    """Adjacent chunks of one sub-stream joined into one (records never are). A learner call
    costs far more than a serial read of one 12-byte line, so a worker that fell behind catches
    up in a few large calls instead of falling further behind in many small ones. A joined
    chunk keeps its first arrival time (latency counts from the oldest byte) and last offset.

    >>> from adapters.base import Chunk
    >>> [(c.data, c.key, c.offset) for c in coalesce([Chunk(b"1,", offset=2), Chunk(b"2\\n", offset=4), Chunk(b"x", key="b"), Chunk(b"m", is_record=True)])]
    [(b'1,2\\n', '', 4), (b'x', 'b', None), (b'm', '', None)]
    """
    groups: list[list] = []
    for chunk in chunks:
        last = groups[-1][-1] if groups else None
        joinable = last is not None and not (chunk.is_record or last.is_record)
        if joinable and chunk.key == last.key and (chunk.offset is None) == (last.offset is None):
            groups[-1].append(chunk)
        else:
            groups.append([chunk])
    return [g[0] if len(g) == 1 else replace(g[0], data=b"".join(c.data for c in g), offset=g[-1].offset) for g in groups]


def split_chunks(chunks, limit: int):
    """The chunks cut into pieces of at most ``limit`` bytes, each with the offset just past it
    (so learning can stop between pieces without skipping or repeating on resume). A record
    (``is_record``: a message, a datagram) is never cut.

    >>> from adapters.base import Chunk
    >>> [(c.data, c.offset) for c in split_chunks([Chunk(b"abcde", offset=105), Chunk(b"xyz", is_record=True)], 2)]
    [(b'ab', 102), (b'cd', 104), (b'e', 105), (b'xyz', None)]
    """
    for chunk in chunks:
        size = len(chunk.data)
        if chunk.is_record or size <= limit:
            yield chunk
            continue
        for start in range(0, size, limit):
            end = min(size, start + limit)
            offset = None if chunk.offset is None else chunk.offset - (size - end)
            yield replace(chunk, data=chunk.data[start:end], offset=offset)


def require_writable(state_dir: Path) -> None:
    """Refuse to start on a state_dir where no checkpoint can be written (a read-only mount, a
    wrong owner): running on would learn for months and lose it all at the next restart, with
    only a counter to say so. A full disk is not refused: snapshots fail, are counted and
    retried, and scoring goes on until space returns."""
    from .checkpoint import CheckpointError

    probe = state_dir / f".somad-write-probe.{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return
        raise CheckpointError(f"state_dir is not writable ({err.strerror or err}): checkpoints could not be saved; fix the mount or its owner, or set another state_dir", state_dir) from None


class ReloadRefused(Exception):
    """A valid config that cannot be put in force here (state_dir not creatable, metrics
    address taken); raised before anything was swapped, so the running config stays."""


class StreamRunner:
    """One stream's source, queue, pipeline and the two threads that move bytes through them."""

    def __init__(self, cfg, state_dir: Path, metrics, on_bad_checkpoint: str = "fresh"):
        self.cfg = cfg
        self.metrics = metrics
        self.log = structlog.get_logger("somad.stream").bind(stream=cfg.name)
        self.sinks = [make_sink(s.type, s.options, name=cfg.name) for s in cfg.sinks]
        self.pipeline = StreamPipeline(cfg, state_dir, metrics, self.sinks, self.log, on_bad_checkpoint=on_bad_checkpoint)
        self.source = make_source(cfg.source.type, cfg.source.options, name=cfg.name)
        self.queue = ChunkQueue(cfg.queue.resolved_max_bytes(cfg.source.type), cfg.queue_policy)
        self._stop_reading = threading.Event()
        self._stop_working = threading.Event()
        self.error: BaseException | None = None
        self.source_ended = False
        self.finished = False  # worker drained everything after the source ended or stop
        self.progress_at = time.monotonic()  # last time the worker came back from a step (or idled healthily)
        self._learned_seen = -1  # learned bytes at the previous stalled_for() (main thread only)
        self._learned_at = self.progress_at  # when the main thread last saw them move
        self._io_published_at = 0.0
        self._status_prev = (0, 0.0)  # (bytes, bits) at the previous status line
        self._queue_dropped_seen = 0
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        offset = self.pipeline.saved_offset() if not self.cfg.split_by_key else None
        if offset is not None and hasattr(self.source, "restore"):
            self.source.restore(offset)
        for sink in self.sinks:
            sink.start()
        self.source.start()
        for target, what in ((self._read_loop, "reader"), (self._work_loop, "worker")):
            thread = threading.Thread(target=self._guard(target), name=f"{self.cfg.name}-{what}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.log.info("stream_started", source=self.cfg.source.type, queue_policy=self.queue.policy)

    def stop(self, timeout: float) -> None:
        """Stop reading, drain what is queued, snapshot, close sinks: all within ``timeout``."""
        deadline = time.monotonic() + timeout
        self.stop_reading()
        self.drain(until=time.monotonic() + timeout * DRAIN_SHARE)
        self.finish(deadline)

    def stop_reading(self) -> None:
        """Stop the source and close the queue; the worker goes on with what is queued."""
        self._stop_reading.set()
        self.source.stop()
        self.queue.close()

    def drain(self, until: float) -> None:
        """Let the worker learn what is queued until ``until`` (monotonic), then stop it; it
        leaves at the end of the piece in flight (``WORK_PIECE_BYTES``)."""
        for thread in self._threads:
            thread.join(max(0.0, until - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            self._stop_working.set()  # out of time: the worker leaves the rest of the queue
            self.log.warning("drain_timeout", queued_bytes=self.queue.queued_bytes)
            for thread in self._threads:
                thread.join(2.0)

    def finish(self, deadline: float) -> None:
        """Final snapshot, sinks flushed within ``deadline`` (monotonic), last metrics."""
        if any(t.is_alive() for t in self._threads if t.name.endswith("-worker")):
            # A wedged worker is inside a step: a snapshot now could save a half-updated model.
            self.log.error("final_snapshot_skipped", reason="the worker is still inside a step", kept="the last periodic snapshot")
        else:
            self.pipeline.snapshot(force=True)
        for sink in self.sinks:
            sink.stop(timeout=max(0.5, deadline - time.monotonic()))
        self.publish_io_metrics(force=True)
        self.log.info("stream_stopped", dropped_bytes=self.queue.dropped_bytes)

    def status(self, elapsed: float) -> dict:
        """Progress since the previous call: bytes/s, bits/byte, band d, alerts open."""
        models = list(self.pipeline.models.values())
        learned = sum(m.learned_here for m in models)
        bits = sum(m.total_bits for m in models)
        prev_bytes, prev_bits = self._status_prev
        self._status_prev = (learned, bits)
        new = learned - prev_bytes
        return {
            "bytes": sum(m.learner.bytes_seen for m in models),
            "bytes_per_second": round(new / max(elapsed, 1e-9)),
            "bits_per_byte": round((bits - prev_bits) / new, 3) if new else None,
            "d": round(max((m.learner.metabolism.d for m in models), default=0.0), 2),
            "records": sum(m.scorer.records for m in models),
            "alerts_open": sum(m.scorer.alert_open for m in models),
            "queued_bytes": self.queue.queued_bytes,
            "dropped_bytes": self.queue.dropped_bytes,
        }

    def summary(self) -> dict:
        """Totals for ``--json``: bytes learned, records scored, alerts, drops."""
        models = self.pipeline.models.values()
        return {
            "bytes": sum(m.learner.bytes_seen for m in models),
            "records": sum(m.scorer.records for m in models),
            "alerts": sum(m.scorer.alerts_total for m in models),
            "dropped_bytes": self.queue.dropped_bytes + self.pipeline.unrouted_bytes,
            "bits_per_byte": sum(m.total_bits for m in models) / max(1, sum(m.learned_here for m in models)),
            "checkpoint_ids": [m.checkpoint_id for m in models],
        }

    @property
    def alive(self) -> bool:
        return self.error is None and (self.finished or all(t.is_alive() for t in self._threads))

    def learned_bytes(self) -> int:
        # list(): the worker may add a sub-stream's model while another thread sums
        return sum(m.learner.bytes_seen for m in list(self.pipeline.models.values()))

    def stalled_for(self, now: float) -> float:
        """Seconds the worker has shown no sign of life: it has neither come back from its
        current step (``pipeline.process`` or a snapshot) nor learned a byte inside it. A slow
        step that keeps learning is not a stall; one blocked in a sink or a disk write is.
        Called from the main thread only."""
        if self.finished or self.error is not None:
            return 0.0
        learned = self.learned_bytes()
        if learned != self._learned_seen:
            self._learned_seen, self._learned_at = learned, now
        return max(0.0, now - max(self.progress_at, self._learned_at))

    def _guard(self, loop):
        def run():
            try:
                loop()
            except BaseException as err:  # noqa: BLE001 - a stream fault must not kill the daemon
                self.error = err
                self.log.exception("stream_failed", error=str(err))
                self._stop_reading.set()
                self.queue.close()

        return run

    # ------------------------------------------------------------------ threads

    def _read_loop(self) -> None:
        while not self._stop_reading.is_set():
            try:
                chunks = self.source.read(READ_TIMEOUT)
            except SourceEnded:
                self.source_ended = True
                self.log.info("source_ended")
                break
            for chunk in chunks:
                while not self.queue.put(chunk, timeout=READ_TIMEOUT):
                    if self._stop_reading.is_set() or self.queue.closed:
                        return
            self.publish_io_metrics()
        self.queue.close()

    def publish_io_metrics(self, force: bool = False) -> None:
        """Source state, queue drops and sink counters into the stream's series (at most 1/s)."""
        now = time.monotonic()
        if now - self._io_published_at < 1.0 and not force:
            return
        self._io_published_at = now
        series = self.metrics.stream(self.cfg.name)
        series.set_source(self.source.status())
        dropped = self.queue.dropped_bytes
        series.observe_batch(bytes=0, dropped_bytes=dropped - self._queue_dropped_seen)
        self._queue_dropped_seen = dropped
        for i, sink in enumerate(self.sinks):
            series.set_sink(f"{i}:{sink.type_name}", sink.stats())

    def _work_loop(self) -> None:
        while not self._stop_working.is_set():
            chunks = self._next_batch()
            if chunks:
                self._process(chunks)
            elif self.queue.closed:
                break
            self.progress_at = time.monotonic()
            if not self._stop_reading.is_set():
                self.pipeline.snapshot()
        self.finished = True

    def _next_batch(self) -> list:
        """What is queued, up to ``WORK_BATCH_BYTES``. A trickle (a serial port delivering one
        line at a time) gets ``GATHER_SECONDS`` to grow first: a learner call has a fixed cost
        of about a millisecond, so twenty one-line calls cost nearly twenty times one
        twenty-line call; the price is at most that much latency."""
        chunks = self.queue.get(timeout=READ_TIMEOUT, max_bytes=WORK_BATCH_BYTES)
        size = sum(len(c.data) for c in chunks)
        if chunks and size < WORK_PIECE_BYTES and not self.queue.closed:
            time.sleep(GATHER_SECONDS)
            chunks += self.queue.get(timeout=0, max_bytes=WORK_BATCH_BYTES - size)
        return chunks

    def _process(self, chunks) -> None:
        # Small reads joined (per-call cost), then cut into pieces, so that a drain cut short
        # stops within one piece and not after a whole 64 KiB file chunk (seconds on a slow
        # device); the offset stays exact.
        for piece in split_chunks(coalesce(chunks), WORK_PIECE_BYTES):
            if self._stop_working.is_set():
                return  # unlearned: a file source resumes from the offset of the last piece learned
            self.pipeline.process([piece])


class Daemon:
    def __init__(
        self, config, metrics=None, notifier=None, config_path: str | Path | None = None, status_every: float = 60.0, remote_document: str | None = None
    ):
        from .metrics import Metrics  # imported here: the embedded run does not need it

        self.config = config
        self.config_path = Path(config_path) if config_path else None  # re-read on SIGHUP
        self.remote_document = remote_document  # the accepted remote document in force (None: the local file is)
        self.remote = None  # somad.remote.RemoteConfigService while config.remote is set
        self._watch = None  # somad.config_watch.ConfigFileWatch while config.watch_config is set
        self.metrics = metrics or Metrics()
        self.notifier = notifier
        self.stall_seconds = stall_limit(getattr(notifier, "watchdog_interval", None))  # see _progressing
        self._wedged: set[str] = set()  # streams whose worker is stalled now (logged once per episode)
        self.log = structlog.get_logger("somad.daemon")
        self.runners: dict[str, StreamRunner] = {}
        self._restart_at: dict[str, tuple] = {}  # name -> (config, when, backoff) of failed streams
        self._stop = threading.Event()
        self._reload_requested = threading.Event()
        self._pending: queue.Queue = queue.Queue()  # (text, origin, reply) documents to apply
        self._signals = 0
        self.http = None
        self.summary: dict = {}
        self.status_every = status_every  # seconds between status log lines (0: none)
        self._status_at = time.monotonic()
        self._started_at = time.monotonic()

    # ------------------------------------------------------------------ signals

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGHUP, lambda signum, frame: self._reload_requested.set())

    def _on_stop_signal(self, signum, frame) -> None:
        self._signals += 1
        if self._signals > 1:
            # Second signal: leave now, without draining or snapshots. os._exit rather than
            # SystemExit: a normal interpreter exit tears down worker threads that are inside
            # torch, and that aborts the process (SIGABRT) instead of exiting with our status.
            os.write(2, b"somad: second signal: exiting now, without draining or final snapshots\n")
            os._exit(130)
        self._stop.set()

    def request_stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        torch.set_num_threads(1)
        try:
            self._start()
            while not self._stop.wait(0.2):
                if self._watch is not None and self._watch.changed():
                    self.log.info("config_file_changed", file=str(self.config_path))
                    self._reload_requested.set()
                self._apply_pending_reloads()
                self._supervise()
                if self.runners and all(r.finished for r in self.runners.values()):
                    self.log.info("all_sources_ended")
                    break
                progressing = self._progressing()  # every loop: a wedge is logged even without systemd
                if self.notifier:
                    self.notifier.tick(self.status_line(), progressing=progressing)
                self._log_status()
        finally:
            self.shutdown()
        return 0

    def _start(self) -> None:
        state_dir = Path(self.config.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        require_writable(state_dir)
        self._start_http()
        for cfg in self.config.streams:
            self._start_stream(cfg)
        self._start_remote()
        self._follow_config_file()
        self.log.info("ready", streams=len(self.runners), state_dir=str(state_dir))
        if self.notifier:
            self.notifier.ready(self.status_line())

    def shutdown(self) -> None:
        if self.notifier:
            self.notifier.stopping()
        self._log_status(force=True)
        self._stop_remote()  # no new documents while the streams stop
        self.log.info("stopping", streams=len(self.runners))
        runners = list(self.runners.values())
        budget = self.config.shutdown_timeout
        started = time.monotonic()
        # Every source stops first, so all workers drain side by side within one shared budget
        # (stopping streams one after another would let the first use up the others' time).
        for runner in runners:
            runner.stop_reading()
        for runner in runners:
            runner.drain(until=started + budget * DRAIN_SHARE)
        for runner in runners:
            runner.finish(deadline=started + budget)
        streams = {r.cfg.name: r.summary() for r in runners}
        total = sum(v["bytes"] for v in streams.values())
        self.summary = {
            "bytes": total,
            "records": sum(v["records"] for v in streams.values()),
            "alerts": sum(v["alerts"] for v in streams.values()),
            "bits_per_byte": sum(v["bits_per_byte"] * v["bytes"] for v in streams.values()) / max(1, total),
            "seconds": time.monotonic() - self._started_at,
            "streams": streams,
        }
        self.runners.clear()
        if self.http is not None:
            self.http.stop()
        self.log.info("stopped")

    def _start_http(self) -> None:
        if not self.config.metrics.enabled:
            return
        from .http import MetricsServer

        self.http = MetricsServer(self.config.metrics.listen, self.metrics.registry, health=self.health)
        self.http.start()
        self.log.info("metrics_listening", address=self.http.address)

    def _start_stream(self, cfg) -> None:
        runner = StreamRunner(cfg, Path(self.config.state_dir), self.metrics, self.config.on_bad_checkpoint)
        runner.start()
        self.runners[cfg.name] = runner

    # ------------------------------------------------------------------ reload

    def request_reload(self) -> None:
        """Re-read the config file (what SIGHUP does); applied by the main loop."""
        self._reload_requested.set()

    def submit_config(self, text: str, origin: str, reply=None, remote: bool = False) -> None:
        """Apply a config document from another thread (remote config); ``reply(ok, detail)``
        is called from the main loop with the version hash or the error. ``remote``: a fleet's
        document (see ``apply_config_text``)."""
        self._pending.put((text, origin, reply, remote))

    def _apply_pending_reloads(self) -> None:
        if self._reload_requested.is_set():
            self._reload_requested.clear()
            self.reload_from_file()
        while not self._pending.empty():
            text, origin, reply, remote = self._pending.get_nowait()
            ok, detail = self.apply_config_text(text, origin, remote=remote)
            if reply is not None:
                reply(ok, detail)

    def reload_from_file(self) -> bool:
        if self.config_path is None:
            self.log.warning("reload_ignored", reason="no config file (embedded default)")
            return False
        if self._watch is not None:
            self._watch.mark_read()
        try:
            text = self.config_path.read_bytes().decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as err:
            self.metrics.config_reloaded(False)
            self.log.error("reload_failed", file=str(self.config_path), error=str(err), kept="the running config")
            return False
        return self.apply_config_text(text, str(self.config_path))[0]

    def apply_config_text(self, text: str, origin: str, remote: bool = False) -> tuple[bool, str]:
        """Validate first; swap only a valid config. Returns (ok, version hash or error).

        A local file (``remote=False``) keeps an accepted remote document in force, under the
        file's device, state_dir and remote sections (``somad.remote.config_in_force``); a
        remote document (``remote=True``) replaces everything but those."""
        from .config import ConfigError, parse_config
        from .remote import config_in_force, parse_remote_document

        if self.notifier:
            self.notifier.reloading()
        previous_document = self.remote_document
        try:
            if remote:
                new, document = parse_remote_document(text, origin, local=self.config), text
            else:
                new, document = config_in_force(parse_config(text, origin), self.remote_document)
            self.remote_document = document  # before the swap: a restarted remote channel reports it
            self.apply_config(new)
        except (ConfigError, ReloadRefused) as err:
            self.remote_document = previous_document
            self.metrics.config_reloaded(False)
            self.log.error("reload_rejected", origin=origin, problems=getattr(err, "problems", [str(err)]), kept="the running config")
            if self.notifier:
                self.notifier.ready(self.status_line())  # out of RELOADING: still serving, on the old config
            return False, str(err)
        version = config_version(text)
        self.metrics.config_reloaded(True)
        self.log.info("reloaded", origin=origin, version=version)
        if self.notifier:
            self.notifier.ready(self.status_line())
        return True, version

    def apply_config(self, new) -> None:
        """Swap to ``new``: restart only the streams whose settings changed; the others keep
        their models, traces, connections and counters untouched."""
        from .config import diff_streams
        from .logs import configure_logging

        old = self.config
        self._prepare_swap(old, new)  # may refuse: nothing has changed yet
        changes = diff_streams(old, new)
        if new.state_dir != old.state_dir:  # every model moves: restart them all
            changes = replace(changes, changed=changes.changed + changes.unchanged, unchanged=())
        timeout = new.shutdown_timeout
        for name in changes.removed + changes.changed:
            runner = self.runners.pop(name, None)
            self._restart_at.pop(name, None)
            if runner is not None:
                runner.stop(timeout=timeout)
            if name in changes.removed:
                for model in runner.pipeline.models.values() if runner is not None else ():
                    self.metrics.remove_stream(model.name)  # sub-stream series ("name/key") too
                self.metrics.remove_stream(name)
        self.config = new
        if new.log != old.log:
            configure_logging(new.log.level, new.log.format)
        for name in changes.added + changes.changed:
            self._start_stream_or_schedule(new.stream(name))
        if new.remote != old.remote:
            self._stop_remote()
            self._start_remote()
        self._follow_config_file()
        self.log.info("streams_swapped", added=changes.added, removed=changes.removed, restarted=changes.changed, untouched=changes.unchanged)

    def _prepare_swap(self, old, new) -> None:
        """What can fail outside the config itself, done before any stream is touched:
        the state directory, and the metrics listener when it moves (the old one is kept
        when the new address cannot be bound). Raises ReloadRefused."""
        try:
            Path(new.state_dir).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ReloadRefused(f"state_dir: cannot create {new.state_dir!r}: {err.strerror or err}") from None
        if new.metrics == old.metrics:
            return
        from .config import parse_listen
        from .http import MetricsServer

        previous = self.http
        server = MetricsServer(new.metrics.listen, self.metrics.registry, health=self.health) if new.metrics.enabled else None
        try:
            if server is not None:
                server.start()
        except OSError as err:
            if previous is None or parse_listen(new.metrics.listen)[1] != previous.port:
                raise ReloadRefused(f"metrics.listen: {err.strerror or err}") from None
            bound = previous.address  # the same port on another host part (0.0.0.0:P for 127.0.0.1:P): free it, then bind
            previous.stop()
            try:
                server.start()
            except OSError as err:
                self.http = MetricsServer(bound, self.metrics.registry, health=self.health)
                self.http.start()  # where it was a moment ago (the port was ours: it binds again)
                raise ReloadRefused(f"metrics.listen: {err.strerror or err}") from None
        if previous is not None:
            previous.stop()
        self.http = server
        if server is not None:
            self.log.info("metrics_listening", address=server.address)

    def _start_remote(self) -> None:
        """Remote configuration channels (after the streams: a document can only replace a running config)."""
        if self.config.remote is None:
            return
        from .remote import RemoteConfigService

        try:
            service = RemoteConfigService(self, self.config.remote)
            service.start()
        except (ValueError, OSError) as err:  # unreadable password_file or TLS files: logged, never fatal
            self.log.error("remote_config_unavailable", error=str(err))
            return
        self.remote = service

    def _stop_remote(self) -> None:
        service, self.remote = self.remote, None
        if service is not None:
            service.stop()

    def _follow_config_file(self) -> None:
        """Watch the config file while ``watch_config`` is on (and there is a file)."""
        from .config_watch import ConfigFileWatch

        wanted = self.config.watch_config and self.config_path is not None
        if wanted and self._watch is None:
            self._watch = ConfigFileWatch(self.config_path)
        elif not wanted:
            self._watch = None

    def _start_stream_or_schedule(self, cfg) -> None:
        """Start a stream; if it cannot start now, the supervisor retries it with backoff."""
        try:
            self._start_stream(cfg)
        except Exception as err:  # noqa: BLE001 - one stream never takes the reload down
            self.log.error("stream_start_failed", stream=cfg.name, error=str(err))
            self._schedule_restart(cfg)

    # ------------------------------------------------------------------ supervision

    def _supervise(self) -> None:
        """Failed streams are stopped and started again after a backoff that doubles per
        failure (1 s up to 60 s); the other streams are never touched."""
        now = time.monotonic()
        for name, runner in list(self.runners.items()):
            if runner.error is not None:
                del self.runners[name]
                runner.stop(timeout=1.0)
                self._schedule_restart(runner.cfg)
        for name, (cfg, when, backoff) in list(self._restart_at.items()):
            if now >= when:
                self._restart_at[name] = (cfg, float("inf"), backoff)  # backoff kept for a next failure
                self.metrics.stream(name).restarted()
                self._start_stream_or_schedule(cfg)

    def _schedule_restart(self, cfg) -> None:
        _, _, backoff = self._restart_at.get(cfg.name, (cfg, 0.0, 0.0))
        backoff = min(RESTART_BACKOFF[1], max(RESTART_BACKOFF[0], backoff * 2))
        self._restart_at[cfg.name] = (cfg, time.monotonic() + backoff, backoff)
        self.log.warning("stream_restart_scheduled", stream=cfg.name, in_seconds=backoff)

    def _progressing(self) -> bool:
        """The watchdog's condition: no stream's worker has gone ``stall_seconds`` without
        coming back from a step or learning a byte inside it. Each wedge is logged when it
        starts and when it ends, so the journal says why systemd restarted the service."""
        now = time.monotonic()
        stalled = {name: runner.stalled_for(now) for name, runner in self.runners.items()}
        wedged = {name for name, seconds in stalled.items() if seconds >= self.stall_seconds}
        for name in sorted(wedged - self._wedged):
            self.log.error("stream_wedged", stream=name, stalled_seconds=round(stalled[name], 1), limit_seconds=self.stall_seconds, watchdog="pings stopped")
        for name in sorted((self._wedged - wedged) & stalled.keys()):
            self.log.warning("stream_unwedged", stream=name)
        self._wedged = wedged
        return not wedged

    def health(self) -> dict:
        wedged = self._wedged
        return {
            name: {"alive": runner.alive, "wedged": name in wedged, "source": runner.cfg.source.type, "connected": runner.source.status().connected}
            for name, runner in list(self.runners.items())
        }

    def _log_status(self, force: bool = False) -> None:
        """One line per stream every ``status_every`` seconds: what it learned since the last."""
        now = time.monotonic()
        if not self.status_every or (now - self._status_at < self.status_every and not force):
            return
        elapsed, self._status_at = now - self._status_at, now
        for runner in self.runners.values():
            self.log.info("status", stream=runner.cfg.name, **runner.status(elapsed))

    def status_line(self) -> str:
        parts = []
        for name, runner in self.runners.items():
            parts.append(f"{name}:{runner.learned_bytes()}B" + (" WEDGED" if name in self._wedged else ""))
        return f"{len(self.runners)} streams " + " ".join(parts)


def run_config_file(path: str, seconds: float | None = None, summary_json: bool = False) -> int:
    """``somad run --config FILE``: 0 after a clean stop, 1 when the config or start fails."""
    import sys

    from .config import ConfigError, load_config

    try:
        config = load_config(path)
    except ConfigError as err:
        print(f"somad: {err}", file=sys.stderr)
        return 1
    return serve(config, config_path=path, seconds=seconds, summary_json=summary_json)


def serve(config, config_path=None, seconds: float | None = None, summary_json: bool = False, status_every: float = 60.0) -> int:
    """Run ``config`` in this process until a signal, ``seconds``, or every source ended."""
    import gc
    import json
    import sys

    from .checkpoint import CheckpointError
    from .logs import configure_logging
    from .notify import SystemdNotifier
    from .remote import config_in_force, persisted_document

    configure_logging(config.log.level, config.log.format)
    local = config
    config, document = config_in_force(local, persisted_document(local.state_dir) if local.remote is not None else None)
    if config.log != local.log:  # an accepted remote document may set another level or format
        configure_logging(config.log.level, config.log.format)
    daemon = Daemon(config, notifier=SystemdNotifier(), config_path=config_path, status_every=status_every, remote_document=document)
    daemon.install_signal_handlers()
    if seconds:
        timer = threading.Timer(seconds, daemon.request_stop)
        timer.daemon = True
        timer.start()
    try:
        daemon.run()
    except (CheckpointError, OSError) as err:
        structlog.get_logger("somad.daemon").error("start_failed", error=str(err))
        print(f"somad: cannot start: {err}", file=sys.stderr)
        return 1
    if summary_json:
        print(json.dumps(daemon.summary))
    # The interpreter's last garbage collections walk torch's whole object graph: over a second
    # on a loaded or slow CPU, on top of shutdown_timeout. Streams, sinks and checkpoints are
    # closed by now, so what is still alive is left to the process exit.
    gc.freeze()
    return 0
