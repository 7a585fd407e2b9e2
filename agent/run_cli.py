"""``lane-agent run [--config FILE]``: start the lane daemon.

Exit codes: 0 stopped cleanly by SIGTERM/SIGINT; 78 (EX_CONFIG) the
configuration or the ruleset is invalid (every problem printed to stderr);
3 the store failed (damaged database, full disk at start, locked); 4 the
API's address cannot be bound.  Under systemd, ``Restart=on-failure`` retries
the others (a locked database or a busy port may clear), while
``RestartPreventExitStatus=78`` stops a loop that only a technician can end;
a crash exits 1 and is restarted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import TYPE_CHECKING

from agent.config import DEFAULT_PATH, load_config, redacted
from agent.daemon import ListenError, serve
from agent.errors import InputError, StoreError
from agent.logs import setup_logging
from agent.ruleset import load_ruleset

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]  # noqa: SLF001 - argparse's only name for it

log = logging.getLogger("agent.run")

EXIT_INVALID = 78  # EX_CONFIG (sysexits.h): distinct from a crash's 1
EXIT_STORE = 3
EXIT_LISTEN = 4


def add_run_parser(subparsers: SubParsers) -> argparse.ArgumentParser:
    """Add ``run [--config FILE]`` to the ``lane-agent`` command line."""
    run = subparsers.add_parser("run", help="run the lane daemon (the POS API) until SIGTERM")
    run.add_argument(
        "--config", default=str(DEFAULT_PATH), metavar="FILE", help=f"lane configuration (default {DEFAULT_PATH})"
    )
    return run


def _report(what: str, exc: InputError) -> None:
    print(f"lane-agent: invalid {what}:", file=sys.stderr)
    for issue in exc.issues:
        print(f"  {issue}", file=sys.stderr)


def run_daemon(args: argparse.Namespace) -> int:
    """Validate everything, then serve; returns the process exit code."""
    try:
        config = load_config(args.config)
    except InputError as exc:
        _report("configuration", exc)
        return EXIT_INVALID
    setup_logging(config.logging.level, json_format=config.logging.json_format)
    # aiosqlite logs every statement at DEBUG: far too much for a till running for months.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, logging.getLogger().level))
    log.info("configuration %s: %s", args.config, redacted(config))
    try:
        ruleset = load_ruleset(config.rules.path)
    except InputError as exc:
        _report(f"ruleset {config.rules.path}", exc)
        return EXIT_INVALID
    try:
        asyncio.run(serve(config, ruleset))
    except StoreError as exc:
        log.error("the store failed: %s [%s]", exc, exc.code)  # noqa: TRY400 - the message says it all
        return EXIT_STORE
    except ListenError as exc:
        log.error("%s", exc)  # noqa: TRY400 - the message says it all
        return EXIT_LISTEN
    return 0
