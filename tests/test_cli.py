"""The somad command line, end to end in a subprocess, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def somad(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "somad", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_version():
    out = somad("--version")
    assert out.returncode == 0
    assert out.stdout.startswith("somad ")


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"]])
def test_help(args):
    out = somad(*args)
    assert out.returncode == 0
    assert "usage: somad" in out.stdout


def test_no_command_is_usage_error():
    out = somad()
    assert out.returncode == 2


@pytest.mark.parametrize("args", [["run", "--seconds", "-1"], ["run", "--preset", "huge"], ["frobnicate"]])
def test_bad_arguments_exit_2_with_message(args):
    out = somad(*args)
    assert out.returncode == 2
    assert "error:" in out.stderr
    assert "Traceback" not in out.stderr


def test_run_embedded_default_learns_reports_and_resumes(tmp_path):
    args = ("run", "--seconds", "6", "--fast", "--preset", "tiny", "--json", "--state-dir", str(tmp_path))
    out = somad(*args)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["bytes"] > 10_000
    assert summary["records"] > 1_000
    # A learned periodic signal costs far less than 8 bits per byte.
    assert 0 < summary["bits_per_byte"] < 5
    events = [json.loads(line)["event"] for line in out.stderr.splitlines() if line.startswith("{")]
    assert "ready" in events and "status" in events and "stopped" in events, out.stderr[-3000:]
    assert list(tmp_path.glob("sensor/*.pt")), "no checkpoint after a clean stop"
    second = somad(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads(second.stdout)
    assert again["bytes"] > summary["bytes"]  # learning survived the restart
