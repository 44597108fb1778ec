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

import hashlib
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
from .stream import StreamPipeline

READ_TIMEOUT = 0.2  # seconds a reader waits on its source before checking for stop
WORK_BATCH_BYTES = 1 << 14  # bytes a worker takes from its queue at once
RESTART_BACKOFF = (1.0, 60.0)  # first and largest delay before restarting a failed stream


def config_version(text: str) -> str:
    """The version of a config document: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
        self.progress_at = time.monotonic()  # last time the worker made progress or idled healthily
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
        """Stop reading, drain what is queued within ``timeout``, snapshot, close sinks."""
        deadline = time.monotonic() + timeout
        self._stop_reading.set()
        self.source.stop()
        self.queue.close()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            self._stop_working.set()  # out of time: the worker leaves the rest of the queue
            self.log.warning("drain_timeout", queued_bytes=self.queue.queued_bytes)
            for thread in self._threads:
                thread.join(2.0)
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
            chunks = self.queue.get(timeout=READ_TIMEOUT, max_bytes=WORK_BATCH_BYTES)
            if chunks:
                self.pipeline.process(chunks)
            elif self.queue.closed:
                break
            self.progress_at = time.monotonic()
            if not self._stop_reading.is_set():
                self.pipeline.snapshot()
        self.finished = True


class Daemon:
    def __init__(self, config, metrics=None, notifier=None, config_path: str | Path | None = None, status_every: float = 60.0):
        from .metrics import Metrics  # imported here: the embedded run does not need it

        self.config = config
        self.config_path = Path(config_path) if config_path else None  # re-read on SIGHUP
        self.metrics = metrics or Metrics()
        self.notifier = notifier
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
            raise SystemExit(130)  # second signal: leave now
        self._stop.set()

    def request_stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        torch.set_num_threads(1)
        try:
            self._start()
            while not self._stop.wait(0.2):
                self._apply_pending_reloads()
                self._supervise()
                if self.runners and all(r.finished for r in self.runners.values()):
                    self.log.info("all_sources_ended")
                    break
                if self.notifier:
                    self.notifier.tick(self.status_line(), progressing=self._progressing())
                self._log_status()
        finally:
            self.shutdown()
        return 0

    def _start(self) -> None:
        state_dir = Path(self.config.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self._start_http()
        for cfg in self.config.streams:
            self._start_stream(cfg)
        self.log.info("ready", streams=len(self.runners), state_dir=str(state_dir))
        if self.notifier:
            self.notifier.ready(self.status_line())

    def shutdown(self) -> None:
        if self.notifier:
            self.notifier.stopping()
        self._log_status(force=True)
        self.log.info("stopping", streams=len(self.runners))
        runners = list(self.runners.values())
        budget = self.config.shutdown_timeout
        deadline = time.monotonic() + budget
        for runner in runners:
            runner.stop(timeout=max(0.5, deadline - time.monotonic()))
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

    def submit_config(self, text: str, origin: str, reply=None) -> None:
        """Apply a config document from another thread (remote config); ``reply(ok, detail)``
        is called from the main loop with the version hash or the error."""
        self._pending.put((text, origin, reply))

    def _apply_pending_reloads(self) -> None:
        if self._reload_requested.is_set():
            self._reload_requested.clear()
            self.reload_from_file()
        while not self._pending.empty():
            text, origin, reply = self._pending.get_nowait()
            ok, detail = self.apply_config_text(text, origin)
            if reply is not None:
                reply(ok, detail)

    def reload_from_file(self) -> bool:
        if self.config_path is None:
            self.log.warning("reload_ignored", reason="no config file (embedded default)")
            return False
        try:
            text = self.config_path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            self.metrics.config_reloaded(False)
            self.log.error("reload_failed", file=str(self.config_path), error=str(err), kept="the running config")
            return False
        return self.apply_config_text(text, str(self.config_path))[0]

    def apply_config_text(self, text: str, origin: str) -> tuple[bool, str]:
        """Validate first; swap only a valid config. Returns (ok, version hash or error)."""
        from .config import ConfigError, parse_config

        if self.notifier:
            self.notifier.reloading()
        try:
            new = parse_config(text, origin)
        except ConfigError as err:
            self.metrics.config_reloaded(False)
            self.log.error("reload_rejected", origin=origin, problems=err.problems, kept="the running config")
            return False, str(err)
        self.apply_config(new)
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
                self.metrics.remove_stream(name)
        self.config = new
        if new.log != old.log:
            configure_logging(new.log.level, new.log.format)
        if new.metrics != old.metrics:
            if self.http is not None:
                self.http.stop()
                self.http = None
            self._start_http()
        Path(new.state_dir).mkdir(parents=True, exist_ok=True)
        for name in changes.added + changes.changed:
            self._start_stream_or_schedule(new.stream(name))
        self.log.info("streams_swapped", added=changes.added, removed=changes.removed, restarted=changes.changed, untouched=changes.unchanged)

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
        """True while every running worker has looped recently (the watchdog's condition)."""
        now = time.monotonic()
        return all(now - r.progress_at < 10.0 for r in self.runners.values() if not r.finished and r.error is None)

    def health(self) -> dict:
        return {
            name: {"alive": runner.alive, "source": runner.cfg.source.type, "connected": runner.source.status().connected}
            for name, runner in self.runners.items()
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
            learned = sum(m.learner.bytes_seen for m in runner.pipeline.models.values())
            parts.append(f"{name}:{learned}B")
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
    import json
    import sys

    from .checkpoint import CheckpointError
    from .logs import configure_logging
    from .notify import SystemdNotifier

    configure_logging(config.log.level, config.log.format)
    daemon = Daemon(config, notifier=SystemdNotifier(), config_path=config_path, status_every=status_every)
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
    return 0
