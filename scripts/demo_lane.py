"""The lane half of `make demo`: a real lane agent answering a simulated till over its POS API.

Writes a lane configuration (with a simulated card reader), a ruleset and a
member snapshot into a temporary directory, imports the members with
`lane-agent members import`, starts `lane-agent run` and plays a till: the
reader swipes a good card, a lost one and half a card, taps a card issued
today and scans a coupon, and the POS hears each on `GET /v1/events`; then a
basket is priced, the sale committed and retried (the retry is answered from
the journal), part of it returned, a second sale voided.  Run on its own, the
agent stays up for LANE_HOLD seconds afterwards (default 0: stop at once; a
negative value keeps it until Ctrl-C) so its /docs page can be opened.  The
lanes syncing with head office are the next part (scripts/demo_chain.py).
"""

from __future__ import annotations

import datetime as dt
import json
import os
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

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "rules" / "888-mall.toml"
SHANGHAI = dt.timezone(dt.timedelta(hours=8))
CARDS = {"gold": "6200 8888 0000 0001", "lost": "6200 8888 0000 0002", "new": "6200 8888 0000 0003"}


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _members(key: bytes, today: dt.date) -> list[SnapshotMember]:
    def card(number: str, state: str = "active", valid_from: dt.date = dt.date(2025, 1, 1)) -> SnapshotCard:
        return SnapshotCard(card_hash=card_hash(key, number).hex(), kind="standard", state=state, valid_from=valid_from)

    return [
        SnapshotMember(
            member_id="M000888",
            tier="gold",
            points_balance=12000,
            rebate_balance="35.20",
            cards=(card(CARDS["gold"]), card(CARDS["lost"], "lost")),
        ),
        SnapshotMember(
            member_id="M000889",
            tier="vip",
            points_balance=0,
            rebate_balance="0.00",
            cards=(card(CARDS["new"], valid_from=today + dt.timedelta(days=1)),),
        ),
    ]


def _say(text: str) -> None:
    print(text, flush=True)


def _swipe(number: str) -> str:
    pan = number.replace(" ", "")
    return f"%B{pan}^MEMBER/DEMO^2712101?;{pan}=2712101?"


# The simulated reader's script: what a cashier does with the cards in the first seconds.
DEVICES = f"""
[[devices]]
name = "reader"
type = "simulated"
steps = [
  {{ after_s = 2.5, swipe = "{_swipe(CARDS["gold"])}" }},
  {{ after_s = 0.3, swipe = "{_swipe(CARDS["lost"])}" }},
  {{ after_s = 0.3, swipe = "{_swipe(CARDS["gold"])[:20]}" }},
  {{ after_s = 0.3, tap = "{CARDS["new"]}" }},
  {{ after_s = 0.3, scan = "CPN20261201" }},
]
"""


def _listen(http: httpx.Client, heard: list[tuple[str, dict[str, Any]]], wanted: int) -> None:
    """The POS's side of GET /v1/events: what the simulated reader's swipes and taps became."""
    with http.stream("GET", "/v1/events", timeout=15) as stream:
        kind = ""
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind != "device.changed":
                heard.append((kind, json.loads(line.split(":", 1)[1])))
                if len(heard) >= wanted:
                    return


def _show(kind: str, data: dict[str, Any]) -> None:
    if kind == "member.identified":
        member = data["member"]
        _say(
            f"  {data['source']:<9} {kind}: {member['member_id']} {member['tier_label']['en']}, "
            f"{member['points_available']} points, rebate {member['rebate_available']} available"
        )
    elif kind == "card.rejected":
        detail = f" ({data['detail']})" if data.get("detail") else ""
        _say(
            f"  {data['source']:<9} {kind}: REFUSED [{data['reason']}]{detail} "
            f"{data['message']['zh-CN']} / {data['message']['en']}"
        )
    else:
        _say(f"  {'barcode':<9} {kind}: {data.get('code')}")


def _reader(http: httpx.Client) -> None:
    heard: list[tuple[str, dict[str, Any]]] = []
    listener = threading.Thread(target=_listen, args=(http, heard, 5), daemon=True)
    listener.start()
    listener.join(12)
    _say("  the POS hears on GET /v1/events:")
    for kind, data in heard:
        _show(kind, data)


