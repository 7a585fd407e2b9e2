"""The agent's process life: restart, SIGTERM, kill -9 in a loop of commits, a full disk, bad start-ups.

Each test runs its own ``lane-agent run`` process over a real SQLite file and
checks the database afterwards with plain sqlite3.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lane_harness import Lane, basket, free_port

pytestmark = pytest.mark.timeout(300)


def sale_doc(sale_id: str, net: str) -> dict[str, Any]:
    return basket(sale_id=sale_id, tenders=[{"kind": "cash", "amount": net}])


def guest_net(http: httpx.Client) -> str:
    return str(http.post("/v1/price", json=basket()).json()["totals"]["net"])


def journal_sales(db: Path) -> tuple[list[int], list[str]]:
    """Every journal seq, and the sale ids of the sale entries, read beside (or after) the agent."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        seqs = [row[0] for row in conn.execute("SELECT seq FROM journal ORDER BY seq")]
        bodies = [
            json.loads(row[0]) for row in conn.execute("SELECT body FROM journal WHERE kind = 'sale' ORDER BY seq")
        ]
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    return seqs, [body["sale_id"] for body in bodies]


@pytest.fixture
def lane(tmp_path: Path) -> Iterator[Lane]:
    agent = Lane(tmp_path / "lane")
    agent.import_members()
    yield agent
    agent.kill()


def test_sigterm_stops_cleanly_and_a_restart_keeps_every_sale(lane: Lane) -> None:
    lane.start()
    with lane.client() as http:
        net = guest_net(http)
        first = http.post("/v1/sales", json=sale_doc("restart-1", net))
        assert first.status_code == 200
    assert lane.stop() == 0
    assert any("STOPPING=1" in note for note in lane.notes) or "STOPPING=1" in lane.notify_messages()
    assert "stopped; the store is closed" in lane.log()
    lane.start()
    with lane.client() as http:
        again = http.post("/v1/sales", json=sale_doc("restart-1", net))
        status = http.get("/v1/status").json()
    assert (again.status_code, again.headers["idempotent-replay"]) == (200, "true")
    assert again.json() == first.json()
    assert status["journal"]["last_seq"] == 1
    assert lane.stop() == 0


def test_sigterm_lets_sales_in_flight_finish(lane: Lane) -> None:
    lane.start()
    answered: list[str] = []
    failed: list[str] = []
    stop = threading.Event()
    with lane.client() as http:
        net = guest_net(http)

    def ring() -> None:
        with lane.client(timeout=10) as http:
            i = 0
            while not stop.is_set():
                sale_id = f"term-{threading.get_ident()}-{i}"
                try:
                    answer = http.post("/v1/sales", json=sale_doc(sale_id, net))
                except httpx.HTTPError:
                    failed.append(sale_id)
                    return
                (answered if answer.status_code == 200 else failed).append(sale_id)
                i += 1

    tills = [threading.Thread(target=ring) for _ in range(4)]
    for till in tills:
        till.start()
    time.sleep(1.5)
    code = lane.stop()
    stop.set()
    for till in tills:
        till.join(10)
    assert code == 0, lane.log()
    assert lane.db is not None
    _, committed = journal_sales(lane.db)
    assert answered, "no sale was answered before SIGTERM"
    assert set(answered) <= set(committed)  # every sale the POS was told about is on disk
    assert len(committed) == len(set(committed))


