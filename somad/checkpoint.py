"""Checkpoints: one portable ``.pt`` file per model state, with a verifiable identity and lineage.

A checkpoint is a ``torch.save`` of a plain dict (tensors, numbers, strings, lists, dicts):

- ``format``, ``format_version``: what the file is;
- ``model`` (SomaConfig fields: n_bands, hidden_dim, base, direct_readout, features, ...),
  ``preset``, ``learner_config`` (the training settings it was saved with);
- ``state``: ``SomaLearner.state_dict()``: U, W, b, Wd (with a direct readout), the trace
  bank in float64, the carried state, ``bytes_seen``, the metabolism's statistics;
- ``extra``: what the caller keeps beside the model (scorer statistics, a file offset);
- ``checkpoint_history``: ancestor ids, oldest first (the last ``MAX_HISTORY``);
  ``checkpoint_parents``: the direct parents (one for a snapshot, several for a merge, none
  for a fresh model);
- ``checkpoint_id``: SHA-256 over all of the above (see ``compute_id``), so that the same
  state has the same id on any machine, and the lineage cannot be rewritten without changing
  the id (as a git commit covers its parents);
- ``created_at``, ``written_by``: metadata, outside the hash; so is the metabolism's
  ``byte_rate`` (the learning machine's speed, not the model's state).

Reading is ``torch.load(weights_only=True)`` only (a checkpoint is untrusted input: a pickle
that asks for anything but tensors and plain values is refused before it can run), then the
id is recomputed and compared. Writing is atomic: a temporary file in the same directory,
fsync, rename, fsync of the directory; a failed or killed write leaves the previous file as
it was. ``CheckpointStore`` adds numbered snapshots with retention for the daemon.

>>> import tempfile
>>> from somad.learner import SomaLearner
>>> from somad.model import preset
>>> learner = SomaLearner(preset("tiny")); _ = learner.learn(b"21.5\\n" * 20)
>>> path = tempfile.mkdtemp() + "/m.pt"
>>> cid = save_checkpoint(path, learner, preset="tiny")
>>> ckpt = load_checkpoint(path)
>>> ckpt.checkpoint_id == cid, ckpt.bytes_seen, ckpt.history
(True, 100, ())
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import re
import secrets
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .learner import LearnerConfig, SomaLearner, learner_state_shapes
from .metabolism import Metabolism, MetabolismConfig
from .model import COMPAT_FIELDS, SomaConfig, SomaParams

FORMAT = "somad.checkpoint"
FORMAT_VERSION = 1
# Outside the id: metadata about the file, and the speed of the machine that learned (the
# metabolism's bytes/s), so that the same model state has the same id wherever it was computed.
UNHASHED = (("checkpoint_id",), ("created_at",), ("written_by",), ("state", "metabolism", "byte_rate"))
_ID_PATTERN = re.compile(r"^[0-9a-f]{64}$")
# Integer views used to hash a tensor's bytes in little-endian order, by element size.
_INT_VIEWS = {1: (torch.uint8, "<u1"), 2: (torch.int16, "<i2"), 4: (torch.int32, "<i4"), 8: (torch.int64, "<i8")}


class CheckpointError(Exception):
    """A checkpoint that cannot be read, verified, used or written. ``str()`` is one line
    naming the file (when there is one) and what is wrong."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None):
        self.reason = " ".join(str(reason).split())  # one line, whatever the cause said
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {self.reason}" if self.path else self.reason)


# --------------------------------------------------------------------------- identity


