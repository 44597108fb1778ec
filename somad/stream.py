"""One stream's pipeline after the queue: learner (score, then learn) -> framer -> scorer -> sinks.

No threads and no sockets here: ``StreamPipeline.process(chunks)`` is called by the daemon's
worker thread with what the source produced; it returns nothing and hands events to the sinks.
A stream holds one model, or one per sub-stream key (MQTT topic, TCP peer) when
``split_by_key`` is set — at most ``max_substreams``; chunks for further keys are dropped and
counted.

Each model snapshots through its own ``CheckpointStore`` under
``state_dir/<stream>/`` with a prefix that names its architecture, so a model whose
architecture changed in the config starts fresh *beside* the old checkpoints instead of
overwriting them.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog
import torch

from adapters.base import Chunk

from .checkpoint import CheckpointError, CheckpointStore
from .framing import Framer
from .learner import NumericalFault, SomaLearner
from .model import COMPAT_FIELDS, SomaConfig
from .scoring import StreamScorer


def architecture_tag(cfg: SomaConfig) -> str:
    """Short, stable name for the fields that decide checkpoint compatibility.

    >>> from somad.model import preset
    >>> architecture_tag(preset("small")) == architecture_tag(preset("small", seed=7))
    True
    """
    fields = {name: getattr(cfg, name) for name in COMPAT_FIELDS}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    return f"k{cfg.n_bands}-h{cfg.hidden_dim}-{digest}"


def safe_name(key: str) -> str:
    """A sub-stream key as a file-name and label-safe suffix (unique: a hash is appended when
    anything had to be replaced).

    >>> safe_name("sensors/room-1/temp")
    'sensors_room-1_temp-a2f3ea'
    >>> safe_name("peer1")
    'peer1'
    """
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:48]
    if clean != key:
        clean += "-" + hashlib.sha256(key.encode()).hexdigest()[:6]
    return clean or "_"


DIVERGED_BITS = 100.0  # mean loss per byte of a chunk beyond which the model has diverged


def check_converging(bits: np.ndarray, bytes_seen: int) -> None:
    """Raise ``NumericalFault`` for a chunk whose mean loss exceeds ``DIVERGED_BITS``: 12 times
    what a model that knows nothing pays (8 bits). A too-large learning step blows the weights
    up into losses of hundreds of bits per byte long before any NaN (lr 3 on a CSV stream:
    150-760). A sound model can be confidently wrong too, but less so: after 16 KB of one
    repeated byte, the next 2 KB of new bytes cost it 31-38 bits each.

    >>> check_converging(np.array([2.0, 40.0, 3.0]), 3)
    >>> check_converging(np.array([300.0, 250.0]), 2)
    Traceback (most recent call last):
    ...
    somad.learner.NumericalFault: diverged: mean loss 275.0 bits/byte over 2 bytes (after 2 bytes)
    """
    if bits.size and float(bits.mean()) > DIVERGED_BITS:
        raise NumericalFault(f"diverged: mean loss {float(bits.mean()):.1f} bits/byte over {bits.size} bytes (after {bytes_seen} bytes)")


def score_and_learn(learner: SomaLearner, data: bytes, scorer: StreamScorer, learn: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every byte's loss in bits, scored before it is learned from, and the entropy of each
    prediction when the scorer's record score needs it (else None). Learning runs at the
    rate the scorer's alert policy allows (``learning_factor``: reduced or none while an
    alert is open) and not at all when ``learn`` is false."""
    factor = scorer.learning_factor() if learn else 0.0
    if factor > 0:
        learner.eta_scale = factor
        run = learner.learn_with_entropy if scorer.scoring.needs_entropy else learner.learn
    else:
        run = learner.score_with_entropy if scorer.scoring.needs_entropy else learner.score
    out = run(data)
    return out if isinstance(out, tuple) else (out, None)


@dataclass
class Model:
    """Everything one learner carries: its state, framing, scorer and snapshot bookkeeping."""

    name: str  # stream name, or "<stream>/<key>" for a sub-stream (the metrics label)
    learner: SomaLearner
    framer: Framer
    scorer: StreamScorer
    store: CheckpointStore
    offset: int | None = None  # source position just past the bytes learned (file tail)
    bytes_at_snapshot: int = 0
    snapshot_at: float = field(default_factory=time.monotonic)
    checkpoint_id: str = ""
    series: object = None  # the model's metrics.StreamMetrics
    total_bits: float = 0.0  # loss of every byte this process scored (for status lines)
    learned_here: int = 0  # bytes this process fed the learner


