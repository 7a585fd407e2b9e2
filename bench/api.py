"""The POS API over real HTTP: latency of status, price and sale, beside the disk's fsync floor; the agent's memory.

``python -m bench.api [--members 1000000] [--requests 2000] [--quick]``

One run, one temporary directory on the disk under test:

1. **Set-up.** A 200-rule synthetic ruleset (``bench.synthetic``), a snapshot
   of N members (``bench.store``'s generator, plus the synthetic shopper the
   baskets are priced for, as its last member), a ``lane.toml`` on a free
   loopback port, ``lane-agent members import`` through the real CLI, then
   ``lane-agent run`` as a subprocess, ready when ``GET /v1/status`` answers
   200.
2. **HTTP latency.** One ``httpx.Client``, keep-alive, one request at a time:
   latency, not throughput.  ``GET /v1/status`` (the HTTP floor: routing,
   auth, a small store read, JSON), ``POST /v1/price`` (30 lines, the
   member, a pool of distinct baskets so the engine's memos are as warm as on
   a lane that has been trading) and ``POST /v1/sales`` (the same baskets,
   a new ``sale_id`` each, paid in cash for exactly the net learnt by pricing
   the pool once).  A warm-up is discarded first.
3. **The fsync floor.** ``bench.store._raw_commits``: plain ``sqlite3``, WAL,
   ``synchronous=FULL``, one small INSERT per transaction, on a file in the
   same directory.
4. **Memory.** The agent's VmRSS after start (the member cache loaded), after
   the warm-up and after the measurements, and its peak (VmHWM).

Steps 2 and 3 run interleaved, a few requests of each kind and a few raw
commits per round (the kinds' order rotating), so that a slow moment of the
shared VM or its disk hits every figure alike.  Then the agent gets SIGTERM
and must exit 0.  The table goes to stdout (progress to stderr); the figures
to ``bench/results/api.json``.

Targets (the POS API issue): price p99 <= 2 x status p99; sales p99 <= status
p99 + 3 x raw commit p99; the agent's RSS <= 150 MiB with 1,000,000 members.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import itertools
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import httpx

from agent.snapshot import SnapshotCard, SnapshotMember, card_hash, write_snapshot
from bench.run import machine
from bench.synthetic import UTC8, Catalogue, make_catalogue, make_requests, make_ruleset

if TYPE_CHECKING:
    # bench.store's signatures, so that mypy does not follow the import into bench/store.py,
    # which it does not pass yet (line 67 gives a money string where the model's type says int).
    KEY: bytes

    def _members(count: int) -> Iterator[SnapshotMember]: ...
    def _number(i: int, extra: int = 0) -> str: ...
    def _raw_commits(path: Path, count: int) -> list[float]: ...
else:
    from bench.store import KEY, _members, _number, _raw_commits

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "api.json"
RULES = 200
# The day the baskets are rung up: inside the synthetic promotions' season (mid-October to
# mid-February) and in the past, as a sale must be; an ordinary Monday, not one of the member days.
SALE_DAY = dt.date(2026, 11, 30)
KINDS = ("status", "price", "sales")
PATHS = {"status": "GET /v1/status", "price": "POST /v1/price", "sales": "POST /v1/sales"}
PER_ROUND = 10  # requests of each kind, and raw commits, per round
WARM_UP = 200  # requests, all kinds together, discarded
# Raw commits discarded before measuring: until the WAL has wrapped once and is reused
# in place, each commit also grows the file, which the agent's long-lived WAL rarely does.
RAW_WARM_UP = 1600
READY_SECONDS = 180.0  # an agent opening a 1M-member store checks it first
STOP_SECONDS = 30.0

TARGET_PRICE_OVER_STATUS = 2.0
TARGET_SALES_OVER_FLOOR = 1.0
TARGET_RSS_MIB = 150.0


class BenchError(Exception):
    """The agent did not start, answered an error, or did not stop cleanly."""


# --- set-up --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Inputs:
    rules: Path
    snapshot: Path
    member_id: str
    baskets: tuple[dict[str, Any], ...]  # price requests: lines, coupons, member_id, at; no tenders


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _shopper(index: int, seed: int, catalogue: Catalogue, coupons: Sequence[str]) -> SnapshotMember:
    """``python -m bench.synthetic --emit member``'s member, renumbered after the generated ones, with one card."""
    requests = make_requests(8, seed, catalogue, coupons)
    member = next(m for _, m in requests if m is not None)
    next_from = member.get("next_tier_from")
    card = SnapshotCard(
        card_hash=card_hash(KEY, _number(index)).hex(),
        kind=member["card_kind"],
        state="active",
        valid_from=dt.date(2024, 1, 1),
        valid_until=dt.date(2028, 12, 31),
    )
    return SnapshotMember(
        member_id=f"M{index:09d}",  # bench.store's ids are M000000000 .. M{count-1}: this one follows them
        tier=member["tier"],
        card_kind=member["card_kind"],
        birthday=member["birthday"],
        points_balance=member["points_balance"],
        rebate_balance=member["rebate_balance"],
        next_tier=member.get("next_tier"),
        next_tier_from=None if next_from is None else dt.date.fromisoformat(next_from),
        cards=(card,),
    )


