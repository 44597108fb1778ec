"""Every command the top-level README shows in a code block is exercised: the cheap ones run here;
each other one is mapped to the test (or CI step) that runs it, and that test must exist. The
README's YAML blocks must load as configs and its alert example must have the event's fields.

A command added to the README without a rule below fails ``test_readme_command_is_covered``.
"""

from __future__ import annotations

import ast
import doctest
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
TIMEOUT = 120  # seconds for one command (somad check imports torch)
PHI = (1 + 5**0.5) / 2

# ============================================================================ reading the README


@dataclass(frozen=True)
class Block:
    language: str  # what follows the opening fence: sh, yaml, json, or ""
    text: str  # the block's lines, the fence's indentation removed
    line: int  # line number of the opening fence, for messages


def code_blocks(markdown: str) -> list[Block]:
    """Fenced code blocks, also those indented inside list items.

    >>> [(b.language, b.text) for b in code_blocks("x\\n```sh\\nls\\n```\\n1. a\\n   ```yaml\\n   k: v\\n   ```\\n")]
    [('sh', 'ls\\n'), ('yaml', 'k: v\\n')]
    """
    blocks = []
    pattern = re.compile(r"^( *)```(\w*)\n(.*?)^\1```[ \t]*$", re.MULTILINE | re.DOTALL)
    for match in pattern.finditer(markdown):
        indent, language, body = match.groups()
        text = "".join(line.removeprefix(indent) for line in body.splitlines(keepends=True))
        blocks.append(Block(language, text, markdown.count("\n", 0, match.start()) + 1))
    return blocks


def shell_commands(markdown: str) -> list[str]:
    """Commands of the shell blocks: one per line (``\\`` continuations joined), a ``$ `` prompt
    and a trailing ``# comment`` dropped.

    >>> shell_commands("```sh\\n$ somad --help   # usage\\nsomad run \\\\\\n  --seconds 2\\n```\\n")
    ['somad --help', 'somad run --seconds 2']
    """
    commands = []
    for block in code_blocks(markdown):
        if block.language not in ("sh", "bash", "shell", "console"):
            continue
        joined = re.sub(r"\\\n\s*", "", block.text)
        for line in joined.splitlines():
            line = re.split(r"\s+#\s", " " + line.strip() + " ", maxsplit=1)[0].strip()
            if line.startswith("#") or not line:
                continue
            commands.append(line.removeprefix("$ "))
    return commands


# ============================================================================ what covers what


@dataclass(frozen=True)
class Rule:
    pattern: str  # regular expression a whole command must match
    covered_by: tuple[str, ...]  # "RUN" (run here), "tests/FILE.py::test_name", or a CI file
    why: str  # what that test does with the command


NOTIFY = "tests/test_notify_daemon.py::test_ready_status_watchdog_reload_and_stopping_from_the_real_daemon"
INSTALLER = "tests/test_deploy.py::test_install_sh_end_to_end_in_a_fake_root"
LAUNCHD = "tests/test_deploy.py::test_launchd_plist_runs_the_daemon_as_the_readme_installs_it"

RULES = (
    Rule(r"somad check --config configs/[\w.-]+\.yaml", ("RUN",), "validates the example in the checkout"),
    Rule(r"somad (--help|--version|\w+ --help)", ("RUN",), "prints usage"),
    Rule(r"promtool (check config|test rules) deploy/prometheus/[\w.]+\.yml", ("RUN",), "checks the shipped Prometheus files"),
    Rule(r"\./dev test", (".ci/run",), "CI's entry point runs exactly this"),
    Rule(r"\./dev run --seconds \d+", ("tests/test_cli.py::test_run_embedded_default_learns_reports_and_resumes",), "./dev run is `somad run` in the set-up venv; the test runs `somad run --seconds`"),
    Rule(r"sudo deploy/install\.sh( --[\w-]+( [\w-]+)?)*", (INSTALLER,), "runs every installer command the READMEs show (readme_install_commands) in a fake root"),
    Rule(r"somad check --config /etc/somad/somad\.yaml", (INSTALLER,), "the installed somad checks the installed /etc/somad/somad.yaml"),
    Rule(r"systemctl status somad", (NOTIFY,), "READY=1 and STATUS= as systemctl status shows them, from the real daemon"),
    Rule(r"journalctl -u somad( -f)?", (NOTIFY,), "the JSON log lines the daemon writes for the journal"),
    Rule(r"sudo systemctl reload somad", (NOTIFY, "tests/test_deploy.py::test_unit_settings"), "ExecReload=kill -HUP $MAINPID; SIGHUP gives RELOADING=1 then READY=1"),
    # macOS: launchd cannot run on the Linux CI; the same lines in deploy/macos/README.md are checked
    # against the plist (program, config path, directories, user), statically.
    Rule(r"sudo (python3 -m venv|/opt/somad/venv/bin/pip install|mkdir -p|cp|chown|launchctl bootstrap) .*", (LAUNCHD,), "macOS only: checked statically against the plist"),
)