def test_kill_9_in_a_loop_of_commits_loses_and_duplicates_nothing(lane: Lane) -> None:
    """Four tills ring sales while the agent is SIGKILLed at random moments and restarted.

    A till retries a sale whose answer it never got (as a POS must) with the
    same id and body.  At the end: every answered sale is in the journal
    exactly once, no other sale is, and the sequence has no gap.
    """
    rng = random.Random(9)
    answered: set[str] = set()
    attempted: set[str] = set()
    lock = threading.Lock()
    lane.start()
    with lane.client() as http:
        net = guest_net(http)
    for kill_round in range(6):
        stop = threading.Event()
        retries: list[str] = []

        def ring(
            till: int, stop: threading.Event = stop, retries: list[str] = retries, kill_round: int = kill_round
        ) -> None:
            pending: str | None = None
            n = 0
            with lane.client(timeout=5) as http:
                while not stop.is_set():
                    sale_id = pending or f"k9-{kill_round}-{till}-{n}"
                    with lock:
                        attempted.add(sale_id)
                    try:
                        answer = http.post("/v1/sales", json=sale_doc(sale_id, net))
                    except httpx.HTTPError:
                        pending = sale_id
                        time.sleep(0.05)
                        continue
                    assert answer.status_code == 200, answer.text
                    with lock:
                        answered.add(sale_id)
                    pending = None
                    n += 1
            # Retry what was in flight at the kill, against the restarted agent below.
            if pending is not None:
                retries.append(pending)

        tills = [threading.Thread(target=ring, args=(t,)) for t in range(4)]
        for till in tills:
            till.start()
        time.sleep(rng.uniform(0.3, 1.2))
        lane.kill()
        stop.set()
        for till in tills:
            till.join(10)
        lane.start()
        with lane.client() as http:
            for sale_id in retries:
                answer = http.post("/v1/sales", json=sale_doc(sale_id, net))
                assert answer.status_code == 200
                answered.add(sale_id)
    assert lane.stop() == 0
    assert lane.db is not None
    seqs, committed = journal_sales(lane.db)
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(committed) == len(set(committed)), "a sale was journaled twice"
    assert answered <= set(committed), f"answered but lost: {sorted(answered - set(committed))[:5]}"
    assert set(committed) <= attempted
    assert len(answered) > 50, "too few sales to mean anything"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB file system (tmpfs), so the disk can be filled for real."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"this test mounts a tmpfs (needs root): {result.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> None:
    """Write until the file system is full."""
    with path.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError:
            pass
    # Leave a sliver: SQLite then fails on a page write, not on the first byte.


def test_a_full_disk_refuses_the_sale_cleanly_and_recovers_when_space_returns(tmp_path: Path, small_disk: Path) -> None:
    lane = Lane(tmp_path / "lane", db=small_disk / "lane.db")
    lane.import_members()
    lane.start()
    try:
        with lane.client() as http:
            net = guest_net(http)
            assert http.post("/v1/sales", json=sale_doc("disk-0", net)).status_code == 200
            fill(small_disk / "ballast")
            refused = None
            for i in range(1, 400):
                answer = http.post("/v1/sales", json=sale_doc(f"disk-{i}", net))
                if answer.status_code != 200:
                    refused = (i, answer)
                    break
            assert refused is not None, "the disk never filled"
            i, answer = refused
            assert answer.status_code == 507, answer.text
            assert answer.json()["error"]["code"] == "disk_full"
            assert answer.headers["retry-after"] == "1"
            # Reads go on: the POS can still identify and price.
            assert http.get("/v1/status").status_code == 200
            assert http.post("/v1/price", json=basket()).status_code == 200
            (small_disk / "ballast").unlink()
            retry = http.post("/v1/sales", json=sale_doc(f"disk-{i}", net))
            assert retry.status_code == 200, retry.text
            assert "idempotent-replay" not in retry.headers  # the refused attempt left nothing behind
        assert lane.stop() == 0
    finally:
        lane.kill()
    seqs, committed = journal_sales(small_disk / "lane.db")
    assert seqs == list(range(1, len(seqs) + 1))
    assert committed == [f"disk-{n}" for n in range(i + 1)]
    assert "disk_full" in lane.log() or "disk is full" in lane.log()


def test_an_invalid_configuration_exits_78_with_every_problem(tmp_path: Path) -> None:
    lane = Lane(tmp_path / "lane", extra_config="\n[returns]\nwindow_days = -1\nbogus = 1\n")
    result = lane.cli("run", "--config", str(lane.config_path), check=False)
    assert result.returncode == 78  # EX_CONFIG: systemd does not restart it
    assert "returns.window_days" in result.stderr
    assert "returns.bogus" in result.stderr


def test_a_port_in_use_exits_4(lane: Lane) -> None:
    with __import__("socket").socket() as holder:
        holder.bind(("127.0.0.1", lane.port))
        holder.listen()
        result = lane.cli("run", "--config", str(lane.config_path), check=False)
    assert result.returncode == 4, result.stderr
    assert f"cannot listen on 127.0.0.1:{lane.port}" in result.stderr


def test_a_damaged_database_exits_3_and_is_left_as_found(tmp_path: Path) -> None:
    lane = Lane(tmp_path / "lane")
    assert lane.db is not None
    lane.db.write_bytes(b"this is not a database" * 100)
    before = lane.db.read_bytes()
    result = lane.cli("run", "--config", str(lane.config_path), check=False)
    assert result.returncode == 3, result.stderr
    assert "store_corrupt" in result.stderr
    assert lane.db.read_bytes() == before


def test_the_watchdog_is_fed_while_the_store_answers(tmp_path: Path) -> None:
    lane = Lane(tmp_path / "lane", port=free_port())
    lane.import_members()
    lane.start(env={"WATCHDOG_USEC": "400000"})  # 0.4 s: pings every 0.2 s
    try:
        deadline = time.monotonic() + 5
        pings = 0
        while time.monotonic() < deadline and pings < 3:
            pings += lane.notify_messages().count("WATCHDOG=1")
        assert pings >= 3
    finally:
        assert lane.stop(signal.SIGINT) == 0


def test_the_offline_floors_keep_part_of_every_balance_back(tmp_path: Path) -> None:
    lane = Lane(tmp_path / "lane", extra_config='\n[offline]\nrebate_floor = "5.00"\npoints_floor = 100\n')
    lane.import_members()
    lane.start()
    try:
        with lane.client() as http:
            member = http.post("/v1/identify", json={"code": "M000123", "kind": "member_id"}).json()["member"]
            assert (member["rebate_balance"], member["rebate_available"]) == ("35.20", "30.20")
            assert (member["points_balance"], member["points_available"]) == (12000, 11900)
            doc = basket(member_id="M000123", sale_id="floor-1")
            net = int(http.post("/v1/price", json=basket(member_id="M000123")).json()["totals"]["net"].replace(".", ""))
            over = {
                **doc,
                "tenders": [
                    {"kind": "rebate", "amount": "30.21"},
                    {"kind": "cash", "amount": f"{(net - 3021) / 100:.2f}"},
                ],
            }
            answer = http.post("/v1/sales", json=over)
            assert answer.status_code == 422
            assert answer.json()["error"]["code"] == "rebate_insufficient"
            within = {
                **doc,
                "tenders": [
                    {"kind": "rebate", "amount": "30.20"},
                    {"kind": "cash", "amount": f"{(net - 3020) / 100:.2f}"},
                ],
            }
            assert http.post("/v1/sales", json=within).status_code == 200
    finally:
        assert lane.stop() == 0


def test_sigterm_ends_open_event_streams_and_exits_promptly(lane: Lane) -> None:
    lane.start()
    ended = threading.Event()

    def listen() -> None:
        with lane.client(timeout=30) as http, http.stream("GET", "/v1/events") as stream:
            for _ in stream.iter_lines():
                pass
        ended.set()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    with lane.client() as http:
        for _ in range(100):
            if http.get("/v1/status").json()["events"]["subscribers"] >= 1:
                break
            time.sleep(0.02)
    started = time.monotonic()
    assert lane.stop() == 0
    assert time.monotonic() - started < 5, "an open event stream held the shutdown"
    assert ended.wait(5), "the event stream was not ended by the shutdown"
