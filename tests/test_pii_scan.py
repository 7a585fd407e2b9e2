"""scripts/pii_scan.py: a real lane keeps no personal data, and the check finds it when it is there.

One real lane (``lane_harness.Lane``, logging at DEBUG) lives a till's day:
members imported; cards swiped through the evdev magstripe reader (track 1
carrying the holder's name), printed cards and a product barcode scanned on
the member scanner, a signed member QR code, numbers keyed at the POS (with
spaces, dashes, full-width digits; lost, expired, replaced, unknown cards; a
phone and an ID number typed where a card number goes; garbage); sales with
and without members, a replay, conflicts, short tenders, a return, a void.
The scan of its database, WAL and log, with the raw card numbers used and what
head office holds for those members as known values, must be clean.

The other tests plant personal data in copies of that lane's database and log
and expect the check to find each with its kind, where and a masked value,
never the value itself; and they show what it must not report (barcodes,
sale ids, timestamps, amounts of a real sale body).  Every scan runs the
script as the soak and CI do, with ``python -I -S``: no site-packages, so it
stays standard-library only.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO_ROOT
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from keyrecords import pack, records_for_text
from lane_harness import (
    CANCELLED_CARD,
    EXPIRED_CARD,
    GOLD_CARD,
    LOST_CARD,
    NEW_CARD,
    REPLACED_CARD,
    VIP_CARD,
    EventListener,
    Lane,
    basket,
)

from drivers.member_qr import NONCE_BYTES, sign_member_code

pytestmark = pytest.mark.timeout(120)

SCAN = REPO_ROOT / "scripts" / "pii_scan.py"


def resident_id(first17: str) -> str:
    """An ID number with its ISO 7064 MOD 11-2 check character (written here, not taken from the script)."""
    weights = [2 ** (17 - i) % 11 for i in range(17)]
    return first17 + "10X98765432"[sum(int(d) * w for d, w in zip(first17, weights, strict=True)) % 11]


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def ean_valid(digits: str) -> bool:
    odd = sum(int(d) for d in digits[-2::-2])
    even = sum(int(d) for d in digits[-3::-2])
    return (10 - (odd * 3 + even) % 10) % 10 == int(digits[-1])


# What head office holds for the test programme's members (M000123 gold, M000124 vip, M000125):
# the lane gets member ids, tiers, balances and card hashes, never these.
NAMES = ("张伟", "李娜", "欧阳娜娜", "Zhang Wei", "Li Na")
PHONES = ("13812345678", "15900001234", "18611112222")
IDS = (resident_id("11010519491231002"), resident_id("31011519850612301"), resident_id("44030419920229123"))
EMAILS = ("zhang.wei@example.com",)
UNKNOWN_CARD = "6200 1234 5678 9999"
BANK_CARD = "6222 0212 3456 7894"  # a customer's bank card swiped by mistake: Luhn-valid, unknown here
CARDS = (GOLD_CARD, LOST_CARD, NEW_CARD, EXPIRED_CARD, CANCELLED_CARD, REPLACED_CARD, VIP_CARD, UNKNOWN_CARD, BANK_CARD)

# Planted by the negative tests: not in the known list, so only the patterns can find them.
PLANTED_PHONE = "13987654321"
PLANTED_ID = resident_id("51010719770101456")
PLANTED_CARD = "6217 0000 0000 1236"

# Product barcodes that pass the Luhn check too: only the EAN guard keeps them from being "cards".
SKUS = ("6900000000021", "6900000000120", "6900000000229")


def digits_of(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit() or ch == "X")


def secrets_of(values: tuple[str, ...]) -> list[str]:
    """What must never be printed: each value whole, and the digits of each number without separators."""
    return [v for v in values if not v.isdigit()] + [digits_of(v) for v in values if digits_of(v)]


ALL_KNOWN = (*NAMES, *PHONES, *IDS, *EMAILS, *CARDS)


@dataclass
class Scan:
    code: int
    out: str
    err: str

    @property
    def doc(self) -> dict[str, Any]:
        return dict(json.loads(self.out))

    def assert_masked(self, *values: str) -> None:
        printed = (self.out + self.err).replace(" ", "").replace("-", "")
        for secret in secrets_of((*ALL_KNOWN, *values)):
            assert secret.replace(" ", "") not in printed, f"the scan printed a value it found:\n{self.out}{self.err}"


def scan(*args: str | Path) -> Scan:
    """The script as CI and the soak run it, without site-packages (``-I -S``): standard library only."""
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(SCAN), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Scan(result.returncode, result.stdout, result.stderr)


# --- a lane's day ----------------------------------------------------------------------------------


@dataclass
class Lived:
    lane: Lane
    known: Path
    live_scan: Scan  # taken while the agent ran, its WAL holding the day's commits
    journal_entries: int

    @property
    def db(self) -> Path:
        assert self.lane.db is not None
        return Path(self.lane.db)

    def copy(self, dest: Path) -> tuple[Path, Path]:
        """The lane's database files and log, copied for planting."""
        dest.mkdir()
        for path in self.db.parent.glob(self.db.name + "*"):
            if not path.name.endswith("-shm"):
                shutil.copyfile(path, dest / path.name)
        shutil.copyfile(self.lane.stderr_path, dest / "agent.log")
        return dest / self.db.name, dest / "agent.log"


