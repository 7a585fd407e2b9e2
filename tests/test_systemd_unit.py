"""The systemd unit keeps the contract the daemon relies on: notify readiness, watchdog, state, sandbox."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "lane-agent.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections → key → every value in order (systemd keys may repeat); comments and continuations as systemd reads them."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    assert not pending, "the file ends inside a continuation"
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}= should be set exactly once, found {values}"
    return values[0]


def test_parser_reads_repeats_comments_and_continuations() -> None:
    # systemd.syntax(7): the backslash becomes a space; the next line's indentation goes.
    parsed = parse_unit("# c\n[A]\nK=1\n; c\nK=2\nL=a\\\n  b \\\n c\nE=\n")
    assert parsed == {"A": {"K": ["1", "2"], "L": ["a b  c"], "E": [""]}}


def test_the_daemon_contract(unit: dict[str, dict[str, list[str]]], tmp_path: Path) -> None:
    assert set(unit) == {"Unit", "Service", "Install"}
    # The daemon sends READY=1 and WATCHDOG=1 from its main process (agent/sdnotify.py).
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    watchdog = one(unit, "Service", "WatchdogSec")
    assert watchdog.isdigit()
    assert int(watchdog) > 0
    assert one(unit, "Service", "Restart") == "on-failure"
    assert float(one(unit, "Service", "RestartSec")) > 0
    assert one(unit, "Service", "KillMode") == "mixed"
    assert int(one(unit, "Service", "TimeoutStopSec")) >= 10
    assert one(unit, "Install", "WantedBy") == "multi-user.target"

    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert Path(argv[0]).name == "lane-agent"
    assert argv[1] == "run"
    assert argv[2:] == ["--config", "/etc/lane-agent/lane.toml"]

    assert "pcscd.socket" in " ".join(unit["Unit"]["After"])
    assert "pcscd.socket" in " ".join(unit["Unit"]["Wants"])

    _verify_with_systemd(tmp_path)


def test_state_identity_and_sandbox(unit: dict[str, dict[str, list[str]]]) -> None:
    expected = {
        "StateDirectory": "lane-agent",
        "StateDirectoryMode": "0750",
        "ConfigurationDirectory": "lane-agent",
        "User": "lane-agent",
        "Group": "lane-agent",
        "SupplementaryGroups": "input",
        "UMask": "0027",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "no",
        "DevicePolicy": "closed",
        "DeviceAllow": "char-input rw",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "SystemCallArchitectures": "native",
        "SystemCallFilter": "@system-service",
        "CapabilityBoundingSet": "",
        "Environment": "PYTHONUNBUFFERED=1",
    }
    actual = {key: one(unit, "Service", key) for key in expected}
    assert actual == expected
    # The state directory is the only writable place; a ReadWritePaths= would widen it.
    assert "ReadWritePaths" not in unit["Service"]


def _verify_with_systemd(tmp_path: Path) -> None:
    # The directives are checked everywhere; systemd's own parser, where it is installed, also catches
    # misspelt keys and bad values (it reports them but still exits 0, hence the output check).
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # verify insists the command exists; on a development machine it is the virtualenv's script.
    script = Path(sys.executable).with_name("lane-agent")
    command = script if script.exists() else Path("/bin/true")
    text = UNIT.read_text(encoding="utf-8").replace("ExecStart=/usr/local/bin/lane-agent", f"ExecStart={command}")
    assert f"ExecStart={command}" in text
    copy = tmp_path / UNIT.name
    copy.write_text(text, encoding="utf-8")
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
    assert result.returncode == 0, result.stdout + result.stderr
    assert complaints == []
