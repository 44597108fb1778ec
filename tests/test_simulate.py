"""The embedded simulated sensor: deterministic CSV lines, faults where asked; and as a source."""

import threading
import time

import pytest

from adapters.registry import make_source
from adapters.simulate import (
    SIM_MAX_LINES_PER_READ,
    Fault,
    SimulateConfig,
    SimulatedSensor,
    SimulateOptions,
    SimulateSource,
)


def lines(sensor: SimulatedSensor, n_bytes: int) -> list[bytes]:
    return sensor.read(n_bytes).split(b"\n")[:-1]


def test_deterministic_for_a_seed():
    a = SimulatedSensor(SimulateConfig(seed=3)).read(5000)
    b = SimulatedSensor(SimulateConfig(seed=3)).read(5000)
    c = SimulatedSensor(SimulateConfig(seed=4)).read(5000)
    assert a == b and a != c


def test_lines_are_csv_time_value():
    for line in lines(SimulatedSensor(SimulateConfig()), 2000):
        t, v = line.split(b",")
        float(t), float(v)


def test_read_respects_max_bytes_and_loses_nothing():
    s1, s2 = SimulatedSensor(SimulateConfig()), SimulatedSensor(SimulateConfig())
    pieces = b"".join(s1.read(7) for _ in range(500))
    assert pieces == s2.read(3500)


def test_spike_fault_is_far_out_of_range():
    cfg = SimulateConfig(noise=0.0, faults=(Fault("spike", at_line=100),))
    values = [float(l.split(b",")[1]) for l in lines(SimulatedSensor(cfg), 4000)]
    normal = values[:100]
    assert values[100] > max(normal) + 3 * cfg.amplitude


def test_stuck_fault_repeats_the_reading():
    cfg = SimulateConfig(faults=(Fault("stuck", at_line=50, length=10),))
    values = [l.split(b",")[1] for l in lines(SimulatedSensor(cfg), 2000)]
    assert len(set(values[49:60])) == 1


@pytest.mark.parametrize("kwargs", [{"kind": "melt", "at_line": 1}, {"kind": "spike", "at_line": -1}, {"kind": "stuck", "at_line": 1, "length": 0}])
def test_bad_fault_rejected(kwargs):
    with pytest.raises(ValueError):
        Fault(**kwargs)


# ---------------------------------------------------------------------- as a daemon source

def read_lines(source: SimulateSource, seconds: float) -> tuple[bytes, list]:
    chunks, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        chunks += source.read(0.05)
    return b"".join(c.data for c in chunks), chunks


def test_source_is_paced_and_never_ahead_of_the_clock():
    source = SimulateSource(SimulateOptions(rate=200, seed=5), name="sim")
    source.start()
    started = time.monotonic()
    data, chunks = read_lines(source, 0.4)
    elapsed = time.monotonic() - started
    n_lines = data.count(b"\n")
    assert 0 < n_lines <= 200 * elapsed + 1
    assert data == SimulatedSensor(SimulateConfig(rate=200, seed=5)).read(len(data))  # same lines, paced
    assert all(c.received_at <= time.monotonic() and c.offset is None for c in chunks)
    assert source.status().connected


def test_source_falls_behind_then_catches_up_in_bounded_reads():
    source = SimulateSource(SimulateOptions(rate=20000))
    source.start()
    time.sleep(0.3)  # 6000 lines due
    (chunk,) = source.read(0.0)
    assert chunk.data.count(b"\n") == SIM_MAX_LINES_PER_READ
    assert chunk.received_at < time.monotonic() - 0.2  # stamped when its first line was due


def test_unpaced_source_reads_at_once():
    source = SimulateSource(SimulateOptions(realtime=False))
    source.start()
    (chunk,) = source.read(10.0)
    assert len(chunk.data) == 16384


def test_faults_from_yaml_mappings():
    source = make_source("simulate", {"realtime": False, "noise": 0.0, "faults": [{"kind": "spike", "at_line": 5}]})
    assert source.options.faults == (Fault("spike", at_line=5),)
    source.start()
    values = [float(line.split(b",")[1]) for line in source.read(0)[0].data.split(b"\n")[:10]]
    assert values[5] > max(values[:5]) + 3 * source.options.amplitude


@pytest.mark.parametrize(
    "faults, message",
    [
        ([{"kind": "spike", "line": 3}], r"faults\[0\]: unknown key 'line'"),
        ([{"kind": "spike", "at_line": 1}, {"kind": "melt", "at_line": 1}], r"faults\[1\]: fault kind must be"),
        ([{"kind": "spike"}], r"faults\[0\]: .*at_line"),
        (["spike"], r"faults\[0\]: expected a mapping"),
    ],
)
def test_bad_faults_name_their_place(faults, message):
    with pytest.raises(ValueError, match=message):
        SimulateOptions(faults=faults)


def test_stop_wakes_a_paced_read():
    source = SimulateSource(SimulateOptions(rate=0.01))  # one line per 100 s
    source.start()
    source.read(0.1)  # line 0, due at start
    result = []
    reader = threading.Thread(target=lambda: result.append(source.read(60.0)))
    reader.start()
    time.sleep(0.05)
    source.stop()
    reader.join(5)
    assert not reader.is_alive() and result == [[]]
    assert source.read(1.0) == [] and not source.status().connected


def test_clock_start_offsets_the_time_stamps_only():
    plain = lines(SimulatedSensor(SimulateConfig()), 600)
    later = lines(SimulatedSensor(SimulateConfig(clock_start=1_700_000_000.0)), 600)
    pairs = list(zip(plain, later))  # (the longer stamps fill a read with fewer lines)
    assert len(pairs) >= 15
    assert all(float(a.split(b",")[0]) + 1_700_000_000.0 == float(b.split(b",")[0]) for a, b in pairs)
    assert all(a.split(b",")[1] == b.split(b",")[1] for a, b in pairs)
