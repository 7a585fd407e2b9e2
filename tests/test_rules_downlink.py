"""Signed rulesets from head office to the lanes.

End to end: a real Mosquitto, real ``lane-agent run`` processes with sync on, and the real
``lane-hq rules keygen`` / ``lane-hq rules publish`` command line.  Then ``RulesKeeper`` on
its own, for what is slow or awkward through a process: the clock jumping, files on disk
after a stop at the wrong moment, ``rules.path`` edited after head office's ruleset.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from broker import Broker
from conftest import REPO_ROOT, RULES_888
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from lane_harness import Lane, basket

from agent.config import load_config
from agent.metrics import Metrics
from agent.ruleset import Ruleset, load_ruleset, parse_ruleset
from sync import rules_downlink, signing
from sync.rules_downlink import RulesKeeper

pytestmark = pytest.mark.timeout(180)

TOML = RULES_888.read_text(encoding="utf-8")
FILE_VERSION = "2026.11.1"
TOPIC = "retail/hq/rules"
UTC = dt.UTC


def variant(version: str, prefix: str) -> str:
    """The 888 mall's ruleset under another version, its tier discount under another rule id."""
    text = TOML.replace(f'version = "{FILE_VERSION}"', f'version = "{version}"', 1)
    text = text.replace('id = "tier-rate"', f'id = "{prefix}-tier-rate"', 1)
    assert text.count(version) == 1
    assert f"{prefix}-tier-rate" in text
    return text


# --- head office's command line --------------------------------------------------------------


def lane_hq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sync.hq.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )


