"""``lane-agent config check FILE``: validate a lane configuration file.

Prints ``FILE: ok`` and the effective configuration (every key, defaults
filled in, secrets redacted) to stdout and exits 0; or prints every problem as
``FILE: key: reason [code]`` to stderr and exits 1.  Never a traceback for a
bad file: unreadable files and TOML syntax errors are problems like any other.

``agent.cli`` wires this in with ``add_config_parser`` and ``run_config``;
``python -m agent.config_cli config check FILE`` runs it on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agent.config import load_config, redacted
from agent.errors import ConfigError

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]  # noqa: SLF001 - argparse's only name for it

EXIT_INVALID = 1


def add_config_parser(subparsers: SubParsers) -> argparse.ArgumentParser:
    """Add ``config check FILE [--json]`` to a command's subparsers; returns the ``config`` parser."""
    config = subparsers.add_parser("config", help="lane configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check",
        help="validate a lane configuration file and print it, secrets redacted",
        description="Validate FILE; print the effective configuration (secrets redacted) or every problem found.",
    )
    check.add_argument("file", metavar="FILE", help="lane configuration TOML, e.g. /etc/lane-agent/lane.toml")
    check.add_argument("--json", action="store_true", help="print the configuration as JSON instead of TOML")
    return config


def run_config(args: argparse.Namespace) -> int:
    """Run a ``config`` subcommand parsed by ``add_config_parser``; returns the exit code."""
    if args.config_command == "check":
        return check_config(args.file, as_json=args.json)
    raise AssertionError(f"unhandled config command {args.config_command!r}")  # argparse refuses others


def check_config(path: str, *, as_json: bool = False) -> int:
    """Validate one configuration file: 0 and the redacted configuration, or 1 and every problem."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{path}: invalid, {len(exc.issues)} problem(s)", file=sys.stderr)
        return EXIT_INVALID
    data = redacted(config)
    try:
        print(f"{path}: ok")
        print(json.dumps(data, ensure_ascii=False, indent=2) if as_json else to_toml(data), end="\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): not an error; silence the interpreter's final flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        pairs = ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return "{ " + pairs + " }" if pairs else "{}"
    # A JSON string is a valid TOML basic string: same quotes, same escapes.
    return json.dumps(str(value), ensure_ascii=False)


def to_toml(data: Mapping[str, Any]) -> str:
    """Render a redacted configuration as TOML; keys never given are shown as comments."""
    out: list[str] = []
    for section, keys in data.items():
        tables = keys if isinstance(keys, list) else [keys]
        for table in tables:
            if out:
                out.append("")
            out.append(f"[[{section}]]" if isinstance(keys, list) else f"[{section}]")
            for key, value in table.items():
                out.append(f"# {key} is not set" if value is None else f"{key} = {_toml_value(value)}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agent.config_cli config check FILE``: the same command outside ``lane-agent``."""
    parser = argparse.ArgumentParser(prog="lane-agent", description="Lane configuration tools")
    add_config_parser(parser.add_subparsers(dest="command", required=True))
    return run_config(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