def canonical(value: Any, where: str = "checkpoint") -> Any:
    """The JSON skeleton that ``compute_id`` hashes: containers tagged (so that a dict can
    never pass for a tensor or a list), each tensor replaced by its dtype, shape and the
    SHA-256 of its bytes in little-endian order. ``where`` names the entry in errors.

    >>> skeleton = canonical({"b": (1, 2.5), "a": torch.zeros(2, dtype=torch.int16)})
    >>> skeleton[0], skeleton[1]["b"], skeleton[1]["a"][:3]
    ('dict', ['list', [1, 2.5]], ['tensor', 'torch.int16', [2]])
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else ["float", repr(value)]
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype), list(value.shape), tensor_digest(value, where)]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise CheckpointError(f"{where}: keys must be strings, got {bad[0]!r}")
        return ["dict", {k: canonical(v, f"{where}.{k}") for k, v in value.items()}]
    if isinstance(value, (list, tuple)):
        return ["list", [canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]]
    raise CheckpointError(
        f"{where}: cannot store a {type(value).__name__} (only None, bool, int, float, str, "
        "list, tuple, dict with str keys, torch.Tensor)"
    )


def tensor_digest(tensor: torch.Tensor, where: str = "tensor") -> str:
    """SHA-256 of a dense CPU tensor's elements in C order, little-endian, whatever the host."""
    if tensor.layout != torch.strided or tensor.is_complex() or tensor.is_quantized:
        raise CheckpointError(f"{where}: only dense real tensors can be stored, got {tensor.layout} {tensor.dtype}")
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    int_dtype, np_order = _INT_VIEWS[flat.element_size()]
    as_int = flat.view(torch.uint8) if flat.dtype == torch.bool else flat.view(int_dtype)
    array = np.ascontiguousarray(as_int.numpy().astype(np_order, copy=False))
    return hashlib.sha256(array.data).hexdigest()