def swipe(number: str, name: str) -> str:
    pan = number.replace(" ", "")
    return f"%B{pan}^{name}^2712101?;{pan}=2712101?"


def type_into(fifo: Path, text: str) -> None:
    records = records_for_text(text, t0=int(time.time() * 1_000_000), per_key_us=300)
    with fifo.open("wb", buffering=0) as handle:
        handle.write(pack(records))


def wait_connected(lane: Lane, count: int) -> None:
    with lane.client() as http:
        for _ in range(200):
            devices = http.get("/v1/status").json()["devices"]
            if len(devices) == count and all(d["state"] == "connected" for d in devices):
                return
            time.sleep(0.05)
    raise AssertionError(f"devices not connected: {devices}")


def priced(http: httpx.Client, doc: dict[str, Any]) -> str:
    answer = http.post("/v1/price", json={k: v for k, v in doc.items() if k != "sale_id"})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["totals"]["net"])


def lines_of(*skus: str) -> list[dict[str, Any]]:
    return [
        {"line_id": str(i), "sku": sku, "category": "womenswear", "qty": "1", "unit_price": f"{100 + 37 * i}.80"}
        for i, sku in enumerate(skus, 1)
    ]


def live_a_day(lane: Lane, msr: Path, scanner: Path, qr_key: bytes) -> None:
    outcomes = []
    with EventListener(lane) as events:

        def read(fifo: Path, text: str) -> None:
            type_into(fifo, text)
            kind, data = events.next("member.identified", "card.rejected")
            outcomes.append((kind, data.get("reason")))

        read(msr, swipe(GOLD_CARD, "ZHANG/WEI"))
        read(msr, swipe(LOST_CARD, "ZHANG/WEI"))
        read(msr, swipe(BANK_CARD, "LI/NA"))
        read(msr, swipe(VIP_CARD, "LI/NA")[:22])  # half a swipe
        read(scanner, GOLD_CARD.replace(" ", ""))  # the printed card's barcode
        read(scanner, SKUS[0])  # a product on the member scanner
        read(scanner, sign_member_code(qr_key, "hq1", "M000124", int(time.time()), secrets.token_bytes(NONCE_BYTES)))
        read(scanner, "LM1.hq1.M000124.forged")
    assert outcomes == [
        ("member.identified", None),
        ("card.rejected", "lost"),
        ("card.rejected", "unknown"),
        ("card.rejected", "unreadable"),
        ("member.identified", None),
        ("card.rejected", "unreadable"),
        ("member.identified", None),
        ("card.rejected", "unreadable"),
    ]
    wide = GOLD_CARD.translate({ord(c): 0xFF10 + int(c) for c in "0123456789"})
    with lane.client() as http:
        keyed = {
            GOLD_CARD: "identified",
            GOLD_CARD.replace(" ", "-"): "identified",
            wide: "identified",
            VIP_CARD.replace(" ", ""): "identified",
            LOST_CARD: "lost",
            EXPIRED_CARD: "expired",
            CANCELLED_CARD: "cancelled",
            REPLACED_CARD: "replaced",
            NEW_CARD: "not_yet_valid",
            UNKNOWN_CARD: "unknown",
            BANK_CARD: "unknown",
            PHONES[0]: "unknown",  # the customer gave a phone number and the cashier typed it
            IDS[0]: "unknown",
            "6200 12?? 5678 0001": "unreadable",
        }
        for code, expected in keyed.items():
            answer = http.post("/v1/identify", json={"code": code})
            assert answer.status_code == 200, answer.text
            assert answer.json().get("reason", "identified") == expected, (code, answer.json())
        assert http.post("/v1/identify", json={"code": "M000123", "kind": "member_id"}).json()["result"] == "identified"
        assert http.post("/v1/identify", json={"code": GOLD_CARD * 9}).status_code == 422  # too long
        assert http.post("/v1/identify", json={"code": PHONES[1], "kind": "phone"}).status_code == 422

        # Sales: a member's with product barcodes, a guest's, a rebate tender, a replay, and errors.
        sale = {"sale_id": "20261202-L03-000001", "member_id": "M000123", "lines": lines_of(*SKUS)}
        sale["tenders"] = [{"kind": "cash", "amount": priced(http, sale)}]
        assert http.post("/v1/sales", json=sale).status_code == 200
        assert http.post("/v1/sales", json=sale).headers["idempotent-replay"] == "true"
        conflict = {**sale, "tenders": [{"kind": "cash", "amount": "1.00"}]}
        assert http.post("/v1/sales", json=conflict).status_code == 409
        guest = basket(sale_id="20261202-L03-000002")
        guest["tenders"] = [{"kind": "cash", "amount": priced(http, guest)}]
        assert http.post("/v1/sales", json=guest).status_code == 200
        rebate = basket(sale_id="POS3-1764681234567015", member_id="M000123")
        net = int(priced(http, rebate).replace(".", ""))
        rebate["tenders"] = [
            {"kind": "rebate", "amount": "20.00"},
            {"kind": "cash", "amount": f"{(net - 2000) / 100:.2f}"},
        ]
        assert http.post("/v1/sales", json=rebate).status_code == 200, rebate
        short = {**basket(sale_id="20261202-L03-000004"), "tenders": [{"kind": "cash", "amount": "0.01"}]}
        assert http.post("/v1/sales", json=short).status_code == 422
        assert http.post("/v1/sales", json={**guest, "sale_id": "x-1", "member_id": "M999"}).status_code == 422
        assert (
            http.post("/v1/sales", content=b"{not json", headers={"Content-Type": "application/json"}).status_code
            == 400
        )
        # A return of one line, then the rebate sale voided.
        back = {"return_id": "R-20261202-0001", "sale_id": sale["sale_id"], "member_id": "M000123"}
        back["lines"] = [{"line_id": "2", "qty": "1"}]
        assert http.post("/v1/returns", json=back).status_code == 200
        assert http.post("/v1/returns", json={**back, "return_id": "R-2", "member_id": None}).status_code == 422
        void = http.post(f"/v1/sales/{rebate['sale_id']}/void", json={"reason": "customer changed mind"})
        assert void.status_code == 200, void.text
        assert http.post("/v1/sales/never-sold/void", json={}).status_code == 404


