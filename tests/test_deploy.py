"""Deployment files, each checked with the real tool: systemd units (``systemd-analyze verify`` and
``security``), the installer (shellcheck, run end to end into a fake root), Prometheus rules
(``promtool check`` / ``test rules``), the Grafana dashboard and the launchd plist (every metric
they name is one the daemon exports, read from ``somad.metrics``'s registry), and a real
Prometheus scraping a real ``somad run --config`` whose simulated sensor has an injected fault.

A tool that is not installed skips its test with the apt package to install; nothing else skips.
"""

from __future__ import annotations

import json
import os
import plistlib
import re
import shlex
import shutil
import site
import socket
import stat
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "systemd"
DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "somad.json"
PLIST = DEPLOY / "macos" / "com.somad.daemon.plist"
INSTALL_SH = DEPLOY / "install.sh"

EXEC_START = "/opt/somad/venv/bin/somad"  # where install.sh puts the entry point, named by the units
UNITS = ("somad.service", "somad@.service")
ALERTS = {
    "SomadStreamAnomaly",
    "SomadStreamSilent",
    "SomadSourceDisconnected",
    "SomadCheckpointTooOld",
    "SomadDroppedBytes",
    "SomadDown",
}
PROMETHEUS_MADE = {"up", "ALERTS"}  # series Prometheus itself writes, not the daemon
TIMEOUT = 60  # seconds for any one tool run


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (apt-get install {package})")
    return path


