"""Fuzz the checkpoint loader: given any mutation or truncation of a real checkpoint,
``load_checkpoint`` returns a verified ``Checkpoint`` or raises ``CheckpointError`` (one line,
naming the file), never anything else; and a checkpoint it accepts is one the daemon resumes
from: placed as a stream's newest snapshot, the pipeline loads it and learns and scores with
finite losses and weights (extras it cannot use, such as a malformed scorer state, are logged
and left out rather than keeping the stream down).

Mutations, from the outside in:

- raw bytes: flips, overwritten runs, insertions, deletions, truncation, appended garbage;
- archive entries: one entry of torch's zip (the pickle, a tensor's storage, the version
  records) changed and the archive rebuilt with valid CRCs, so the damage gets past the zip
  layer into the unpickler and the storage reader;
- payload values: a random node of the stored dict deleted or replaced (wrong types, huge or
  negative numbers, NaN, tensors of other shapes and dtypes), saved again by torch, with the id
  recomputed or not: a consistent file that says something false.

The real checkpoint is written the way the daemon writes one (``CheckpointStore.save`` with the
scorer's state and a file offset in ``extra``). ``SOMAD_FUZZ_EXAMPLES=5000`` raises the
number of inputs for a deeper run.
"""

from __future__ import annotations

import copy
import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.base import Chunk
from somad.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    compute_id,
    load_checkpoint,
)
from somad.config import parse_config
from somad.learner import SomaLearner
from somad.metrics import Metrics
from somad.scoring import StreamScorer
from somad.stream import StreamPipeline, architecture_tag
from tests.faults.figures import record

