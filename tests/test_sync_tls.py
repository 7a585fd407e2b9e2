"""Sync over mutual TLS with a per-lane broker ACL: the production set-up of docs/protocol.md ("Security").

A real Mosquitto requires a client certificate, takes its CN as the user name
and holds explicit per-lane ACL lines (the portable form, see
../shared/REAL_COMPONENTS.md).  A real lane and a real head office connect
with their own certificates; another lane's certificate cannot write into
this lane's journal (the broker PUBACKs the denied publish, and nothing
reaches head office), and a client without a certificate cannot connect.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from broker import Broker
from hq_harness import Hq, HqReader
from lane_harness import Lane
from test_sync_e2e import LANE, STORE, lane_acked, lane_epoch, raw_entries, sell, sync_section, wait_drained

from sync import wire

pytestmark = pytest.mark.timeout(120)

LANE_USER = f"lane-{STORE}-{LANE}"
OTHER_USER = f"lane-{STORE}-lane-04"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(pki: Path, name: str, cn: str, *, server: bool = False) -> None:
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}", cwd=pki)  # fmt: skip
    ext = pki / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n" if server else "extendedKeyUsage=clientAuth\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name, cwd=pki)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, the broker's certificate and one client certificate per party."""
    pki = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=test chain CA", cwd=pki)  # fmt: skip
    _issue(pki, "broker", "127.0.0.1", server=True)
    for name, cn in (("lane", LANE_USER), ("other", OTHER_USER), ("hq", "hq")):
        _issue(pki, name, cn)
    return pki


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Path) -> Iterator[Broker]:
    acl = tmp_path / "acl"
    acl.write_text(
        # Explicit lines per lane, as enrolment would generate them.
        f"user {LANE_USER}\n"
        f"topic write retail/{STORE}/{LANE}/journal\ntopic write retail/{STORE}/{LANE}/state\n"
        f"topic read retail/{STORE}/{LANE}/ack\ntopic read retail/hq/#\n\n"
        f"user {OTHER_USER}\n"
        f"topic write retail/{STORE}/lane-04/#\ntopic read retail/{STORE}/lane-04/ack\n\n"
        "user hq\n"
        "topic read retail/+/+/journal\ntopic read retail/+/+/state\ntopic write retail/+/+/ack\n"
    )
    extra = (
        f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'broker.pem'}\nkeyfile {pki / 'broker.key'}\n"
        f"require_certificate true\nuse_identity_as_username true\nacl_file {acl}\n"
        # Debug: the broker logs each publish its ACL denies, which the test checks.
        "log_type debug\n"
    )
    with Broker(tmp_path / "broker", extra=extra) as running:
        yield running


def _tls_keys(pki: Path, name: str) -> dict[str, object]:
    return {
        "tls_ca_file": str(pki / "ca.pem"),
        "tls_cert_file": str(pki / f"{name}.pem"),
        "tls_key_file": str(pki / f"{name}.key"),
    }


def test_a_lane_and_head_office_sync_over_mutual_tls_and_a_forged_lane_reaches_nothing(
    tmp_path: Path, pki: Path, tls_broker: Broker
) -> None:
    db_url = f"sqlite:///{tmp_path / 'hq.db'}"
    hq = Hq(tmp_path / "hq", broker_port=tls_broker.port, db_url=db_url, client_id="hq")
    keys = _tls_keys(pki, "hq")
    hq.config.write_text(
        hq.config.read_text().replace(
            "[broker]\n", "[broker]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())
        )
    )
    lane = Lane(tmp_path / "lane", extra_config=sync_section(tls_broker, **_tls_keys(pki, "lane")))
    lane.import_members()
    reader = HqReader(db_url)
    try:
        hq.start()
        lane.start()
        with lane.client() as client:
            sell(client, "TLS-1")
            sell(client, "TLS-2", member=False)
            wait_drained(lane)
            assert client.get("/v1/status").json()["sync"]["connected"] is True
        assert reader.scalar("SELECT count(*) FROM journal_entries") == 2

        # Lane 04's certificate writing into lane 03's journal: the broker takes the publish and drops it.
        forged = wire.encode_batch(STORE, LANE, lane_epoch(lane), raw_entries(lane)[:1])

        async def forge() -> None:
            tls = aiomqtt.TLSParameters(
                ca_certs=str(pki / "ca.pem"), certfile=str(pki / "other.pem"), keyfile=str(pki / "other.key")
            )
            async with aiomqtt.Client("127.0.0.1", tls_broker.port, identifier="forger", tls_params=tls) as bad:
                await bad.publish(wire.lane_topic("retail", STORE, LANE, "journal"), forged, qos=1)
                await bad.publish(wire.lane_topic("retail", STORE, LANE, "ack"), b"{}", qos=1)

        asyncio.run(forge())
        time.sleep(1.0)
        assert hq.metric("hq_batches_total") == pytest.approx(hq.metric('hq_batches_total{outcome="applied"}'))
        assert reader.scalar("SELECT count(*) FROM dead_letters") == 0
        assert "ignored" not in lane.log()  # the forged ack never reached the lane either
        assert lane_acked(lane) == (2, 2)
        assert "denied publish from forger" in tls_broker.log.read_text().lower()

        # No certificate, no connection.
        async def anonymous() -> None:
            tls = aiomqtt.TLSParameters(ca_certs=str(pki / "ca.pem"))
            async with aiomqtt.Client("127.0.0.1", tls_broker.port, identifier="nobody", tls_params=tls, timeout=3):
                pass

        with pytest.raises(aiomqtt.MqttError):
            asyncio.run(anonymous())
    finally:
        reader.close()
        lane.kill()
        hq.kill()
