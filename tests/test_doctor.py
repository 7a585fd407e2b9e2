"""``lane-agent doctor``: the lane checked end to end against real components, and what it says to fix.

Every run is the real command (``python -m agent.cli doctor``) as a technician
types it, against real SQLite files, a private Mosquitto (plain and mutual
TLS, certificates issued here with ``cryptography``), a real ``lane-hq`` and a
real lane agent.  What cannot be plugged in here is replaced at the last
boundary only: an evdev path that does not exist, a FIFO of recorded input,
the machine's pcscd with the vpcd virtual reader (or a PC/SC socket that is
not there, through pcsc-lite's own ``PCSCLITE_CSOCK_NAME``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from broker import Broker, free_port
from conftest import REPO_ROOT
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hq_harness import Hq
from lane_harness import KEY, SHANGHAI, TOKEN, Lane, members
from pcsc import VPCD_READER, Pcscd
from test_sync_e2e import LANE, STORE, sell, sync_section, wait_drained, wait_for

from agent import doctor
from agent.config import parse_config
from agent.snapshot import write_snapshot
from agent.store import LaneStore
from sync.lane_auth import lane_token

pytestmark = pytest.mark.timeout(120)

HQ_SECRET = "doctor-test-lanes-secret-0123456789abcdef"
BUDGET_S = 15.0
STATUSES = {"ok", "warn", "fail", "skip"}


# --- running the command ---------------------------------------------------------------------------


def run_doctor(
    config: Path, *, human: bool = False, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> tuple[int, Any, float]:
    """``lane-agent doctor --config FILE [--json]``: (exit code, parsed JSON or text, seconds taken)."""
    command = [*prefix, sys.executable, "-m", "agent.cli", "doctor", "--config", str(config)]
    if not human:
        command.append("--json")
    environ = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    started = time.monotonic()
    result = subprocess.run(  # noqa: PLW1510 - the exit code is what the test checks
        command,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env=environ,
    )
    elapsed = time.monotonic() - started
    assert "Traceback" not in result.stderr, result.stderr
    if human:
        return result.returncode, result.stdout, elapsed
    try:
        document = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"not JSON ({exc}): {result.stdout!r} {result.stderr}") from exc
    return result.returncode, document, elapsed


def checks_of(document: dict[str, Any]) -> dict[str, dict[str, str]]:
    assert set(document) == {"ok", "checks"}
    for check in document["checks"]:
        assert set(check) == {"name", "status", "detail", "fix"}, check
        assert check["status"] in STATUSES, check
    names = [check["name"] for check in document["checks"]]
    assert len(names) == len(set(names)), names
    return {check["name"]: check for check in document["checks"]}


def toml_section(name: str, **keys: object) -> str:
    return f"\n[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())


def commit_sales(db: Path, count: int, *, at: dt.datetime | None = None, pad: str = "") -> None:
    """Commit ``count`` sales into the lane's real store, as the agent would."""

    async def main() -> None:
        async with await LaneStore.open(db, KEY) as store:
            for index in range(count):
                sale_id = f"DOC-{index}-{time.monotonic_ns()}"
                await store.commit_sale(
                    sale_id,
                    "digest",
                    {"sale_id": sale_id, "pad": pad},
                    {"sale_id": sale_id, "total": "10.00"},
                    at=at or dt.datetime.now(dt.UTC),
                    rules_version="888-2026.12",
                )

    asyncio.run(main())


# --- certificates ------------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


class Pki:
    """A test chain CA issuing broker and lane certificates with any validity."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name("doctor test CA"))
            .issuer_name(_name("doctor test CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=400))
            .not_valid_after(now + dt.timedelta(days=400))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, name: str, cn: str, *, not_before: dt.datetime, not_after: dt.datetime, server: bool = False
    ) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
        )
        if server:
            import ipaddress  # noqa: PLC0415

            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        else:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file, key_file = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_file, key)
        return cert_file, key_file


LANE_CN = f"lane-{STORE}-{LANE}"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    """Mutual TLS, the certificate's CN as user name, an ACL that knows this lane only."""
    now = dt.datetime.now(dt.UTC)
    cert, key = pki.issue("broker", "127.0.0.1", not_before=now - dt.timedelta(days=1),
                          not_after=now + dt.timedelta(days=30), server=True)  # fmt: skip
    acl = tmp_path / "acl"
    acl.write_text(
        f"user {LANE_CN}\ntopic write retail/{STORE}/{LANE}/journal\ntopic write retail/{STORE}/{LANE}/state\n"
        f"topic read retail/{STORE}/{LANE}/ack\ntopic read retail/hq/#\n"
    )
    extra = (
        f"cafile {pki.ca_file}\ncertfile {cert}\nkeyfile {key}\n"
        f"require_certificate true\nuse_identity_as_username true\nacl_file {acl}\n"
    )
    with Broker(tmp_path / "broker", extra=extra) as running:
        yield running


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path / "plain-broker") as running:
        yield running


