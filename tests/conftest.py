"""Shared test setup: one torch thread (the target hardware has few cores), deterministic seeds."""

import pytest
import torch

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long soak tests (deselect with -m 'not slow')")


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