class StreamPipeline:
    """Learner, framer, scorer and snapshots for one configured stream."""

    def __init__(self, cfg, state_dir: str | Path, metrics, sinks=(), log=None, clock=time.time, on_bad_checkpoint: str = "fresh"):
        self.cfg = cfg
        self.state_dir = Path(state_dir)
        self.metrics = metrics
        self.sinks = list(sinks)
        self.log = log or structlog.get_logger("somad.stream").bind(stream=cfg.name)
        self.clock = clock
        self.soma_cfg = cfg.model.soma_config()
        self.learner_cfg = cfg.model.learner_config(cfg.metabolism)
        self.models: dict[str, Model] = {}
        self.unrouted_bytes = 0  # bytes for sub-stream keys beyond max_substreams
        self.rollbacks = 0
        self.on_bad_checkpoint = on_bad_checkpoint  # "fresh" or "exit"
        self._refusals_logged: dict[str, int] = {}

    # ------------------------------------------------------------------ models

    def model_for(self, key: str) -> Model | None:
        key = key if self.cfg.split_by_key else ""
        model = self.models.get(key)
        if model is None:
            if len(self.models) >= max(1, self.cfg.max_substreams if self.cfg.split_by_key else 1):
                return None
            model = self._open_model(key)
            self.models[key] = model
        return model

    def _open_model(self, key: str) -> Model:
        name = f"{self.cfg.name}/{key}" if key else self.cfg.name
        directory = self.state_dir / self.cfg.name / (safe_name(key) if key else "")
        store = CheckpointStore(directory, prefix=architecture_tag(self.soma_cfg), keep=self.cfg.snapshot.keep)
        model = Model(
            name=name,
            learner=SomaLearner(self.soma_cfg, self.learner_cfg),
            framer=Framer(self.cfg.framing),
            scorer=StreamScorer(name, self.cfg.scoring, self.cfg.alerts),
            store=store,
            series=self.metrics.stream(name),
        )
        resumed = self._restore(model)
        self.log.info("model_ready", model=name, kernel=model.learner.kernel, resumed=resumed)  # kernel: "torch" where no C compiler built the native one
        return model

    def _restore(self, model: Model) -> bool:
        """Load the newest good checkpoint into ``model``; False when there is none.

        Refused snapshots (corrupt, truncated, tampered, not a checkpoint) are logged once and
        left in place; the stream resumes from an older good one or starts fresh beside them —
        or, with ``on_bad_checkpoint: exit``, refuses to start.
        """
        ckpt = model.store.latest()
        for err in model.store.skipped[self._refusals_logged.get(model.name, 0) :]:
            self.log.error("checkpoint_refused", model=model.name, error=str(err))
        self._refusals_logged[model.name] = len(model.store.skipped)
        if model.store.skipped and self.on_bad_checkpoint == "exit":
            raise CheckpointError(f"refusing to start: {len(model.store.skipped)} unusable checkpoint(s), on_bad_checkpoint is 'exit'", model.store.directory)
        if ckpt is None:
            return False
        model.learner = ckpt.learner(self.learner_cfg)
        extra = ckpt.extra or {}
        self._restore_extra(model, extra, ckpt.checkpoint_id)
        model.bytes_at_snapshot = model.learner.bytes_seen
        model.checkpoint_id = ckpt.checkpoint_id
        model.series.learner_restored(model.learner.stats())
        model.series.checkpoint_loaded(ckpt.created_at)
        self.log.info("resumed", model=model.name, checkpoint=ckpt.checkpoint_id[:12], bytes_seen=model.learner.bytes_seen, offset=model.offset)
        return True

    def _restore_extra(self, model: Model, extra: dict, checkpoint_id: str) -> None:
        """Scorer statistics and file offset saved beside the model. The model itself has been
        verified; if these are unusable (another version's layout, or a tampered file that kept
        a valid id) they are logged and left out, so the stream runs instead of failing to
        start: the scorer starts over (a new grace period), the source from its ``start``."""
        if "scorer" in extra:
            try:
                model.scorer.load_state_dict(extra["scorer"])
            except ValueError as err:
                self.log.error("scorer_state_refused", model=model.name, checkpoint=checkpoint_id[:12], error=str(err))
        offset = extra.get("offset")
        if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int) or offset < 0):
            self.log.error("offset_refused", model=model.name, checkpoint=checkpoint_id[:12], offset=repr(offset)[:40])
            offset = None
        model.offset = offset

    def saved_offset(self) -> int | None:
        """The source position to resume from (single-model streams only)."""
        model = self.model_for("")
        return model.offset if model is not None else None

    # ------------------------------------------------------------------ the hot path

    def process(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            model = self.model_for(chunk.key)
            if model is None:
                self.unrouted_bytes += len(chunk.data)
                self.metrics.stream(self.cfg.name).observe_batch(bytes=0, dropped_bytes=len(chunk.data))
                continue
            try:
                self._learn_chunk(model, chunk)
            except NumericalFault as err:
                self._roll_back(model, err)
                # the model that read these bytes is gone: counted as not learned, not lost silently
                model.series.observe_batch(bytes=0, dropped_bytes=len(chunk.data))

    def _learn_chunk(self, model: Model, chunk: Chunk) -> None:
        data = model.framer.learner_input(chunk.data, chunk.is_record)
        bits, entropy = score_and_learn(model.learner, data, model.scorer)
        bits_np = bits.numpy().astype(np.float64)
        check_converging(bits_np, model.learner.bytes_seen)
        model.total_bits += float(bits_np.sum())
        model.learned_here += len(data)
        records = model.framer.push(data, bits_np, chunk.is_record, entropy=None if entropy is None else entropy.numpy())
        now = self.clock()
        band_power = model.learner.metabolism.band_power.numpy()
        anomaly = None
        for record in records:
            scored, alerts = model.scorer.score_record(record.data, record.bits, band_power=band_power, entropy=record.entropy, now=now)
            anomaly = scored.anomaly
            self._emit(scored)
            for alert in alerts:
                self._alert(model, alert)
        if chunk.offset is not None:
            model.offset = chunk.offset
        model.series.observe_batch(
            bytes=len(data),
            records=len(records),
            bits=bits_np,
            anomaly=anomaly,
            latency_seconds=time.monotonic() - chunk.received_at if chunk.received_at else None,
            cut_records=sum(r.cut for r in records),
        )
        model.series.set_learner(model.learner.stats())

    def _alert(self, model: Model, alert) -> None:
        self._emit(alert)
        fields = alert.to_dict()
        for key in ("event", "stream", "kind"):
            fields.pop(key, None)
        self.log.warning(f"alert_{alert.kind}", model=model.name, **fields)
        if alert.kind == "open":
            model.series.alert_opened()
        else:
            model.series.alert_closed()

    def _emit(self, event) -> None:
        for sink in self.sinks:
            sink.send(event)

    def _roll_back(self, model: Model, err: Exception) -> None:
        """A NaN/Inf or a diverged step: return to the last good checkpoint (or a fresh model) and count it."""
        self.rollbacks += 1
        restored = self._restore(model)
        model.series.numerical_fault(rolled_back=restored)
        if not restored:
            model.learner = SomaLearner(self.soma_cfg, self.learner_cfg)
        self.log.error("numerical_fault_rolled_back", model=model.name, error=str(err), to=model.checkpoint_id[:12] if restored else "fresh")

    # ------------------------------------------------------------------ snapshots

    def snapshot_due(self, model: Model, now: float) -> bool:
        snap = self.cfg.snapshot
        if model.learner.bytes_seen == model.bytes_at_snapshot:
            return False
        if snap.every_seconds and now - model.snapshot_at >= snap.every_seconds:
            return True
        return bool(snap.every_bytes) and model.learner.bytes_seen - model.bytes_at_snapshot >= snap.every_bytes

    def snapshot(self, force: bool = False) -> None:
        """Snapshot every model that is due (or all that learned anything, when ``force``)."""
        now = time.monotonic()
        for model in self.models.values():
            learned_since = model.learner.bytes_seen != model.bytes_at_snapshot
            if (force and learned_since) or self.snapshot_due(model, now):
                self._snapshot_model(model)

    def _snapshot_model(self, model: Model) -> None:
        try:
            # A NaN in weights no loss reads (the rows of a byte value not seen yet) is found
            # here at the latest: roll back rather than fail every snapshot from now on.
            model.learner.check_finite()
        except NumericalFault as err:
            self._roll_back(model, err)
            return
        started = time.monotonic()
        extra = {"scorer": model.scorer.state_dict(), "offset": model.offset, "stream": model.name}
        try:
            path = model.store.save(model.learner, extra=extra, preset=self.cfg.model.preset)
        except (OSError, CheckpointError) as err:
            # The previous checkpoint stays; ingestion goes on; retry at the next due time.
            model.snapshot_at = time.monotonic()
            model.series.snapshot(time.monotonic() - started, ok=False)
            self.log.error("snapshot_failed", model=model.name, error=str(err))
            return
        model.bytes_at_snapshot = model.learner.bytes_seen
        model.snapshot_at = time.monotonic()
        model.checkpoint_id = model.store.last_id or ""
        model.series.snapshot(model.snapshot_at - started, ok=True)
        self.log.debug("snapshot", model=model.name, path=str(path), seconds=round(model.snapshot_at - started, 3))