def run(*args, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(a) for a in args],
        check=False,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{shlex.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


# ============================================================================ systemd units


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values in order (keys may repeat); comments and blank lines dropped."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


@pytest.fixture(scope="module")
def systemd_root(tmp_path_factory) -> Path:
    """A filesystem root for ``systemd-analyze --root``: systemd's own units (targets), ``kill``
    for ExecReload, a placeholder at the ExecStart path and the real unit files, byte for byte,
    where install.sh puts them."""
    tool("systemd-analyze", "systemd")
    root = tmp_path_factory.mktemp("sysroot")
    system_units = next(
        p
        for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
        if p.is_dir()
    )
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    shutil.copy2(shutil.which("kill"), root / "usr/bin/kill")
    entry = root / EXEC_START.lstrip("/")
    entry.parent.mkdir(parents=True)
    entry.write_text("#!/bin/sh\nexit 0\n")
    entry.chmod(0o755)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for unit in UNITS:
        shutil.copyfile(SYSTEMD / unit, unit_dir / unit)
    return root


def verify(root: Path, *units: str) -> subprocess.CompletedProcess:
    return run("systemd-analyze", "verify", f"--root={root}", *units, check=False)


def test_units_pass_systemd_analyze_verify_without_a_warning(systemd_root):
    proc = verify(
        systemd_root, "somad.service", "somad@.service", "somad@pump1.service"
    )
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_verify_catches_a_missing_binary_and_a_misspelt_key(systemd_root, tmp_path):
    """The clean result above means something: the same check fails on a broken copy."""
    root = tmp_path / "root"
    shutil.copytree(systemd_root, root, symlinks=True)
    (root / EXEC_START.lstrip("/")).unlink()
    proc = verify(root, "somad.service")
    assert proc.returncode != 0 and f"{EXEC_START} is not executable" in proc.stderr
    unit = root / "etc/systemd/system/somad.service"
    unit.write_text(
        unit.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict")
    )
    assert "Unknown key 'ProtectSytem'" in verify(root, "somad.service").stderr


REQUIRED = {
    "Service.Type": ["notify"],
    "Service.NotifyAccess": ["main"],
    "Service.ExecReload": ["kill -HUP $MAINPID"],
    "Service.Restart": ["on-failure"],
    "Service.User": ["somad"],
    "Service.SupplementaryGroups": ["dialout"],
    "Service.ProtectSystem": ["strict"],
    "Service.ProtectHome": ["yes"],
    "Service.PrivateTmp": ["yes"],
    "Service.NoNewPrivileges": ["yes"],
    "Service.CapabilityBoundingSet": [""],
    "Service.DevicePolicy": ["closed"],
    "Install.WantedBy": ["multi-user.target"],
}
# PrivateDevices hides serial ports; MemoryDenyWriteExecute breaks libffi and torch; ProcSubset=pid
# hides /proc/stat, without which the process collector exports no memory metric.
FORBIDDEN = (
    "Service.PrivateDevices",
    "Service.MemoryDenyWriteExecute",
    "Service.ProcSubset",
    "Service.DynamicUser",
)


@pytest.mark.parametrize(
    ("unit", "config", "state"),
    [
        ("somad.service", "/etc/somad/somad.yaml", "somad"),
        ("somad@.service", "/etc/somad/%i.yaml", "somad/%i"),
    ],
)
def test_unit_settings(unit, config, state):
    settings = parse_unit(SYSTEMD / unit)
    for key, values in REQUIRED.items():
        assert settings.get(key) == values, f"{unit}: {key}"
    assert not [key for key in FORBIDDEN if key in settings], unit
    assert settings["Service.ExecStart"] == [f"{EXEC_START} run --config {config}"]
    assert settings["Service.ExecStartPre"] == [f"{EXEC_START} check --config {config}"]
    assert settings["Service.StateDirectory"] == [state]
    assert settings["Service.WorkingDirectory"] == [f"%S/{state}"]
    watchdog = settings["Service.WatchdogSec"][0]
    assert (
        re.fullmatch(r"\d+s", watchdog) and int(watchdog[:-1]) >= 20
    )  # the daemon pings at half of it
    serial = {v.split()[0] for v in settings["Service.DeviceAllow"]}
    assert {"char-ttyUSB", "char-ttyACM", "char-ttyAMA", "char-ttyS"} <= serial
    assert settings["Service.RestrictAddressFamilies"] == [
        "AF_UNIX AF_INET AF_INET6 AF_NETLINK"
    ]


def test_template_differs_from_the_service_only_in_its_instance():
    """Hardening changed in one unit and forgotten in the other would pass every other test."""
    single, template = (
        parse_unit(SYSTEMD / "somad.service"),
        parse_unit(SYSTEMD / "somad@.service"),
    )
    instance_keys = {
        "Unit.Description",
        "Service.ExecStart",
        "Service.ExecStartPre",
        "Service.StateDirectory",
        "Service.WorkingDirectory",
    }
    assert {k: v for k, v in single.items() if k not in instance_keys} == {
        k: v for k, v in template.items() if k not in instance_keys
    }
    assert all("%i" in template[key][0] for key in instance_keys)


def security_exposure(*args: str) -> float:
    proc = run(
        "systemd-analyze", "security", "--offline=yes", *args, check=False, cwd=REPO
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout[-2000:] + proc.stderr
    return float(found.group(1))


def test_security_exposure_is_at_most_3_and_as_the_readme_says(systemd_root):
    """``--offline`` reads the unit file itself: no running systemd needed (systemd >= 250)."""
    readme = (SYSTEMD / "README.md").read_text()
    for unit, args in (
        ("somad.service", ["systemd/somad.service"]),
        ("somad@.service", [f"--root={systemd_root}", "somad@pump1.service"]),
    ):
        exposure = security_exposure(*args)
        assert exposure <= 3.0, unit
        claimed = re.search(rf"`{re.escape(unit)}`[^\n|]*\|\s*(\d+\.\d+)", readme)
        assert claimed and float(claimed.group(1)) == exposure, (
            f"systemd/README.md must report {unit}: {exposure}"
        )


def test_a_config_without_state_dir_uses_systemds_state_directory():
    """``StateDirectory=`` (and the launchd plist) pass ``$STATE_DIRECTORY``: the one writable place."""
    from somad.config import parse_config

    text = "streams: [{name: uart0, source: {type: stdin}}]\n"
    assert parse_config(text, environ={"STATE_DIRECTORY": "/var/lib/somad/pump1"}).state_dir == "/var/lib/somad/pump1"
    assert parse_config(text, environ={"STATE_DIRECTORY": "/var/lib/somad:/var/lib/x"}).state_dir == "/var/lib/somad"
    assert parse_config(text, environ={}).state_dir == "/var/lib/somad"
    assert parse_config("state_dir: /srv/somad\n" + text, environ={"STATE_DIRECTORY": "/x"}).state_dir == "/srv/somad"


# ============================================================================ Prometheus rules


def test_promtool_checks_the_rules_and_the_scrape_config():
    tool("promtool", "prometheus")
    out = run("promtool", "check", "rules", PROMETHEUS / "somad.rules.yml").stdout
    assert f"SUCCESS: {len(ALERTS)} rules found" in out
    run("promtool", "check", "config", PROMETHEUS / "prometheus.yml")


def test_promtool_rule_unit_tests_pass(tmp_path):
    tool("promtool", "prometheus")
    proc = run("promtool", "test", "rules", "somad.rules.test.yml", cwd=PROMETHEUS)
    assert "SUCCESS" in proc.stdout
    # ... and they can fail: the same tests against a rule whose threshold is off.
    shutil.copy(PROMETHEUS / "somad.rules.test.yml", tmp_path)
    rules = (PROMETHEUS / "somad.rules.yml").read_text()
    (tmp_path / "somad.rules.yml").write_text(
        rules.replace(
            "somad_checkpoint_age_seconds > 3600", "somad_checkpoint_age_seconds > 7200"
        )
    )
    broken = run(
        "promtool", "test", "rules", "somad.rules.test.yml", cwd=tmp_path, check=False
    )
    assert (
        broken.returncode != 0
        and "SomadCheckpointTooOld" in broken.stdout + broken.stderr
    )


def load_rules() -> list[dict]:
    import yaml

    doc = yaml.safe_load((PROMETHEUS / "somad.rules.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_alert_is_named_and_unit_tested_firing():
    import yaml

    rules = load_rules()
    assert {r["alert"] for r in rules} == ALERTS
    tests = yaml.safe_load((PROMETHEUS / "somad.rules.test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired == ALERTS
    for rule in rules:
        assert (
            rule["labels"]["severity"] in ("warning", "critical")
            and rule["annotations"]["summary"]
        )


# ============================================================================ metric names

KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (Grafana's ``$variables`` allowed)."""
    text = re.sub(
        r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr
    )  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )  # label lists
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, is_call = match.groups()
        if not is_call and word.lower() not in KEYWORDS:
            names.add(word)
    return names


def test_promql_metric_names_finds_names_and_only_names():
    expr = 'sum by (le, stream) (rate(somad_x_bucket{stream=~"$stream", a="b{c}"}[$__rate_interval])) / on (instance) group_left (v) somad_y > 0.99 and bool up offset 5m'
    assert promql_metric_names(expr) == {"somad_x_bucket", "somad_y", "up"}
    assert promql_metric_names("histogram_quantile(0.9, rate(a:b_c[5m])) * 1e3") == {
        "a:b_c"
    }


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every sample name the daemon's registry exports once a stream has seen a batch."""
    from somad.metrics import FIXED_NAMES, Metrics

    metrics = Metrics()
    stream = metrics.stream("probe")
    stream.observe_batch(
        bytes=4, records=1, bits=[1.0, 2.0, 3.0, 4.0], anomaly=0.5, latency_seconds=0.01
    )
    names = {
        sample.name
        for family in metrics.registry.collect()
        for sample in family.samples
    }
    assert {
        n for n in FIXED_NAMES if n != "somad_bits_per_byte"
    } <= names  # the registry really is the daemon's
    assert {"somad_bits_per_byte_bucket", "process_resident_memory_bytes"} <= names
    return names


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every target, annotation and template variable of the dashboard."""
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r}", target["expr"]))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            queries.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", var["query"]["query"])
            assert inner, (
                f"variable {var['name']}: expected label_values(selector, label)"
            )
            queries.append((f"variable ${var['name']}", inner.group(1)))
    return queries


def rule_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every rule expression and every ``query`` inside an annotation template."""
    queries = []
    for rule in load_rules():
        queries.append((f"rule {rule['alert']}", rule["expr"]))
        for key, text in rule["annotations"].items():
            for inner in re.findall(r'printf\s+"([^"]*)"[^|}]*\|\s*query', text):
                queries.append(
                    (f"rule {rule['alert']} annotation {key}", inner.replace("%s", "x"))
                )
    return queries


def test_dashboard_and_rules_name_only_exported_metrics(exported):
    dashboard = json.loads(DASHBOARD.read_text())
    unknown = [
        (where, name)
        for where, expr in dashboard_queries(dashboard) + rule_queries()
        for name in promql_metric_names(expr)
        if name not in exported | PROMETHEUS_MADE
    ]
    assert unknown == []


def test_dashboard_is_valid_and_shows_what_the_issue_asks(exported):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "somad" and dashboard["title"] == "somad"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance", "stream"} <= set(variables)
    assert variables["stream"]["multi"] and variables["stream"]["includeAll"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        for target in panel.get("targets", []):
            names = promql_metric_names(target["expr"])
            assert names and target["refId"], panel["title"]
            per_stream = {n for n in names if n.startswith("somad_")} - {
                "somad_build_info"
            }
            if per_stream:  # every per-stream panel follows the stream variable
                assert 'stream=~"$stream"' in target["expr"], panel["title"]
    shown = {
        name
        for _, expr in dashboard_queries(dashboard)
        for name in promql_metric_names(expr)
    }
    wanted = {
        "somad_anomaly_score", "somad_alerts_open", "somad_alerts_total",  # score and alerts
        "somad_bits_per_byte_sum", "somad_bits_per_byte_count", "somad_bits_per_byte_bucket",  # bits/byte
        "somad_decimation_band", "somad_observations_per_byte", "somad_observations_total",  # band, learning cost
        "somad_bytes_total", "somad_dropped_bytes_total", "somad_source_reconnects_total",  # throughput, drops, reconnects
        "somad_checkpoint_age_seconds", "process_resident_memory_bytes",  # checkpoint age, memory
    }  # fmt: skip
    assert wanted <= shown


# ============================================================================ installer


def test_install_sh_passes_shellcheck():
    tool("shellcheck", "shellcheck")
    run("shellcheck", INSTALL_SH)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--bogus"], 2, "unknown option: --bogus"),
        (["--purge"], 2, "--purge only goes with --uninstall"),
        (["--instance", "../etc"], 2, "--instance: expected letters"),
        (
            ["--root", "/nonexistent-somad-root"],
            1,
            "--root /nonexistent-somad-root: no such directory",
        ),
        (
            ["--config", "nope", "--root", "/tmp", "--no-deps"],
            1,
            f"--config nope: no {REPO}/configs/nope.yaml (examples: ",
        ),
    ],
)
def test_install_sh_rejects_bad_arguments_by_name(args, code, message, tmp_path):
    proc = run("bash", INSTALL_SH, *args, check=False, cwd=tmp_path)
    assert proc.returncode == code and message in proc.stderr


def test_install_sh_help_lists_every_option():
    usage = run("bash", INSTALL_SH, "--help").stdout
    options = set(
        re.findall(r"^\s+(--[a-z-]+)\)", INSTALL_SH.read_text(), re.MULTILINE)
    )
    assert len(options) >= 9
    assert options <= set(re.findall(r"--[a-z-]+", usage))


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """somad's wheel, built offline with this environment's setuptools from a copy of the checkout
    (install.sh builds it from the checkout itself when it has network for its build backend)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "somad", "adapters"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, src / name)
    wheels = work / "wheels"
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        wheels,
        src,
    )
    assert len(list(wheels.glob("somad-*.whl"))) == 1
    return wheels


def fake_root(path: Path) -> Path:
    """An empty system: root and dialout exist, nothing else."""
    (path / "etc").mkdir(parents=True)
    (path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (path / "etc/group").write_text("root:x:0:\ndialout:x:20:\n")
    for name in ("shadow", "gshadow"):
        (path / "etc" / name).write_text("")
    return path


def tree(root: Path) -> dict[str, tuple]:
    """Path -> (mode, owner, content or link target), the venv's compiled files aside."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if (
            "__pycache__" in rel
            or rel.endswith((".pyc", "RECORD", ".pwd.lock"))
            or rel.startswith("etc/")
            and rel.endswith("-")
        ):
            continue
        info = path.lstat()
        if path.is_symlink():
            content = os.readlink(path)
        elif path.is_file():
            content = path.read_bytes()
        else:
            content = None
        state[rel] = (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, content)
    return state


def readme_install_commands() -> list[str]:
    """The installer commands deploy/README.md and the top-level README show, without ``sudo``."""
    text = (DEPLOY / "README.md").read_text() + (REPO / "README.md").read_text()
    return [
        line.split("#")[0].strip().removeprefix("sudo ")
        for line in text.splitlines()
        if re.match(r"\s*sudo deploy/install\.sh\b", line)
    ]


def test_install_sh_end_to_end_in_a_fake_root(tmp_path, wheelhouse):
    if os.geteuid() != 0:
        pytest.skip("install.sh creates a user (useradd --root chroots): needs root")
    tool("useradd", "passwd")
    root = fake_root(tmp_path / "root")
    testing = [
        "--root",
        str(root),
        "--wheelhouse",
        str(wheelhouse),
        "--no-deps",
        "--python",
        sys.executable,
    ]
    ran = []

    def install(command: str) -> subprocess.CompletedProcess:
        ran.append(command)
        argv = shlex.split(command)
        assert argv[0] == "deploy/install.sh"
        return run("bash", INSTALL_SH, *argv[1:], *testing, cwd=REPO)

    # --- the Pi install: user, directories, venv, config, units, enabled
    install("deploy/install.sh --config pi-serial --enable")
    passwd = (root / "etc/passwd").read_text()
    user = re.search(
        r"^somad:x:(\d+):(\d+):[^:]*:/var/lib/somad:/usr/sbin/nologin$",
        passwd,
        re.MULTILINE,
    )
    assert user and int(user.group(1)) < 1000, passwd  # a system user
    gid = int(user.group(2))
    assert re.search(
        r"^dialout:x:20:somad$", (root / "etc/group").read_text(), re.MULTILINE
    )
    etc = root / "etc/somad"
    assert (stat.S_IMODE(etc.stat().st_mode), etc.stat().st_uid, etc.stat().st_gid) == (
        0o750,
        0,
        gid,
    )
    config = etc / "somad.yaml"
    assert (stat.S_IMODE(config.stat().st_mode), config.stat().st_gid) == (0o640, gid)
    example = (REPO / "configs/pi-serial.yaml").read_text()
    assert re.sub(r"(?m)^state_dir:.*$", "", config.read_text()) == re.sub(
        r"(?m)^state_dir:.*$", "", example
    )
    for unit in UNITS:
        assert (root / "etc/systemd/system" / unit).read_bytes() == (
            SYSTEMD / unit
        ).read_bytes()
    assert (
        os.readlink(root / "etc/systemd/system/multi-user.target.wants/somad.service")
        == "/etc/systemd/system/somad.service"
    )
    assert os.readlink(root / "usr/local/bin/somad") == EXEC_START
    assert sorted(
        p.name for p in (root / "opt/somad/share/configs").iterdir()
    ) == sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert not (root / "var/lib/somad").exists()  # systemd's StateDirectory= makes it

    # The installed config is valid and puts state where systemd says (and a sane default without it).
    from somad.config import load_config

    assert (
        load_config(config, environ={"STATE_DIRECTORY": "/var/lib/somad"}).state_dir
        == "/var/lib/somad"
    )
    assert load_config(config, environ={}).state_dir == "/var/lib/somad"

    # The entry point runs the installed package (dependencies lent by this environment: --no-deps).
    venv = root / "opt/somad/venv"
    lent = os.pathsep.join(site.getsitepackages())
    env = {**os.environ, "PYTHONPATH": lent, "OMP_NUM_THREADS": "1"}
    where = run(
        venv / "bin/python",
        "-c",
        "import somad; print(somad.__file__)",
        env=env,
        cwd=tmp_path,
    ).stdout
    assert where.startswith(str(venv))  # not the checkout's copy
    version = run(venv / "bin/somad", "--version", env=env, cwd=tmp_path).stdout
    assert version.strip() == "somad 0.1.0"
    # The README's next step: the installed somad checks the installed config.
    check = run(venv / "bin/somad", "check", "--config", config, env=env, cwd=tmp_path).stdout
    assert "valid, 1 stream(s): uart0" in check, check

    # --- idempotent: the same command again changes nothing; an edited config is kept
    before = tree(root)
    install("deploy/install.sh --config pi-serial --enable")
    assert tree(root) == before
    config.write_text(config.read_text() + "# edited by hand\n")
    install("deploy/install.sh")  # the upgrade
    assert config.read_text().endswith("# edited by hand\n")

    # --- a template instance: its own config with its own state directory
    install("deploy/install.sh --instance pump1 --config pi-serial --enable")
    instance = load_config(etc / "pump1.yaml", environ={})
    assert instance.state_dir == "/var/lib/somad/pump1"
    # It may write only there (ProtectSystem=strict, StateDirectory=somad/pump1): so do its sinks.
    written = re.findall(r"/var/lib/somad[^\s\"']*", (etc / "pump1.yaml").read_text())
    assert written and all(p.startswith("/var/lib/somad/pump1") for p in written), (
        written
    )
    assert (
        root / "etc/systemd/system/multi-user.target.wants/somad@pump1.service"
    ).is_symlink()
    assert passwd == (root / "etc/passwd").read_text()

    # --- uninstall keeps configuration and state; purge removes them and the user
    state = root / "var/lib/somad/uart0"
    state.mkdir(parents=True)
    (state / "model.pt").write_bytes(b"checkpoint")
    install("deploy/install.sh --uninstall")
    for gone in (
        "opt/somad",
        "usr/local/bin/somad",
        "etc/systemd/system/somad.service",
        "etc/systemd/system/somad@.service",
    ):
        assert not (root / gone).exists() and not (root / gone).is_symlink(), gone
    assert not list(
        (root / "etc/systemd/system").rglob("somad*")
    )  # no enablement links left
    assert (
        config.read_text().endswith("# edited by hand\n")
        and (state / "model.pt").read_bytes() == b"checkpoint"
    )
    assert "somad:" in (root / "etc/passwd").read_text()
    install("deploy/install.sh --uninstall --purge")
    assert not etc.exists() and not (root / "var/lib/somad").exists()
    assert (
        "somad"
        not in (root / "etc/passwd").read_text() + (root / "etc/group").read_text()
    )

    shown = readme_install_commands()
    assert shown and set(shown) <= set(ran), (
        f"deploy/README.md shows installer commands no test runs: {set(shown) - set(ran)}"
    )


# ============================================================================ macOS


def test_launchd_plist_runs_the_daemon_as_the_readme_installs_it():
    plist = plistlib.loads(PLIST.read_bytes())
    assert plist["Label"] == "com.somad.daemon" and PLIST.stem == plist["Label"]
    program, verb, flag, config = plist["ProgramArguments"]
    assert (program, verb, flag) == (EXEC_START, "run", "--config")
    assert (
        plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True
    )
    assert plist["EnvironmentVariables"]["STATE_DIRECTORY"] == plist["WorkingDirectory"]
    assert plist["UserName"] != "root"
    readme = (DEPLOY / "macos/README.md").read_text()
    for path in (
        config,
        plist["WorkingDirectory"],
        str(Path(plist["StandardErrorPath"]).parent),
        f"/Library/LaunchDaemons/{PLIST.name}",
    ):
        assert path in readme, f"deploy/macos/README.md does not set up {path}"


# ============================================================================ Prometheus, for real


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_api(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}{path}" + (
        "?" + urllib.parse.urlencode(params) if params else ""
    )
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


def wait_for(what: str, probe, timeout: float = 20.0):
    """Poll ``probe()`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (
            OSError,
            ValueError,
        ) as exc:  # not listening yet, or a half-written reply
            last = exc
        else:
            if last:
                return last
        time.sleep(0.25)
    raise AssertionError(
        f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}"
    )


def firing(port: int, alertname: str) -> list[dict]:
    alerts = prometheus_api(port, "/api/v1/alerts")["data"]["alerts"]
    return [
        a
        for a in alerts
        if a["labels"]["alertname"] == alertname and a["state"] == "firing"
    ]


SIMULATED_FAULT = """\
state_dir: "{state}"
metrics: {{listen: "127.0.0.1:0"}}
log: {{level: info, format: json}}
shutdown_timeout: 5
streams:
  - name: sensor
    source:
      type: simulate
      rate: 200
      # At line 1500 (7.5 s in) the reading drops by ten amplitudes and stays there for 1000
      # lines: negative values, a '-' the stream has never shown.
      faults: [{{kind: shift, at_line: 1500, length: 1000, magnitude: -10.0}}]
    model: {{preset: tiny}}
    # The default detector (novelty) and alert threshold; an alert stays open until 400
    # quiet records (2 s) in a row, so Prometheus (scraping every second) cannot miss it.
    alerts: {{close_after: 400}}
    snapshot: {{every_seconds: 3600}}
    sinks:
      - {{type: jsonl, path: "{alerts}", events: alerts, flush_seconds: 0}}
"""


def start_prometheus(binary: str, tmp_path: Path, target: str) -> tuple[subprocess.Popen, int]:
    """Debian's Prometheus on a free loopback port (returned with it), scraping ``target`` every
    second with the real rules file."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{json.dumps(str(PROMETHEUS / 'somad.rules.yml'))}]\n"
        f"scrape_configs: [{{job_name: somad, static_configs: [{{targets: ['{target}']}}]}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    prom = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()  # the child has its own copy
    return prom, port


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def test_a_real_prometheus_scrapes_a_running_somad_and_fires_the_anomaly_rule(tmp_path):
    """``somad run --config`` (a simulated sensor with an injected fault) scraped by a real
    Prometheus loaded with the real rules: the stream's anomaly score and byte counters are
    found through Prometheus's HTTP API, and SomadStreamAnomaly fires for the fault."""
    from tests.test_notify_daemon import Somad

    binary = tool("prometheus", "prometheus")
    alerts = tmp_path / "alerts.jsonl"
    config = tmp_path / "somad.yaml"
    config.write_text(SIMULATED_FAULT.format(state=tmp_path / "state", alerts=alerts))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NOTIFY_SOCKET", None)
    somad = Somad(config, env, tmp_path / "somad.log")
    prom = None
    try:
        target = somad.wait_event("metrics_listening", timeout=120)["address"]
        prom, port = start_prometheus(binary, tmp_path, target)
        wait_for(
            "Prometheus to be ready",
            lambda: prom.poll() is None and urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2).status == 200,
            timeout=60,
        )

        def series(query: str) -> dict:
            result = prometheus_api(port, "/api/v1/query", query=query)["data"]["result"]
            return {r["metric"].get("stream", ""): float(r["value"][1]) for r in result}

        def grows(query: str):
            first = wait_for(f"{query} above 0", lambda: series(query).get("sensor", 0) > 0 and series(query), timeout=60)
            return wait_for(f"{query} to grow", lambda: series(query)["sensor"] > first["sensor"], timeout=30)

        grows('somad_bytes_total{job="somad"}')
        grows('somad_records_total{job="somad"}')
        assert 0.0 <= series("somad_anomaly_score")["sensor"] <= 1.0
        assert series("somad_source_connected") == {"sensor": 1.0}
        assert series('up{job="somad"}') == {"": 1.0}

        alert = wait_for("SomadStreamAnomaly to fire", lambda: firing(port, "SomadStreamAnomaly"), timeout=90)[0]
        assert alert["labels"]["stream"] == "sensor" and alert["labels"]["severity"] == "warning"
        score = re.search(r"latest anomaly score (\d\.\d{3})", alert["annotations"]["description"])
        assert score and 0.0 <= float(score.group(1)) <= 1.0, alert["annotations"]  # the latest record's: a new level soon looks less new

        # It fired for the injected fault: the alert the stream opened is on a faulty reading.
        opened = wait_for("the alert event", lambda: [e for e in score_events(alerts) if e["event"] == "alert_open"])
        on_fault = [e for e in opened if ",-" in e["record"]]
        assert on_fault and on_fault[0]["timescales"] and on_fault[0]["peak_anomaly"] >= 0.999, opened
    finally:
        if prom is not None:
            stop_process(prom)
        code = somad.stop()
    assert code == 0, somad.log_tail()


def score_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