def compute_id(payload: dict) -> str:
    """SHA-256 over everything in a checkpoint payload but ``UNHASHED``, as canonical JSON
    (sorted keys, no spaces, ASCII): the same content gives the same id on any machine."""
    content = payload
    for path in UNHASHED:
        content = _without(content, path)
    text = json.dumps(canonical(content), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _without(d: dict, path: tuple[str, ...]) -> dict:
    """``d`` without the entry at ``path`` (copying only the dicts along the way)."""
    if not isinstance(d, dict) or path[0] not in d:
        return d
    out = dict(d)
    if len(path) == 1:
        del out[path[0]]
    else:
        out[path[0]] = _without(d[path[0]], path[1:])
    return out


# --------------------------------------------------------------------------- the loaded form


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint, as read from ``path``."""

    path: Path  # the file it was read from
    checkpoint_id: str  # SHA-256 hex of the content (``compute_id``)
    history: tuple[str, ...]  # ancestor ids, oldest first (the direct parents among the last)
    parents: tuple[str, ...]  # direct parents: one for a snapshot, several for a merge, none when fresh
    created_at: float  # unix seconds when it was written (not part of the id)
    written_by: str  # "somad <version>" that wrote it (not part of the id)
    format_version: int
    size_bytes: int  # size of the file
    preset: str | None  # the preset the model was created from, if any
    model: SomaConfig  # architecture
    learner_config: LearnerConfig  # training settings it was saved with
    state: dict = field(repr=False)  # SomaLearner.state_dict()
    extra: dict = field(default_factory=dict, repr=False)  # what the caller stored beside the model

    @property
    def bytes_seen(self) -> int:
        return int(self.state["bytes_seen"])

    @property
    def lineage(self) -> tuple[str, ...]:
        """The history of a checkpoint derived from this one: its history plus its own id."""
        return (*self.history, self.checkpoint_id)

    def learner(self, lcfg: LearnerConfig | None = None) -> SomaLearner:
        """A learner continuing exactly where this checkpoint stopped. ``lcfg``: training
        settings to continue with (default: the ones it was saved with); with a weight bound,
        the weights are brought within it."""
        lcfg = lcfg or self.learner_config
        ucat = self.state["U"] if not self.model.direct_readout else torch.cat([self.state["U"], self.state["Wd"]], dim=1)
        params = SomaParams(ucat=ucat.clone(), w=self.state["W"].clone(), b=self.state["b"].clone())
        learner = SomaLearner(self.model, lcfg, params=params)
        learner.load_state_dict(self.state)
        if lcfg.weight_bound > 0:
            for tensor in (learner.params.ucat, learner.params.w, learner.params.b):
                tensor.clamp_(-lcfg.weight_bound, lcfg.weight_bound)
            learner.sync_carry()
        return learner


def load_learner(source: str | os.PathLike | Checkpoint, lcfg: LearnerConfig | None = None) -> SomaLearner:
    """A learner from a checkpoint file (verified) or an already loaded ``Checkpoint``."""
    ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source)
    return ckpt.learner(lcfg)


# --------------------------------------------------------------------------- compatibility


def config_differences(a: SomaConfig, b: SomaConfig, names: tuple[str, ...] = COMPAT_FIELDS) -> dict[str, tuple]:
    """{field: (a's value, b's value)} for the fields among ``names`` that differ."""
    return {name: (getattr(a, name), getattr(b, name)) for name in names if getattr(a, name) != getattr(b, name)}


def check_compatible(a: SomaConfig, b: SomaConfig, names: tuple[str, ...] = COMPAT_FIELDS, labels: tuple[str, str] = ("a", "b")) -> None:
    """Raise ``CheckpointError`` listing every differing field among ``names``.

    >>> from somad.model import preset
    >>> check_compatible(preset("tiny"), preset("small"), labels=("x.pt", "y.pt"))
    Traceback (most recent call last):
    ...
    somad.checkpoint.CheckpointError: incompatible models: n_bands (x.pt 16, y.pt 24), hidden_dim (x.pt 32, y.pt 128), direct_readout (x.pt False, y.pt True)
    """
    diff = config_differences(a, b, names)
    if diff:
        la, lb = labels
        listed = ", ".join(f"{name} ({la} {va}, {lb} {vb})" for name, (va, vb) in diff.items())
        raise CheckpointError(f"incompatible models: {listed}")


# --------------------------------------------------------------------------- writing


MAX_HISTORY = 1024  # ancestor ids kept in a checkpoint (66 KB), the most recent ones


def build_payload(
    learner: SomaLearner,
    *,
    history: tuple[str, ...] | list[str] = (),
    parents: tuple[str, ...] | list[str] | None = None,
    preset: str | None = None,
    extra: dict | None = None,
) -> dict:
    """The dict a checkpoint file holds, its id computed. Refuses non-finite weights, ids that
    are not SHA-256 hex, and extra values that cannot be stored (naming the entry). Only the
    last ``MAX_HISTORY`` ancestors are kept: a daemon snapshotting every minute would otherwise
    add 3.6 MB a year to every file (each id still covers the history it keeps, and that
    history covers the ids before it)."""
    history = tuple(history)
    parents = tuple(history[-1:] if parents is None else parents)
    history = history[-MAX_HISTORY:]
    for ident in (*history, *parents):
        if not isinstance(ident, str) or not _ID_PATTERN.match(ident):
            raise CheckpointError(f"history: {ident!r} is not a checkpoint id (64 lowercase hex digits)")
    if not learner.params.all_finite():
        raise CheckpointError(f"refusing to save a model with non-finite weights (after {learner.bytes_seen} bytes)")
    extra = _compact(dict(extra or {}), "extra")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": learner.cfg.to_dict(),
        "preset": preset,
        "learner_config": asdict(learner.lcfg),
        "state": learner.state_dict(),
        "extra": extra,
        "checkpoint_history": list(history),
        "checkpoint_parents": list(parents),
        "created_at": time.time(),
        "written_by": f"somad {__version__}",
    }
    payload["checkpoint_id"] = compute_id(payload)
    return payload


def _compact(value: Any, where: str) -> Any:
    """Extra values as stored: numpy scalars as Python numbers, numpy arrays as tensors,
    tensors as compact CPU copies (a view would drag its whole storage into the file); anything else is checked by
    ``canonical`` when the id is computed."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):  # read back as a tensor (np.asarray takes either)
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().clone()
    if isinstance(value, dict):
        return {k: _compact(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_compact(v, f"{where}[{i}]") for i, v in enumerate(value))
    return value


def save_checkpoint(
    path: str | os.PathLike,
    learner: SomaLearner,
    *,
    history: tuple[str, ...] | list[str] = (),
    parents: tuple[str, ...] | list[str] | None = None,
    preset: str | None = None,
    extra: dict | None = None,
) -> str:
    """Write ``learner`` to ``path`` atomically; returns the checkpoint id.

    ``history``: ancestor ids, oldest first (a resumed model passes ``ckpt.lineage``);
    ``parents`` defaults to the last of them. Raises ``CheckpointError`` (the file named, the
    previous file at ``path`` untouched) when the state cannot be stored or written.
    """
    payload = build_payload(learner, history=history, parents=parents, preset=preset, extra=extra)
    write_payload(path, payload)
    return payload["checkpoint_id"]


_ACTIVE_TEMPS: set[str] = set()  # temporary files being written by this process (never cleaned)
_ACTIVE_LOCK = threading.Lock()


def _temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


_TEMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def write_payload(path: str | os.PathLike, payload: dict) -> None:
    """Temp file beside ``path``, fsync, rename over ``path``, fsync the directory."""
    target = Path(path)
    if target.is_dir():
        raise CheckpointError("is a directory, expected a checkpoint file name", target)
    if not target.parent.is_dir():
        raise CheckpointError(f"cannot save: directory {target.parent} does not exist", target)
    remove_stale_temps(target.parent, lambda name: name == target.name)
    temp = _temp_name(target)
    with _ACTIVE_LOCK:
        _ACTIVE_TEMPS.add(str(temp))
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
        _fsync_directory(target.parent)
    except BaseException as err:
        try:
            temp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(err, (OSError, RuntimeError)):
            raise CheckpointError(f"cannot save: {_os_reason(err)} (any previous file at this path is untouched)", target) from err
        raise
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE_TEMPS.discard(str(temp))


def _os_reason(err: BaseException) -> str:
    """The OS error behind an exception (torch wraps write errors in a RuntimeError)."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable. Some file systems cannot fsync a directory: that is no error."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def remove_stale_temps(directory: Path, target_matches) -> list[Path]:
    """Delete temp files left by killed writers for targets where ``target_matches(name)``:
    those of dead processes, and this process's own that no write of it is using."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _TEMP_PATTERN.match(name)
        if not match or not target_matches(match["target"]):
            continue
        path = directory / name
        pid = int(match["pid"])
        with _ACTIVE_LOCK:
            in_use = str(path) in _ACTIVE_TEMPS
        if in_use or (pid != os.getpid() and _process_alive(pid)):
            continue
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# --------------------------------------------------------------------------- reading


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint. Raises ``CheckpointError`` naming the file and what is
    wrong: missing, a directory, unreadable, empty, truncated, not a checkpoint, a pickle that
    asks for code (refused, nothing run), a newer format, an id that does not match the
    content (tampered or corrupt), or an inconsistent model."""
    path = Path(path)
    size = _check_readable(path)
    payload = _torch_load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        keys = sorted(payload)[:6] if isinstance(payload, dict) else None
        what = f"a dict with keys {keys}" if keys is not None else f"a {type(payload).__name__}"
        raise CheckpointError(f"not a somad checkpoint (it holds {what}, no format marker {FORMAT!r})", path)
    version = payload.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"bad format_version {version!r}", path)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"format version {version} is newer than this somad reads ({FORMAT_VERSION}); upgrade somad", path)
    _check_keys(path, payload)
    stored = payload["checkpoint_id"]
    try:
        actual = compute_id(payload)
    except CheckpointError as err:
        raise CheckpointError(err.reason, path) from None
    if stored != actual:
        raise CheckpointError(f"checkpoint_id mismatch: the file says {str(stored)[:16]}..., its content hashes to {actual[:16]}... (tampered or corrupt)", path)
    return _from_payload(path, payload, size)


def _check_readable(path: Path) -> int:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError("no such file", path) from None
    except OSError as err:
        raise CheckpointError(f"cannot read: {err.strerror}", path) from None
    if path.is_dir():
        raise CheckpointError("is a directory, expected a checkpoint file", path)
    if st.st_size == 0:
        raise CheckpointError("empty file (0 bytes), not a checkpoint", path)
    return st.st_size


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a torch zip file; every failure as one line."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise CheckpointError(f"cannot read: {err.strerror or err}", path) from None
    if magic != b"PK\x03\x04":  # somad always writes torch's zip format; nothing else is unpickled
        raise CheckpointError("not a somad checkpoint (not a torch zip file)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            raise CheckpointError(f"refused: its pickle asks for {found.group(1)}; a checkpoint holds only tensors and plain values (nothing was run)", path) from None
        raise CheckpointError(f"refused: its pickle is not plain data ({_informative_line(text)}; nothing was run)", path) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError) as err:
        text = str(err)
        if "central directory" in text or isinstance(err, EOFError):
            raise CheckpointError("truncated or corrupt (its zip archive is incomplete)", path) from None
        raise CheckpointError(f"corrupt or not a checkpoint ({type(err).__name__}: {_informative_line(text)})", path) from None
    except OSError as err:  # the file opened fine above: a failing read inside it is damage (or a failing disk)
        raise CheckpointError(f"truncated or corrupt (reading it failed: {err.strerror or err})", path) from None
    except Exception as err:  # noqa: BLE001 - damaged input reaches unpickler paths that raise anything (struct.error, found by the fuzz)
        raise CheckpointError(f"corrupt or not a checkpoint ({type(err).__name__}: {_informative_line(str(err))})", path) from None


def _informative_line(text: str) -> str:
    """The first line of a torch error that says something specific, cut to 160 characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation"))]
    line = (specific or lines or ["no detail"])[0]
    return line[:160].split(". This is an internal")[0]


# What validating a config built from untrusted values may raise: a tensor where a number
# belongs fails a comparison with RuntimeError, a huge number with OverflowError.
_CONFIG_ERRORS = (TypeError, ValueError, RuntimeError, ArithmeticError)

_REQUIRED = {
    "model": dict,
    "learner_config": dict,
    "state": dict,
    "extra": dict,
    "checkpoint_history": (list, tuple),
    "checkpoint_parents": (list, tuple),
    "checkpoint_id": str,
}


def _check_keys(path: Path, payload: dict) -> None:
    for key, kind in _REQUIRED.items():
        if key not in payload:
            raise CheckpointError(f"missing {key!r}", path)
        if not isinstance(payload[key], kind):
            raise CheckpointError(f"{key!r} has the wrong type ({type(payload[key]).__name__})", path)
    preset = payload.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise CheckpointError(f"'preset' has the wrong type ({type(preset).__name__})", path)


def _from_payload(path: Path, payload: dict, size: int) -> Checkpoint:
    for key in ("model", "learner_config"):  # settings are plain values; a tensor would pass as a truth value
        tensors = [name for name, value in payload[key].items() if isinstance(value, torch.Tensor)]
        if tensors:
            raise CheckpointError(f"bad {key.replace('_', ' ')}: {tensors[0]} is a tensor", path)
    try:
        model = SomaConfig.from_dict(payload["model"])
    except _CONFIG_ERRORS as err:
        raise CheckpointError(f"bad model config: {err}", path) from None
    learner_config = _learner_config(path, payload["learner_config"])
    _check_state(path, model, payload["state"])
    history, parents = tuple(payload["checkpoint_history"]), tuple(payload["checkpoint_parents"])
    for ident in (*history, *parents):
        if not isinstance(ident, str) or not _ID_PATTERN.match(ident):
            raise CheckpointError(f"bad ancestor id {ident!r} in its history", path)
    created = payload.get("created_at")
    return Checkpoint(
        path=path,
        checkpoint_id=payload["checkpoint_id"],
        history=history,
        parents=parents,
        created_at=float(created) if isinstance(created, (int, float)) else 0.0,
        written_by=str(payload.get("written_by", "")),
        format_version=payload["format_version"],
        size_bytes=size,
        preset=payload.get("preset"),
        model=model,
        learner_config=learner_config,
        state=payload["state"],
        extra=payload["extra"],
    )


def _learner_config(path: Path, d: dict) -> LearnerConfig:
    """Training settings as saved. Fields this somad does not know (written by a newer one)
    are ignored, missing ones take their defaults: they are settings, not architecture."""
    try:
        meta = d.get("metabolism", {})
        meta_known = {f.name for f in fields(MetabolismConfig)}
        known = {f.name for f in fields(LearnerConfig)} - {"metabolism"}
        metabolism = MetabolismConfig(**{k: v for k, v in meta.items() if k in meta_known})
        return LearnerConfig(**{k: v for k, v in d.items() if k in known}, metabolism=metabolism)
    except (*_CONFIG_ERRORS, AttributeError) as err:
        raise CheckpointError(f"bad learner config: {err}", path) from None


def _check_state(path: Path, model: SomaConfig, state: dict) -> None:
    for name, (shape, dtype) in learner_state_shapes(model).items():
        tensor = state.get(name)
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"state.{name} is missing or not a tensor", path)
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise CheckpointError(f"state.{name} is {tuple(tensor.shape)} {tensor.dtype}, the model needs {shape} {dtype}", path)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            # somad never saves such a state (build_payload refuses it): a resumed NaN would
            # only roll back to itself, again and again.
            raise CheckpointError(f"state.{name} holds NaN or Inf", path)
    for name in ("bytes_seen", "updates", "chunks_since_sync"):
        if not isinstance(state.get(name), int) or state[name] < 0:
            raise CheckpointError(f"state.{name} must be an integer >= 0, got {state.get(name)!r}", path)
    metabolism = state.get("metabolism")
    expected = Metabolism(MetabolismConfig(), model.base, model.n_bands).state_dict()
    if not isinstance(metabolism, dict) or set(metabolism) != set(expected):
        got = sorted(metabolism) if isinstance(metabolism, dict) else type(metabolism).__name__
        raise CheckpointError(f"state.metabolism must hold {sorted(expected)}, got {got}", path)
    for name, value in metabolism.items():
        if name == "band_power":
            if not isinstance(value, torch.Tensor) or value.shape != (model.n_bands,) or value.dtype != torch.float64:
                raise CheckpointError(f"state.metabolism.band_power must be ({model.n_bands},) float64", path)
            if not bool((torch.isfinite(value) & (value >= 0)).all()):
                raise CheckpointError("state.metabolism.band_power must be finite and >= 0", path)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"state.metabolism.{name} must be a number, got {value!r}", path)
        else:
            low, high = _METABOLISM_RANGES.get(name, (0.0, math.inf))
            if not (-1e300 < value < 1e300 and math.isfinite(value) and low <= value <= high):  # ints beyond floats too
                raise CheckpointError(f"state.metabolism.{name} must be a finite number in [{low}, {high}], got {value!r}", path)