@pytest.fixture(scope="module")
def lived(tmp_path_factory: pytest.TempPathFactory) -> Lived:
    root = tmp_path_factory.mktemp("pii")
    msr, scanner = root / "msr.fifo", root / "scanner.fifo"
    os.mkfifo(msr)
    os.mkfifo(scanner)
    private = Ed25519PrivateKey.generate()
    qr_key = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    devices = (
        f'\n[[devices]]\nname = "msr"\ntype = "evdev_wedge"\npath = "{msr}"\nrole = "magstripe"\n'
        f'\n[[devices]]\nname = "scanner"\ntype = "evdev_wedge"\npath = "{scanner}"\nrole = "barcode"\n'
        f'member_prefixes = ["6200"]\nqr_keys = {{ hq1 = "hex:{public}" }}\n'
    )
    lane = Lane(root / "lane", extra_config=devices)
    known = root / "known.txt"
    known.write_text("# head office's values for the test members\n" + "\n".join(ALL_KNOWN) + "\n", encoding="utf-8")
    lane.import_members()
    lane.start()
    try:
        wait_connected(lane, 2)
        live_a_day(lane, msr, scanner, qr_key)
        assert lane.db is not None
        assert Path(f"{lane.db}-wal").stat().st_size > 0  # the day's commits are (also) in the WAL
        live = scan(
            "--db", lane.db, "--logs", lane.stderr_path, "--known", known, "--config", lane.config_path, "--json"
        )
    finally:
        assert lane.stop() == 0, lane.log()
    with sqlite3.connect(f"file:{lane.db}?mode=ro", uri=True) as conn:
        entries = conn.execute("SELECT count(*) FROM journal").fetchone()[0]
    return Lived(lane, known, live, entries)


