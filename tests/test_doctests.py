"""Run the docstring examples of every module in somad/ and adapters/ that carries them."""

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for package in ("somad", "adapters")
    for path in (ROOT / package).rglob("*.py")
    if ">>> " in path.read_text()
)


def test_modules_with_examples_are_found():
    assert "somad.metabolism" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0
    assert result.failed == 0
