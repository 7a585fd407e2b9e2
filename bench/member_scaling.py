"""Member-count scaling: a member basket's price, and the card look-up before it, at 10k, 100k and 1M members.

``python -m bench.member_scaling [--sizes 10000,100000,1000000] [--requests 1500] [--quick]``

What the till does for a member's basket, through the real lane: the card is
identified (``POST /v1/identify {"code": <card>}``: the card's keyed hash
looked up in the lane's SQLite card table, then the member), and the basket
is priced for that member (``POST /v1/price`` with ``member_id``: the member
and its unsynced spend read from the SQLite cache, then the engine).  The
question is how the size of the lane's member cache changes those latencies.

One run, one temporary directory:

1. **Set-up.** For each size N, the snapshot of N members from
   ``bench.members``'s cache (``bench.store``'s generator, 1.2 cards a member;
   written once into ``$TMPDIR/lane-bench-members/`` and shared with
   ``bench.members``), a lane of its own (``bench.api.write_config``: the
   200-rule synthetic ruleset, a free port, a random token), ``lane-agent
   members import`` through the CLI, then ``lane-agent run``.  All the lanes
   run at once.
2. **Requests.** One keep-alive ``httpx.Client`` per lane, one request at a
   time.  Every request is for a member drawn at random from the whole
   table, so the look-ups touch the whole file as a day's customers do.
   The members drawn are the same modulo 84 at every size, and the
   generator's tier and birthday repeat every 84 members, so the engine
   prices the same baskets for the same kinds of member at every size: only
   where the member sits in the cache differs.  The baskets are
   ``bench.api``'s pool of 200 distinct 30-line baskets, rung up on the same
   past day.  A warm-up (the pool priced once per lane, plus identifies) is
   discarded.
3. **Interleaved rounds.** Each round sends a few price and identify
   requests to each lane, the lanes' order rotating, so a slow moment of the
   shared machine hits every size alike.  The reference of each figure is
   the same figure at the smallest size, measured in the same run.
4. **Memory.** Each agent's VmHWM (peak RSS) after measuring.

Then every agent gets SIGTERM and must exit 0.  The table goes to stdout
(progress to stderr), the figures to ``bench/results/member_scaling.json``.
No earlier issue set a target for this; the figures say how much the member
count costs at the till.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.api import (
    RULES,
    Agent,
    BenchError,
    _baskets,
    _check,
    _free_port,
    _number,
    import_members,
    summary,
    write_config,
)
from bench.members import _cached_snapshot
from bench.run import machine
from bench.synthetic import make_catalogue, make_ruleset

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "member_scaling.json"
SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (2_000, 20_000)
# bench.store's generator: tier i % 3, birthday (i % 12, i % 28); together they repeat every 84 members.
PERIOD = 84
PER_ROUND = 5  # price and identify requests per lane per round
WARM_UP_IDENTIFIES = 100
READY_SECONDS = 180.0


@dataclass(slots=True)
class Lane:
    """One lane of N members: its agent, its client, and the requests it is sent, encoded before measuring."""

    members: int
    work: Path
    agent: Agent
    client: httpx.Client
    import_seconds: float
    ready_seconds: float = 0.0
    price_bodies: list[bytes] = field(default_factory=list)
    identify_bodies: list[tuple[bytes, str]] = field(default_factory=list)
    samples: dict[str, list[int]] = field(default_factory=lambda: {"price": [], "identify": []})


def draws(count: int, members: int, seed: int) -> list[int]:
    """``count`` member indexes spread over ``members``, with the same residues modulo PERIOD at every size.

    The residues come from one generator seeded alike for every size, the
    offsets from one seeded by the size; so the k-th request is for the same
    kind of member (tier, birthday) whatever the table's size.
    """
    residues = random.Random(seed)
    offsets = random.Random(seed * 1_000_003 + members)
    blocks = members // PERIOD
    if blocks < 1:
        raise BenchError(f"a lane needs at least {PERIOD} members")
    return [PERIOD * offsets.randrange(blocks) + residues.randrange(PERIOD) for _ in range(count)]


def encode_requests(lane: Lane, baskets: Sequence[dict[str, Any]], count: int, seed: int) -> None:
    """The price and identify bodies for ``count`` requests of each kind (warm-up included)."""
    members = draws(count, lane.members, seed)
    lane.price_bodies = [
        json.dumps({**baskets[k % len(baskets)], "member_id": f"M{i:09d}"}, ensure_ascii=False).encode("utf-8")
        for k, i in enumerate(members)
    ]
    # Another stream of members for the identifies, so that a price never follows its own member's identify.
    others = draws(count, lane.members, seed + 1)
    lane.identify_bodies = [(json.dumps({"code": _number(i)}).encode("ascii"), f"M{i:09d}") for i in others]


def price_ns(lane: Lane, index: int) -> int:
    body = lane.price_bodies[index]
    started = time.perf_counter_ns()
    response = lane.client.post("/v1/price", content=body)
    elapsed = time.perf_counter_ns() - started
    _check(response, "POST /v1/price")
    return elapsed


def identify_ns(lane: Lane, index: int) -> int:
    body, member_id = lane.identify_bodies[index]
    started = time.perf_counter_ns()
    response = lane.client.post("/v1/identify", content=body)
    elapsed = time.perf_counter_ns() - started
    _check(response, "POST /v1/identify")
    answer = response.json()
    if answer.get("result") != "identified" or answer.get("member", {}).get("member_id") != member_id:
        raise BenchError(f"identify of {member_id}'s card answered {response.text[:500]}")
    return elapsed


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def start_lane(stack: ExitStack, work: Path, members: int, rules: Path, *, fresh: bool) -> Lane:
    snapshot, written = _cached_snapshot(members, fresh=fresh)
    if written is not None:
        _progress(f"  snapshot of {members:,} members written in {written:.1f} s")
    work.mkdir()
    port, token = _free_port(), secrets.token_urlsafe(32)
    config = write_config(work, port, token, rules)
    _progress(f"importing {members:,} members with lane-agent members import ...")
    seconds = import_members(config, snapshot)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    client = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30.0))
    agent = stack.enter_context(Agent(config, work / "agent.log"))
    lane = Lane(members, work, agent, client, seconds)
    _progress(f"starting lane-agent run with {members:,} members ...")
    lane.ready_seconds = agent.wait_ready(client, READY_SECONDS)
    return lane


def measure(lanes: Sequence[Lane], rounds: int, warm: int) -> None:
    """``rounds`` rounds of PER_ROUND price and identify requests per lane, after ``warm`` discarded requests."""
    for r in range(rounds):
        shift = r % len(lanes)
        for lane in [*lanes[shift:], *lanes[:shift]]:
            for i in range(PER_ROUND):
                n = warm + r * PER_ROUND + i
                # Alternate which kind goes first, so neither always follows the other lane's last request.
                if (r + i) % 2:
                    lane.samples["price"].append(price_ns(lane, n))
                    lane.samples["identify"].append(identify_ns(lane, n))
                else:
                    lane.samples["identify"].append(identify_ns(lane, n))
                    lane.samples["price"].append(price_ns(lane, n))
        if (r + 1) % 50 == 0:
            _progress(f"  round {r + 1}/{rounds}")


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sizes = sorted(args.sizes or (QUICK_SIZES if args.quick else SIZES))
    per_size = args.requests or (150 if args.quick else 1_500)
    rounds = max(1, -(-per_size // PER_ROUND))
    catalogue = make_catalogue(args.seed)
    ruleset = make_ruleset(RULES, args.seed, catalogue)
    rules = work / "rules.toml"
    rules.write_text(ruleset.text, encoding="utf-8")
    baskets = _baskets(args.pool, args.seed, catalogue, ruleset.coupon_codes, "M000000000")
    warm = max(args.pool, WARM_UP_IDENTIFIES)
    with ExitStack() as stack:
        lanes = [start_lane(stack, work / f"lane-{n}", n, rules, fresh=args.fresh) for n in sizes]
        for lane in lanes:
            status = lane.client.get("/v1/status").json()
            if status["member_table"]["members"] != lane.members:
                raise BenchError(f"a lane has {status['member_table']['members']} members, not {lane.members}")
            encode_requests(lane, baskets, warm + rounds * PER_ROUND, args.seed)
        _progress(f"warming up: {args.pool} baskets priced and {WARM_UP_IDENTIFIES} identifies per lane ...")
        for lane in lanes:
            for n in range(warm):
                price_ns(lane, n)
                identify_ns(lane, n)
        gc.collect()
        gc.freeze()  # the encoded requests live for the whole run: keep the collector from walking them
        _progress(f"measuring: {rounds} rounds over {len(lanes)} lanes ...")
        load_before = os.getloadavg()[0]
        measure(lanes, rounds, warm)
        load_after = os.getloadavg()[0]
        memory = {lane.members: lane.agent.memory() for lane in lanes}
        db_bytes = {lane.members: lane.client.get("/v1/status").json()["store"]["db_bytes"] for lane in lanes}
        _progress("stopping the agents with SIGTERM ...")
        codes = {lane.members: lane.agent.stop() for lane in lanes}
        for lane in lanes:
            if codes[lane.members] != 0:
                raise BenchError(f"an agent exited {codes[lane.members]} after SIGTERM, not 0:\n{lane.agent.tail()}")
    smallest = lanes[0]
    out_sizes = []
    for lane in lanes:
        figures = {kind: summary(values) for kind, values in lane.samples.items()}
        ratios = {
            kind: {
                "p50": round(figures[kind]["p50_ms"] / summary(smallest.samples[kind])["p50_ms"], 3),
                "p99": round(figures[kind]["p99_ms"] / summary(smallest.samples[kind])["p99_ms"], 3),
            }
            for kind in figures
        }
        out_sizes.append(
            {
                "members": lane.members,
                "import_seconds": round(lane.import_seconds, 2),
                "ready_seconds": round(lane.ready_seconds, 2),
                "db_bytes": db_bytes[lane.members],
                "peak_rss_mib": round(memory[lane.members]["VmHWM"] / 1024, 1),
                "figures": figures,
                "ratio_to_smallest": ratios,
            }
        )
    return {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {
            "sizes": sizes,
            "rules": RULES,
            "seed": args.seed,
            "distinct_baskets": len(baskets),
            "lines_per_basket": len(baskets[0]["lines"]),
            "per_size": rounds * PER_ROUND,
            "rounds": rounds,
            "per_round": PER_ROUND,
            "warm_up": warm,
            "load_average": [round(load_before, 2), round(load_after, 2)],
        },
        "sizes": out_sizes,
        "agent_exit_codes": list(codes.values()),
    }


def render(results: dict[str, Any]) -> str:
    config = results["config"]
    out = [
        (
            f"Member-count scaling: {', '.join(f'{n:,}' for n in config['sizes'])} members, one lane each, "
            f"{config['rules']}-rule synthetic ruleset, {config['lines_per_basket']}-line baskets "
            f"({config['distinct_baskets']} distinct), a random member per request"
        ),
        (
            f"{config['rounds']} interleaved rounds of {config['per_round']} price and {config['per_round']} identify "
            f"requests per lane; {config['warm_up']} of each discarded first; load average "
            f"{config['load_average'][0]:.2f} before, {config['load_average'][1]:.2f} after"
        ),
        "",
    ]
    header = ("measurement", "members", "n", "p50 ms", "p99 ms", "max ms", "p50 vs first", "p99 vs first")
    rows: list[tuple[str, ...]] = [header]
    for kind, title in (("price", "POST /v1/price, member basket"), ("identify", "POST /v1/identify, card")):
        for size in results["sizes"]:
            fig, ratio = size["figures"][kind], size["ratio_to_smallest"][kind]
            rows.append(
                (
                    title,
                    f"{size['members']:,}",
                    f"{fig['count']:,}",
                    f"{fig['p50_ms']:.3f}",
                    f"{fig['p99_ms']:.3f}",
                    f"{fig['max_ms']:.3f}",
                    f"{ratio['p50']:.2f}x",
                    f"{ratio['p99']:.2f}x",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for number, row in enumerate(rows):
        out.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if number == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("")
    for size in results["sizes"]:
        out.append(
            f"{size['members']:>9,} members: imported by the CLI in {size['import_seconds']:.1f} s, agent ready in "
            f"{size['ready_seconds']:.1f} s, database {size['db_bytes'] / 2**20:,.0f} MiB, "
            f"agent peak RSS {size['peak_rss_mib']:.1f} MiB"
        )
    out += ["", f"agents stopped by SIGTERM: exit codes {results['agent_exit_codes']}", f"Results: {results['output']}"]
    return "\n".join(out)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of member counts: {text!r}") from None
    if not sizes or min(sizes) < PERIOD:
        raise argparse.ArgumentTypeError(f"each size must be at least {PERIOD}")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.member_scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=_sizes, help="member counts (default 10000,100000,1000000; --quick 2000,20000)")
    parser.add_argument("--requests", type=int, help="requests of each kind per size (default 1,500; --quick 150)")
    parser.add_argument("--quick", action="store_true", help="2,000 and 20,000 members, 150 requests: a smoke test")
    parser.add_argument("--pool", type=int, default=200, help="distinct baskets (default 200)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="write the snapshots again even if they are cached")
    parser.add_argument("--dir", type=Path, help="where the temporary directory goes: the disk measured")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.pool < 1:
        parser.error("--pool must be at least 1")
    with tempfile.TemporaryDirectory(prefix="bench-member-scaling-", dir=args.dir) as tmp:
        try:
            results = run(args, Path(tmp))
        except BenchError as exc:
            print(f"bench.member_scaling: {exc}", file=sys.stderr)
            return 2
    results["output"] = str(args.output)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