def _till(http: httpx.Client) -> None:
    basket: dict[str, Any] = {
        "member_id": "M000888",
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
    priced = http.post("/v1/price", json=basket).json()
    totals = priced["totals"]
    _say(
        f"  price: gross {totals['gross']}, discount {totals['discount']}, "
        f"net {totals['net']}, {totals['points']} points"
    )
    for line in priced["lines"]:
        for discount in line["discounts"]:
            _say(f"    line {line['line_id']}: -{discount['amount']} {discount['label']['zh-CN']} ({discount['rule']})")
    net_fen = int(totals["net"].replace(".", ""))
    sale = {
        **basket,
        "sale_id": f"DEMO-{int(time.time())}",
        "tenders": [{"kind": "rebate", "amount": "35.20"}, {"kind": "cash", "amount": f"{(net_fen - 3520) / 100:.2f}"}],
    }
    started = time.perf_counter()
    first = http.post("/v1/sales", json=sale)
    took = (time.perf_counter() - started) * 1000
    _say(f"  sale {sale['sale_id']}: {first.status_code} {first.json()['status']} in {took:.1f} ms (durable on disk)")
    again = http.post("/v1/sales", json=sale)
    _say(
        f"  same sale sent again (a POS retry): {again.status_code}, "
        f"Idempotent-Replay: {again.headers.get('idempotent-replay')}"
    )
    changed = {**sale, "tenders": [{"kind": "cash", "amount": totals["net"]}]}
    conflict = http.post("/v1/sales", json=changed).json()["error"]
    _say(f"  same sale_id, other body: {conflict['code']}")
    returned = http.post(
        "/v1/returns",
        json={
            "return_id": f"{sale['sale_id']}-R1",
            "sale_id": sale["sale_id"],
            "member_id": "M000888",
            "lines": [{"line_id": "2", "qty": "0.200"}],
        },
    ).json()
    _say(f"  return 0.200 kg of line 2: refund {returned['refund']}, {returned['points_reversed']} points reversed")
    guest = {
        "sale_id": f"{sale['sale_id']}-2",
        "lines": [basket["lines"][0]],
        "tenders": [{"kind": "bank_card", "amount": "1000.00"}],
    }
    http.post("/v1/sales", json=guest)
    voided = http.post(f"/v1/sales/{guest['sale_id']}/void", json={"reason": "wrong basket"}).json()
    _say(f"  guest sale voided: refund {voided['refund']}")
    status = http.get("/v1/status").json()
    journal = status["journal"]
    _say(f"  journal: last seq {journal['last_seq']}, backlog {journal['backlog']} (sync is off on this lane)")


def main() -> int:
    duration = float(os.environ.get("LANE_HOLD", "0") or 0)
    work = Path(tempfile.mkdtemp(prefix="lane-demo-"))
    key = secrets.token_bytes(32)
    token = secrets.token_urlsafe(24)
    port = _port()
    rules = work / "rules.toml"
    shutil.copyfile(RULES, rules)
    config = work / "lane.toml"
    config.write_text(
        f'[lane]\nstore = "demo-store"\nlane = "lane-01"\n\n'
        f'[api]\nport = {port}\ntoken = "{token}"\n\n'
        f'[store]\npath = "{work / "lane.db"}"\ncard_hash_key = "hex:{key.hex()}"\n\n'
        f'[rules]\npath = "{rules}"\n\n[logging]\nlevel = "WARNING"\n' + DEVICES,
        encoding="utf-8",
    )
    snapshot = work / "members.jsonl"
    write_snapshot(snapshot, _members(key, dt.datetime.now(SHANGHAI).date()), version=1, card_key=key)
    agent = [sys.executable, "-m", "agent.cli"]
    subprocess.run(
        [*agent, "members", "import", str(snapshot), "--config", str(config)], check=True, cwd=ROOT, capture_output=True
    )
    _say(f"\n=== A lane agent on http://127.0.0.1:{port} (POS API docs: http://127.0.0.1:{port}/docs)")
    process = subprocess.Popen([*agent, "run", "--config", str(config)], cwd=ROOT)
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=10
        ) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    http.get("/v1/status").raise_for_status()
                    break
                except httpx.HTTPError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        _say("the lane agent did not start")
                        return 1
                    time.sleep(0.1)
            _reader(http)
            _till(http)
            metrics = http.get("/metrics").text
            answered = sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("lane_api_requests_total{")
            )
            _say(f"  {answered:.0f} API requests answered; metrics: http://127.0.0.1:{port}/metrics")
        if duration:
            _say(
                f"  the agent keeps running {'until Ctrl-C' if duration < 0 else f'for {duration:g} s'}; token: {token}"
            )
            try:
                if duration < 0:
                    process.wait()
                else:
                    time.sleep(duration)
            except KeyboardInterrupt:
                pass
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    _say(f"  lane agent stopped (exit {code}); its data was in {work} (removed)")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