# Ranges of the metabolism's numbers other than [0, inf): the token bucket may be in debt, the
# phase is a fraction of a stride, and d is a band: 64 is far beyond any bank's span (the seed
# model has 46 bands) yet keeps the stride r^d a number the learner can compute with.
_METABOLISM_RANGES = {"tokens": (-math.inf, math.inf), "phase": (0.0, 1.0), "d": (0.0, 64.0)}


# --------------------------------------------------------------------------- the daemon's store


class CheckpointStore:
    """Numbered snapshots ``<prefix>-<seq>-<id12>.pt`` of one model in ``directory``.

    - ``save`` writes a new snapshot atomically, its history chained to the previous snapshot
      of this store (the newest good one found, or the last one saved), then keeps the newest
      ``keep`` good snapshots: older good ones are deleted, and only once the new one has been
      read back and verified, so the directory always holds a good checkpoint.
    - ``latest`` returns the newest snapshot that loads and verifies. Those that do not are
      listed in ``skipped`` (``CheckpointError``s naming file and reason) and left in place for
      an operator to look at: never deleted, by ``latest`` or by retention.
    - Temp files of a killed writer are removed at the next ``save``.

    One store per model and directory; not for concurrent use from several processes.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str, keep: int = 3):
        if not prefix or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", prefix):
            raise ValueError(f"checkpoint prefix must be letters, digits, '_', '.', '-' (not first), got {prefix!r}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.prefix = prefix
        self.keep = keep
        self.last_id: str | None = None  # id of the newest snapshot saved or found by latest()
        self.skipped: list[CheckpointError] = []  # snapshots refused (corrupt, tampered...), left in place
        self._pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-([0-9a-f]{{12}})\.pt$")
        self._lineage: tuple[str, ...] | None = None  # history for the next save (None: not looked up yet)
        self._verified: dict[tuple, bool] = {}  # (name, size, mtime_ns, inode) -> loads and verifies

    def snapshots(self) -> list[Path]:
        """This store's snapshot files, oldest first (by sequence number)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        numbered = [(int(m.group(1)), name) for name in names if (m := self._pattern.match(name))]
        return [self.directory / name for _, name in sorted(numbered)]

    def latest(self) -> Checkpoint | None:
        """The newest snapshot that loads and verifies, or None. Refused ones go to ``skipped``."""
        for path in reversed(self.snapshots()):
            try:
                ckpt = load_checkpoint(path)
            except CheckpointError as err:
                self._record_bad(path, err)
                continue
            self._remember(path, True)
            self._lineage = ckpt.lineage
            self.last_id = ckpt.checkpoint_id
            return ckpt
        self._lineage = ()
        return None

    def save(self, learner: SomaLearner, extra: dict | None = None, preset: str | None = None, history: tuple[str, ...] | None = None) -> Path:
        """Snapshot ``learner``; returns the new file's path. ``history`` overrides the
        automatic chaining (pass ``()`` to start a new lineage)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CheckpointError(f"cannot create the snapshot directory: {err.strerror or err}", self.directory) from None
        remove_stale_temps(self.directory, lambda name: bool(self._pattern.match(name)))
        if history is None:
            if self._lineage is None:
                self.latest()
            history = self._lineage or ()
        payload = build_payload(learner, history=history, preset=preset, extra=extra)
        existing = self.snapshots()
        seq = int(self._pattern.match(existing[-1].name).group(1)) + 1 if existing else 1
        path = self.directory / f"{self.prefix}-{seq:08d}-{payload['checkpoint_id'][:12]}.pt"
        write_payload(path, payload)
        try:
            load_checkpoint(path)  # read back: only a verified snapshot lets older ones go
        except CheckpointError as err:
            self._record_bad(path, err)
            raise CheckpointError(f"snapshot did not verify after writing ({err.reason}); older snapshots kept", path) from None
        self._remember(path, True)
        self.last_id = payload["checkpoint_id"]
        self._lineage = (*history, payload["checkpoint_id"])
        self._retain()
        return path

    def _retain(self) -> None:
        """Delete good snapshots beyond the newest ``keep`` good ones; never a refused one."""
        good = [path for path in reversed(self.snapshots()) if self._is_good(path)]
        for path in good[self.keep :]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        present = {path.name for path in self.snapshots()}
        self._verified = {key: ok for key, ok in self._verified.items() if key[0] in present}  # bounded over months

    def _key(self, path: Path) -> tuple | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (path.name, st.st_size, st.st_mtime_ns, st.st_ino)

    def _remember(self, path: Path, good: bool) -> None:
        key = self._key(path)
        if key is not None:
            self._verified[key] = good

    def _is_good(self, path: Path) -> bool:
        key = self._key(path)
        if key is None:
            return False
        if key not in self._verified:
            try:
                load_checkpoint(path)
                self._verified[key] = True
            except CheckpointError as err:
                self._record_bad(path, err)
        return self._verified.get(key, False)

    def _record_bad(self, path: Path, err: CheckpointError) -> None:
        self._remember(path, False)
        if all(e.path != err.path for e in self.skipped):
            self.skipped.append(err)
