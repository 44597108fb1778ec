"""Run the docstring examples of the modules that carry them."""

import doctest
import importlib

import pytest

MODULES = ["somad.metabolism", "somad.records", "adapters.simulate"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0
    assert result.failed == 0