def test_a_real_lane_keeps_no_personal_data(lived: Lived) -> None:
    # The day happened and was recorded: the scan had something to read.
    assert lived.journal_entries == 5  # three sales, a return, a void
    log = lived.lane.log()
    assert "member M000123 identified (source magstripe)" in log
    assert "card rejected (unknown, source manual)" in log
    for result in (
        lived.live_scan,
        scan(
            "--db",
            lived.db,
            "--logs",
            lived.lane.stderr_path,
            "--known",
            lived.known,
            "--config",
            lived.lane.config_path,
            "--json",
        ),
    ):
        assert result.code == 0, result.out + result.err
        doc = result.doc
        assert doc["clean"] is True
        assert doc["findings"] == []
        assert str(lived.db) in doc["scanned"]["files"]
        assert str(lived.lane.stderr_path) in doc["scanned"]["files"]
        assert doc["scanned"]["bytes"] > 100_000
    assert f"{lived.db}-wal" in lived.live_scan.doc["scanned"]["files"]


def test_the_sale_bodies_hold_what_looks_like_card_numbers_but_is_not(lived: Lived) -> None:
    """The false-positive guards are exercised: barcodes that pass Luhn, sale ids, timestamps, amounts in fen."""
    with sqlite3.connect(f"file:{lived.db}?mode=ro", uri=True) as conn:
        bodies = " ".join(row[0] for row in conn.execute("SELECT body FROM journal"))
    for sku in SKUS:
        assert luhn_valid(sku)
        assert ean_valid(sku)
        assert sku in bodies
    assert "20261202-L03-000001" in bodies
    assert "1764681234567015" in bodies
    assert luhn_valid("1764681234567015")
    assert "+08:00" in bodies  # timestamps
    assert '"unit_fen"' in bodies or '"net"' in bodies


# --- planted values are found ----------------------------------------------------------------------


def kinds(result: Scan) -> list[tuple[str, str, str]]:
    return [(f["kind"], f["masked"], f["source"]) for f in result.doc["findings"]]


