"""The chain half of `make demo`: a broker, head office on SQLite and three lanes selling and syncing.

Starts, in a temporary directory: a private Mosquitto broker, `lane-hq run`
(SQLite, the shipped rulesets, its dashboard) and three `lane-agent run`
lanes with MQTT sync on.  Each lane's simulated card reader swipes members'
cards on a loop; a till per lane hears each identification on the lane's
`GET /v1/events`, prices a basket for that member and commits the sale, with
guest sales in between.  A third of the way in the broker is stopped for a
while: the lanes keep selling and their backlogs grow; when it returns the
backlogs drain.  Head office holds the member table: the lanes start empty
and take it from head office (a snapshot over HTTP), and two thirds of the way
in one member's card is reported lost at head office (`lane-hq cards lost`):
the demo says how soon each lane refuses it.  At the end: what each lane sold,
what head office ingested (sales, discounts, points, duplicates skipped, dead
letters, audit mismatches), each lane's backlog, sync lag and member-table
version, and where to look.

DURATION seconds of selling (default 30); DURATION=0 keeps everything running
until Ctrl-C.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from agent.snapshot import SnapshotCard, SnapshotMember, card_hash, write_snapshot
from sync.lane_auth import lane_token

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "rules" / "888-mall.toml"
SHANGHAI = dt.timezone(dt.timedelta(hours=8))
LANES = ("lane-01", "lane-02", "lane-03")
STORE = "demo-store"
MEMBERS = 12
LOST_CARD = 3  # the member whose card is reported lost part-way
PRODUCTS = (
    ("6901234567892", "womenswear", "1", "399.00", None),
    ("6900000000012", "fresh", "0.356", "45.80", "52.00"),
    ("6900000000029", "grocery", "2", "12.50", None),
    ("6900000000036", "cosmetics", "1", "268.00", None),
    ("6900000000043", "fresh", "1.120", "18.60", None),
    ("6900000000050", "household", "3", "9.90", None),
)


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _say(text: str) -> None:
    print(text, flush=True)


def _card(index: int) -> str:
    return f"6200 8888 1000 {index:04d}"


def _masked(number: str) -> str:
    digits = number.replace(" ", "")
    return f"{digits[:4]}••••{digits[-4:]}"


def _swipe(number: str) -> str:
    pan = number.replace(" ", "")
    return f"%B{pan}^MEMBER/DEMO^2712101?;{pan}=2712101?"


def _members(key: bytes) -> list[SnapshotMember]:
    tiers = ("standard", "silver", "gold", "vip")
    return [
        SnapshotMember(
            member_id=f"M1{index:05d}",
            tier=tiers[index % len(tiers)],
            points_balance=1000 * index,
            rebate_balance="0.00",
            cards=(
                SnapshotCard(
                    card_hash=card_hash(key, _card(index)).hex(),
                    kind="standard",
                    state="active",
                    valid_from=dt.date(2025, 1, 1),
                ),
            ),
        )
        for index in range(1, MEMBERS + 1)
    ]


class Broker:
    """A private mosquitto: `user root` and `log_dest file` (../shared/REAL_COMPONENTS.md)."""

    def __init__(self, work: Path) -> None:
        self.port = _port()
        self.dir = work / "broker"
        self.dir.mkdir()
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence true\n"
            f"persistence_location {self.dir}/\nlog_dest file {self.dir / 'mosquitto.log'}\n"
            "max_queued_messages 10000\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen([binary, "-c", str(self.conf)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)
            self.process = None


class Lane:
    """One `lane-agent run` with sync on, and its till thread."""

    def __init__(self, work: Path, name: str, hq: HeadOffice, key: bytes, rules: Path, index: int) -> None:
        self.name = name
        self.dir = work / name
        self.dir.mkdir()
        self.port = _port()
        self.token = secrets.token_urlsafe(24)
        cards = [_card(i) for i in range(1, MEMBERS + 1)]
        random.Random(index).shuffle(cards)
        steps = ",\n".join(f'  {{ after_s = 1.2, swipe = "{_swipe(number)}" }}' for number in cards)
        self.config = self.dir / "lane.toml"
        self.config.write_text(
            f'[lane]\nstore = "{STORE}"\nlane = "{name}"\n\n'
            f'[api]\nport = {self.port}\ntoken = "{self.token}"\n\n'
            f'[store]\npath = "{self.dir / "lane.db"}"\ncard_hash_key = "hex:{key.hex()}"\n\n'
            f'[rules]\npath = "{rules}"\n\n[logging]\nlevel = "ERROR"\n\n'
            f"[sync]\nenabled = true\nport = {hq.broker_port}\nresend_after_seconds = 5\n"
            "state_interval_seconds = 5\nreconnect_max_seconds = 2\n"
            f'hq_url = "http://127.0.0.1:{hq.port}"\nhq_token = "{lane_token(hq.secret, STORE, name)}"\n\n'
            f'[[devices]]\nname = "reader"\ntype = "simulated"\nrepeat = true\nsteps = [\n{steps}\n]\n',
            encoding="utf-8",
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}", headers={"Authorization": f"Bearer {self.token}"}, timeout=10
        )
        self.sold = 0
        self.refused = 0
        self.stop = threading.Event()
        self.rng = random.Random(1000 + index)

    def start(self) -> None:
        """Start the agent with an empty member table; head office's snapshot fills it."""
        agent = [sys.executable, "-m", "agent.cli"]
        self.process = subprocess.Popen([*agent, "run", "--config", str(self.config)], cwd=ROOT)
        deadline = time.monotonic() + 60
        while True:
            try:
                status = self.http.get("/v1/status")
                status.raise_for_status()
                if status.json()["member_table"]["members"] >= MEMBERS:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start with head office's member table") from None
            time.sleep(0.1)

    def _basket(self, member_id: str | None) -> dict[str, Any]:
        lines = []
        for number, (sku, category, qty, unit, regular) in enumerate(self.rng.sample(PRODUCTS, self.rng.randint(1, 4))):
            line = {"line_id": str(number + 1), "sku": sku, "category": category, "qty": qty, "unit_price": unit}
            if regular:
                line["regular_price"] = regular
            lines.append(line)
        doc: dict[str, Any] = {"lines": lines}
        if member_id:
            doc["member_id"] = member_id
        return doc

    def _sell(self, member_id: str | None) -> None:
        basket = self._basket(member_id)
        priced = self.http.post("/v1/price", json=basket)
        if priced.status_code != 200:
            self.refused += 1
            return
        net = priced.json()["totals"]["net"]
        kind = self.rng.choice(("cash", "bank_card"))
        sale = {**basket, "sale_id": f"{self.name}-{secrets.token_hex(6)}", "tenders": [{"kind": kind, "amount": net}]}
        answer = self.http.post("/v1/sales", json=sale)
        if answer.status_code == 200:
            self.sold += 1
        else:
            self.refused += 1

    def till(self) -> None:
        """Hear each swipe on the event stream and ring up that member's basket; a guest now and then."""
        while not self.stop.is_set():
            try:
                with self.http.stream("GET", "/v1/events", timeout=httpx.Timeout(10, read=3)) as stream:
                    kind = ""
                    for line in stream.iter_lines():
                        if self.stop.is_set():
                            return
                        if line.startswith("event:"):
                            kind = line.split(":", 1)[1].strip()
                        elif line.startswith("data:") and kind == "member.identified":
                            self._sell(json.loads(line.split(":", 1)[1])["member"]["member_id"])
                            if self.rng.random() < 0.4:
                                self._sell(None)
            except httpx.HTTPError:
                time.sleep(0.2)

    def refused_lost_after(self, since: float, timeout: float = 10.0) -> float | None:
        """Seconds from ``since`` until this lane refuses the lost card as ``lost`` (None: not in time)."""
        while (now := time.monotonic()) < since + timeout:
            answer = self.http.post("/v1/identify", json={"code": _card(LOST_CARD)})
            if answer.status_code == 200 and answer.json().get("reason") == "lost":
                return now - since
            time.sleep(0.05)
        return None

    def status(self) -> dict[str, Any]:
        return dict(self.http.get("/v1/status").json())

    def terminate(self) -> int:
        self.stop.set()
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(30)
        self.http.close()
        return code


