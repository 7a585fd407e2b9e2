"""``lane-agent members …``: the technicians' member-cache commands.

``members import FILE --db PATH --card-key-hex HEX`` loads a member snapshot
(docs/member-snapshot.md) into the lane's store.  The database path and the
card key will come from lane.toml once the configuration lands; until then
they are options.

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
    imp.add_argument("--db", required=True, metavar="PATH", help="the lane's database file")
    imp.add_argument(
        "--card-key-hex", required=True, metavar="HEX", help="the chain's card key (hex), shared with head office"
    )
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


async def _import(args: argparse.Namespace, key: bytes) -> ImportResult:
    async with await LaneStore.open(args.db, key) as store:
        return await store.import_snapshot(args.file, allow_older=args.allow_older)


def run_members(args: argparse.Namespace) -> int:
    """Run a ``members`` subcommand; returns the process exit code."""
    try:
        result = asyncio.run(_import(args, _card_key(args.card_key_hex)))
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
        f"imported {result.source} into {args.db}: member-table version {result.version}, "
        f"{result.members} members, {result.cards} cards ({result.seconds:.1f} s)"
    )
    return 0