class HeadOffice:
    """An hq.toml for publishing (broker, rules directory, signing key), and the key made by keygen."""

    def __init__(self, directory: Path, broker_port: int, *, key_id: str = "hq-test") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.library = directory / "library"
        self.library.mkdir()
        self.key_file = directory / "signing.pem"
        made = lane_hq("rules", "keygen", "--out", str(self.key_file), "--key-id", key_id)
        assert made.returncode == 0, made.stderr
        lines = dict(line.split(": ", 1) for line in made.stdout.splitlines())
        assert lines["key_id"] == key_id
        self.key_id = key_id
        self.public_key = lines["public_key"]
        assert self.public_key.startswith("hex:")
        assert len(self.public_key) == 4 + 64
        self.config = directory / "hq.toml"
        self.write_config(broker_port)

    def write_config(self, broker_port: int) -> None:
        self.config.write_text(
            f"[broker]\nport = {broker_port}\nconnect_timeout_seconds = 3\n\n"
            f'[rules]\ndirectory = "{self.library}"\nsigning_key_file = "{self.key_file}"\nkey_id = "{self.key_id}"\n',
            encoding="utf-8",
        )

    def private_key(self) -> Ed25519PrivateKey:
        key = serialization.load_pem_private_key(self.key_file.read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        return key

    def publish(self, text: str, *options: str, name: str = "ruleset.toml") -> subprocess.CompletedProcess[str]:
        path = self.directory / name
        path.write_text(text, encoding="utf-8")
        return lane_hq("rules", "publish", str(path), "--config", str(self.config), *options)


# --- raw MQTT, for what head office never sends -------------------------------------------------


def mqtt_publish(broker: Broker, payload: bytes, topic: str = TOPIC) -> None:
    async def run() -> None:
        async with aiomqtt.Client(broker.host, broker.port, identifier=f"test-{uuid.uuid4().hex[:8]}") as client:
            await client.publish(topic, payload, qos=1, retain=True)

    asyncio.run(run())


def mqtt_retained(broker: Broker, topic: str = TOPIC, timeout: float = 5.0) -> bytes | None:
    async def run() -> bytes | None:
        async with aiomqtt.Client(broker.host, broker.port, identifier=f"test-{uuid.uuid4().hex[:8]}") as client:
            await client.subscribe(topic, qos=1)
            try:
                async with asyncio.timeout(timeout):
                    async for message in client.messages:
                        payload = message.payload
                        return payload if isinstance(payload, bytes) else str(payload).encode()
            except TimeoutError:
                return None
        return None

    return asyncio.run(run())


# --- a lane -----------------------------------------------------------------------------------------


def sync_section(broker: Broker, rules_keys: dict[str, str]) -> str:
    keys = ", ".join(f'{key_id} = "{text}"' for key_id, text in rules_keys.items())
    return (
        f"\n[sync]\nenabled = true\nport = {broker.port}\nstate_interval_seconds = 1.0\n"
        f"reconnect_min_seconds = 0.1\nreconnect_max_seconds = 0.5\nrules_keys = {{ {keys} }}\n"
    )


def status(lane: Lane) -> dict[str, Any]:
    with lane.client() as http:
        answer = http.get("/v1/status")
    assert answer.status_code == 200, answer.text
    return answer.json()


def rules_of(lane: Lane) -> dict[str, Any]:
    return status(lane)["rules"]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def priced(lane: Lane) -> dict[str, Any]:
    with lane.client() as http:
        answer = http.post("/v1/price", json=basket(member_id="M000123"))
    assert answer.status_code == 200, answer.text
    return answer.json()


def rule_ids(document: dict[str, Any]) -> set[str]:
    return {d["rule"] for line in document["lines"] for d in line["discounts"]}


def sell(lane: Lane) -> str:
    sale_id = f"T03-{uuid.uuid4().hex[:10]}"
    with lane.client() as http:
        doc = basket(member_id="M000123")
        net = http.post("/v1/price", json=doc).json()["totals"]["net"]
        answer = http.post("/v1/sales", json={**doc, "sale_id": sale_id, "tenders": [{"kind": "cash", "amount": net}]})
    assert answer.status_code == 200, answer.text
    return sale_id


def journal_rules(lane: Lane) -> list[dict[str, Any]]:
    assert lane.db is not None
    with sqlite3.connect(f"file:{lane.db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT body FROM journal ORDER BY seq").fetchall()
    return [json.loads(body)["rules"] for (body,) in rows]


def metric(lane: Lane, name: str) -> float:
    with lane.client() as http:
        text = http.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, value = line.rsplit(" ", 1)
            if head == name or head.startswith(name + "{"):
                total += float(value)
    return total


def connected(lane: Lane) -> bool:
    return bool(status(lane)["sync"]["connected"])


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def hq(tmp_path: Path, broker: Broker) -> HeadOffice:
    return HeadOffice(tmp_path / "hq", broker.port)


@pytest.fixture
def lane(tmp_path: Path, broker: Broker, hq: HeadOffice) -> Iterator[Lane]:
    running = Lane(tmp_path / "lane", extra_config=sync_section(broker, {hq.key_id: hq.public_key}))
    running.import_members()
    running.start()
    wait_for("the lane connects", lambda: connected(running))
    yield running
    running.kill()


def published_now(hq: HeadOffice, lane: Lane, version: str, prefix: str) -> dict[str, Any]:
    done = hq.publish(variant(version, prefix))
    assert done.returncode == 0, done.stderr
    return wait_for(f"{version} in force", lambda: (r := rules_of(lane))["version"] == version and r)


# --- end to end ---------------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_only_its_owner_reads(hq: HeadOffice) -> None:
    assert stat.S_IMODE(hq.key_file.stat().st_mode) == 0o600
    raw = hq.private_key().public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert hq.public_key == "hex:" + raw.hex()
    again = lane_hq("rules", "keygen", "--out", str(hq.key_file))
    assert again.returncode == 78, "an existing key is never overwritten"
    assert hq.key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_a_ruleset_effective_now_prices_the_next_basket_and_is_journaled(hq: HeadOffice, lane: Lane) -> None:
    before = priced(lane)
    assert before["rules"]["version"] == FILE_VERSION
    assert "tier-rate" in rule_ids(before)
    sell(lane)
    assert rules_of(lane)["source"] == "file"

    done = hq.publish(variant("2026.12.1", "hq2"))
    assert done.returncode == 0, done.stderr
    assert "serial 1 " in done.stdout
    assert (hq.library / "888-mall-2026.12.1.toml").read_text(encoding="utf-8") == variant("2026.12.1", "hq2")

    rules = wait_for("the new ruleset in force", lambda: (r := rules_of(lane))["version"] == "2026.12.1" and r)
    assert rules["source"] == "head_office"
    assert rules["serial"] == 1
    assert rules["id"] == "888-mall"
    assert rules["digest"] == signing.toml_digest(variant("2026.12.1", "hq2"))
    assert rules["pending"] is None
    assert rules["last_rejected"] is None
    assert rules["previous"]["version"] == FILE_VERSION
    assert rules["previous"]["source"] == "file"

    after = priced(lane)
    assert after["rules"]["version"] == "2026.12.1"
    assert "hq2-tier-rate" in rule_ids(after)
    assert "tier-rate" not in rule_ids(after)
    sell(lane)
    versions = [entry["version"] for entry in journal_rules(lane)]
    assert versions == [FILE_VERSION, "2026.12.1"]
    assert metric(lane, "lane_rules_serial") == 1
    kept = lane.root / "rules" / "current.json"
    assert signing.decode_envelope(kept.read_bytes()).serial == 1

    # The next publication takes the next serial from the retained one, without --serial.
    second = hq.publish(variant("2026.12.2", "hq3"))
    assert second.returncode == 0, second.stderr
    assert "serial 2 " in second.stdout
    rules = wait_for("serial 2 in force", lambda: (r := rules_of(lane))["serial"] == 2 and r)
    assert rules["previous"]["serial"] == 1
    assert rules["previous"]["source"] == "head_office"
    assert signing.decode_envelope((lane.root / "rules" / "previous.json").read_bytes()).serial == 1


def test_a_ruleset_effective_in_three_seconds_switches_then(hq: HeadOffice, lane: Lane) -> None:
    published_now(hq, lane, "2026.12.1", "hq2")
    effective = dt.datetime.now(UTC).replace(microsecond=0) + dt.timedelta(seconds=4)
    done = hq.publish(variant("2026.12.2", "hq3"), "--effective-from", effective.isoformat())
    assert done.returncode == 0, done.stderr

    rules = wait_for("pending shown", lambda: (r := rules_of(lane))["pending"] and r)
    assert rules["version"] == "2026.12.1"
    assert rules["pending"]["version"] == "2026.12.2"
    assert rules["pending"]["serial"] == 2
    assert dt.datetime.fromisoformat(rules["pending"]["effective_from"]) == effective
    assert (lane.root / "rules" / "pending.json").exists()

    # Until then the lane prices with the ruleset in force.
    while dt.datetime.now(UTC) < effective - dt.timedelta(seconds=0.5):
        document = priced(lane)
        assert document["rules"]["version"] == "2026.12.1"
        assert "hq2-tier-rate" in rule_ids(document)
        time.sleep(0.2)

    switched = wait_for("the switch", lambda: (r := rules_of(lane))["version"] == "2026.12.2" and r, timeout=10)
    seen_at = dt.datetime.now(UTC)
    assert seen_at >= effective
    assert seen_at - effective < dt.timedelta(seconds=3)
    assert switched["pending"] is None
    assert switched["serial"] == 2
    assert switched["previous"]["version"] == "2026.12.1"
    assert switched["previous"]["serial"] == 1
    assert "hq3-tier-rate" in rule_ids(priced(lane))
    assert not (lane.root / "rules" / "pending.json").exists()
    assert signing.decode_envelope((lane.root / "rules" / "current.json").read_bytes()).serial == 2


def test_forged_and_replayed_rulesets_are_refused(hq: HeadOffice, lane: Lane, broker: Broker) -> None:
    published_now(hq, lane, "2026.12.1", "hq2")
    genuine_serial_1 = mqtt_retained(broker)
    assert genuine_serial_1 is not None
    published_now(hq, lane, "2026.12.2", "hq3")

    # Signed by someone else under head office's key id, with a higher serial.
    forged = signing.build_envelope(
        variant("2026.12.9", "evil"),
        version="2026.12.9",
        serial=99,
        effective_from=dt.datetime.now(UTC),
        key_id=hq.key_id,
        private_key=Ed25519PrivateKey.generate(),
    )
    mqtt_publish(broker, forged)
    rules = wait_for("the forgery refused", lambda: (r := rules_of(lane))["last_rejected"] and r)
    assert rules["last_rejected"]["code"] == "bad_signature"
    assert dt.datetime.fromisoformat(rules["last_rejected"]["at"]).tzinfo is not None
    assert rules["version"] == "2026.12.2"
    assert rules["serial"] == 2
    document = priced(lane)
    assert document["rules"]["version"] == "2026.12.2"
    assert "evil-tier-rate" not in rule_ids(document)
    assert metric(lane, 'lane_rules_rejected_total{code="bad_signature"}') == 1

    # Head office's own, genuine serial 1 again: an old signed ruleset replayed.
    mqtt_publish(broker, genuine_serial_1)
    wait_for("the replay refused", lambda: rules_of(lane)["last_rejected"]["code"] == "stale_serial")
    assert rules_of(lane)["serial"] == 2

    mqtt_publish(broker, b"\x00 not json")
    wait_for("garbage refused", lambda: rules_of(lane)["last_rejected"]["code"] == "bad_json")
    assert metric(lane, "lane_rules_rejected_total") == 3
    assert priced(lane)["rules"]["version"] == "2026.12.2"
    log = lane.log()
    assert "refused [bad_signature]" in log
    assert "evil-tier-rate" not in log, "no payload dump in the log"


def test_after_a_restart_the_kept_ruleset_is_still_in_force(hq: HeadOffice, lane: Lane) -> None:
    published_now(hq, lane, "2026.12.1", "hq2")
    kept = lane.root / "rules" / "current.json"
    written = kept.stat().st_mtime_ns
    assert lane.stop() == 0

    lane.start()
    rules = rules_of(lane)  # at once, before the broker has re-delivered anything
    assert rules["version"] == "2026.12.1"
    assert rules["source"] == "head_office"
    assert rules["serial"] == 1
    assert rules["previous"]["source"] == "file"
    assert "hq2-tier-rate" in rule_ids(priced(lane))
    assert "rules: head office's 888-mall 2026.12.1 (serial 1" in lane.log()

    # The retained envelope is delivered again on connecting: not a refusal, not written again.
    wait_for("the lane connects", lambda: connected(lane))
    time.sleep(1.0)
    assert rules_of(lane)["last_rejected"] is None
    assert metric(lane, "lane_rules_rejected_total") == 0
    assert kept.stat().st_mtime_ns == written


def test_publish_exit_codes(tmp_path: Path, hq: HeadOffice, broker: Broker) -> None:
    broken = hq.publish(TOML.replace('tiers = ["gold"]', 'tiers = ["platinum"]', 1))
    assert broken.returncode == 1
    assert "unknown_tier" in broken.stderr

    naive = hq.publish(TOML, "--effective-from", "2026-12-05T00:00:00")
    assert naive.returncode == 1
    assert "UTC offset" in naive.stderr

    assert hq.publish(TOML).returncode == 0
    # The same version with other content would make the audit re-price with the wrong text.
    other = hq.publish(TOML + "\n# changed\n")
    assert other.returncode == 1
    assert "already published with other content" in other.stderr
    behind = hq.publish(variant("2026.12.1", "hq2"), "--serial", "1")
    assert behind.returncode == 1
    assert "not above 1" in behind.stderr

    hq.config.write_text(hq.config.read_text().replace(f'signing_key_file = "{hq.key_file}"\n', ""))
    no_key = hq.publish(variant("2026.12.1", "hq2"))
    assert no_key.returncode == 78
    assert "signing_key_file" in no_key.stderr

    not_a_key = tmp_path / "not-a-key.pem"
    not_a_key.write_text("hello\n")
    hq.key_file = not_a_key
    hq.write_config(broker.port)
    assert hq.publish(variant("2026.12.1", "hq2")).returncode == 78

    hq.key_file = hq.directory / "signing.pem"
    closed = Broker(tmp_path / "closed")  # a port nobody listens on
    hq.write_config(closed.port)
    unreachable = hq.publish(variant("2026.12.1", "hq2"))
    assert unreachable.returncode == 3, unreachable.stderr
    assert "broker" in unreachable.stderr

    assert mqtt_retained(broker) is not None
    assert signing.decode_envelope(mqtt_retained(broker) or b"").version == FILE_VERSION


# --- RulesKeeper on its own ------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


class Keeper:
    """A RulesKeeper over a lane.toml in ``directory``, with a settable clock and the rulesets it switched to."""

    def __init__(self, directory: Path, keys: dict[str, str], clock: Clock) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.rules_path = directory / "rules.toml"
        if not self.rules_path.exists():
            self.rules_path.write_text(TOML, encoding="utf-8")
        config_path = directory / "lane.toml"
        entries = ", ".join(f'{k} = "{v}"' for k, v in keys.items())
        config_path.write_text(
            '[lane]\nstore = "s1"\nlane = "l1"\n\n[api]\ntoken = "test-token-0123456789-abcdefghij"\n\n'
            f'[store]\npath = "{directory / "lane.db"}"\ncard_hash_key = "hex:{"00" * 32}"\n\n'
            f'[rules]\npath = "{self.rules_path}"\n\n[sync]\nrules_keys = {{ {entries} }}\n',
            encoding="utf-8",
        )
        self.metrics = Metrics()
        self.switched: list[Ruleset] = []
        self.switch_seen = asyncio.Event()
        self.state = directory / "rules"
        self.keeper = RulesKeeper(load_config(config_path), self.metrics, self.state, self._switched, clock=clock)

    def _switched(self, ruleset: Ruleset) -> None:
        self.switched.append(ruleset)
        self.switch_seen.set()

    def load(self) -> Ruleset:
        return self.keeper.load(load_ruleset(self.rules_path))

    def rejected(self, code: str) -> float:
        return self.metrics.rules_rejected.labels(code)._value.get()


KEY = Ed25519PrivateKey.generate()
KEYS = {"hq": signing.public_key_text(KEY.public_key())}
T0 = dt.datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def signed(version: str, serial: int, effective: dt.datetime, prefix: str = "x") -> bytes:
    return signing.build_envelope(
        variant(version, prefix), version=version, serial=serial, effective_from=effective, key_id="hq", private_key=KEY
    )


def test_keeper_switch_previous_pending_and_status(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = Clock(T0)
        k = Keeper(tmp_path, KEYS, clock)
        assert k.load().version == FILE_VERSION
        assert k.keeper.status()["source"] == "file"
        await k.keeper.on_message(signed("2026.12.1", 1, T0))
        assert [r.version for r in k.switched] == ["2026.12.1"]
        assert k.keeper.previous is not None
        assert k.keeper.previous.source == "file"
        await k.keeper.on_message(signed("2026.12.2", 2, T0 + dt.timedelta(days=1)))
        status = k.keeper.status()
        assert (status["version"], status["pending"]["version"], status["pending"]["serial"]) == (
            "2026.12.1",
            "2026.12.2",
            2,
        )
        # A newer pending replaces the older one (head office's retained topic holds only the newest).
        await k.keeper.on_message(signed("2026.12.3", 3, T0 + dt.timedelta(days=2)))
        assert k.keeper.status()["pending"]["serial"] == 3
        # Serial 2 again is a replay now, however genuine.
        await k.keeper.on_message(signed("2026.12.2", 2, T0 + dt.timedelta(days=1)))
        assert k.keeper.status()["last_rejected"]["code"] == "stale_serial"
        assert k.rejected("stale_serial") == 1
        # Effective now with a higher serial: taken at once, the pending one dropped.
        await k.keeper.on_message(signed("2026.12.4", 4, T0))
        status = k.keeper.status()
        assert (status["version"], status["serial"], status["pending"]) == ("2026.12.4", 4, None)
        assert status["previous"]["serial"] == 1
        assert not (k.state / "pending.json").exists()

    asyncio.run(scenario())


def test_keeper_redelivery_is_neither_an_error_nor_a_write(tmp_path: Path) -> None:
    async def scenario() -> None:
        k = Keeper(tmp_path, KEYS, Clock(T0))
        k.load()
        payload = signed("2026.12.1", 1, T0)
        await k.keeper.on_message(payload)
        kept = k.state / "current.json"
        before = kept.stat()
        for _ in range(3):
            await k.keeper.on_message(payload)
        after = kept.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert k.keeper.status()["last_rejected"] is None
        assert len(k.switched) == 1
        assert sum(k.rejected(code) for code in signing.REFUSAL_CODES) == 0

    asyncio.run(scenario())


def test_keeper_without_keys_refuses_everything_as_unknown_key(tmp_path: Path) -> None:
    async def scenario() -> None:
        k = Keeper(tmp_path, {}, Clock(T0))
        k.load()
        await k.keeper.on_message(signed("2026.12.1", 1, T0))
        assert k.keeper.status()["last_rejected"]["code"] == "unknown_key"
        assert k.keeper.status()["source"] == "file"
        assert not (k.state / "current.json").exists()
        assert k.switched == []

    asyncio.run(scenario())


def test_keeper_switches_after_a_clock_jump_without_being_woken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rules_downlink, "RECHECK_SECONDS", 0.1)

    async def scenario() -> None:
        clock = Clock(T0)
        k = Keeper(tmp_path, KEYS, clock)
        k.load()
        await k.keeper.on_message(signed("2026.12.1", 1, T0 + dt.timedelta(hours=6)))
        task = asyncio.create_task(k.keeper.run())
        try:
            await asyncio.sleep(0.3)
            assert k.switched == [], "not before its time"
            clock.now = T0 + dt.timedelta(hours=7)  # the wall clock corrected forward: no message, no wake-up
            async with asyncio.timeout(5):
                await k.switch_seen.wait()
            assert k.switched[0].version == "2026.12.1"
            assert k.keeper.status()["pending"] is None
        finally:
            task.cancel()

    asyncio.run(scenario())


def test_keeper_at_start_up(tmp_path: Path) -> None:
    async def scenario() -> None:
        first = Keeper(tmp_path, KEYS, Clock(T0))
        first.load()
        await first.keeper.on_message(signed("2026.12.1", 1, T0))
        await first.keeper.on_message(signed("2026.12.2", 2, T0 + dt.timedelta(hours=1)))

    asyncio.run(scenario())

    # Stopped before the pending one's time, started after it: it is in force, the other previous.
    later = Keeper(tmp_path, KEYS, Clock(T0 + dt.timedelta(hours=2)))
    assert later.load().version == "2026.12.2"
    status = later.keeper.status()
    assert (status["source"], status["serial"], status["pending"]) == ("head_office", 2, None)
    assert status["previous"]["serial"] == 1
    assert not (later.state / "pending.json").exists()

    # rules.path edited after head office's ruleset took effect here: the file wins, and says why.
    future = max(time.time(), (T0 + dt.timedelta(hours=3)).timestamp()) + 3600
    os.utime(later.rules_path, (future, future))
    edited = Keeper(tmp_path, KEYS, Clock(T0 + dt.timedelta(hours=2)))
    assert edited.load().version == FILE_VERSION
    status = edited.keeper.status()
    assert (status["source"], status["previous"]["serial"]) == ("file", 2)

    async def redelivered() -> None:
        # The retained serial 2 again does not undo that; a newer serial does.
        await edited.keeper.on_message(signed("2026.12.2", 2, T0 + dt.timedelta(hours=1)))
        assert edited.keeper.status()["source"] == "file"
        assert edited.keeper.status()["last_rejected"] is None
        await edited.keeper.on_message(signed("2026.12.5", 5, T0))
        assert edited.keeper.status()["version"] == "2026.12.5"

    asyncio.run(redelivered())

    # A key withdrawn from lane.toml withdraws what it signed: refused at start-up, rules.path in force.
    other = {"hq-new": signing.public_key_text(Ed25519PrivateKey.generate().public_key())}
    withdrawn = Keeper(tmp_path, other, Clock(T0 + dt.timedelta(hours=2)))
    assert withdrawn.load().version == FILE_VERSION
    assert withdrawn.keeper.status()["last_rejected"]["code"] == "unknown_key"
    assert withdrawn.rejected("unknown_key") >= 1


def test_keeper_ignores_a_pending_file_left_by_a_stop_between_writes(tmp_path: Path) -> None:
    async def scenario() -> None:
        k = Keeper(tmp_path, KEYS, Clock(T0))
        k.load()
        await k.keeper.on_message(signed("2026.12.1", 1, T0))

    asyncio.run(scenario())
    state = tmp_path / "rules"
    (state / "pending.json").write_bytes((state / "current.json").read_bytes())  # promoted, not yet unlinked
    again = Keeper(tmp_path, KEYS, Clock(T0))
    assert again.load().version == "2026.12.1"
    assert again.keeper.status()["pending"] is None
    assert not (state / "pending.json").exists()


def test_the_kept_files_are_what_the_lane_verifies(tmp_path: Path) -> None:
    """A kept file altered on disk is refused at start-up like a message (digest_mismatch here)."""

    async def scenario() -> None:
        k = Keeper(tmp_path, KEYS, Clock(T0))
        k.load()
        await k.keeper.on_message(signed("2026.12.1", 1, T0))

    asyncio.run(scenario())
    kept = tmp_path / "rules" / "current.json"
    doc = json.loads(kept.read_bytes())
    doc["toml"] = doc["toml"].replace(
        'rates = { vip = "0.90", gold = "0.88" }', 'rates = { vip = "0.10", gold = "0.10" }'
    )
    kept.write_text(json.dumps(doc), encoding="utf-8")
    again = Keeper(tmp_path, KEYS, Clock(T0))
    assert again.load().version == FILE_VERSION
    assert again.keeper.status()["last_rejected"]["code"] == "digest_mismatch"
    assert parse_ruleset(doc["toml"]).version == "2026.12.1"  # it would compile: only the signature stops it


def test_the_audit_library_finds_a_version_published_while_head_office_runs(tmp_path: Path) -> None:
    from sync.hq.audit import RulesetLibrary  # noqa: PLC0415 - head office's side, only here

    directory = tmp_path / "library"
    directory.mkdir()
    (directory / "888-mall.toml").write_text(TOML, encoding="utf-8")
    library = RulesetLibrary.load(directory)
    assert len(library) == 1
    assert library.find("888-mall", "2026.12.1") is None
    text = variant("2026.12.1", "hq2")
    (directory / "888-mall-2026.12.1.toml").write_text(text, encoding="utf-8")  # as `rules publish` copies it
    found = library.find("888-mall", "2026.12.1", signing.toml_digest(text))
    assert found is not None
    assert found.version == "2026.12.1"
    assert library.find("888-mall", "2026.12.1", "0" * 64) is None  # another text of that version: not it
    (directory / "broken.toml").write_text("[ruleset\n", encoding="utf-8")
    assert library.find("888-mall", "2099.1") is None  # a broken file is skipped, as it would fail start-up
    assert len(library) == 2
