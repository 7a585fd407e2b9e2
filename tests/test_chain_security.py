"""A chain's security set-up end to end: the shipped broker config, the ``lane-hq certs`` PKI, HTTPS.

A real Mosquitto runs the shipped ``config/mosquitto/chain.conf`` (only paths
and the port changed for the test) with an ACL that ``lane-hq certs issue
--acl`` wrote into a copy of ``config/mosquitto/acl.example``; every
certificate comes from the real ``lane-hq certs`` commands.  A real lane and a
real head office (TLS to the broker, HTTPS for its API) show that a lane's
certificate reaches only its own topics (not head office's), that head office dead-letters a
batch whose body names another lane than its topic, that a lane enrolled
while the broker runs is let in by a SIGHUP, that a client without a
certificate or with another CA's cannot connect, and that the API answers
only a client that trusts the chain CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import ssl
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import httpx
import pytest
from broker import Broker
from conftest import REPO_ROOT
from hq_harness import Hq, HqReader
from lane_harness import Lane
from test_sync_e2e import LANE, STORE, lane_epoch, raw_entries, sell, sync_section, wait_drained, wait_for

from sync import wire
from sync.hq import cli as hq_cli
from sync.hq.certs import lane_stanza, replace_stanza
from sync.lane_auth import lane_token

pytestmark = pytest.mark.timeout(120)

CHAIN_CONF = REPO_ROOT / "config" / "mosquitto" / "chain.conf"
ACL_EXAMPLE = REPO_ROOT / "config" / "mosquitto" / "acl.example"
LANE_USER = f"lane-{STORE}-{LANE}"
LATE_LANE = "lane-05"  # enrolled while the broker runs


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


def lane_hq(*args: str) -> Ran:
    """``lane-hq ARGS`` in this process (the console script's own ``main``): a second each saved, ~20 calls."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = hq_cli.main(list(args))
    return Ran(code, out.getvalue(), err.getvalue())


def lane_hq_process(*args: str) -> Ran:
    """``lane-hq ARGS`` as its own process, for ``run``."""
    result = subprocess.run(
        [sys.executable, "-m", "sync.hq.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Ran(result.returncode, result.stdout, result.stderr)


def ok(*args: str) -> str:
    result = lane_hq(*args)
    assert result.returncode == 0, f"lane-hq {' '.join(args)}: {result.returncode} {result.stderr}"
    return result.stdout


@dataclass(frozen=True)
class Pki:
    root: Path
    ca: Path
    acl: Path

    def cert(self, user: str, directory: str = "lanes") -> tuple[Path, Path]:
        return self.root / directory / f"{user}.pem", self.root / directory / f"{user}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The chain CA, the broker's, head office's and its API's certificates, lane 03's with its ACL stanza."""
    root = tmp_path_factory.mktemp("chain")
    ca, acl = root / "ca", root / "lane-acl"
    acl.write_text(ACL_EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    acl.chmod(0o640)
    ok("certs", "init-ca", str(ca))
    ok("certs", "issue-broker", str(ca), "--host", "127.0.0.1", "--host", "localhost")
    ok("certs", "issue-hq", "--ca", str(ca), "--out", str(root / "hq"))
    ok("certs", "issue-broker", str(ca), "--host", "127.0.0.1", "--out", str(root / "hq"), "--name", "api")
    ok("certs", "issue", STORE, LANE, "--ca", str(ca), "--out", str(root / "lanes"), "--acl", str(acl))
    # The same CN from another CA: a stranger's certificate.
    ok("certs", "init-ca", str(root / "other-ca"), "--name", "somebody else's CA")
    ok("certs", "issue", STORE, LANE, "--ca", str(root / "other-ca"), "--out", str(root / "stranger"))
    return Pki(root, ca, acl)


def chain_broker_config(pki: Pki, broker: Broker) -> str:
    """The shipped chain.conf with this test's paths and port; every other line as shipped."""
    paths = {
        "listener": f"{broker.port} 127.0.0.1",
        "cafile": str(pki.ca / "ca.pem"),
        "certfile": str(pki.ca / "broker.pem"),
        "keyfile": str(pki.ca / "broker.key"),
        "acl_file": str(pki.acl),
        "persistence_location": f"{broker.directory}/",
        "log_dest": f"file {broker.log}",
        "pid_file": str(broker.directory / "mosquitto.pid"),
    }
    seen = dict.fromkeys(paths, 0)
    lines = []
    for line in CHAIN_CONF.read_text(encoding="utf-8").splitlines():
        key = line.split(" ", 1)[0]
        if key in paths:
            seen[key] += 1
            line = f"{key} {paths[key]}"  # noqa: PLW2901
        lines.append(line)
    assert seen == dict.fromkeys(paths, 1), f"chain.conf should set each of these once: {seen}"
    # Root here (../shared/REAL_COMPONENTS.md); debug logs the publishes the ACL denies.
    return "\n".join([*lines, "user root", "log_type debug", ""])


@pytest.fixture
def chain_broker(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    broker = Broker(tmp_path / "broker")
    broker.config.write_text(chain_broker_config(pki, broker), encoding="utf-8")
    with broker:
        yield broker


class HttpsHq(Hq):
    """``lane-hq run`` with TLS to the broker and its API on HTTPS, trusted through the chain CA."""

    def __init__(self, directory: Path, pki: Pki, *, broker_port: int, db_url: str) -> None:
        super().__init__(directory, broker_port=broker_port, db_url=db_url, client_id="hq")
        self.ca_file = pki.ca / "ca.pem"
        hq = pki.root / "hq"
        broker_keys = {"tls_ca_file": self.ca_file, "tls_cert_file": hq / "hq.pem", "tls_key_file": hq / "hq.key"}
        api_keys = {"tls_cert_file": hq / "api.pem", "tls_key_file": hq / "api.key"}

        def lines(keys: dict[str, Path]) -> str:
            return "".join(f"{key} = {json.dumps(str(value))}\n" for key, value in keys.items())

        text = self.config.read_text(encoding="utf-8")
        text = text.replace("[broker]\n", "[broker]\n" + lines(broker_keys)).replace(
            "[api]\n", "[api]\n" + lines(api_keys)
        )
        self.config.write_text(text, encoding="utf-8")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=ssl.create_default_context(cafile=self.ca_file), timeout=5)

    def start(self, timeout: float = 30.0) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sync.hq.cli", "run", "--config", str(self.config)],
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        with self.http() as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"lane-hq exited with {self.process.returncode}: {self.tail()}")
                try:
                    if "hq_broker_connected 1.0" in http.get("/metrics").text:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"lane-hq did not connect over TLS within {timeout} s: {self.tail()}")


def mqtt_tls(pki: Pki, cert: tuple[Path, Path] | None) -> aiomqtt.TLSParameters:
    if cert is None:
        return aiomqtt.TLSParameters(ca_certs=str(pki.ca / "ca.pem"))
    return aiomqtt.TLSParameters(ca_certs=str(pki.ca / "ca.pem"), certfile=str(cert[0]), keyfile=str(cert[1]))


def publish_as(
    broker: Broker,
    pki: Pki,
    cert: tuple[Path, Path],
    identifier: str,
    messages: list[tuple[str, bytes]],
    *,
    retain: bool = False,
) -> None:
    async def run() -> None:
        tls = mqtt_tls(pki, cert)
        async with aiomqtt.Client(broker.host, broker.port, identifier=identifier, tls_params=tls, timeout=5) as client:
            for topic, payload in messages:
                await client.publish(topic, payload, qos=1, retain=retain)

    asyncio.run(run())


def retained_as(broker: Broker, pki: Pki, cert: tuple[Path, Path], identifier: str, topic: str) -> bytes | None:
    async def run() -> bytes | None:
        tls = mqtt_tls(pki, cert)
        async with aiomqtt.Client(broker.host, broker.port, identifier=identifier, tls_params=tls, timeout=5) as client:
            await client.subscribe(topic, qos=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    async for message in client.messages:
                        return message.payload if isinstance(message.payload, bytes) else None
        return None

    return asyncio.run(run())


def connect_as(broker: Broker, pki: Pki, cert: tuple[Path, Path] | None, identifier: str) -> None:
    async def run() -> None:
        tls = mqtt_tls(pki, cert)
        async with aiomqtt.Client(broker.host, broker.port, identifier=identifier, tls_params=tls, timeout=3):
            pass

    asyncio.run(run())


def entry_of(template: wire.RawEntry, lane: str, seq: int = 1) -> wire.RawEntry:
    """An honest-looking entry of ``lane``: what head office would apply if it reached it."""
    body = template.body.replace(LANE, lane)
    return wire.RawEntry(seq, str(uuid.uuid4()), template.kind, template.at, template.rules_version, 0, body)


def journal_count(reader: HqReader, lane: str) -> int:
    return int(reader.scalar("SELECT count(*) FROM journal_entries WHERE store = :s AND lane = :l", s=STORE, l=lane))


def broker_log(broker: Broker) -> str:
    return broker.log.read_text(encoding="utf-8", errors="replace").lower()


# --- the ACL file that `certs issue --acl` maintains ------------------------------------------------


def test_certs_issue_twice_leaves_one_stanza_and_replaces_a_hand_edited_one(pki: Pki, tmp_path: Path) -> None:
    acl = tmp_path / "lane-acl"
    acl.write_text(ACL_EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    out = str(tmp_path / "lanes")

    def issue(store: str, lane: str) -> str:
        return ok("certs", "issue", store, lane, "--ca", str(pki.ca), "--out", out, "--acl", str(acl))

    assert f"stanza of {LANE_USER} added" in issue(STORE, LANE)
    once = acl.read_text(encoding="utf-8")
    assert "unchanged" in issue(STORE, LANE)
    assert acl.read_text(encoding="utf-8") == once
    assert once.count(f"user {LANE_USER}\n") == 1
    # The example's lane stanza is exactly what the command writes.
    assert "stanza of lane-store-0001-lane-01 unchanged" in issue("store-0001", "lane-01")

    # A stanza widened by hand is put back to the lane's own topics, in one piece, the rest untouched.
    acl.write_text(once.replace(f"user {LANE_USER}\n", f"user {LANE_USER}\ntopic readwrite retail/#\n"))
    printed = issue(STORE, LANE)
    assert "replaced" in printed
    assert "reload the broker" in printed
    again = acl.read_text(encoding="utf-8")
    assert again.count(f"user {LANE_USER}\n") == 1
    assert "retail/#" not in again
    assert again.split("user hq\n")[1].startswith("topic read retail/+/+/journal\n")
    key = Path(out) / f"{LANE_USER}.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((pki.ca / "ca.key").stat().st_mode) == 0o600
    assert "expires" in printed


def test_a_stanza_is_replaced_in_place_up_to_the_next_user_and_a_duplicate_goes() -> None:
    text = (
        "# lane-hq certs issue: lane-s-l\nuser lane-s-l\ntopic write x\n\n# head office\nuser hq\ntopic read y\n"
        "user lane-s-l\ntopic read z\n"
    )
    result = replace_stanza(text, "lane-s-l", lane_stanza("s", "l"))
    assert result == lane_stanza("s", "l") + "\n# head office\nuser hq\ntopic read y\n"
    assert replace_stanza(result, "lane-s-l", lane_stanza("s", "l")) == result
    assert replace_stanza("", "lane-s-l", lane_stanza("s", "l")) == lane_stanza("s", "l")


def test_bad_ids_an_existing_ca_and_a_missing_ca_are_refused(pki: Pki, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    for store, lane in (("hq", LANE), ("store/1", LANE), (STORE, "lane 3"), (STORE, "x" * 33)):
        result = lane_hq("certs", "issue", store, lane, "--ca", str(pki.ca), "--out", out)
        assert result.returncode == 2, result
        assert "invalid" in result.stderr
    assert not Path(out).exists()
    again = lane_hq("certs", "init-ca", str(pki.ca))
    assert again.returncode == 1
    assert "refusing" in again.stderr
    missing = lane_hq("certs", "issue", STORE, LANE, "--ca", str(tmp_path / "none"), "--out", out)
    assert missing.returncode == 1
    assert "init-ca" in missing.stderr
    bad_host = lane_hq("certs", "issue-broker", str(pki.ca), "--host", "not a host")
    assert bad_host.returncode == 1


def test_lanes_token_prints_the_lanes_api_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "hq.toml"
    config.write_text('[lanes]\nauth_secret_env = "TEST_LANES_SECRET"\n', encoding="utf-8")
    secret = "s3cret-of-the-chain-0123456789"
    monkeypatch.setenv("TEST_LANES_SECRET", secret)
    result = lane_hq("lanes", "token", STORE, LANE, "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == lane_token(secret.encode(), STORE, LANE)
    assert result.stdout.strip() != lane_token(secret.encode(), STORE, "lane-04")

    monkeypatch.setenv("TEST_LANES_SECRET", "")
    unset = lane_hq("lanes", "token", STORE, LANE, "--config", str(config))
    assert unset.returncode == 78
    assert unset.stdout == ""
    config.write_text("[api]\nport = 8780\n", encoding="utf-8")
    none = lane_hq("lanes", "token", STORE, LANE, "--config", str(config))
    assert none.returncode == 78
    assert "auth_secret" in none.stderr
    assert lane_hq("lanes", "token", "hq", LANE, "--config", str(config)).returncode == 2


# --- the broker, head office and a lane ------------------------------------------------------------


def test_a_lanes_certificate_reaches_only_its_own_topics_and_strangers_do_not_connect(
    tmp_path: Path, pki: Pki, chain_broker: Broker
) -> None:
    db_url = f"sqlite:///{tmp_path / 'hq.db'}"
    hq = HttpsHq(tmp_path / "hq", pki, broker_port=chain_broker.port, db_url=db_url)
    ca_file, (cert_file, key_file) = pki.root / "lanes" / "ca.pem", pki.cert(LANE_USER)
    tls = {"tls_ca_file": str(ca_file), "tls_cert_file": str(cert_file), "tls_key_file": str(key_file)}
    lane = Lane(tmp_path / "lane", extra_config=sync_section(chain_broker, **tls))
    lane.import_members()
    reader = HqReader(db_url)
    try:
        hq.start()
        lane.start()
        with lane.client() as client:
            sell(client, "OWN-1")
            wait_drained(lane)
        assert journal_count(reader, LANE) == 1  # the lane's own sale arrives over mutual TLS

        # (a) Lane 03's certificate writing into lane 04's journal, then (b) on its own topic a batch whose
        # body names lane 04.  The broker handles one connection's publishes in order: once (b) is dead-
        # lettered, (a) has been dealt with too.
        template = raw_entries(lane)[0]
        into_other = wire.encode_batch(STORE, "lane-04", "cd" * 16, [entry_of(template, "lane-04")])
        body_mismatch = wire.encode_batch(STORE, "lane-04", lane_epoch(lane), [entry_of(template, "lane-04")])
        publish_as(
            chain_broker,
            pki,
            pki.cert(LANE_USER),
            "forger",
            [
                (wire.lane_topic("retail", STORE, "lane-04", "journal"), into_other),
                (wire.lane_topic("retail", STORE, LANE, "journal"), body_mismatch),
            ],
        )
        wait_for("the mismatched batch dead-lettered", lambda: reader.scalar("SELECT count(*) FROM dead_letters") == 1)
        dead = reader.rows("SELECT code, topic FROM dead_letters")
        assert [tuple(row) for row in dead] == [("lane_mismatch", wire.lane_topic("retail", STORE, LANE, "journal"))]
        time.sleep(0.5)
        assert journal_count(reader, "lane-04") == 0
        assert reader.scalar("SELECT count(*) FROM journal_entries") == 1
        assert "denied publish from forger" in broker_log(chain_broker)

        # Head office's own topics: a lane may not write them; head office writes and reads back (rules publish).
        hq_probe = wire.hq_topic("retail", "rules")
        publish_as(chain_broker, pki, pki.cert(LANE_USER), "forger-hq", [(hq_probe, b"from a lane")], retain=True)
        wait_for("the lane's publish denied", lambda: "denied publish from forger-hq" in broker_log(chain_broker))
        assert retained_as(chain_broker, pki, pki.cert("hq", "hq"), "hq-reader", hq_probe) is None
        publish_as(chain_broker, pki, pki.cert("hq", "hq"), "hq-writer", [(hq_probe, b"from head office")], retain=True)
        assert retained_as(chain_broker, pki, pki.cert("hq", "hq"), "hq-reader", hq_probe) == b"from head office"

        # A lane enrolled while the broker runs: nothing until the broker re-reads its ACL, then its own topics.
        late_user = f"lane-{STORE}-{LATE_LANE}"
        ok(
            "certs",
            "issue",
            STORE,
            LATE_LANE,
            "--ca",
            str(pki.ca),
            "--out",
            str(tmp_path / "late"),
            "--acl",
            str(pki.acl),
        )
        late_cert = (tmp_path / "late" / f"{late_user}.pem", tmp_path / "late" / f"{late_user}.key")
        late_topic = wire.lane_topic("retail", STORE, LATE_LANE, "journal")
        late_batch = wire.encode_batch(STORE, LATE_LANE, "ef" * 16, [entry_of(template, LATE_LANE)])
        publish_as(chain_broker, pki, late_cert, "late-before", [(late_topic, late_batch)])
        wait_for("the broker to deny it", lambda: "denied publish from late-before" in broker_log(chain_broker))
        assert chain_broker.process is not None
        chain_broker.process.send_signal(signal.SIGHUP)
        wait_for("the broker to reload", lambda: "reloading config" in broker_log(chain_broker))
        publish_as(chain_broker, pki, late_cert, "late-after", [(late_topic, late_batch)])
        wait_for("the late lane's entry applied", lambda: journal_count(reader, LATE_LANE) == 1)
        assert "denied publish from late-after" not in broker_log(chain_broker)

        # (c) No certificate, or the right CN from another CA: no connection.
        with pytest.raises(aiomqtt.MqttError):
            connect_as(chain_broker, pki, None, "nobody")
        with pytest.raises(aiomqtt.MqttError):
            connect_as(chain_broker, pki, pki.cert(LANE_USER, "stranger"), "stranger")
        log = broker_log(chain_broker)
        assert "peer did not return a certificate" in log
        assert "certificate verify failed" in log
        assert "as stranger" not in log
        assert "as nobody" not in log
        # The lane itself is still welcome.
        with lane.client() as client:
            sell(client, "OWN-2")
            wait_drained(lane)
        assert journal_count(reader, LANE) == 2

        # (e) Head office's API answers over HTTPS a client that trusts the chain CA, and nobody else.
        with hq.http() as http:
            assert http.get("/healthz").status_code == 200
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{hq.url}/healthz", timeout=5)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{hq.port}/healthz", timeout=5)
    finally:
        reader.close()
        lane.kill()
        hq.kill()


def test_the_shipped_broker_config_has_one_listener_and_it_wants_certificates() -> None:
    directives = [line.split() for line in CHAIN_CONF.read_text(encoding="utf-8").splitlines() if line[:1].isalpha()]
    settings = {words[0]: words[1:] for words in directives}
    assert [words for words in directives if words[0] == "listener"] == [["listener", "8883"]]
    assert settings["allow_anonymous"] == ["false"]
    assert settings["require_certificate"] == ["true"]
    assert settings["use_identity_as_username"] == ["true"]
    assert settings["acl_file"] == ["/etc/mosquitto/lane-acl"]
    assert settings["persistence"] == ["true"]
    assert "password_file" not in settings


def test_run_with_an_unusable_https_certificate_exits_78(tmp_path: Path, pki: Pki) -> None:
    hq = pki.root / "hq"
    for cert, key in ((tmp_path / "missing.pem", hq / "api.key"), (hq / "api.pem", hq / "hq.key")):
        config = tmp_path / "hq.toml"
        config.write_text(
            f'[database]\nurl = "sqlite:///{tmp_path / "hq.db"}"\n\n'
            f'[api]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n',
            encoding="utf-8",
        )
        result = lane_hq_process("run", "--config", str(config))
        assert result.returncode == 78, result.stderr
        assert "api.tls_cert_file" in result.stderr
        assert "tls_unusable" in result.stderr
