"""Shared test setup: one torch thread (the target hardware has few cores), deterministic seeds."""

import pytest
import torch

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long soak tests (deselect with -m 'not slow')")


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)


@pytest.fixture
def mosquitto(tmp_path):
    """A real mosquitto on a free 127.0.0.1 port, persistence on; stopped after the test.
    Skipped, saying why, only where the mosquitto binary is absent (``./dev test`` installs it)."""
    from tests.brokers import MOSQUITTO, Mosquitto

    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto, or run ./dev test as root)")
    broker = Mosquitto(tmp_path / "mosquitto").start()
    yield broker
    broker.kill()


@pytest.fixture(scope="session")
def nab_root():
    """NAB's directory (``../shared/data/nab``, or ``$SOMAD_NAB``); skipped, saying why, where the
    data set (kept outside the repository, present in CI) is missing."""
    from bench import nab_scorer as nab

    try:
        root = nab.nab_dir(None)
    except (FileNotFoundError, SystemExit) as e:
        pytest.skip(f"NAB data not available: {e}")
    if not (root / "labels" / "combined_windows.json").is_file():
        pytest.skip(f"NAB data not found at {root}")
    return root


@pytest.fixture(scope="session")
def recurrence():
    """The compiled recurrence (somad/native.py). Skipped where no C compiler can build it,
    except in CI, whose set-up (./dev) installs one: there its absence is a failure."""
    import os

    from somad import native

    kernel = native.recurrence()
    if kernel is None:
        message = f"native kernel unavailable: {native.unavailable_reason()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return kernel