def test_a_phone_number_in_a_journal_body(lived: Lived, tmp_path: Path) -> None:
    db, log = lived.copy(tmp_path / "copy")
    with sqlite3.connect(db) as conn:
        seq, body = conn.execute("SELECT seq, body FROM journal WHERE kind = 'void'").fetchone()
        entry = json.loads(body)
        entry["reason"] = f"customer changed mind, call back on {PLANTED_PHONE}"
        conn.execute("UPDATE journal SET body = ? WHERE seq = ?", (json.dumps(entry, ensure_ascii=False), seq))
    result = scan("--db", db, "--logs", log, "--known", lived.known, "--json")
    assert result.code == 1, result.err
    assert kinds(result) == [("phone", "139****4321", "sql")]
    (finding,) = result.doc["findings"]
    assert finding["where"] == f"table journal, column body, rowid {seq}"
    result.assert_masked(PLANTED_PHONE)
    text = scan("--db", db, "--known", lived.known)
    assert (text.code, text.out) == (1, f"{db}: table journal, column body, rowid {seq}: phone 139****4321\n")
    assert "1 finding(s)" in text.err


def test_an_id_number_in_a_log_line(lived: Lived, tmp_path: Path) -> None:
    db, log = lived.copy(tmp_path / "copy")
    lines = log.read_text(encoding="utf-8").count("\n")
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"INFO agent.service: the customer showed ID {PLANTED_ID} at the service desk\n")
    result = scan("--db", db, "--logs", log, "--known", lived.known, "--json")
    assert result.code == 1
    assert result.doc["findings"] == [
        {
            "file": str(log),
            "where": f"line {lines + 1}",
            "kind": "id",
            "masked": "510***********4563",
            "source": "log",
            "count": 1,
        }
    ]
    result.assert_masked(PLANTED_ID)


def test_an_id_number_with_a_wrong_check_character_or_date_is_not_one(tmp_path: Path) -> None:
    wrong = PLANTED_ID[:-1] + ("0" if PLANTED_ID[-1] != "0" else "1")
    log = tmp_path / "lane.log"
    log.write_text(f"INFO a: {wrong} and {resident_id('51010719771301456')} (month 13)\n", encoding="utf-8")
    result = scan("--logs", log, "--json")
    assert [f for f in result.doc["findings"] if f["kind"] == "id"] == []
    log.write_text(f"INFO a: {PLANTED_ID}\n", encoding="utf-8")
    assert kinds(scan("--logs", log, "--json")) == [("id", "510***********4563", "log")]


def test_a_card_number_with_spaces_in_a_table_cell(lived: Lived, tmp_path: Path) -> None:
    db, _ = lived.copy(tmp_path / "copy")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE sales SET member_id = ? WHERE sale_id = '20261202-L03-000002'", (PLANTED_CARD,))
    result = scan("--db", db, "--json")
    assert result.code == 1
    (finding,) = result.doc["findings"]
    assert (finding["kind"], finding["masked"], finding["source"]) == ("card", "6217 **** **** 1236", "sql")
    # sales is a WITHOUT ROWID table: its primary key names the row.
    assert finding["where"] == "table sales, column member_id, sale_id '20261202-L03-000002'"
    result.assert_masked(PLANTED_CARD)


