"""The embedded simulated sensor: deterministic CSV lines, faults where asked."""

import pytest

from adapters.simulate import Fault, SimulateConfig, SimulatedSensor


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
