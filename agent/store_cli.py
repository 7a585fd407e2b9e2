"""``lane-agent members …``: the technicians' member-cache commands.

``members import FILE [--config lane.toml]`` loads a member snapshot
(docs/member-snapshot.md) into the lane's store, the database path and card
key taken from the lane's configuration (default /etc/lane-agent/lane.toml).
``--db PATH --card-key-hex HEX`` give them directly instead (a bench, a
database copied off a lane).

Exit codes: 0 imported; 1 the file or an option is invalid, or the snapshot is
older than the lane's member table (every problem printed to stderr, the cache
in use untouched); 3 the store itself failed (damaged database, full disk,
locked by another process).
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import sys

from agent.config import DEFAULT_PATH, load_config
from agent.errors import InputError, Issue, StaleSnapshotError, StoreError
from agent.snapshot import MIN_KEY_BYTES
from agent.store import ImportResult, LaneStore

EXIT_INVALID = 1
EXIT_STORE = 3


def add_members_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``members import`` to the ``lane-agent`` command line; returns the ``members`` parser."""
    members = subparsers.add_parser("members", help="member cache tools")
    sub = members.add_subparsers(dest="members_command", required=True)
    imp = sub.add_parser("import", help="replace the member cache with a snapshot file (docs/member-snapshot.md)")
    imp.add_argument("file", metavar="FILE", help="member snapshot, JSON Lines")
    imp.add_argument(
        "--config", metavar="FILE", help=f"lane configuration with [store] path and card key (default {DEFAULT_PATH})"
    )
    imp.add_argument(
        "--db", metavar="PATH", help="the lane's database file (instead of --config; needs --card-key-hex)"
    )
    imp.add_argument("--card-key-hex", metavar="HEX", help="the chain's card key (hex), shared with head office")
    imp.add_argument("--allow-older", action="store_true", help="accept a snapshot older than the cached member table")
    return members


def _card_key(text: str) -> bytes:
    try:
        key = binascii.unhexlify(text.strip())
    except (binascii.Error, ValueError) as exc:
        raise InputError([Issue("--card-key-hex", "bad_hex", "not a hexadecimal string")], what="option") from exc
    if len(key) < MIN_KEY_BYTES:
        raise InputError(
            [Issue("--card-key-hex", "short_key", f"the card key must be at least {MIN_KEY_BYTES} bytes")],
            what="option",
        )
    return key


async def _import(args: argparse.Namespace, db: str, key: bytes) -> ImportResult:
    async with await LaneStore.open(db, key) as store:
        return await store.import_snapshot(args.file, allow_older=args.allow_older)


def _target(args: argparse.Namespace) -> tuple[str, bytes]:
    """The database and card key: from --db/--card-key-hex, else from the configuration file."""
    if args.db is not None or args.card_key_hex is not None:
        if args.config is not None:
            issue = Issue("--config", "conflict", "give --config, or --db with --card-key-hex")
            raise InputError([issue], what="option")
        if args.db is None or args.card_key_hex is None:
            missing = "--db" if args.db is None else "--card-key-hex"
            raise InputError([Issue(missing, "missing", "--db and --card-key-hex go together")], what="option")
        return args.db, _card_key(args.card_key_hex)
    config = load_config(args.config or DEFAULT_PATH)
    return str(config.store.path), config.store.card_hash_key.reveal()


def run_members(args: argparse.Namespace) -> int:
    """Run a ``members`` subcommand; returns the process exit code."""
    db = args.db
    try:
        db, key = _target(args)
        result = asyncio.run(_import(args, db, key))
    except InputError as exc:
        print(
            f"lane-agent: invalid {exc.what} ({len(exc.issues)} problem(s)); nothing imported:",
            file=sys.stderr,
        )
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_INVALID
    except StaleSnapshotError as exc:
        print(f"lane-agent: {args.file}: {exc}; nothing imported (--allow-older to force)", file=sys.stderr)
        return EXIT_INVALID
    except StoreError as exc:
        print(f"lane-agent: {exc} [{exc.code}]", file=sys.stderr)
        return EXIT_STORE
    print(
        f"imported {result.source} into {db}: member-table version {result.version}, "
        f"{result.members} members, {result.cards} cards ({result.seconds:.1f} s)"
    )
    return 0
