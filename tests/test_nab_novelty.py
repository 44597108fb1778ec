"""bench/nab_novelty: the novelty detector on real NAB files, through the daemon's scorer."""

from __future__ import annotations

import json

import numpy as np

from bench import nab_novelty as bench
from bench import nab_scorer as nab
from somad.scoring import ScoringConfig

JUMPS = "artificialWithAnomaly/art_daily_jumpsup.csv"  # 4032 rows, one window: the level jumps up
NO_ANOMALY = "artificialNoAnomaly/art_daily_small_noise.csv"  # 4032 rows, no window


def rows_of(root, name: str) -> list[bytes]:
    return [v.encode() + b"\n" for v in nab.read_csv_column(root / "data" / name, "value")[1]]


def test_the_jump_is_flagged_inside_its_window_and_nowhere_near_as_high_elsewhere(nab_root):
    (labelled,) = nab.load_corpus(nab_root, [JUMPS])
    (start, end), = labelled.windows
    triggers = bench.triggers(rows_of(nab_root, JUMPS), ScoringConfig())
    peak = int(np.argmax(triggers))
    assert start <= peak <= end, (peak, labelled.windows)
    outside = np.concatenate((triggers[: start - 1], triggers[end + 1 :]))
    assert outside.max() < triggers[peak]


def test_cli_scores_a_grid_with_a_split_and_writes_the_table(nab_root, tmp_path, capsys):
    out = tmp_path / "grid.json"
    bench.main(["--files", f"{JUMPS},{NO_ANOMALY}", "--depth", "3,6", "--split", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "chosen on the odd files" in printed and "chosen on the even files" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["depth"] for r in rows] != [] and {r["depth"] for r in rows} == {3, 6}
    for r in rows:
        for half in ("all", "odd", "even"):
            assert set(r[half]) == set(nab.PROFILE_NAMES)
            assert all(-100.0 <= v <= 100.0 for v in r[half].values())
    assert rows[0]["all"]["standard"] >= rows[-1]["all"]["standard"]  # best first