def _baskets(count: int, seed: int, catalogue: Catalogue, coupons: Sequence[str], member_id: str) -> list[Any]:
    """``count`` synthetic 30-line baskets for ``member_id``, rung up on SALE_DAY at the generator's times of day.

    One fixed day in the past, so that every run prices the same work: a sale
    may not be ahead of the lane's clock, and the same moment in the price
    and the sale request keeps the net learnt by pricing equal to what the
    sale must be paid.  The generator's own tenders are dropped: the sales
    pay cash only (points and rebate tenders depend on the balance and on
    the rules' caps).
    """
    day = min(SALE_DAY, dt.datetime.now(UTC8).date() - dt.timedelta(days=1))  # a clock set earlier: yesterday
    out = []
    for basket, _ in make_requests(count, seed, catalogue, coupons):
        at = dt.datetime.fromisoformat(basket["at"])
        body = {key: value for key, value in basket.items() if key != "tenders"}
        body["member_id"] = member_id
        body["at"] = dt.datetime.combine(day, at.timetz()).isoformat()
        out.append(body)
    return out


def write_inputs(work: Path, members: int, seed: int, pool: int) -> Inputs:
    catalogue = make_catalogue(seed)
    ruleset = make_ruleset(RULES, seed, catalogue)
    rules = work / "rules.toml"
    rules.write_text(ruleset.text, encoding="utf-8")
    shopper = _shopper(members, seed, catalogue, ruleset.coupon_codes)
    snapshot = work / "members.jsonl"
    write_snapshot(snapshot, itertools.chain(_members(members), [shopper]), version=1, card_key=KEY)
    baskets = _baskets(pool, seed, catalogue, ruleset.coupon_codes, shopper.member_id)
    return Inputs(rules, snapshot, shopper.member_id, tuple(baskets))


def write_config(work: Path, port: int, token: str, rules: Path) -> Path:
    config = work / "lane.toml"
    # json.dumps gives a TOML basic string: the same quoting and escapes.
    config.write_text(
        f"""[lane]
store = "bench"
lane = "api-1"
timezone = "Asia/Shanghai"

[api]
port = {port}
token = {json.dumps(token)}

[store]
path = {json.dumps(str(work / "lane.db"))}
card_hash_key = "hex:{KEY.hex()}"

[rules]
path = {json.dumps(str(rules))}

[logging]
level = "WARNING"
""",
        encoding="utf-8",
    )
    return config


def lane_agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", *args]


