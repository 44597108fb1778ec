"""bench/nab_offline: the cached model pass and the offline scoring layer, on one real NAB file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import nab_offline as off
from bench import nab_scorer as nab
from somad.learner import SomaLearner
from somad.model import preset

SHORT_FILE = "artificialWithAnomaly/art_daily_jumpsup.csv"  # 4032 rows, one window


def test_entropy_tap_leaves_losses_unchanged_and_is_a_valid_entropy():
    data = b"12.5\n13.0\n12.75\n" * 40
    plain = SomaLearner(preset("tiny")).learn(data).numpy()
    bits, entropy = off.learn_with_entropy(SomaLearner(preset("tiny")), data)
    np.testing.assert_array_equal(bits, plain.astype(np.float32))
    assert entropy.shape == bits.shape
    assert (entropy >= -1e-4).all() and (entropy <= 8.0 + 1e-4).all()  # 256 outcomes: at most 8 bits
    assert entropy[-100:].mean() < entropy[:10].mean()  # the model grows confident on a repeating stream


def test_row_layout_offsets_restart_at_each_row():
    data, row_start, offset = off.row_layout(["1.5", "22", "7"])
    assert data == b"1.5\n22\n7\n"
    assert row_start.tolist() == [0, 4, 7, 9]
    assert offset.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]


def test_offset_z_flags_a_rare_miss_at_a_quiet_offset():
    rng = np.random.default_rng(0)
    rows = 400
    surprise = np.stack([rng.normal(0.1, 0.01, rows), rng.normal(4.0, 1.0, rows)], axis=1)  # quiet leading byte, noisy last byte
    surprise[300, 0] = 3.0  # the leading byte missed: smaller than the last byte's usual noise
    z = off.offset_z(surprise.reshape(-1), np.tile([0, 1], rows))
    record = off.per_row(z, np.arange(0, 2 * rows + 1, 2), "max")
    assert int(np.argmax(record)) == 300
    raw = off.per_row(surprise.reshape(-1), np.arange(0, 2 * rows + 1, 2), "max")
    assert int(np.argmax(raw)) != 300  # without the per-offset view the miss is lost in the noise


def test_htm_likelihood_peaks_after_a_level_shift_and_log_scale_keeps_order():
    rng = np.random.default_rng(1)
    scores = rng.normal(2.0, 0.2, 1000)
    scores[700:] += 3.0
    likelihood = off.htm_likelihood(scores, log_scale=False)
    assert likelihood[:288].tolist() == [0.5] * 288  # learning period: no opinion
    assert likelihood[700:710].max() > 0.999999 > likelihood[300:690].max()
    logged = off.htm_likelihood(scores, log_scale=True)
    order = np.argsort(likelihood, kind="stable")
    assert np.all(np.diff(logged[order]) >= -1e-12)


def test_onsets_keep_the_first_of_a_run_of_high_rows():
    anomaly = np.array([0.2, 0.9, 0.9, 0.95, 0.1, 0.1, 0.1, 0.5])
    assert off.onsets(anomaly, rows=3).tolist() == [0.2, 0.9, 0.9, 0.95, 0.0, 0.0, 0.0, 0.5]
    assert off.onsets(anomaly, rows=1).tolist() == [0.2, 0.9, 0.9, 0.95, 0.0, 0.1, 0.1, 0.5]


def test_squash_is_monotone_into_the_unit_interval():
    x = np.array([-1e9, -3.0, 0.0, 1e-6, 2.0, 1e12])
    y = off.squash(x)
    assert np.all(np.diff(y) > 0) and y.min() > 0 and y.max() < 1


def test_cache_and_ablate_one_nab_file(nab_root, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "ablation.json"
    off.main(["all", "--preset", "tiny", "--jobs", "1", "--files", SHORT_FILE, "--cache", str(cache), "--json", str(out),
              "--records", "mean_bits,offz_max_excess", "--transforms", "shipped_tail,htm_log"])  # fmt: skip
    (f,) = nab.load_corpus(nab_root, [SHORT_FILE])
    cached = off.Cached.load(off.cache_path("tiny", SHORT_FILE, cache))
    assert cached.row_start.size == f.n_rows + 1 and cached.bits.size == cached.row_start[-1]
    assert np.isfinite(cached.bits).all() and (cached.bits >= 0).all()
    report = json.loads(out.read_text())
    assert {(r["record"], r["transform"]) for r in report["rows"]} == {
        (rec, tr + post) for rec in ("mean_bits", "offz_max_excess") for tr in ("shipped_tail", "htm_log") for post in ("", "+onset")
    }
    for row in report["rows"]:
        assert set(row["scores"]) == set(nab.PROFILE_NAMES)
        assert all(-1000 < s <= 100 for s in row["scores"].values())
    assert "offz_max_excess" in capsys.readouterr().out
    # a second run reuses the cache rather than running the model again
    mtime = off.cache_path("tiny", SHORT_FILE, cache).stat().st_mtime_ns
    off.main(["cache", "--preset", "tiny", "--files", SHORT_FILE, "--cache", str(cache)])
    assert off.cache_path("tiny", SHORT_FILE, cache).stat().st_mtime_ns == mtime


def test_unknown_transform_is_named():
    with pytest.raises(SystemExit, match="bogus"):
        off.main(["ablate", "--transforms", "bogus"])
