"""Commit sales as fast as possible; print each sale_id only after commit_sale returned.

Run by tests/test_store_crash.py, which SIGKILLs it at random moments:
``python tests/store_commit_loop.py DB PREFIX [LAST_PRINTED]``.  With
LAST_PRINTED (the last id an earlier, killed run printed) it first commits that
sale again and exits 3 unless the store replays it: what was printed survived.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys

from agent.returns import SoldLine
from agent.store import LaneStore

KEY = bytes(range(32))
AT = dt.datetime(2026, 12, 10, 14, 5, tzinfo=dt.timezone(dt.timedelta(hours=8)))
LINES = (SoldLine("1", 1000, 1990, 19), SoldLine("2", 2000, 500, 5))


async def commit(store: LaneStore, sale_id: str) -> bool:
    _, replayed = await store.commit_sale(
        sale_id,
        "digest-" + sale_id,
        {"sale_id": sale_id, "lines": ["1", "2"]},
        {"sale_id": sale_id, "total": "24.90"},
        at=AT,
        rules_version="2026.11.1",
        member_id="M000123",
        points_spent=1,
        lines=LINES,
    )
    return replayed


async def main(db: str, prefix: str, last: str | None) -> int:
    async with await LaneStore.open(db, KEY) as store:
        if last and not await commit(store, last):
            print(f"{last} was printed by an earlier run but is not in the store", file=sys.stderr)
            return 3
        i = 0
        while True:
            sale_id = f"{prefix}-{i}"
            if await commit(store, sale_id):
                print(f"{sale_id} replayed on its first commit", file=sys.stderr)
                return 4
            sys.stdout.write(sale_id + "\n")  # one write(2) per line: a kill cannot split it
            sys.stdout.flush()
            i += 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)))