def test_a_programme_card_without_a_luhn_digit_is_found_by_the_lanes_card_format(lived: Lived, tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    log.write_text(f"DEBUG drivers: read {LOST_CARD} raw\n", encoding="utf-8")  # not Luhn-valid
    assert not luhn_valid(digits_of(LOST_CARD))
    assert scan("--logs", log).code == 0  # by its form alone, it is no bank card
    by_config = scan("--logs", log, "--config", lived.lane.config_path)  # member_prefixes = ["6200"]
    assert (by_config.code, by_config.out) == (1, f"{log}: line 1: card 6200 **** **** 0002\n")
    assert scan("--logs", log, "--card-prefix", "6200", "--card-length", "16").code == 1
    assert scan("--logs", log, "--card-prefix", "6200", "--card-luhn").code == 0
    by_known = scan("--logs", log, "--known", lived.known)
    assert (by_known.code, by_known.out) == (1, f"{log}: line 1: card 6200 **** **** 0002\n")


def test_a_known_name_in_a_json_escaped_log_line(lived: Lived, tmp_path: Path) -> None:
    db, log = lived.copy(tmp_path / "copy")
    lines = log.read_text(encoding="utf-8").count("\n")
    record = {"ts": "2026-12-02T06:05:00.123Z", "level": "INFO", "logger": "agent.service", "msg": "会员 欧阳娜娜 到店"}
    escaped = json.dumps(record)  # ensure_ascii: \u6b27\u9633...
    assert "\\u6b27\\u9633" in escaped
    with log.open("a", encoding="utf-8") as handle:
        handle.write(escaped + "\n")
        handle.write(json.dumps({**record, "msg": "track1 LI/NA"}) + "\n")
        handle.write("INFO x: repr " + repr("张伟".encode()) + "\n")  # b'\xe5\xbc\xa0\xe4\xbc\x9f'
    result = scan("--db", db, "--logs", log, "--known", lived.known, "--json")
    assert result.code == 1
    assert [(f["where"], f["kind"], f["masked"]) for f in result.doc["findings"]] == [
        (f"line {lines + 1}", "name", "欧*"),
        (f"line {lines + 2}", "name", "L*"),
        (f"line {lines + 3}", "name", "张*"),
    ]
    result.assert_masked()


def test_a_deleted_row_lingers_in_a_free_page(lived: Lived, tmp_path: Path) -> None:
    db, _ = lived.copy(tmp_path / "copy")
    row = f"member 李娜 phone {PLANTED_PHONE} id {PLANTED_ID}"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA secure_delete = OFF")  # Debian's SQLite defaults to ON, which zeroes deleted cells
        conn.execute("CREATE TABLE scratch (t TEXT)")
        conn.executemany("INSERT INTO scratch VALUES (?)", [(f"{row} {'.' * 200} {i}",) for i in range(200)])
        conn.commit()
        conn.execute("DROP TABLE scratch")
        conn.commit()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    assert free > 0
    assert b"13987654321" in db.read_bytes()  # in the file, yet no query shows it
    assert scan("--db", db, "--json").doc["findings"] != []
    result = scan("--db", db, "--known", lived.known, "--json")
    assert result.code == 1
    found = {(f["kind"], f["masked"], f["source"]) for f in result.doc["findings"]}
    assert found == {("phone", "139****4321", "raw"), ("id", "510***********4563", "raw"), ("name", "李*", "raw")}
    for finding in result.doc["findings"]:
        assert finding["file"] == str(db)
        assert "a free page, not visible to SQL" in finding["where"]
        assert finding["count"] >= 200  # each row, and copies a page split left behind
    result.assert_masked(PLANTED_PHONE, PLANTED_ID)


def test_a_deleted_row_lingers_in_the_wal(lived: Lived, tmp_path: Path) -> None:
    db, _ = lived.copy(tmp_path / "copy")
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("CREATE TABLE scratch (t TEXT)")
        conn.execute("INSERT INTO scratch VALUES (?)", (f"card {PLANTED_CARD}",))
        conn.commit()
        conn.execute("DELETE FROM scratch")  # with secure_delete on (the default here): zeroed in a newer frame
        conn.commit()
        result = scan("--db", db, "--json")  # while the connection is open: the WAL is not checkpointed
    finally:
        conn.close()
    assert result.code == 1
    assert [(f["file"], f["kind"], f["masked"], f["source"]) for f in result.doc["findings"]] == [
        (f"{db}-wal", "card", "6217 **** **** 1236", "raw")
    ]
    assert "WAL frame" in result.doc["findings"][0]["where"]


def test_rotated_and_compressed_logs_and_directories(lived: Lived, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copyfile(lived.lane.stderr_path, logs / "lane-agent.log")
    text = lived.lane.stderr_path.read_bytes() + f"INFO x: 手机 {PLANTED_PHONE}\n".encode()
    with gzip.open(logs / "lane-agent.log.2.gz", "wb") as handle:
        handle.write(text)
    result = scan("--logs", logs, "--known", lived.known, "--json")
    assert result.code == 1
    lines = text.decode().count("\n")
    assert [(f["file"], f["where"], f["kind"]) for f in result.doc["findings"]] == [
        (str(logs / "lane-agent.log.2.gz"), f"line {lines}", "phone")
    ]
    clean = lived.lane.stderr_path.read_bytes()
    (logs / "lane-agent.log.3.gz").write_bytes(gzip.compress(clean)[:-20])  # rotated while being written
    truncated = scan("--logs", logs / "lane-agent.log.3.gz")
    assert truncated.code == 2
    assert "could not be read to its end" in truncated.err


# --- what is not personal data ---------------------------------------------------------------------


def test_barcodes_ids_timestamps_and_amounts_of_a_real_sale_body_are_not_reported(lived: Lived, tmp_path: Path) -> None:
    with sqlite3.connect(f"file:{lived.db}?mode=ro", uri=True) as conn:
        body = conn.execute("SELECT body FROM journal WHERE kind = 'sale' ORDER BY seq LIMIT 1").fetchone()[0]
    log = tmp_path / "bodies.log"
    noise = [
        body,
        json.dumps(json.loads(body)),  # escaped as ensure_ascii writes it
        "ts 1764681234567015 us, 1764681234567 ms, 1764681234 s, 20261202140500",
        "float 0.30000000000000004 and 2.3812345678901234e-05, amount 13812345.67",
        "uuid 3f2c1e7a-1d2b-4c3d-9e8f-438123456789 digest 6d1f3812345678904e0a9b2c3d4e5f6a7b8c9d0e",
        # Journal entry ids whose decimal-only groups read as a Luhn-valid card and a mobile number.
        "id e1f0c2a3-4730-4123-9464-1233abcd5678 id a1b2c3d4-e5f6-4a7b-8c9d-a13812345678",
        "EAN " + " ".join(SKUS) + " GTIN-14 16900000000028",
        "masked card **** **** **** 0001 and ************0001, track %B************0001^***?",
    ]
    log.write_text("\n".join(noise) + "\n", encoding="utf-8")
    result = scan("--logs", log)
    assert result.code == 0, result.out
    # The control: the same file with one real card number in it is not clean.
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"card {digits_of(PLANTED_CARD)}\n")
    assert luhn_valid("4730412394641233")
    assert scan("--logs", log).out == f"{log}: line {len(noise) + 1}: card 6217********1236\n"


# --- usage ------------------------------------------------------------------------------------------


def test_usage_errors_exit_2_with_a_clear_message(lived: Lived, tmp_path: Path) -> None:
    text = tmp_path / "not.db"
    text.write_text("hello", encoding="utf-8")
    bad_toml = tmp_path / "lane.toml"
    bad_toml.write_text("[store\n", encoding="utf-8")
    cases = {
        (): "nothing to scan",
        ("--db", tmp_path / "missing.db"): "no such file",
        ("--db", text): "not an SQLite database",
        ("--logs", tmp_path / "missing.log"): "no such file or directory",
        ("--db", lived.db, "--known", tmp_path / "missing.txt"): "--known",
        ("--logs", text, "--config", bad_toml): "not valid TOML",
        ("--db", lived.db, "--frobnicate"): "unrecognized arguments",
    }
    for args, message in cases.items():
        result = scan(*args)
        assert result.code == 2, (args, result.out, result.err)
        assert message in result.err, (args, result.err)
        assert result.out == ""


def test_the_config_names_the_database(lived: Lived) -> None:
    result = scan("--config", lived.lane.config_path, "--json")
    assert result.code == 0, result.err
    assert result.doc["scanned"]["files"][0] == str(lived.db)
