"""Where part 2 of the fault suite (network, serial, bad input, fuzz) writes its measured figures:
``bench/out/faults-part2.json`` (gitignored), one section per test, merged by the shared
``harness.record_figures``."""

from __future__ import annotations

from tests.faults.harness import REPO, record_figures

PART2 = REPO / "bench" / "out" / "faults-part2.json"


def record(section: str, figures: dict) -> None:
    record_figures(section, figures, PART2)
