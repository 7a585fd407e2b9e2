"""A real lane agent for the API tests: its own directory, config, member snapshot and process.

``Lane`` writes a lane.toml, a ruleset and a member snapshot into a directory,
imports the members with ``lane-agent members import``, and starts
``lane-agent run`` as a subprocess on a free loopback port.  Readiness is the
systemd notify protocol itself: the harness binds a datagram socket, passes it
as NOTIFY_SOCKET, and waits for READY=1, as systemd would.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
from conftest import REPO_ROOT

from agent.snapshot import SnapshotCard, SnapshotMember, card_hash, write_snapshot

KEY = bytes(range(32))
TOKEN = "test-token-0123456789-abcdefghij"
SHANGHAI = dt.timezone(dt.timedelta(hours=8))

# Card numbers of the test programme; only their hashes reach the lane.
GOLD_CARD = "6200 1234 5678 0001"
LOST_CARD = "6200 1234 5678 0002"
NEW_CARD = "6200 1234 5678 0003"
EXPIRED_CARD = "6200 1234 5678 0004"
CANCELLED_CARD = "6200 1234 5678 0005"
REPLACED_CARD = "6200 1234 5678 0006"
VIP_CARD = "6200 1234 5678 0007"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def members(today: dt.date) -> list[SnapshotMember]:
    """Members whose cards are in every state, relative to ``today`` (the lane's local date)."""

    def card(number: str, state: str = "active", **dates: dt.date) -> SnapshotCard:
        return SnapshotCard(
            card_hash=card_hash(KEY, number).hex(),
            kind="standard",
            state=state,  # type: ignore[arg-type]
            valid_from=dates.get("valid_from", dt.date(2025, 1, 1)),
            valid_until=dates.get("valid_until"),
        )

    return [
        SnapshotMember(
            member_id="M000123",
            tier="gold",
            birthday=f"{today.month:02d}-{today.day:02d}",
            points_balance=12000,
            rebate_balance="35.20",
            cards=(
                card(GOLD_CARD, valid_until=today + dt.timedelta(days=365)),
                card(LOST_CARD, "lost"),
                card(REPLACED_CARD, "replaced"),
            ),
        ),
        SnapshotMember(
            member_id="M000124",
            tier="vip",
            points_balance=500,
            rebate_balance="0.00",
            cards=(card(NEW_CARD, valid_from=today + dt.timedelta(days=1)), card(VIP_CARD)),
        ),
        SnapshotMember(
            member_id="M000125",
            tier="vip",
            points_balance=0,
            rebate_balance="0.00",
            cards=(
                card(EXPIRED_CARD, valid_until=today - dt.timedelta(days=1)),
                card(CANCELLED_CARD, "cancelled"),
            ),
        ),
    ]


@dataclass
class Lane:
    """One lane agent process under test."""

    root: Path
    rules: Path = REPO_ROOT / "config" / "rules" / "888-mall.toml"
    port: int = field(default_factory=free_port)
    extra_config: str = ""
    db: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None
    notes: list[str] = field(default_factory=list)
    lane_id: str = "lane-03"

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.db is None:
            self.db = self.root / "lane.db"
        self.config_path = self.root / "lane.toml"
        self.stderr_path = self.root / "agent.log"
        rules_copy = self.root / "rules.toml"
        shutil.copyfile(self.rules, rules_copy)
        self.config_path.write_text(
            f"""
[lane]
store = "store-0101"
lane = "{self.lane_id}"
timezone = "Asia/Shanghai"

[api]
port = {self.port}
token = "{TOKEN}"
request_timeout_seconds = 10.0

[store]
path = "{self.db}"
card_hash_key = "hex:{KEY.hex()}"
busy_timeout_ms = 2000

[rules]
path = "{rules_copy}"

[logging]
level = "DEBUG"
{self.extra_config}
""",
            encoding="utf-8",
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "agent.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"lane-agent {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def import_members(self, today: dt.date | None = None, version: int = 7) -> None:
        today = today or dt.datetime.now(SHANGHAI).date()
        path = self.root / f"members-{version}.jsonl"
        write_snapshot(path, members(today), version=version, card_key=KEY)
        self.cli("members", "import", str(path), "--config", str(self.config_path))

    def start(self, *, wait: bool = True, env: dict[str, str] | None = None) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        notify_path = self.root / "notify.sock"
        notify_path.unlink(missing_ok=True)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(notify_path))
        self.notify.settimeout(0.2)
        environ = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONUNBUFFERED": "1", **(env or {})}
        self._stderr = self.stderr_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config_path)],
            cwd=REPO_ROOT,
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.process is not None
        assert self.notify is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the agent exited with {self.process.returncode}:\n{self.log()}")
            try:
                message = self.notify.recv(4096).decode()
            except TimeoutError:
                continue
            self.notes.append(message)
            if "READY=1" in message.split("\n"):
                return
        raise AssertionError(f"no READY=1 within {timeout} s:\n{self.log()}")

    def notify_messages(self, wait: float = 0.2) -> str:
        """What the agent sent on its notify socket since the last call (waiting up to ``wait`` for the first)."""
        assert self.notify is not None
        received = []
        self.notify.settimeout(wait)
        try:
            while True:
                message = self.notify.recv(4096).decode()
                received.append(message)
                self.notes.append(message)
                self.notify.settimeout(0.01)
        except (TimeoutError, BlockingIOError):
            pass
        return "\n".join(received)

    def log(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace") if self.stderr_path.exists() else ""

    def client(self, *, token: str | None = TOKEN, timeout: float = 15.0) -> httpx.Client:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the agent and wait for it; returns its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        finally:
            self._stderr.close()
            if self.notify is not None and self.notify.fileno() != -1:
                self.notify_messages(wait=0.01)
                self.notify.close()
        return code

    def kill(self) -> None:
        """SIGKILL: what a power cut does to the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.process is not None:
            self._stderr.close()
        if self.notify is not None:
            self.notify.close()


def basket(**changes: Any) -> dict[str, Any]:
    """A two-line basket of the 888 mall (womenswear and a marked-down fresh line)."""
    doc: dict[str, Any] = {
        "lines": [
            {"line_id": "1", "sku": "6901234567892", "category": "womenswear", "qty": "1", "unit_price": "1000.00"},
            {
                "line_id": "2",
                "sku": "6900000000012",
                "category": "fresh",
                "qty": "0.356",
                "unit_price": "45.80",
                "regular_price": "52.00",
            },
        ],
    }
    doc.update(changes)
    return doc


class EventListener:
    """``GET /v1/events`` read on a thread: ``wait_for(kind)`` returns the next such event's data."""

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self._opened = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._taken = 0

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._opened.wait(10), "the event stream did not open"
        with self.lane.client() as http:
            for _ in range(100):  # registered as a subscriber once the server runs the stream
                if http.get("/v1/status").json()["events"]["subscribers"] >= 1:
                    break
                time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True

    def _listen(self) -> None:
        with self.lane.client(timeout=60) as http, http.stream("GET", "/v1/events") as stream:
            self._opened.set()
            kind = ""
            for line in stream.iter_lines():
                if self._stop:
                    return
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    with self._cond:
                        self.events.append((kind, json.loads(line.split(":", 1)[1])))
                        self._cond.notify_all()

    def next(self, *kinds: str, timeout: float = 10.0) -> tuple[str, dict[str, Any]]:
        """The next event (of one of ``kinds``, skipping others) after the last one returned."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._taken < len(self.events):
                    kind, data = self.events[self._taken]
                    self._taken += 1
                    if not kinds or kind in kinds:
                        return kind, data
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {kinds or 'event'} within {timeout} s; got {self.events}")
                self._cond.wait(left)