def tls_lane(tmp_path: Path, broker: Broker, pki: Pki, cert: Path, key: Path) -> Lane:
    lane = Lane(
        tmp_path / "lane",
        extra_config=sync_section(broker, tls_ca_file=str(pki.ca_file), tls_cert_file=str(cert), tls_key_file=str(key)),
    )
    lane.import_members()
    return lane


# --- a healthy lane --------------------------------------------------------------------------------


@pytest.fixture
def head_office(tmp_path: Path, broker: Broker) -> Iterator[Hq]:
    """A real lane-hq serving the lanes' API, with the test programme's members in its member table."""
    secret = tmp_path / "lanes.secret"
    secret.write_text(HQ_SECRET + "\n")
    hq = Hq(tmp_path / "hq", broker_port=broker.port, db_url=f"sqlite:///{tmp_path / 'hq.db'}")
    hq.config.write_text(
        hq.config.read_text()
        + f'\n[lanes]\nauth_secret_file = "{secret}"\n\n[members]\ncard_hash_key = "hex:{KEY.hex()}"\n'
    )
    seed = tmp_path / "hq-members.jsonl"
    write_snapshot(seed, members(dt.datetime.now(SHANGHAI).date()), version=1, card_key=KEY)
    imported = subprocess.run(
        [sys.executable, "-m", "sync.hq.cli", "members", "import", str(seed), "--config", str(hq.config)],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, check=False,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    hq.start()
    try:
        yield hq
    finally:
        hq.kill()


def hq_keys(hq: Hq, *, token: str | None = None) -> dict[str, object]:
    return {"hq_url": hq.url, "hq_token": token or lane_token(HQ_SECRET.encode(), STORE, LANE)}


def hello(hq: Hq) -> dict[str, Any]:
    answer = httpx.get(
        f"{hq.url}/v1/sync/{STORE}/{LANE}/hello",
        headers={"Authorization": f"Bearer {lane_token(HQ_SECRET.encode(), STORE, LANE)}"},
        timeout=5,
    )
    assert answer.status_code == 200, answer.text
    document: dict[str, Any] = answer.json()
    return document


def test_a_healthy_lane_is_all_ok_against_a_real_broker_and_head_office(
    tmp_path: Path, broker: Broker, head_office: Hq
) -> None:
    head = hello(head_office)
    assert head["member_version"] > 0
    lane = Lane(tmp_path / "lane", extra_config=sync_section(broker, **hq_keys(head_office)))
    lane.import_members(version=head["member_version"])  # the lane's cache is head office's table
    lane.start()
    try:
        with lane.client() as client:
            wait_for("the agent to connect", lambda: client.get("/v1/status").json()["sync"]["connected"])
            sell(client, "DOC-1", member=False)
            wait_drained(lane)
            assert client.get("/v1/status").json()["member_table"]["version"] == head["member_version"]
        code, document, elapsed = run_doctor(lane.config_path)
        checks = checks_of(document)
        assert elapsed < BUDGET_S
        problems = {name: check for name, check in checks.items() if check["status"] not in {"ok", "skip"}}
        assert problems == {}
        assert code == doctor.EXIT_OK
        assert document["ok"] is True
        assert checks["member-table"]["detail"].startswith(f"version {head['member_version']}, 3 members, snapshot of ")
        assert checks["member-table"]["detail"].endswith(", as head office")
        for name in ("config", "state-dir", "disk", "store", "agent", "broker", "head-office", "clock", "ruleset"):
            assert checks[name]["status"] == "ok", checks[name]
        assert checks["config"]["detail"] == f"{lane.config_path} valid"
        assert checks["agent"]["detail"].startswith(f"running on 127.0.0.1:{lane.port} as {STORE}/{LANE}")
        assert checks["broker"]["detail"].startswith(f"connected to 127.0.0.1:{broker.port} without TLS")
        assert checks["broker"]["detail"].endswith("; the agent is connected")
        assert checks["head-office"]["detail"].startswith(f"{head_office.url} answers hello, token accepted")
        assert "the lane's clock is" in checks["clock"]["detail"]
        assert checks["backlog"] == {
            "name": "backlog",
            "status": "ok",
            "detail": "0 unsynced entries (0.0 MB)",
            "fix": "",
        }
        assert checks["ruleset"]["detail"].startswith("the agent prices with 888-mall 2026.11.1")
        assert f"; {lane.root / 'rules.toml'} modified 20" in checks["ruleset"]["detail"]
        assert checks["devices"]["status"] == "skip"
        assert checks["certificate"]["status"] == "skip"

        # The same run for people: one aligned line per check, in the same order, then the summary.
        code_text, text, _ = run_doctor(lane.config_path, human=True)
        assert code_text == code
        lines = text.splitlines()
        assert [line[:6].strip().lower() for line in lines[:-1]] == [c["status"] for c in document["checks"]]
        assert [line[6:22].strip() for line in lines[:-1]] == [c["name"] for c in document["checks"]]
        assert lines[0] == f"OK    config          {lane.config_path} valid"
        for secret in (TOKEN, lane_token(HQ_SECRET.encode(), STORE, LANE), KEY.hex(), HQ_SECRET):
            assert secret not in text
            assert secret not in json.dumps(document)

        # The agent's token does not match this file's: the doctor says so.
        other = tmp_path / "other-token.toml"
        other.write_text(lane.config_path.read_text().replace(TOKEN, "another-token-0123456789-abcdef"))
        code, document, _ = run_doctor(other)
        agent = checks_of(document)["agent"]
        assert agent["status"] == "fail"
        assert "refused this configuration's api.token" in agent["detail"]
        assert code == doctor.EXIT_FAIL
        assert document["ok"] is False
    finally:
        lane.kill()


def test_a_wrong_head_office_token_says_how_to_get_the_right_one(
    tmp_path: Path, broker: Broker, head_office: Hq
) -> None:
    wrong = lane_token(b"not head office's secret", STORE, LANE)
    lane = Lane(tmp_path / "lane", extra_config=sync_section(broker, **hq_keys(head_office, token=wrong)))
    lane.import_members()
    code, document, _ = run_doctor(lane.config_path)
    checks = checks_of(document)
    assert checks["head-office"] == {
        "name": "head-office",
        "status": "fail",
        "detail": f"{head_office.url} refused the lane's token (401)",
        "fix": f"token wrong: run `lane-hq lanes token {STORE} {LANE}` at head office and set sync.hq_token",
    }
    assert checks["clock"]["status"] == "skip"
    assert checks["broker"]["status"] == "ok"  # the broker is up: only the token is wrong
    assert code == doctor.EXIT_FAIL
    assert wrong not in json.dumps(document)


# --- nothing reachable -------------------------------------------------------------------------------


def test_with_everything_down_every_probe_fails_with_a_fix_within_the_budget(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens: the broker and head office are down
    lane = Lane(
        tmp_path / "lane",
        extra_config=toml_section(
            "sync", enabled=True, port=closed, hq_url=f"http://127.0.0.1:{closed}", hq_token="x" * 43
        )
        + f'\n[[devices]]\nname = "msr"\ntype = "evdev_wedge"\npath = "{tmp_path / "no-such-reader"}"\n'
        + '\n[[devices]]\nname = "ic"\ntype = "ic"\nreader = "Virtual PCD"\n',
    )
    # No agent, no store, no pcscd (a PC/SC socket that does not exist).
    code, document, elapsed = run_doctor(lane.config_path, env={"PCSCLITE_CSOCK_NAME": str(tmp_path / "no-pcscd")})
    checks = checks_of(document)
    assert elapsed < BUDGET_S
    assert code == doctor.EXIT_FAIL
    assert document["ok"] is False
    broker = checks["broker"]
    assert broker["status"] == "fail"
    assert broker["detail"].startswith(f"cannot connect to 127.0.0.1:{closed} without TLS: ")
    assert broker["fix"].startswith(f"nothing listens on 127.0.0.1:{closed}: is the broker running")
    hq = checks["head-office"]
    assert hq["status"] == "fail"
    assert hq["detail"].startswith(f"cannot reach http://127.0.0.1:{closed}: ")
    assert hq["fix"].startswith("nothing listens there: is lane-hq running")
    assert checks["clock"] == {
        "name": "clock",
        "status": "skip",
        "detail": "head office did not answer (see head-office)",
        "fix": "",
    }
    assert checks["agent"]["status"] == "warn"
    assert checks["agent"]["detail"] == f"not running: nothing listens on 127.0.0.1:{lane.port}"
    assert checks["store"]["status"] == "fail"
    assert checks["store"]["detail"] == f"no database at {lane.db}"
    assert checks["member-table"]["status"] == "skip"
    assert checks["backlog"]["status"] == "skip"
    assert checks["device:msr"]["status"] == "fail"
    assert checks["device:msr"]["detail"].startswith(f"{tmp_path / 'no-such-reader'} does not exist")
    assert "lane-agent devices" in checks["device:msr"]["fix"]
    assert checks["pcscd"]["status"] == "fail"
    assert "is pcscd running?" in checks["pcscd"]["detail"]
    assert checks["device:ic"] == {
        "name": "device:ic",
        "status": "fail",
        "detail": "PC/SC service unreachable (see pcscd)",
        "fix": "start pcscd",
    }
    for check in checks.values():
        if check["status"] == "fail":
            assert check["fix"], check


def test_an_unreachable_broker_address_times_out_within_the_budget(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): never routed, so the connection attempt hangs or is refused
    # at once by the network; either way the doctor answers within its budget.
    settings = {"enabled": True, "host": "192.0.2.1", "port": 8883, "connect_timeout_seconds": 30,
                "hq_url": "https://192.0.2.1:8780", "hq_token": "y" * 43, "http_timeout_seconds": 30}  # fmt: skip
    lane = Lane(tmp_path / "lane", extra_config=toml_section("sync", **settings))
    lane.import_members()
    code, document, elapsed = run_doctor(lane.config_path)
    checks = checks_of(document)
    assert elapsed < BUDGET_S
    assert code == doctor.EXIT_FAIL
    assert checks["broker"]["status"] == "fail"
    assert checks["broker"]["detail"].startswith("cannot connect to 192.0.2.1:8883 without TLS: ")
    assert checks["head-office"]["status"] == "fail"
    assert checks["head-office"]["detail"].startswith("cannot reach https://192.0.2.1:8780: ")


# --- the client certificate ---------------------------------------------------------------------------


def test_a_certificate_expiring_soon_is_a_warning_with_its_date(tmp_path: Path, pki: Pki, tls_broker: Broker) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    not_after = now + dt.timedelta(days=10)
    cert, key = pki.issue("lane", LANE_CN, not_before=now - dt.timedelta(days=355), not_after=not_after)
    lane = tls_lane(tmp_path, tls_broker, pki, cert, key)
    code, document, _ = run_doctor(lane.config_path)
    checks = checks_of(document)
    certificate = checks["certificate"]
    assert certificate["status"] == "warn"
    assert certificate["detail"].startswith(
        f"CN={LANE_CN} (issuer doctor test CA) expires on {not_after:%Y-%m-%d %H:%M} UTC, in "
    )
    assert "issue a new certificate" in certificate["fix"]
    # The broker still takes it.
    assert checks["broker"]["status"] == "ok", checks["broker"]
    assert checks["broker"]["detail"].startswith(f"connected to 127.0.0.1:{tls_broker.port} over TLS")
    assert code == doctor.EXIT_WARN
    assert document["ok"] is True

    # A year's certificate is simply ok, with its expiry.
    later = now + dt.timedelta(days=365)
    cert, key = pki.issue("lane-renewed", LANE_CN, not_before=now - dt.timedelta(days=1), not_after=later)
    renewed = tls_lane(tmp_path / "renewed", tls_broker, pki, cert, key)
    _, document, _ = run_doctor(renewed.config_path)
    certificate = checks_of(document)["certificate"]
    assert certificate["status"] == "ok"
    assert (
        certificate["detail"] == f"CN={LANE_CN} (issuer doctor test CA), expires {later:%Y-%m-%d %H:%M} UTC (in 364 d)"
    )


def test_an_expired_certificate_fails_with_its_date_and_the_broker_refuses_it(
    tmp_path: Path, pki: Pki, tls_broker: Broker
) -> None:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    expired = now - dt.timedelta(days=2)
    cert, key = pki.issue("lane", LANE_CN, not_before=now - dt.timedelta(days=367), not_after=expired)
    lane = tls_lane(tmp_path, tls_broker, pki, cert, key)
    code, document, elapsed = run_doctor(lane.config_path)
    checks = checks_of(document)
    assert checks["certificate"]["status"] == "fail"
    assert (
        checks["certificate"]["detail"]
        == f"CN={LANE_CN} (issuer doctor test CA) expired on {expired:%Y-%m-%d %H:%M} UTC"
    )
    assert checks["broker"]["status"] == "fail"
    assert checks["broker"]["detail"].startswith(f"cannot connect to 127.0.0.1:{tls_broker.port} over TLS")
    assert code == doctor.EXIT_FAIL
    assert elapsed < BUDGET_S


def test_a_key_that_is_not_the_certificates_fails(tmp_path: Path, pki: Pki, tls_broker: Broker) -> None:
    now = dt.datetime.now(dt.UTC)
    cert, _ = pki.issue("lane", LANE_CN, not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=90))
    other_key = tmp_path / "other.key"
    _write_key(other_key, ec.generate_private_key(ec.SECP256R1()))
    lane = tls_lane(tmp_path, tls_broker, pki, cert, other_key)
    code, document, _ = run_doctor(lane.config_path)
    checks = checks_of(document)
    assert checks["certificate"]["status"] == "fail"
    assert checks["certificate"]["detail"].endswith("sync.tls_key_file is not this certificate's key")
    assert code == doctor.EXIT_FAIL

    # An unreadable certificate file.
    cert.write_text("not a certificate")
    _, document, _ = run_doctor(lane.config_path)
    assert checks_of(document)["certificate"]["detail"] == f"{cert} is not a PEM certificate"


# --- the state directory, the store, the backlog ------------------------------------------------------


def test_an_unwritable_state_directory_fails(tmp_path: Path) -> None:
    lane = Lane(tmp_path / "lane")
    lane.import_members()
    state = lane.root
    # Root writes anywhere; root without CAP_DAC_OVERRIDE (setpriv drops it from the bounding set) is held
    # to the directory's mode like the agent's own unprivileged user.
    prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--") if os.geteuid() == 0 else ()
    state.chmod(0o555)
    try:
        code, document, _ = run_doctor(lane.config_path, prefix=prefix)
    finally:
        state.chmod(0o755)
    checks = checks_of(document)
    check = checks["state-dir"]
    assert check["status"] == "fail"
    assert check["detail"].startswith(f"{state} is not writable by user ")
    assert check["fix"].startswith(f"chown lane-agent:lane-agent {state}")
    assert code == doctor.EXIT_FAIL
    assert not [p for p in state.iterdir() if p.name.startswith(".lane-doctor")]
    # Nor can SQLite make the WAL's index beside the database: the store is unreadable for this user too.
    assert checks["store"]["status"] == "fail", checks["store"]
    assert checks["store"]["detail"].startswith(f"cannot open {lane.db} read-only")


def test_a_writable_state_directory_is_probed_and_left_clean(tmp_path: Path) -> None:
    lane = Lane(tmp_path / "lane")
    lane.import_members()
    before = sorted(p.name for p in tmp_path.joinpath("lane").iterdir())
    _, document, _ = run_doctor(lane.config_path)
    checks = checks_of(document)
    assert checks["state-dir"]["status"] == "ok"
    assert checks["state-dir"]["detail"] == f"{lane.root} writable (probe file created, fsynced, removed)"
    assert checks["store"]["status"] == "ok"
    assert checks["store"]["detail"].startswith(f"{lane.db} opens read-only, quick_check ok (")
    after = sorted(p.name for p in tmp_path.joinpath("lane").iterdir() if not p.name.endswith(("-wal", "-shm")))
    assert after == before


def test_backlog_thresholds_on_a_real_store_with_unsynced_sales(tmp_path: Path) -> None:
    lane = Lane(tmp_path / "lane", extra_config="\n[sync]\nbacklog_warn_entries = 3\nbacklog_warn_mb = 0\n")
    lane.import_members()
    assert lane.db is not None
    commit_sales(lane.db, 2)
    _, document, _ = run_doctor(lane.config_path)
    backlog = checks_of(document)["backlog"]
    assert backlog["status"] == "ok"
    assert backlog["detail"].startswith("2 unsynced entries (0.0 MB), oldest from ")
    assert backlog["detail"].endswith("; sync disabled: they stay on this PC")

    commit_sales(lane.db, 1)
    code, document, _ = run_doctor(lane.config_path)
    backlog = checks_of(document)["backlog"]
    assert backlog["status"] == "warn"
    assert "backlog of 3 entries reached sync.backlog_warn_entries (3)" in backlog["detail"]
    assert code == doctor.EXIT_WARN  # nothing else is wrong with this lane: sync is off, no devices
    assert document["ok"] is True


def test_backlog_by_size_and_an_old_unsynced_entry_with_sync_on(tmp_path: Path, broker: Broker) -> None:
    lane = Lane(tmp_path / "lane", extra_config=sync_section(broker, backlog_warn_mb=1))
    lane.import_members()
    assert lane.db is not None
    two_hours_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    commit_sales(lane.db, 1, at=two_hours_ago)
    _, document, _ = run_doctor(lane.config_path)
    backlog = checks_of(document)["backlog"]
    assert backlog["status"] == "warn"
    assert backlog["detail"].startswith("1 unsynced entries (0.0 MB), oldest from 2.0 h ago")
    assert backlog["detail"].endswith("head office has acknowledged nothing newer for over 1.0 h")

    commit_sales(lane.db, 3, pad="x" * 400_000)  # 1.2 MB of bodies
    _, document, _ = run_doctor(lane.config_path)
    backlog = checks_of(document)["backlog"]
    assert backlog["status"] == "warn"
    assert "backlog of 1.1 MB reached sync.backlog_warn_mb (1)" in backlog["detail"]


def test_a_damaged_store_fails_and_is_left_as_found(tmp_path: Path) -> None:
    lane = Lane(tmp_path / "lane")
    lane.import_members()
    assert lane.db is not None
    commit_sales(lane.db, 300, pad="p" * 300)
    data = bytearray(lane.db.read_bytes())
    page_size = 4096
    pages = len(data) // page_size
    for page in range(pages // 2, pages // 2 + 3):
        data[page * page_size + 8 : page * page_size + 200] = b"\xa5" * 192
    lane.db.write_bytes(bytes(data))
    code, document, _ = run_doctor(lane.config_path)
    store = checks_of(document)["store"]
    assert store["status"] == "fail"
    assert "quick_check" in store["detail"] or "damaged" in store["detail"]
    assert "copy the file" in store["fix"]
    assert code == doctor.EXIT_FAIL
    assert lane.db.read_bytes() == bytes(data)


# --- devices -----------------------------------------------------------------------------------------


def test_evdev_paths_missing_a_fifo_and_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "replay.fifo"
    os.mkfifo(fifo)
    plain = tmp_path / "plain-file"
    plain.write_text("not a device")
    missing = tmp_path / "by-id" / "usb-IDTECH_USB_HID_MSR-event-kbd"
    devices = "".join(
        f'\n[[devices]]\nname = "{name}"\ntype = "evdev_wedge"\npath = "{path}"\n'
        for name, path in (("msr", missing), ("replay", fifo), ("plain", plain))
    )
    steps = '  { after_s = 0.1, swipe = "%B6200123456780001^MEMBER/TEST^2712101?" },\n'
    devices += f'\n[[devices]]\nname = "sim"\ntype = "simulated"\nsteps = [\n{steps}]\n'
    lane = Lane(tmp_path / "lane", extra_config=devices)
    lane.import_members()
    code, text, _ = run_doctor(lane.config_path, human=True)
    _, document, _ = run_doctor(lane.config_path)
    checks = checks_of(document)
    assert checks["device:msr"] == {
        "name": "device:msr",
        "status": "fail",
        "detail": f"{missing} does not exist: the reader is not plugged in, or the path is wrong",
        "fix": "plug it in (another USB port?); `lane-agent devices` lists the stable /dev/input/by-id paths",
    }
    assert checks["device:replay"]["status"] == "ok"
    assert checks["device:replay"]["detail"] == f"{fifo}: a FIFO of recorded input (replay)"
    assert checks["device:plain"]["status"] == "fail"
    assert checks["device:plain"]["detail"] == f"{plain} is a regular file"
    assert checks["device:sim"]["status"] == "ok"
    assert checks["pcscd"] == {"name": "pcscd", "status": "skip", "detail": "no IC reader configured", "fix": ""}
    assert code == doctor.EXIT_FAIL
    line = next(line for line in text.splitlines() if "device:msr" in line)
    assert line.startswith("FAIL  device:msr      ")
    assert " → fix: plug it in" in line
    assert "6200123456780001" not in text
    assert "6200123456780001" not in json.dumps(document)


@pytest.fixture(scope="module")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pcscd]:
    daemon = Pcscd(tmp_path_factory.mktemp("pcscd"))
    daemon.ensure_running()
    yield daemon
    daemon.restore()


def test_ic_readers_through_the_real_pcscd(tmp_path: Path, pcscd: Pcscd) -> None:
    pcscd.ensure_running()
    devices = (
        '\n[[devices]]\nname = "ic"\ntype = "ic"\nreader = "Virtual PCD 00 00"\n'
        '\n[[devices]]\nname = "acr"\ntype = "ic"\nreader = "ACS ACR1252"\n'
    )
    lane = Lane(tmp_path / "lane", extra_config=devices)
    lane.import_members()
    _, document, _ = run_doctor(lane.config_path)
    checks = checks_of(document)
    assert checks["pcscd"]["status"] == "ok"
    assert checks["pcscd"]["detail"].startswith("reachable; ")
    assert repr(VPCD_READER) in checks["pcscd"]["detail"]
    assert checks["device:ic"] == {
        "name": "device:ic",
        "status": "ok",
        "detail": f"PC/SC reader {VPCD_READER!r}",
        "fix": "",
    }
    assert checks["device:acr"]["status"] == "fail"
    assert checks["device:acr"]["detail"].startswith("no PC/SC reader matches 'ACS ACR1252' (readers: ")
    assert repr(VPCD_READER) in checks["device:acr"]["detail"]


# --- the configuration -------------------------------------------------------------------------------


def test_an_invalid_configuration_exits_78_listing_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "lane.toml"
    config.write_text('[lane]\nstore = "s 1"\n\n[api]\nport = "8765"\nprot = 1\n', encoding="utf-8")
    code, document, elapsed = run_doctor(config)
    checks = checks_of(document)
    assert code == doctor.EXIT_CONFIG == 78
    assert document["ok"] is False
    first = document["checks"][0]
    assert first["name"] == "config"
    assert first["status"] == "fail"
    lines = first["detail"].split("\n")
    assert lines[0] == f"{config}: 6 problem(s)"
    keys = [line.split(":", 1)[0] for line in lines[1:]]
    assert keys == ["lane.store", "lane.lane", "api.token", "api.port", "api.prot", "store.card_hash_key"]
    assert "did you mean 'port'?" in first["detail"]
    assert first["fix"] == f"edit {config}; `lane-agent config check {config}` checks it again"
    skipped = document["checks"][1:]
    assert skipped
    assert all(check["status"] == "skip" for check in skipped)
    assert all(check["detail"] == "needs a valid configuration (see config)" for check in skipped)
    assert {"store", "broker", "head-office", "backlog"} <= set(checks)
    assert elapsed < BUDGET_S

    code, text, _ = run_doctor(config, human=True)
    assert code == 78
    lines = text.splitlines()
    assert lines[0] == f"FAIL  config          {config}: 6 problem(s)"
    assert lines[1].startswith(" " * 24 + "lane.store: must be 1 to 32 characters")
    assert lines[-1] == "configuration unusable: 1 failed, 0 warning(s), 0 ok, 13 skipped"

    # A file that is not there is a configuration problem too.
    code, document, _ = run_doctor(tmp_path / "missing.toml")
    assert code == 78
    assert "cannot read" in document["checks"][0]["detail"]


# --- the pure checks -------------------------------------------------------------------------------


def _sync(**keys: object) -> Any:
    body = "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())
    config = parse_config(
        f'[lane]\nstore = "s1"\nlane = "l1"\n[api]\ntoken = "{TOKEN}"\n[store]\ncard_hash_key = "hex:{KEY.hex()}"\n'
        f"[sync]\n{body}"
    )
    return config.sync


def _hello(skew: float, rtt: float) -> doctor.HelloProbe:
    sent = 1_000_000.0
    now = dt.datetime.fromtimestamp(sent + rtt / 2 + skew, dt.UTC).isoformat()
    return doctor.HelloProbe("http://hq", sent, sent + rtt, http_status=200, hello={"now": now})


@pytest.mark.parametrize(
    ("skew", "rtt", "status"),
    [
        (0.0, 0.01, "ok"),
        (4.9, 0.01, "ok"),
        (5.5, 0.01, "warn"),
        (-5.5, 0.01, "warn"),
        # 6 s off with a 2 s round trip: within 5 s once half the round trip is allowed for.
        (6.0, 2.0, "ok"),
        (59.0, 0.01, "warn"),
        (61.0, 0.01, "fail"),
        (-3600.0, 0.5, "fail"),
    ],
)
def test_clock_skew_allows_for_half_the_round_trip(skew: float, rtt: float, status: str) -> None:
    check = doctor.clock_check(_hello(skew, rtt), "unused")
    assert check.status == status, check
    assert f"{abs(skew):.1f} s {'behind' if skew > 0 else 'ahead of'} head office's" in check.detail
    assert bool(check.fix) == (status != "ok")


def test_certificate_boundaries() -> None:
    now = dt.datetime(2026, 12, 2, 10, 0, tzinfo=dt.UTC)
    sync = _sync(enabled=True)

    def facts(days_left: float, *, matches: bool = True, since: float = -300) -> doctor.CertFacts:
        return doctor.CertFacts(
            "lane-s1-l1", "CA", now + dt.timedelta(days=since), now + dt.timedelta(days=days_left), matches
        )

    assert doctor.certificate_check(sync, facts(31), now).status == "ok"
    assert doctor.certificate_check(sync, facts(29.9), now).status == "warn"
    assert doctor.certificate_check(sync, facts(0.001), now).status == "warn"
    expired = doctor.certificate_check(sync, facts(0), now)
    assert expired.status == "fail"
    assert expired.detail == "CN=lane-s1-l1 (issuer CA) expired on 2026-12-02 10:00 UTC"
    assert doctor.certificate_check(sync, facts(90, matches=False), now).status == "fail"
    assert doctor.certificate_check(sync, facts(90, since=1), now).status == "fail"
    assert doctor.certificate_check(_sync(enabled=False), facts(1), now).status == "skip"
    assert doctor.certificate_check(sync, None, now).status == "skip"


def test_exit_codes_and_json_verdict() -> None:
    ok, skip = doctor.Check("a", "ok", "x"), doctor.Check("b", "skip", "y")
    warn, fail = doctor.Check("c", "warn", "z", "do"), doctor.Check("d", "fail", "w", "do")
    assert doctor.exit_code([ok, skip]) == 0
    assert doctor.exit_code([ok, warn]) == 1
    assert doctor.exit_code([warn, fail]) == 2
    assert doctor.exit_code([doctor.Check("config", "fail", "bad"), skip]) == 78
    assert json.loads(doctor.render_json([ok, warn]))["ok"] is True
    assert json.loads(doctor.render_json([ok, fail]))["ok"] is False
    assert doctor.render_text([ok, warn, fail]).splitlines() == [
        "OK    a               x",
        "WARN  c               z → fix: do",
        "FAIL  d               w → fix: do",
        "needs fixing: 1 failed, 1 warning(s), 1 ok, 0 skipped",
    ]
    # A card number that a detail might carry is masked, as in the logs.
    masked = doctor.render_text([doctor.Check("e", "ok", "read 6200123456780001")])
    assert "6200123456780001" not in masked
    assert "0001" in masked


def test_a_member_table_behind_or_ahead_of_head_office_is_a_warning(
    tmp_path: Path, broker: Broker, head_office: Hq
) -> None:
    head = hello(head_office)["member_version"]
    assert head >= 2
    behind = Lane(tmp_path / "behind", extra_config=sync_section(broker, **hq_keys(head_office)))
    behind.import_members(version=head - 1)
    code, document, _ = run_doctor(behind.config_path)
    table = checks_of(document)["member-table"]
    assert table["status"] == "warn"
    assert table["detail"].startswith(f"version {head - 1}, 3 members, snapshot of ")
    assert table["detail"].endswith(f"; head office is at {head} (1 behind)")
    assert "catches up by itself" in table["fix"]
    assert code == doctor.EXIT_WARN  # the agent is not running (a warning too), nothing failed

    ahead = Lane(tmp_path / "ahead", extra_config=sync_section(broker, **hq_keys(head_office)))
    ahead.import_members(version=head + 5)
    _, document, _ = run_doctor(ahead.config_path)
    table = checks_of(document)["member-table"]
    assert table["status"] == "warn"
    assert f"ahead of head office's {head}" in table["detail"]
    assert "ahead_of_head" in table["fix"]


def test_a_device_the_running_agent_reports_disconnected_is_a_warning(tmp_path: Path) -> None:
    devices = '\n[[devices]]\nname = "sim"\ntype = "simulated"\nsteps = [\n  { after_s = 0.2, unplug = true },\n]\n'
    lane = Lane(tmp_path / "lane", extra_config=devices)
    lane.import_members()
    lane.start()
    try:
        with lane.client() as client:

            def unplugged() -> bool:
                states = {d["name"]: d["state"] for d in client.get("/v1/status").json()["devices"]}
                return states.get("sim") == "disconnected"

            wait_for("the simulated device to go away", unplugged)
        code, document, _ = run_doctor(lane.config_path)
        check = checks_of(document)["device:sim"]
        assert check == {
            "name": "device:sim",
            "status": "warn",
            "detail": "simulated driver: no hardware to check; but the agent reports it disconnected: simulated",
            "fix": "journalctl -u lane-agent; the agent retries by itself, or restart it",
        }
        assert checks_of(document)["agent"]["status"] == "ok"
        assert code == doctor.EXIT_WARN
    finally:
        lane.kill()