def rule_for(command: str) -> Rule | None:
    """The first rule whose pattern matches the whole command.

    >>> rule_for("somad check --config configs/pi-serial.yaml").covered_by
    ('RUN',)
    >>> rule_for("rm -rf /") is None
    True
    """
    return next((rule for rule in RULES if re.fullmatch(rule.pattern, command)), None)


def names_a_test(reference: str) -> bool:
    """``tests/FILE.py::name`` names a test function defined in that file."""
    path, _, name = reference.partition("::")
    tree = ast.parse((REPO / path).read_text())
    return any(isinstance(node, ast.FunctionDef) and node.name == name for node in tree.body)


def run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False)


def somad_argv(command: str) -> list[str]:
    argv = shlex.split(command)
    script = Path(sys.executable).with_name("somad")
    return ([str(script)] if script.exists() else [sys.executable, "-m", "somad"]) + argv[1:]


# ============================================================================ the tests

COMMANDS = shell_commands(README.read_text())


def test_the_readme_shows_the_operator_commands():
    """The extraction itself works: the commands the operator sections are about are found."""
    for expected in (
        "./dev test",
        "sudo deploy/install.sh --config pi-serial --enable",
        "somad check --config /etc/somad/somad.yaml",
        "sudo systemctl reload somad",
        "sudo launchctl bootstrap system /Library/LaunchDaemons/com.somad.daemon.plist",
        "promtool test rules deploy/prometheus/somad.rules.test.yml",
        "sudo deploy/install.sh",
    ):
        assert expected in COMMANDS, expected


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_is_covered(command):
    rule = rule_for(command)
    assert rule is not None, f"README.md shows {command!r}, which no test runs: add a rule to tests/test_readme.py"
    for target in rule.covered_by:
        if target == "RUN":
            run_here(command)
        elif "::" in target:
            assert names_a_test(target), f"{command!r} is mapped to {target}, which does not exist"
        else:
            assert command in (REPO / target).read_text(), f"{target} does not run {command!r}"
    if rule.covered_by == (INSTALLER,) and command.startswith("sudo deploy/install.sh"):
        from tests.test_deploy import readme_install_commands

        assert command.removeprefix("sudo ") in readme_install_commands()  # which that test runs
    if rule.covered_by == (LAUNCHD,):
        macos = (REPO / "deploy/macos/README.md").read_text()
        assert command in shell_commands(macos), "a macOS step that deploy/macos/README.md does not show"


def run_here(command: str) -> None:
    if command.startswith("somad "):
        proc = run(somad_argv(command))
        assert proc.returncode == 0, f"{command}: exit {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        if " check " in f" {command} ":
            assert ": valid, " in proc.stdout.splitlines()[0]
        else:
            assert proc.stdout.strip(), command
    elif command.startswith("promtool "):
        if shutil.which("promtool") is None:
            pytest.skip("promtool not installed (apt-get install prometheus)")
        proc = run(shlex.split(command))
        assert proc.returncode == 0 and "SUCCESS" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    else:
        raise AssertionError(f"no way to run {command!r} here")


def test_a_command_without_a_rule_is_reported():
    """The check above can fail: a README line nobody runs has no rule."""
    text = "```sh\nsomad frobnicate --all\nsudo systemctl restart somad\n```\n"
    assert [rule_for(c) for c in shell_commands(text)] == [None, None]


def test_yaml_blocks_load_as_configs():
    from somad.config import parse_config

    blocks = [b for b in code_blocks(README.read_text()) if b.language == "yaml"]
    assert len(blocks) >= 2
    for block in blocks:
        config = parse_config(block.text, origin=f"README.md:{block.line}", environ={})
        assert config.streams, block.line


def test_the_alert_example_has_exactly_the_events_fields():
    from somad.events import AlertEvent, Timescale

    (block,) = [b for b in code_blocks(README.read_text()) if b.language == "json"]
    shown = json.loads(block.text)
    event = AlertEvent("open", "s", "s-1", 0.0, 0.0, 1.0, 3.0, 1, b"x\n", (Timescale(16, PHI**16, 1.0),))
    assert list(shown) == list(event.to_dict())  # same fields, same order as the sinks write them
    assert shown["event"] == "alert_open" and shown["kind"] == "open"
    for timescale in shown["timescales"]:
        assert set(timescale) == {f.name for f in fields(Timescale)}
        assert math.isclose(timescale["tau_bytes"], PHI ** timescale["band"], rel_tol=0.01)  # tau = phi^band


def test_the_helpers_examples():
    assert doctest.testmod(sys.modules[__name__]).failed == 0