def import_members(config: Path, snapshot: Path) -> float:
    """``lane-agent members import`` through the CLI; returns its wall time in seconds."""
    started = time.perf_counter()
    done = subprocess.run(  # noqa: S603 - our own interpreter and module, fixed arguments
        lane_agent("members", "import", str(snapshot), "--config", str(config)),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"lane-agent members import exited {done.returncode}:\n{done.stderr}")
    return time.perf_counter() - started


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB, from /proc (Linux)."""
    figures = {}
    for row in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        name, _, value = row.partition(":")
        if name in ("VmRSS", "VmHWM"):
            figures[name] = int(value.split()[0])
    return figures


def filesystem_of(path: Path) -> str:
    """The file system type ``path`` lives on (from /proc/mounts), or "unknown": a tmpfs has no fsync to measure."""
    try:
        mounts = [row.split()[1:3] for row in Path("/proc/mounts").read_text(encoding="utf-8").splitlines()]
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    best = ("", "unknown")
    for point, kind in mounts:
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best[0]):
            best = (point, kind)
    return best[1]


class Agent:
    """``lane-agent run`` as a subprocess; ``stop()`` sends SIGTERM and returns the exit code."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        environ = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        self._stderr = log.open("wb")
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module, fixed arguments
            lane_agent("run", "--config", str(config)),
            cwd=REPO_ROOT,
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )

    def wait_ready(self, client: httpx.Client, timeout: float) -> float:
        """Seconds until ``GET /v1/status`` answers 200."""
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                raise BenchError(f"the agent exited with {self.process.returncode}:\n{self.tail()}")
            try:
                if client.get("/v1/status").status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.05)
        raise BenchError(f"GET /v1/status did not answer 200 within {timeout:.0f} s:\n{self.tail()}")

    def memory(self) -> dict[str, int]:
        return memory_kib(self.process.pid)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_SECONDS)
            raise BenchError(f"the agent did not stop within {STOP_SECONDS:.0f} s of SIGTERM") from None

    def tail(self, lines: int = 40) -> str:
        self._stderr.flush()
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process.poll() is None:  # an error on the way: do not leave the agent running
            self.process.kill()
            self.process.wait(STOP_SECONDS)
        self._stderr.close()


# --- the fsync floor -----------------------------------------------------------------