FUZZ = settings(
    max_examples=int(os.environ.get("SOMAD_FUZZ_EXAMPLES", "150")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TRIED = {"inputs": 0, "refused": 0, "accepted": 0, "failures": 0}  # this module's totals, recorded at the end
FINDINGS: list[str] = []  # what escaped as something other than CheckpointError (should stay empty)


STREAM = parse_config("""
state_dir: /nonexistent
streams:
  - name: fuzz
    source: {type: file, path: /nonexistent/fuzz.log}
    model: {preset: tiny}
    scoring: {grace_period: 5}
""", "fuzz.yaml").streams[0]


class Original(bytes):
    """The real checkpoint's bytes, with a short repr (hypothesis prints the test's arguments)."""

    def __repr__(self) -> str:
        return f"<checkpoint of {len(self)} bytes>"


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Original:
    """A real snapshot, as the daemon writes it, with a scorer that has seen records."""
    learner = SomaLearner(STREAM.model.soma_config(), STREAM.model.learner_config(STREAM.metabolism))
    sc = StreamScorer("fuzz", STREAM.scoring, STREAM.alerts)
    text = b"".join(b"%d,%0.2f\n" % (i % 60, 20 + (i % 7) / 3) for i in range(400))
    bits = learner.learn(text).numpy().astype(np.float64)
    start = 0
    for line in text.splitlines(keepends=True):
        sc.score_record(line, bits[start : start + len(line)], band_power=learner.metabolism.band_power.numpy(), now=0.0)
        start += len(line)
    store = CheckpointStore(tmp_path_factory.mktemp("ckpt"), prefix=architecture_tag(learner.cfg))
    path = store.save(learner, extra={"scorer": sc.state_dict(), "offset": len(text), "stream": "fuzz"}, preset="tiny")
    return Original(path.read_bytes())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mutants")


@pytest.fixture(scope="module", autouse=True)
def _record_inputs_tried():
    yield
    record("fuzz_checkpoint", {**TRIED, "findings": FINDINGS[:20], "max_examples_per_test": FUZZ.max_examples})


def check(data: bytes, workdir: Path, original_id: str | None = None) -> None:
    """Load ``data`` as a checkpoint file: refused with a one-line ``CheckpointError`` naming
    the file, or accepted and usable. ``original_id``: an accepted file must be the original
    (for mutations that did not recompute the id)."""
    TRIED["inputs"] += 1
    path = workdir / "mutant.pt"
    path.write_bytes(data)
    try:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as err:
            TRIED["refused"] += 1
            assert str(path) in str(err) and "\n" not in str(err), str(err)
            return
        TRIED["accepted"] += 1
        assert isinstance(ckpt, Checkpoint)
        if original_id is not None:
            assert ckpt.checkpoint_id == original_id, "a changed file was accepted under the original id"
        assert_resumable(path, workdir)
    except Exception as err:
        TRIED["failures"] += 1
        FINDINGS.append(f"{type(err).__name__}: {str(err)[:200]}")
        raise


def assert_resumable(path: Path, workdir: Path) -> None:
    """An accepted checkpoint is one the daemon resumes from: placed as the newest snapshot of
    a stream, the stream's pipeline loads it (not skipped), and learns and scores a chunk with
    finite losses and weights."""
    state_dir = workdir / "state"
    store_dir = state_dir / STREAM.name
    shutil.rmtree(state_dir, ignore_errors=True)
    store_dir.mkdir(parents=True)
    shutil.copy(path, store_dir / f"{architecture_tag(STREAM.model.soma_config())}-00000001-{'0' * 12}.pt")
    pipeline = StreamPipeline(STREAM, state_dir, Metrics())
    model = pipeline.model_for("")
    assert not model.store.skipped and model.checkpoint_id, "the pipeline refused what load_checkpoint accepted"
    assert model.learner.params.all_finite(), "an accepted checkpoint carries non-finite weights"
    pipeline.process([Chunk(b"12,3.5\n" * 4)])
    assert pipeline.rollbacks == 0, "an accepted checkpoint made the learner fail numerically"
    assert model.learner.params.all_finite() and model.scorer.records >= 4


def original_id(data: bytes) -> str:
    return torch.load(io.BytesIO(data), weights_only=True)["checkpoint_id"]


# --------------------------------------------------------------------------- raw bytes


@st.composite
def byte_mutations(draw, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(0, len(out) - 1)))
        edit = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate", "append"]))
        if edit == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif edit == "overwrite":
            run = draw(st.binary(min_size=1, max_size=64))
            out[at : at + len(run)] = run
        elif edit == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif edit == "delete":
            del out[at : at + draw(st.integers(1, 4096))]
        elif edit == "truncate":
            del out[at:]
        else:
            out += draw(st.binary(min_size=1, max_size=256))
    return bytes(out)


@FUZZ
@given(st.data())
def test_raw_byte_mutations(original, workdir, draw):
    check(draw.draw(byte_mutations(original)), workdir, original_id(original))


@FUZZ
@given(keep=st.floats(0.0, 1.0, exclude_max=True))
def test_truncation_anywhere(original, workdir, keep):
    check(original[: int(len(original) * keep)], workdir)


# --------------------------------------------------------------------------- archive entries


def rebuild(data: bytes, name: str, content: bytes | None) -> bytes:
    """The archive with entry ``name`` replaced by ``content`` (None: removed), CRCs valid."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if info.filename != name:
                dst.writestr(info.filename, src.read(info.filename))
            elif content is not None:
                dst.writestr(info.filename, content)
    return out.getvalue()


@FUZZ
@given(st.data())
def test_archive_entry_mutations(original, workdir, draw):
    names = zipfile.ZipFile(io.BytesIO(original)).namelist()
    name = draw.draw(st.sampled_from(names), label="entry")
    content = zipfile.ZipFile(io.BytesIO(original)).read(name)
    action = draw.draw(st.sampled_from(["mutate", "mutate", "mutate", "remove", "replace"]), label="action")
    if action == "remove":
        mutated = None
    elif action == "replace":
        mutated = draw.draw(st.binary(max_size=256), label="new content")
    else:
        mutated = draw.draw(byte_mutations(content), label="mutated content")
    check(rebuild(original, name, mutated), workdir, original_id(original))


# --------------------------------------------------------------------------- payload values


def tensors():
    dtypes = st.sampled_from([torch.float32, torch.float64, torch.int64, torch.uint8, torch.bool, torch.float16])
    shapes = st.lists(st.integers(0, 5), max_size=3)
    fills = st.sampled_from([0.0, 1.0, -1.0, float("nan"), float("inf"), 1e30])
    return st.builds(lambda dtype, shape, fill: torch.full(shape, fill).to(dtype), dtypes, shapes, fills)


WEIRD = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | tensors(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def node_paths(node, prefix=()):
    """Every (container path, key) in the payload, tensors' elements excluded."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from node_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield prefix + (i,)
            yield from node_paths(value, prefix + (i,))


def similar_tensor(draw, tensor: torch.Tensor) -> torch.Tensor:
    """The same tensor with one thing wrong: a NaN/Inf, another dtype, or another shape."""
    wrong = draw.draw(st.sampled_from(["non_finite", "dtype", "shape"]), label="tensor fault")
    if wrong == "non_finite" and tensor.is_floating_point() and tensor.numel():
        out = tensor.clone()
        out.view(-1)[draw.draw(st.integers(0, tensor.numel() - 1))] = draw.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        return out
    if wrong == "dtype":
        return tensor.to(draw.draw(st.sampled_from([torch.float16, torch.float32, torch.float64, torch.int64])))
    return tensor.reshape(-1)[: max(0, tensor.numel() - 1)].clone()


@FUZZ
@given(st.data())
def test_payload_value_mutations(original, workdir, draw):
    payload = torch.load(io.BytesIO(original), weights_only=True)
    for _ in range(draw.draw(st.integers(1, 3), label="edits")):
        paths = list(node_paths(payload))
        target = draw.draw(st.sampled_from(paths), label="path")
        parent = payload
        for key in target[:-1]:
            parent = parent[key]
        old = parent[target[-1]]
        if isinstance(parent, dict) and draw.draw(st.booleans(), label="delete"):
            del parent[target[-1]]
        elif isinstance(old, torch.Tensor) and draw.draw(st.booleans(), label="keep it a tensor"):
            parent[target[-1]] = similar_tensor(draw, old)
        else:
            parent[target[-1]] = copy.deepcopy(draw.draw(WEIRD, label="value"))
    consistent = draw.draw(st.booleans(), label="recompute id")
    if consistent:
        try:
            payload["checkpoint_id"] = compute_id(payload)
        except (CheckpointError, TypeError, ValueError, AttributeError):
            consistent = False  # not hashable as a checkpoint (a value the format cannot hold)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    check(buffer.getvalue(), workdir, None if consistent else original_id(original))


def test_the_original_loads_and_resumes(original, workdir):
    """The fuzz starting point is valid (else the mutations would prove little)."""
    check(original, workdir, original_id(original))
    assert TRIED["accepted"] >= 1


# --------------------------------------------------------------------------- found by this fuzz

FOUND = {  # payload path -> value: crashes the fuzz found (fixed); kept as fixed cases
    "tensor as a model setting (RuntimeError)": (("model", "direct_readout"), torch.zeros(2)),
    "NaN decimation band (ValueError in the learner)": (("state", "metabolism", "d"), float("nan")),
    "huge decimation band (OverflowError in the learner)": (("state", "metabolism", "d"), 2**62),
    "NaN weight (rolled back to itself forever)": (("state", "W"), "nan"),
    "tensor as the scorer's version (RuntimeError)": (("extra", "scorer", "version"), torch.zeros(2)),
    "negative scorer count (ZeroDivisionError)": (("extra", "scorer", "slow", "count"), -1),
    "negative scorer variance (math domain error)": (("extra", "scorer", "slow", "var"), -1),
    "tensor as scorer statistics (IndexError)": (("extra", "scorer", "slow"), torch.tensor(1.5)),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_found_crashes_stay_fixed(original, workdir, case):
    """Consistent files (id recomputed) that once crashed the loader or the resume."""
    path, value = FOUND[case]
    payload = torch.load(io.BytesIO(original), weights_only=True)
    parent = payload
    for key in path[:-1]:
        parent = parent[key]
    if value == "nan":
        value = parent[path[-1]].clone()
        value[0, 0] = float("nan")
    parent[path[-1]] = value
    payload["checkpoint_id"] = compute_id(payload)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    check(buffer.getvalue(), workdir)


def test_found_unpickler_crash_stays_fixed(original, workdir):
    """A cut pickle inside a valid archive made the unpickler raise ``struct.error``."""
    pickle_bytes = zipfile.ZipFile(io.BytesIO(original)).read("archive/data.pkl")
    for cut in range(1, len(pickle_bytes), 37):
        check(rebuild(original, "archive/data.pkl", pickle_bytes[:cut]), workdir, original_id(original))
