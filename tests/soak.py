"""The fault soak: lanes selling without pause while a chaos driver breaks everything around them.

Several real ``lane-agent run`` processes sell continuously (a till thread
each, retrying what it never got an answer to, as a POS must) through a real
Mosquitto to two real ``lane-hq run`` consumers on a shared subscription over
one PostgreSQL database.  Meanwhile the chaos driver, at random moments,

* SIGKILLs lane agents and restarts them,
* SIGKILLs one head-office consumer and restarts it,
* stops the broker and starts it again,
* stops head office altogether for a while (seconds in the short form,
  minutes in the long one),
* fills a lane's disk (a real tmpfs) until sales are refused with 507, then
  frees it.

At the end every process is started again, the backlogs drain, and the soak
checks, reading the lanes' SQLite files and head office's database directly:

* every sale, return and void the POS was told was committed is in its
  lane's journal once, and at head office exactly once;
* head office holds exactly the lanes' journals, nothing more (no
  duplicates, no gaps, nothing the POS was refused);
* head office's totals (sales, nets, refunds) and every member's points and
  rebate balance equal what the lanes' journals add up to, computed here from
  the journal bodies, not with head office's own code;
* no lane database, lane log or head-office log holds personal data
  (``scripts/pii_scan.py``).

``python tests/soak.py`` runs the short form (about two minutes);
``make soak`` runs ``--long`` (at least 200 kills).  tests/test_soak.py runs
the short form in ``make test``.  docs/reliability.md has the last output.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from broker import Broker
from conftest import REPO_ROOT
from hq_harness import Hq, HqReader
from lane_harness import KEY, TOKEN, Lane, basket
from pgdb import fresh_database

from agent.snapshot import SnapshotCard, SnapshotMember, card_hash, write_snapshot

STORE = "store-0101"
SNAPSHOT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long and how hard to shake: counts of each fault, and the pace between them."""

    name: str
    lanes: int
    lane_kills: int
    hq_kills: int
    broker_restarts: int
    hq_outages: int
    outage_seconds: tuple[float, float]
    disk_fulls: int
    pause_seconds: tuple[float, float]  # between two faults
    members: int = 40
    seed: int = 8

    @property
    def faults(self) -> int:
        return self.lane_kills + self.hq_kills + self.broker_restarts + self.hq_outages + self.disk_fulls


# No faults, one lane: the soak's own tests tamper with its result to show the checks catch it.
CALM = Plan(
    name="calm",
    lanes=1,
    lane_kills=0,
    hq_kills=0,
    broker_restarts=0,
    hq_outages=0,
    outage_seconds=(0.0, 0.0),
    disk_fulls=0,
    pause_seconds=(0.0, 0.0),
    members=5,
)
SHORT = Plan(
    name="short",
    lanes=3,
    lane_kills=10,
    hq_kills=3,
    broker_restarts=2,
    hq_outages=1,
    outage_seconds=(6.0, 8.0),
    disk_fulls=1,
    pause_seconds=(0.5, 2.0),
)
LONG = Plan(
    name="long",
    lanes=4,
    lane_kills=190,
    hq_kills=30,
    broker_restarts=12,
    hq_outages=3,
    outage_seconds=(120.0, 180.0),
    disk_fulls=4,
    pause_seconds=(0.5, 3.0),
)


class SoakError(AssertionError):
    """A guarantee did not hold; the message says which and with what figures."""


# --- members -----------------------------------------------------------------------------------


def soak_members(count: int) -> list[SnapshotMember]:
    """Members M9000… in the 888 mall's tiers, with points and rebate money enough for the whole soak."""
    tiers = ("points_card", "vip", "gold")
    return [
        SnapshotMember(
            member_id=f"M9{i:04d}",
            tier=tiers[i % 3],
            points_balance=1_000 * (i + 1),
            rebate_balance="100000.00",
            version=SNAPSHOT_VERSION,
            cards=(
                SnapshotCard(
                    card_hash=card_hash(KEY, card_number(i)).hex(),
                    kind="standard",
                    state="active",
                    valid_from=dt.date(2025, 1, 1),
                ),
            ),
        )
        for i in range(count)
    ]


def card_number(i: int) -> str:
    return f"6200 9900 {i:08d}"