class RawFloor:
    """``bench.store._raw_commits`` in short bursts on one database, so it can be interleaved with the requests.

    ``_raw_commits`` creates its table, commits, and closes its connection.
    Dropping the table after each burst lets the next one create it again in
    the same file; the idle connection held here (no transaction open, so
    checkpoints are not held back) keeps SQLite from deleting the WAL when a
    burst's connection closes.  Every burst then writes into the same WAL,
    reused in place after each checkpoint, as the agent's is; a new file per
    burst would measure a growing file, a slower and less steady fsync.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._holder = sqlite3.connect(path, isolation_level=None)
        self._holder.execute("PRAGMA journal_mode = WAL")

    def burst(self, count: int) -> list[float]:
        """``count`` single-row commits; seconds each."""
        samples = _raw_commits(self.path, count)
        self._holder.execute("DROP TABLE t")
        return samples

    def close(self) -> None:
        self._holder.close()


# --- measuring ---------------------------------------------------------------------


def _check(response: httpx.Response, what: str) -> None:
    if response.status_code != 200:
        raise BenchError(f"{what} answered {response.status_code}: {response.text[:2000]}")


class Requests:
    """The three requests over one keep-alive client; each ``*_ns`` call returns its latency in nanoseconds."""

    def __init__(self, client: httpx.Client, baskets: Sequence[dict[str, Any]]) -> None:
        self.client = client
        self.bodies = [json.dumps(b, ensure_ascii=False).encode("utf-8") for b in baskets]
        self.baskets = baskets
        self.nets: list[str] = []
        self._sales = itertools.count(1)

    def learn_nets(self) -> None:
        """Price every basket once: the net each sale must be paid (and the engine's memos warmed as a lane's)."""
        self.nets = []
        for body in self.bodies:
            response = self.client.post("/v1/price", content=body)
            _check(response, "POST /v1/price")
            self.nets.append(response.json()["totals"]["net"])

    def status_ns(self) -> int:
        started = time.perf_counter_ns()
        response = self.client.get("/v1/status")
        elapsed = time.perf_counter_ns() - started
        _check(response, "GET /v1/status")
        return elapsed

    def price_ns(self, index: int) -> int:
        body = self.bodies[index % len(self.bodies)]
        started = time.perf_counter_ns()
        response = self.client.post("/v1/price", content=body)
        elapsed = time.perf_counter_ns() - started
        _check(response, "POST /v1/price")
        return elapsed

    def sale_body(self, index: int) -> tuple[bytes, str]:
        which = index % len(self.bodies)
        net = self.nets[which]
        tenders = [] if net == "0.00" else [{"kind": "cash", "amount": net}]
        sale = {**self.baskets[which], "sale_id": f"S{next(self._sales):08d}", "tenders": tenders}
        return json.dumps(sale, ensure_ascii=False).encode("utf-8"), net

    def sale_ns(self, index: int) -> int:
        body, net = self.sale_body(index)  # encoded before the clock starts, as the price bodies are
        started = time.perf_counter_ns()
        response = self.client.post("/v1/sales", content=body)
        elapsed = time.perf_counter_ns() - started
        _check(response, "POST /v1/sales")
        if response.json()["totals"]["net"] != net:
            raise BenchError(f"a sale's net {response.json()['totals']['net']} is not the priced {net}")
        return elapsed


def warm_up(requests: Requests, count: int) -> None:
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        if kind == "status":
            requests.status_ns()
        elif kind == "price":
            requests.price_ns(i)
        else:
            requests.sale_ns(i)


def measure(requests: Requests, raw: RawFloor, rounds: int, report: Callable[[int], None]) -> dict[str, list[int]]:
    """``rounds`` rounds of PER_ROUND requests of each kind (kinds interleaved) and a burst of PER_ROUND raw commits."""
    samples: dict[str, list[int]] = {kind: [] for kind in (*KINDS, "raw")}
    pool = len(requests.bodies)
    for r in range(rounds):
        order = KINDS[r % 3 :] + KINDS[: r % 3]  # rotated, so no kind always follows the same one
        for i in range(PER_ROUND):
            n = r * PER_ROUND + i
            for kind in order:
                if kind == "status":
                    samples["status"].append(requests.status_ns())
                elif kind == "price":
                    samples["price"].append(requests.price_ns(n))
                else:
                    # Another basket than the price request's of the same step, offset through the pool.
                    samples["sales"].append(requests.sale_ns(n + pool // 2))
        samples["raw"].extend(round(s * 1e9) for s in raw.burst(PER_ROUND))
        report(r + 1)
    return samples


def percentile_ms(samples: Sequence[int], q: float) -> float:
    """The q-quantile in ms, nearest rank as ``bench.store._pct`` takes it."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


def summary(samples: Sequence[int]) -> dict[str, float]:
    return {
        "count": len(samples),
        "p50_ms": round(percentile_ms(samples, 0.5), 4),
        "p90_ms": round(percentile_ms(samples, 0.9), 4),
        "p99_ms": round(percentile_ms(samples, 0.99), 4),
        "max_ms": round(max(samples) / 1e6, 4),
        "mean_ms": round(sum(samples) / len(samples) / 1e6, 4),
    }


# --- the report --------------------------------------------------------------------


def verdicts(figures: dict[str, dict[str, float]], peak_mib: float) -> dict[str, dict[str, Any]]:
    status, price, sales, raw = (figures[k]["p99_ms"] for k in ("status", "price", "sales", "raw"))
    floor = status + 3 * raw
    return {
        "price_over_status_p99": {
            "value": round(price / status, 3),
            "target": TARGET_PRICE_OVER_STATUS,
            "met": price / status <= TARGET_PRICE_OVER_STATUS,
        },
        "sales_over_floor_p99": {
            "value": round(sales / floor, 3),
            "target": TARGET_SALES_OVER_FLOOR,
            "floor_ms": round(floor, 4),
            "met": sales / floor <= TARGET_SALES_OVER_FLOOR,
        },
        "agent_peak_rss_mib": {
            "value": round(peak_mib, 1),
            "target": TARGET_RSS_MIB,
            "met": peak_mib <= TARGET_RSS_MIB,
        },
    }