class HeadOffice:
    """`lane-hq run` on SQLite with the shipped rulesets, holding the member table lanes take."""

    def __init__(self, work: Path, broker_port: int, key: bytes, snapshot: Path) -> None:
        self.broker_port = broker_port
        self.port = _port()
        # The secret lanes' API tokens derive from: the first line of a file head office reads.
        self.secret = secrets.token_hex(32).encode()
        rules = work / "hq-rules"
        rules.mkdir()
        for path in (ROOT / "config" / "rules").glob("*.toml"):
            shutil.copyfile(path, rules / path.name)
        secret_file = work / "lane-secret"
        secret_file.write_text(self.secret.decode() + "\n", encoding="utf-8")
        self.config = work / "hq.toml"
        self.config.write_text(
            f'[broker]\nport = {broker_port}\nclient_id = "demo-hq"\nreconnect_max_seconds = 2\n\n'
            f'[database]\nurl = "sqlite:///{work / "hq.db"}"\n\n[rules]\ndirectory = "{rules}"\n\n'
            f'[members]\ncard_hash_key = "hex:{key.hex()}"\nsnapshot_dir = "{work / "snapshots"}"\n'
            f"snapshot_every_changes = 1\n\n"
            f'[lanes]\nauth_secret_file = "{secret_file}"\n\n'
            # The member centre runs the 888 mall's programme: its dashboard is /centre.
            f'[centre]\nruleset = "888-mall"\n\n'
            f'[api]\nport = {self.port}\n\n[logging]\nlevel = "ERROR"\n',
            encoding="utf-8",
        )
        self.lane_hq("members", "import", str(snapshot))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sync.hq.cli", "run", "--config", str(self.config)], cwd=ROOT
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).raise_for_status()
            except httpx.HTTPError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("head office did not start") from None
                time.sleep(0.1)
            else:
                return

    def lane_hq(self, *args: str) -> str:
        """Run a `lane-hq` command against this head office; its output."""
        done = subprocess.run(
            [sys.executable, "-m", "sync.hq.cli", *args, "--config", str(self.config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode:
            raise RuntimeError(f"lane-hq {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


def _sell_for(lanes: list[Lane], broker: Broker, hq: HeadOffice, duration: float) -> None:
    outage_at, outage_for = duration / 3, max(duration / 4, 3.0)
    lose_at = max(outage_at + outage_for + 1.0, duration * 2 / 3)
    lost: float | None = None
    started = time.monotonic()
    down = False
    while (elapsed := time.monotonic() - started) < duration:
        if lost is None and elapsed >= lose_at:
            hq.lane_hq("cards", "lost", _card(LOST_CARD))
            lost = time.monotonic()
            card = _masked(_card(LOST_CARD))
            _say(f"  t={elapsed:4.1f} s  head office: card {card} reported lost (lane-hq cards lost)")
        if not down and outage_at <= elapsed < outage_at + outage_for:
            broker.stop()
            down = True
            _say(f"  t={elapsed:4.1f} s  broker stopped: the lanes keep selling offline")
        elif down and elapsed >= outage_at + outage_for:
            backlogs = ", ".join(f"{lane.name} {lane.status()['sync']['backlog']}" for lane in lanes)
            broker.start()
            down = False
            _say(f"  t={elapsed:4.1f} s  broker back; backlogs to drain: {backlogs}")
        time.sleep(0.25)
    if down:
        broker.start()
    if lost is not None:
        # Ask each lane as a cashier would (the card typed at the POS) until it says lost.
        for lane in lanes:
            refused = lane.refused_lost_after(lost)
            when = "not within 10 s" if refused is None else f"{refused:.2f} s after head office's change"
            _say(f"           {lane.name} refuses the lost card {when}")


def _report(lanes: list[Lane], hq_port: int) -> None:
    deadline = time.monotonic() + 60

    def settled() -> bool:  # every backlog drained, every member cache on one version
        statuses = [lane.status() for lane in lanes]
        versions = {status["member_table"]["version"] for status in statuses}
        return not any(status["sync"]["backlog"] for status in statuses) and len(versions) == 1

    while time.monotonic() < deadline and not settled():
        time.sleep(0.5)
    time.sleep(1.0)  # the audit runs just behind ingest
    hq = {row["lane"]: row for row in httpx.get(f"http://127.0.0.1:{hq_port}/v1/lanes", timeout=10).json()["lanes"]}
    _say(
        f"\n  {'lane':<9}{'sold':>6}{'at HQ':>7}{'net':>11}{'discount':>10}{'points':>8}"
        f"{'backlog':>9}{'lag s':>7}{'dups':>6}{'dead':>6}{'audit≠':>8}{'members v':>11}"
    )
    for lane in lanes:
        status = lane.status()
        sync = status["sync"]
        row = hq.get(f"{STORE}/{lane.name}", {})
        lag = sync.get("sync_lag_seconds")
        _say(
            f"  {lane.name:<9}{lane.sold:>6}{row.get('sales', 0):>7}{row.get('net', '0.00'):>11}"
            f"{row.get('discount', '0.00'):>10}{row.get('points_earned', 0):>8}{sync['backlog']:>9}"
            f"{'-' if lag is None else f'{lag:.2f}':>7}{row.get('duplicates', 0):>6}{row.get('dead_letters', 0):>6}"
            f"{row.get('audit_mismatches', 0):>8}{status['member_table']['version']:>11}"
        )
    tiers = httpx.get(f"http://127.0.0.1:{hq_port}/v1/reports/tiers", timeout=10).json()["rows"]
    _say("  member centre, members by tier: " + ", ".join(f"{row['tier']} {row['members']}" for row in tiers))
    _say(
        f"\n  head office dashboard: http://127.0.0.1:{hq_port}/   member centre: /centre   figures: /v1/lanes"
        "   metrics: /metrics"
        f"\n  a lane's POS API docs: http://127.0.0.1:{lanes[0].port}/docs   protocol: docs/protocol.md"
    )


def main() -> int:
    duration = float(os.environ.get("DURATION", "30") or 30)
    work = Path(tempfile.mkdtemp(prefix="chain-demo-"))
    key = secrets.token_bytes(32)
    rules = work / "rules.toml"
    shutil.copyfile(RULES, rules)
    snapshot = work / "members.jsonl"
    write_snapshot(snapshot, _members(key), version=1, card_key=key)
    broker = Broker(work)
    broker.start()
    hq = HeadOffice(work, broker.port, key, snapshot)
    hq_port = hq.port
    lanes = [Lane(work, name, hq, key, rules, index) for index, name in enumerate(LANES)]
    codes: list[int] = []
    try:
        for lane in lanes:
            lane.start()
        _say(f"  {MEMBERS} members at head office; each lane took them from head office's snapshot over HTTP")
        _say(
            f"\n=== A store: broker on :{broker.port}, head office on http://127.0.0.1:{hq_port}/ (SQLite), "
            f"lanes {', '.join(f'{lane.name} :{lane.port}' for lane in lanes)}"
        )
        tills = [threading.Thread(target=lane.till, daemon=True) for lane in lanes]
        for till in tills:
            till.start()
        if duration > 0:
            _say(f"  selling for {duration:g} s (cards swiped by each lane's simulated reader)")
            _sell_for(lanes, broker, hq, duration)
        else:
            _say("  selling until Ctrl-C (DURATION=0)")
            try:
                while True:
                    time.sleep(10)
                    _report(lanes, hq_port)
            except KeyboardInterrupt:
                pass
        for lane in lanes:
            lane.stop.set()
        for till in tills:
            till.join(5)
        _report(lanes, hq_port)
    finally:
        codes = [lane.terminate() for lane in lanes]
        codes.append(hq.stop())
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    _say(f"  stopped the lanes and head office (exit codes {codes}); their data was in {work} (removed)")
    return 0 if not any(codes) else 1


if __name__ == "__main__":
    sys.exit(main())