# --- one till ------------------------------------------------------------------------------------


@dataclasses.dataclass
class TillCounts:
    sales: int = 0
    returns: int = 0
    voids: int = 0
    retries: int = 0
    replays: int = 0  # answers marked idempotent-replay: a retry of something that had committed
    disk_full: int = 0  # 507 answers
    unavailable: int = 0  # 503 answers
    refused: Counter[str] = dataclasses.field(default_factory=Counter)  # other 4xx, by error code
    server_errors: Counter[str] = dataclasses.field(default_factory=Counter)  # 5xx other than 503/507


class Till(threading.Thread):
    """A POS on one lane: price, pay, sometimes return or void; every unanswered request retried as it was."""

    def __init__(self, lane: Lane, members: list[str], rng: random.Random, stop: threading.Event) -> None:
        super().__init__(name=f"till-{lane.lane_id}", daemon=True)
        self.lane = lane
        self.members = members
        self.rng = rng
        self.stopping = stop
        self.counts = TillCounts()
        # What the POS was told was committed: sale, return and void ids.
        self.sold: list[str] = []
        self.returned: list[str] = []
        self.voided: list[str] = []
        self.error: BaseException | None = None
        self._number = 0

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.lane.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as http:
                while not self.stopping.is_set():
                    self._one(http)
                    # About ten sales a second a lane: far busier than a real till, and the
                    # journals stay small enough to check entry by entry at the end.
                    time.sleep(self.rng.uniform(0.05, 0.15))
        except BaseException as exc:  # noqa: BLE001 - reported by the soak, which fails on it
            self.error = exc

    def _one(self, http: httpx.Client) -> None:
        self._number += 1
        sale_id = f"{self.lane.lane_id}-S{self._number:06d}"
        member = self.rng.choice(self.members) if self.rng.random() < 0.7 else None
        doc = basket(sale_id=sale_id, **({"member_id": member} if member else {}))
        doc["lines"][0]["unit_price"] = f"{self.rng.randint(20, 2000)}.{self.rng.randint(0, 99):02d}"
        doc["lines"][1]["qty"] = f"0.{self.rng.randint(100, 999)}"
        quote = self._send(http, "POST", "/v1/price", {k: v for k, v in doc.items() if k != "sale_id"})
        if quote is None:
            return
        net = Decimal(quote["totals"]["net"])
        rebate = Decimal(self.rng.randint(1, 500)) / 100 if member and self.rng.random() < 0.3 else Decimal(0)
        rebate = min(rebate, net)
        doc["tenders"] = [{"kind": "cash", "amount": str(net - rebate)}]
        if rebate:
            doc["tenders"].insert(0, {"kind": "rebate", "amount": str(rebate)})
        if self._send(http, "POST", "/v1/sales", doc) is None:
            return
        self.sold.append(sale_id)
        self.counts.sales += 1
        roll = self.rng.random()
        if member and roll < 0.08:
            return_id = f"{sale_id}-R"
            ask = {"return_id": return_id, "sale_id": sale_id, "member_id": member}
            ask["lines"] = [{"line_id": "2", "qty": "0.050"}]
            if self._send(http, "POST", "/v1/returns", ask) is not None:
                self.returned.append(return_id)
                self.counts.returns += 1
        elif roll < 0.12 and self._send(http, "POST", f"/v1/sales/{sale_id}/void", {"reason": "soak"}) is not None:
            self.voided.append(sale_id)
            self.counts.voids += 1

    def _send(self, http: httpx.Client, method: str, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The answer once the lane gives one; None when the lane refused it for good or the soak is over."""
        first = True
        while True:
            if not first:
                self.counts.retries += 1
                if self.stopping.is_set() and path == "/v1/price":
                    return None
                time.sleep(0.2)
            first = False
            try:
                answer = http.request(method, path, json=body)
            except httpx.HTTPError:
                continue  # the lane is down (killed) or did not answer in time: ask again, same body
            if answer.status_code == 200:
                if answer.headers.get("idempotent-replay") == "true":
                    self.counts.replays += 1
                return dict(answer.json())
            code = _error_code(answer)
            if answer.status_code == 507:
                self.counts.disk_full += 1
            elif answer.status_code == 503:
                self.counts.unavailable += 1
            elif answer.status_code >= 500:
                self.counts.server_errors[f"{answer.status_code} {code}"] += 1
            else:
                self.counts.refused[f"{answer.status_code} {code}"] += 1
                return None


def _error_code(answer: httpx.Response) -> str:
    try:
        return str(answer.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return answer.text[:80]


# --- the chaos driver ---------------------------------------------------------------------------


@dataclasses.dataclass
class Faults:
    lane_kills: int = 0
    hq_kills: int = 0
    broker_restarts: int = 0
    hq_outages: int = 0
    outage_seconds: float = 0.0
    disk_fulls: int = 0
    backlog_peak: int = 0  # the most entries a lane held unacknowledged, seen during outages


class Chaos:
    """Runs the plan's faults in a shuffled order at random moments; every process is up again between faults."""

    def __init__(
        self,
        plan: Plan,
        rng: random.Random,
        lanes: list[Lane],
        hqs: list[Hq],
        broker: Broker,
        disk: Path,
        progress: Callable[[str], None],
    ) -> None:
        self.plan, self.rng, self.lanes, self.hqs, self.broker = plan, rng, lanes, hqs, broker
        self.disk = disk
        self.faults = Faults()
        self.progress = progress

    def run(self) -> None:
        actions: list[Callable[[], None]] = (
            [self.kill_lane] * self.plan.lane_kills
            + [self.kill_hq] * self.plan.hq_kills
            + [self.restart_broker] * self.plan.broker_restarts
            + [self.hq_outage] * self.plan.hq_outages
            + [self.fill_disk] * self.plan.disk_fulls
        )
        self.rng.shuffle(actions)
        for done, action in enumerate(actions, 1):
            time.sleep(self.rng.uniform(*self.plan.pause_seconds))
            action()
            self.progress(f"fault {done}/{len(actions)}: {action.__name__}")

    def kill_lane(self) -> None:
        lane = self.rng.choice(self.lanes)
        lane.kill()
        self.faults.lane_kills += 1
        time.sleep(self.rng.uniform(0.0, 1.0))
        lane.start(wait=True)

    def kill_hq(self) -> None:
        hq = self.rng.choice(self.hqs)
        hq.kill()
        self.faults.hq_kills += 1
        time.sleep(self.rng.uniform(0.2, 2.0))
        hq.start()

    def restart_broker(self) -> None:
        # Half the time a clean stop, half a SIGKILL: persistence written or not.
        if self.rng.random() < 0.5:
            self.broker.stop()
        else:
            self.broker.kill()
        self.faults.broker_restarts += 1
        time.sleep(self.rng.uniform(0.5, 4.0))
        self.broker.start()
        for hq in self.hqs:
            _wait(f"{hq.directory.name} to reconnect", lambda hq=hq: _connected(hq), 60)

    def hq_outage(self) -> None:
        seconds = self.rng.uniform(*self.plan.outage_seconds)
        for hq in self.hqs:
            hq.kill()
        self.faults.hq_outages += 1
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.faults.backlog_peak = max(self.faults.backlog_peak, *(backlog(lane) for lane in self.lanes))
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        self.faults.outage_seconds += seconds
        for hq in self.hqs:
            hq.start()

    def fill_disk(self) -> None:
        """Fill the first lane's file system until it refuses a sale, hold it full a moment, free it."""
        ballast = self.disk / "ballast"
        lane = self.lanes[0]
        before = _disk_full_answers(lane)
        fill(ballast)
        self.faults.disk_fulls += 1
        _wait("a sale refused for the full disk", lambda: _disk_full_answers(lane) > before, 60)
        time.sleep(self.rng.uniform(0.5, 2.0))
        ballast.unlink()


_TILLS: dict[str, Till] = {}


def _disk_full_answers(lane: Lane) -> int:
    return _TILLS[lane.lane_id].counts.disk_full


def fill(path: Path) -> None:
    """Write until the file system is full (a real ENOSPC, not a simulated one)."""
    # Unbuffered, so the ENOSPC comes from the write itself and the close has nothing left to flush.
    with path.open("wb", buffering=0) as handle:
        for chunk in (1 << 20, 1 << 12):
            try:
                while True:
                    handle.write(b"\0" * chunk)
            except OSError:
                pass


def _connected(hq: Hq) -> bool:
    try:
        return "hq_broker_connected 1.0" in httpx.get(f"{hq.url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return False


def _wait(what: str, condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise SoakError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- what the lanes and head office hold -------------------------------------------------------


def _read_lane(lane: Lane, sql: str) -> list[tuple[Any, ...]]:
    assert lane.db is not None
    with contextlib.closing(sqlite3.connect(f"file:{lane.db}?mode=ro", uri=True, timeout=10)) as conn:
        return conn.execute(sql).fetchall()


def backlog(lane: Lane) -> int:
    try:
        [(acked, last)] = _read_lane(
            lane, "SELECT acked_seq, (SELECT COALESCE(MAX(seq), 0) FROM journal) FROM lane_state"
        )
    except sqlite3.Error:
        return 0
    return int(last) - int(acked)


def journal(lane: Lane) -> list[tuple[int, str, str, dict[str, Any]]]:
    rows = _read_lane(lane, "SELECT seq, id, kind, body FROM journal ORDER BY seq")
    return [(int(seq), str(ident), str(kind), json.loads(body)) for seq, ident, kind, body in rows]


def fen(amount: str) -> int:
    value = Decimal(amount) * 100
    if value != value.to_integral_value():
        raise SoakError(f"{amount!r} is not a whole number of fen")
    return int(value)


@dataclasses.dataclass
class Expected:
    """What head office must hold, added up from the lanes' journal bodies."""

    sales: int = 0
    returns: int = 0
    voids: int = 0
    net_fen: int = 0
    refund_fen: int = 0
    points: Counter[str] = dataclasses.field(default_factory=Counter)
    rebate_fen: Counter[str] = dataclasses.field(default_factory=Counter)


def expected_from(journals: dict[str, list[tuple[int, str, str, dict[str, Any]]]]) -> Expected:
    out = Expected()
    for entries in journals.values():
        sales = {body["sale_id"]: body for _, _, kind, body in entries if kind == "sale"}
        for _, _, kind, body in entries:
            if kind == "sale":
                out.sales += 1
                out.net_fen += fen(body["result"]["totals"]["net"])
                member = body["request"].get("member_id")
                if member:
                    out.points[member] += int(body["result"]["totals"]["points"])
                    spent = sum(fen(t["amount"]) for t in body["request"]["tenders"] if t["kind"] == "rebate")
                    out.rebate_fen[member] -= spent
            elif kind == "return":
                out.returns += 1
                out.refund_fen += fen(body["refund"])
                if body.get("member_id"):
                    out.points[body["member_id"]] -= int(body["points_reversed"])
            elif kind == "void":
                out.voids += 1
                sale = sales[body["sale_id"]]
                member = sale["request"].get("member_id")
                if member:
                    out.points[member] -= int(sale["result"]["totals"]["points"])
                    back = sum(fen(t["amount"]) for t in sale["request"]["tenders"] if t["kind"] == "rebate")
                    out.rebate_fen[member] += back
            else:
                raise SoakError(f"an entry of kind {kind!r} in a lane's journal")
    return out


@dataclasses.dataclass
class Report:
    plan: str
    seconds: float
    lanes: int
    told_sales: int
    told_returns: int
    told_voids: int
    hq_entries: int
    faults: Faults
    tills: TillCounts
    duplicates: int
    lost: int
    unexpected: int
    members_checked: int
    pii_findings: int

    def lines(self) -> list[str]:
        f, t = self.faults, self.tills
        return [
            f"soak ({self.plan}): {self.seconds:.0f} s, {self.lanes} lanes, 2 head-office consumers on PostgreSQL",
            (
                f"  committed (the POS was told): {self.told_sales} sales, {self.told_returns} returns, "
                f"{self.told_voids} voids; head office holds {self.hq_entries} journal entries"
            ),
            (
                f"  faults: {f.lane_kills} lane SIGKILLs, {f.hq_kills} head-office SIGKILLs "
                f"({f.lane_kills + f.hq_kills} kills), {f.broker_restarts} broker restarts, "
                f"{f.hq_outages} head-office outages ({f.outage_seconds:.0f} s in all, backlog peak "
                f"{f.backlog_peak} entries), {f.disk_fulls} full disks"
            ),
            (
                f"  tills: {t.retries} retries, {t.replays} idempotent replays, {t.disk_full} refused for a full disk "
                f"(507), {t.unavailable} unavailable (503), refused {dict(t.refused) or 0}, "
                f"server errors {dict(t.server_errors) or 0}"
            ),
            (
                f"  duplicates = {self.duplicates}, lost = {self.lost}, unexpected at head office = {self.unexpected}; "
                f"balances equal the journals for {self.members_checked} members; PII findings = {self.pii_findings}"
            ),
        ]


def verify(
    lanes: list[Lane], tills: list[Till], reader: HqReader, seed: list[SnapshotMember]
) -> tuple[int, int, int, int, int]:
    """Raise SoakError unless head office holds exactly the lanes' journals; the counts that were checked."""
    problems: list[str] = []
    journals = {lane.lane_id: journal(lane) for lane in lanes}
    duplicates = lost = unexpected = 0
    hq_entries = 0
    for lane, till in zip(lanes, tills, strict=True):
        entries = journals[lane.lane_id]
        seqs = [seq for seq, _, _, _ in entries]
        if seqs != list(range(1, len(seqs) + 1)):
            problems.append(f"{lane.lane_id}: the journal's seqs have gaps")
        by_kind: dict[str, Counter[str]] = {"sale": Counter(), "return": Counter(), "void": Counter()}
        for _, _, kind, body in entries:
            by_kind[kind][body.get("return_id") if kind == "return" else body["sale_id"]] += 1
        for kind, told in (("sale", till.sold), ("return", till.returned), ("void", till.voided)):
            journalled = by_kind[kind]
            duplicates += sum(n - 1 for n in journalled.values() if n > 1)
            missing = [ident for ident in told if journalled[ident] == 0]
            lost += len(missing)
            extra = set(journalled) - set(told)
            unexpected += len(extra)
            if missing:
                problems.append(f"{lane.lane_id}: {len(missing)} {kind}s told committed are not in the journal")
            if extra:
                problems.append(f"{lane.lane_id}: {len(extra)} {kind}s in the journal the POS was never told of")
        held = reader.rows(
            "SELECT seq, id, kind FROM journal_entries WHERE store = :s AND lane = :l ORDER BY seq",
            s=STORE,
            l=lane.lane_id,
        )
        hq_entries += len(held)
        mine = [(seq, ident, kind) for seq, ident, kind, _ in entries]
        theirs = [tuple(row) for row in held]
        if theirs != mine:
            ours, hqs = set(mine), set(theirs)
            lost += len(ours - hqs)
            unexpected += len(hqs - ours)
            problems.append(
                f"{lane.lane_id}: head office holds {len(theirs)} entries, the lane {len(mine)} "
                f"({len(ours - hqs)} missing, {len(hqs - ours)} not the lane's)"
            )
    doubled = reader.scalar(
        "SELECT count(*) FROM (SELECT store, lane, sale_id FROM sales GROUP BY store, lane, sale_id "
        "HAVING count(*) > 1) AS d"
    )
    duplicates += int(doubled)
    if doubled:
        problems.append(f"head office holds {doubled} sales more than once")
    expected = expected_from(journals)
    figures = {
        "sales": (reader.scalar("SELECT count(*) FROM sales"), expected.sales),
        "returns": (reader.scalar("SELECT count(*) FROM returns"), expected.returns),
        "voids": (reader.scalar("SELECT count(*) FROM voids"), expected.voids),
        "net_fen": (reader.scalar("SELECT COALESCE(SUM(net_fen), 0) FROM sales"), expected.net_fen),
        "refund_fen": (reader.scalar("SELECT COALESCE(SUM(refund_fen), 0) FROM returns"), expected.refund_fen),
    }
    for name, (theirs_value, ours_value) in figures.items():
        if int(theirs_value) != ours_value:
            problems.append(f"head office's {name} is {theirs_value}, the journals add up to {ours_value}")
    balances = {
        row[0]: (int(row[1]), int(row[2]))
        for row in reader.rows("SELECT member_id, points_balance, rebate_fen FROM members")
    }
    for member in seed:
        want = (
            member.points_balance + expected.points[member.member_id],
            member.rebate_balance + expected.rebate_fen[member.member_id],
        )
        if balances.get(member.member_id) != want:
            problems.append(f"{member.member_id}: head office's balance {balances.get(member.member_id)}, want {want}")
    if problems:
        raise SoakError("; ".join(problems[:20]))
    return hq_entries, duplicates, lost, unexpected, len(seed)


# --- PII ------------------------------------------------------------------------------------------


def pii_scan(lanes: list[Lane], hqs: list[Hq], known: list[str], directory: Path) -> int:
    """Run scripts/pii_scan.py on every lane's database and log, then on head office's logs; raise on a finding."""
    script = REPO_ROOT / "scripts" / "pii_scan.py"
    known_file = directory / "known-pii.txt"
    known_file.write_text("\n".join(known) + "\n", encoding="utf-8")
    scans = [
        ["--db", str(lane.db), "--logs", str(lane.stderr_path), "--config", str(lane.config_path)] for lane in lanes
    ]
    scans.append([arg for hq in hqs for arg in ("--logs", str(hq.log))])
    for scan in scans:
        args = [sys.executable, str(script), "--known", str(known_file), *scan]
        result = subprocess.run(args, capture_output=True, text=True, check=False, timeout=600)
        if result.returncode == 1:
            raise SoakError(f"personal data found: {result.stdout[:2000]}")
        if result.returncode != 0:
            raise SoakError(f"pii_scan failed ({result.returncode}): {result.stderr.strip()[:2000]}")
    return 0


# --- the run --------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(directory: Path, megabytes: int) -> Iterator[Path]:
    """A real tmpfs of its own size, so one lane's disk can be filled without touching the machine's."""
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SoakError(f"the soak mounts a tmpfs for the full-disk fault (needs root): {result.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def sync_section(broker: Broker) -> str:
    return (
        f"\n[sync]\nenabled = true\nport = {broker.port}\nresend_after_seconds = 2.0\n"
        "state_interval_seconds = 5.0\nreconnect_min_seconds = 0.1\nreconnect_max_seconds = 1.0\n"
    )


def run(
    plan: Plan,
    root: Path,
    progress: Callable[[str], None] = lambda _: None,
    tamper: Callable[[str, list[Till]], None] | None = None,
) -> Report:
    """One soak in ``root``; raises SoakError when a guarantee does not hold.

    ``tamper(db_url, tills)``, for the soak's own tests, runs after the drain
    and before the checks: it breaks what the checks must then catch.
    """
    started = time.monotonic()
    rng = random.Random(plan.seed)
    seed = soak_members(plan.members)
    snapshot = root / "members.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    write_snapshot(snapshot, seed, version=SNAPSHOT_VERSION, card_key=KEY)
    lanes: list[Lane] = []
    hqs: list[Hq] = []
    tills: list[Till] = []
    stop = threading.Event()
    megabytes = 64 if plan.name == "short" else 512
    with (
        small_disk(root / "disk", megabytes) as disk,
        Broker(root / "broker", max_queued=100_000) as broker,
        fresh_database("lanehq_soak") as db_url,
    ):
        try:
            for name in ("hq-a", "hq-b"):
                hq = Hq(root / name, broker_port=broker.port, db_url=db_url, client_id=name, share_group="ingest")
                hq.config.write_text(
                    hq.config.read_text(encoding="utf-8")
                    + f'\n[members]\ncard_hash_key = "hex:{KEY.hex()}"\nsnapshot_dir = "{root / "snapshots"}"\n',
                    encoding="utf-8",
                )
                hqs.append(hq)
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "sync.hq.cli",
                    "members",
                    "import",
                    str(snapshot),
                    "--config",
                    str(hqs[0].config),
                ],
                capture_output=True,
                text=True,
                check=False,
                cwd=REPO_ROOT,
                timeout=120,
            )
            if done.returncode != 0:
                raise SoakError(f"lane-hq members import failed: {done.stderr}")
            for hq in hqs:
                hq.start()
            for number in range(plan.lanes):
                lane_id = f"lane-{number + 1:02d}"
                db = disk / "lane.db" if number == 0 else None
                lane = Lane(root / lane_id, extra_config=sync_section(broker), db=db, lane_id=lane_id)
                lane.cli("members", "import", str(snapshot), "--config", str(lane.config_path))
                lane.start()
                lanes.append(lane)
            progress("lanes and head office started")
            for lane in lanes:
                till = Till(lane, [m.member_id for m in seed], random.Random(rng.random()), stop)
                _TILLS[lane.lane_id] = till
                tills.append(till)
                till.start()
            chaos = Chaos(plan, rng, lanes, hqs, broker, disk, progress)
            chaos.run()
            time.sleep(2.0)  # a last moment of selling with everything up
            stop.set()
            for till in tills:
                till.join(120)
                if till.is_alive():
                    raise SoakError(f"{till.name} did not finish its last sale within 120 s")
                if till.error is not None:
                    raise SoakError(f"{till.name} failed: {till.error!r}")
            progress("tills stopped; waiting for the lanes to drain")
            for lane in lanes:
                _wait(f"{lane.lane_id} to drain (backlog {backlog(lane)})", lambda lane=lane: backlog(lane) == 0, 300)
            if tamper is not None:
                tamper(db_url, tills)
            reader = HqReader(db_url)
            try:
                hq_entries, duplicates, lost, unexpected, members_checked = verify(lanes, tills, reader, seed)
            finally:
                reader.close()
            for lane in lanes:
                if lane.stop() != 0:
                    raise SoakError(f"{lane.lane_id} did not stop cleanly: {lane.log()[-2000:]}")
            for hq in hqs:
                hq.stop()
            known = [card_number(i) for i in range(plan.members)]
            known += [card_number(i).replace(" ", "") for i in range(plan.members)]
            findings = pii_scan(lanes, hqs, known, root)
        finally:
            stop.set()
            for lane in lanes:
                lane.kill()
            for hq in hqs:
                hq.kill()
            _TILLS.clear()
    counts = TillCounts()
    for till in tills:
        for field in ("sales", "returns", "voids", "retries", "replays", "disk_full", "unavailable"):
            setattr(counts, field, getattr(counts, field) + getattr(till.counts, field))
        counts.refused.update(till.counts.refused)
        counts.server_errors.update(till.counts.server_errors)
    return Report(
        plan=plan.name,
        seconds=time.monotonic() - started,
        lanes=plan.lanes,
        told_sales=sum(len(t.sold) for t in tills),
        told_returns=sum(len(t.returned) for t in tills),
        told_voids=sum(len(t.voided) for t in tills),
        hq_entries=hq_entries,
        faults=chaos.faults,
        tills=counts,
        duplicates=duplicates,
        lost=lost,
        unexpected=unexpected,
        members_checked=members_checked,
        pii_findings=findings,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--long", action="store_true", help="the long form: at least 200 kills, outages of minutes")
    parser.add_argument("--seed", type=int, default=None, help="the random seed (default: the plan's)")
    parser.add_argument("--keep", action="store_true", help="keep the soak's directory (logs, databases) afterwards")
    args = parser.parse_args(argv)
    plan = LONG if args.long else SHORT
    if args.seed is not None:
        plan = dataclasses.replace(plan, seed=args.seed)
    root = Path(tempfile.mkdtemp(prefix=f"soak-{plan.name}-"))
    try:
        from tqdm import tqdm  # noqa: PLC0415 - the progress bar is a dev extra; the soak runs without it

        bar: Any = tqdm(total=plan.faults, desc=f"soak ({plan.name})", unit="fault", file=sys.stderr)
    except ImportError:
        bar = None

    def progress(text: str) -> None:
        if bar is None:
            print(text, file=sys.stderr)
        elif text.startswith("fault "):
            bar.update(1)
            bar.set_postfix_str(text.split(": ", 1)[1])
        else:
            bar.write(text)

    try:
        report = run(plan, root / "run", progress)
    except SoakError as failure:
        print(f"soak ({plan.name}) FAILED: {failure}\n(directory kept: {root})", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    print("\n".join(report.lines()))
    if args.keep:
        print(f"(directory kept: {root})")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
