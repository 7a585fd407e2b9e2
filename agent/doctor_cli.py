"""``lane-agent doctor [--config FILE] [--json]``: the lane checked end to end, and what to fix.

Prints one aligned line per check and a summary (or, with ``--json``, one
document ``{"ok", "checks": [{name, status, detail, fix}]}``), and exits

- 0: every check ok (or skipped: not configured);
- 1: warnings only: the lane works, something needs attention soon;
- 2: at least one check failed;
- 78 (EX_CONFIG, as ``lane-agent run``): the configuration is invalid; its
  problems are listed and the checks that need it are skipped.

0/1/2 are the exit codes of monitoring plugins (Nagios, Icinga: OK, WARNING,
CRITICAL), so the doctor can be scheduled as a lane's health check as is.
The checks themselves are in ``agent/doctor.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import DEFAULT_PATH
from agent.doctor import diagnose, exit_code, render_json, render_text

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]  # noqa: SLF001 - argparse's only name for it


def add_doctor_parser(subparsers: SubParsers) -> argparse.ArgumentParser:
    """Add ``doctor [--config FILE] [--json]`` to the ``lane-agent`` command line."""
    doctor = subparsers.add_parser(
        "doctor",
        help="check the lane end to end (config, store, devices, broker, head office) and say what to fix",
        description="Check the lane end to end and say what to fix. Exit 0 all ok, 1 warnings only, "
        "2 a check failed, 78 the configuration is invalid.",
    )
    doctor.add_argument(
        "--config", default=str(DEFAULT_PATH), metavar="FILE", help=f"lane configuration (default {DEFAULT_PATH})"
    )
    doctor.add_argument("--json", action="store_true", help="one JSON document instead of lines")
    return doctor


def run_doctor(args: argparse.Namespace) -> int:
    """``lane-agent doctor``; returns the exit code."""
    checks = asyncio.run(diagnose(Path(args.config)))
    print(render_json(checks) if args.json else render_text(checks))
    sys.stdout.flush()
    return exit_code(checks)