def render(results: dict[str, Any]) -> str:
    config, figures, memory, goals = results["config"], results["figures"], results["memory_mib"], results["targets"]
    setup = results["setup"]
    out = [
        (
            f"POS API over HTTP: {config['members']:,} members, {RULES}-rule synthetic ruleset, "
            f"{config['lines_per_basket']}-line baskets ({config['distinct_baskets']} distinct), "
            "one keep-alive client, one request at a time"
        ),
        (
            f"{config['rounds']} interleaved rounds of {PER_ROUND} of each kind and {PER_ROUND} raw commits; "
            f"{config['warm_up']} requests of warm-up discarded; disk: {config['filesystem']}; "
            f"load average {config['load_average'][0]:.2f} before, {config['load_average'][1]:.2f} after"
        ),
        (
            f"set-up: snapshot written in {setup['snapshot_seconds']:.1f} s, imported by the CLI in "
            f"{setup['import_seconds']:.1f} s, agent ready in {setup['ready_seconds']:.1f} s; "
            f"database {setup['db_bytes'] / 2**20:,.0f} MiB"
        ),
        "",
    ]
    header = ("measurement", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms")
    titles = {**PATHS, "raw": "raw sqlite3 commit (WAL+FULL)"}
    rows: list[tuple[str, ...]] = [header]
    for key in ("status", "price", "sales", "raw"):
        fig = figures[key]
        cells = (fig["p50_ms"], fig["p90_ms"], fig["p99_ms"], fig["max_ms"], fig["mean_ms"])
        rows.append((titles[key], f"{fig['count']:,}", *(f"{v:.3f}" for v in cells)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for number, row in enumerate(rows):
        out.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if number == 0:
            out.append("  ".join("-" * w for w in widths))
    out += [
        "",
        (
            f"agent memory: VmRSS {memory['after_start']:.1f} MiB after start, {memory['after_warm_up']:.1f} after "
            f"the warm-up, {memory['after_measuring']:.1f} after measuring; peak (VmHWM) {memory['peak']:.1f} MiB"
        ),
        "",
    ]
    floor = goals["sales_over_floor_p99"]["floor_ms"]
    lines = [
        (
            "price p99 / status p99",
            f"{figures['price']['p99_ms']:.3f} / {figures['status']['p99_ms']:.3f} ms",
            f"{goals['price_over_status_p99']['value']:.2f}",
            f"<= {TARGET_PRICE_OVER_STATUS:.1f}",
            goals["price_over_status_p99"]["met"],
        ),
        (
            "sales p99 / (status p99 + 3 x raw commit p99)",
            f"{figures['sales']['p99_ms']:.3f} / {floor:.3f} ms",
            f"{goals['sales_over_floor_p99']['value']:.2f}",
            f"<= {TARGET_SALES_OVER_FLOOR:.1f}",
            goals["sales_over_floor_p99"]["met"],
        ),
        (
            "agent peak RSS (VmHWM), MiB",
            f"{memory['peak']:.1f} MiB",
            f"{memory['peak']:.1f}",
            f"<= {TARGET_RSS_MIB:.0f}",
            goals["agent_peak_rss_mib"]["met"],
        ),
    ]
    table: list[tuple[str, ...]] = [("target", "figures", "value", "target", "")]
    table += [(name, fig, value, target, "met" if met else "NOT met") for name, fig, value, target, met in lines]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        out.append(
            "  ".join(
                c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    out += ["", f"agent stopped by SIGTERM: exit code {results['agent_exit_code']}", f"Results: {results['output']}"]
    return "\n".join(out)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    members = 20_000 if args.quick and args.members is None else (args.members or 1_000_000)
    per_kind = args.requests or (300 if args.quick else 2_000)
    rounds = max(1, -(-per_kind // PER_ROUND))
    _progress(f"writing a {RULES}-rule ruleset and a snapshot of {members:,} members ...")
    started = time.perf_counter()
    inputs = write_inputs(work, members, args.seed, args.pool)
    snapshot_seconds = time.perf_counter() - started
    port, token = _free_port(), secrets.token_urlsafe(32)
    config = write_config(work, port, token, inputs.rules)
    _progress(f"importing them with lane-agent members import (written in {snapshot_seconds:.1f} s) ...")
    import_seconds = import_members(config, inputs.snapshot)
    inputs.snapshot.unlink()  # 200 MB at 1M members: not needed any more
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    with (
        httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30.0) as client,
        Agent(config, work / "agent.log") as agent,
    ):
        _progress(f"starting lane-agent run on port {port} (imported in {import_seconds:.1f} s) ...")
        ready_seconds = agent.wait_ready(client, READY_SECONDS)
        status = client.get("/v1/status").json()
        if status["member_table"]["members"] != members + 1:
            raise BenchError(f"the agent has {status['member_table']['members']} members, not {members + 1}")
        after_start = agent.memory()
        raw = RawFloor(work / "raw.db")
        try:
            _progress(f"warming up: {len(inputs.baskets)} baskets priced, {WARM_UP} requests, {RAW_WARM_UP} commits")
            requests = Requests(client, inputs.baskets)
            requests.learn_nets()
            warm_up(requests, WARM_UP)
            raw.burst(RAW_WARM_UP)
            after_warm_up = agent.memory()
            # The client's fixtures live for the whole run: keep the collector from walking them mid-measurement.
            gc.collect()
            gc.freeze()
            _progress(f"measuring: {rounds} rounds ...")
            load_before = os.getloadavg()[0]
            samples = measure(
                requests, raw, rounds, lambda r: _progress(f"  round {r}/{rounds}") if r % 50 == 0 else None
            )
            load_after = os.getloadavg()[0]
        finally:
            raw.close()
        after = agent.memory()
        db_bytes = client.get("/v1/status").json()["store"]["db_bytes"]
        _progress("stopping the agent with SIGTERM ...")
        code = agent.stop()
        if code != 0:
            raise BenchError(f"the agent exited {code} after SIGTERM, not 0:\n{agent.tail()}")
    figures = {kind: summary(values) for kind, values in samples.items()}
    memory = {
        "after_start": after_start["VmRSS"] / 1024,
        "after_warm_up": after_warm_up["VmRSS"] / 1024,
        "after_measuring": after["VmRSS"] / 1024,
        "peak": after["VmHWM"] / 1024,
    }
    return {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {
            "members": members,
            "rules": RULES,
            "seed": args.seed,
            "lines_per_basket": len(inputs.baskets[0]["lines"]),
            "distinct_baskets": len(inputs.baskets),
            "per_kind": rounds * PER_ROUND,
            "rounds": rounds,
            "per_round": PER_ROUND,
            "warm_up": WARM_UP + len(inputs.baskets),
            "raw_warm_up": RAW_WARM_UP,
            "filesystem": filesystem_of(work),
            # The 1-minute load average around the measurement: well above 1 means other work shared the CPUs.
            "load_average": [round(load_before, 2), round(load_after, 2)],
        },
        "setup": {
            "snapshot_seconds": round(snapshot_seconds, 2),
            "import_seconds": round(import_seconds, 2),
            "ready_seconds": round(ready_seconds, 2),
            "db_bytes": db_bytes,
        },
        "figures": figures,
        "memory_mib": {key: round(value, 1) for key, value in memory.items()},
        "targets": verdicts(figures, memory["peak"]),
        "agent_exit_code": code,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, help="members in the snapshot (default 1,000,000; --quick 20,000)")
    parser.add_argument("--requests", type=int, help="requests of each kind measured (default 2,000; --quick 300)")
    parser.add_argument("--quick", action="store_true", help="20,000 members and 300 requests: a smoke test")
    parser.add_argument("--pool", type=int, default=200, help="distinct baskets (default 200)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, help="where the temporary directory goes: the disk measured")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    if args.members is not None and args.members < 1:
        parser.error("--members must be at least 1")
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.pool < 1:
        parser.error("--pool must be at least 1")
    with tempfile.TemporaryDirectory(prefix="bench-api-", dir=args.dir) as tmp:
        try:
            results = run(args, Path(tmp))
        except BenchError as exc:
            print(f"bench.api: {exc}", file=sys.stderr)
            return 2
    results["output"] = str(args.output)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(render(results))
    missed = [key for key, goal in results["targets"].items() if not goal["met"]]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
