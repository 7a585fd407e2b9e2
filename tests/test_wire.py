"""sync/wire.py: journal batches, acks and lane states encode and decode; bad messages are named."""

from __future__ import annotations

import json
import uuid

import pytest

from sync import wire

EPOCH = "0123456789abcdef0123456789abcdef"


def _body(kind: str = "sale", store: str = "s1", lane: str = "l1", **extra: object) -> str:
    return json.dumps({"v": 1, "kind": kind, "store": store, "lane": lane, "sale_id": "S-1", **extra})


def _raw(seq: int = 1, **changes: object) -> wire.RawEntry:
    fields: dict[str, object] = {
        "seq": seq,
        "id": str(uuid.uuid4()),
        "kind": "sale",
        "at": "2026-12-10T14:05:00+08:00",
        "rules_version": "2026.12",
        "member_version": 3,
        "body": _body(),
    }
    fields.update(changes)
    return wire.RawEntry(**fields)  # type: ignore[arg-type]


def test_a_batch_round_trips_with_the_stored_body_text_spliced_in() -> None:
    entries = [_raw(1), _raw(2, kind="return", body=_body("return", note="退货 ✓"))]
    payload = wire.encode_batch("s1", "l1", EPOCH, entries)
    batch = wire.decode_batch("s1", "l1", payload)
    assert batch.epoch == EPOCH
    assert batch.rejects == ()
    assert [(e.seq, e.id, e.kind) for e in batch.entries] == [(1, entries[0].id, "sale"), (2, entries[1].id, "return")]
    assert batch.entries[1].body["note"] == "退货 ✓"
    assert batch.entries[0].at.utcoffset() is not None
    assert batch.entries[0].member_version == 3


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xff\xfe", "not_json"),
        (b"[1, 2]", "not_object"),
        (b'{"v": 2, "store": "s1", "lane": "l1"}', "bad_version"),
        (b'{"v": 1, "store": "s1", "lane": "l2", "epoch": "' + EPOCH.encode() + b'", "entries": []}', "lane_mismatch"),
        (b'{"v": 1, "store": "s1", "lane": "l1", "epoch": "XYZ", "entries": []}', "bad_epoch"),
        (b'{"v": 1, "store": "s1", "lane": "l1", "epoch": "' + EPOCH.encode() + b'", "entries": []}', "bad_entries"),
    ],
)
def test_a_message_that_cannot_be_taken_is_refused_whole(payload: bytes, code: str) -> None:
    with pytest.raises(wire.WireError) as caught:
        wire.decode_batch("s1", "l1", payload)
    assert caught.value.code == code


def test_an_oversized_message_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(wire.WireError) as caught:
        wire.decode_batch("s1", "l1", b" " * (wire.MAX_PAYLOAD_BYTES + 1))
    assert caught.value.code == "too_large"


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"seq": 0}, "bad_seq"),
        ({"id": "not-a-uuid"}, "bad_id"),
        ({"id": str(uuid.uuid4()).upper()}, "bad_id"),
        ({"kind": "refund"}, "bad_kind"),
        ({"at": "2026-12-10T14:05:00"}, "bad_at"),
        ({"at": "yesterday"}, "bad_at"),
        ({"rules_version": ""}, "bad_rules_version"),
        ({"member_version": -1}, "bad_member_version"),
        ({"body": '"text"'}, "bad_body"),
        ({"body": _body(lane="l9")}, "body_mismatch"),
        ({"body": _body(kind="void")}, "body_mismatch"),
    ],
)
def test_a_bad_entry_is_rejected_alone_and_the_rest_kept(changes: dict[str, object], code: str) -> None:
    good_before, bad, good_after = _raw(1), _raw(**{"seq": 2, **changes}), _raw(3)
    batch = wire.decode_batch("s1", "l1", wire.encode_batch("s1", "l1", EPOCH, [good_before, bad, good_after]))
    assert [e.seq for e in batch.entries] == [1, 3]
    assert len(batch.rejects) == 1
    reject = batch.rejects[0]
    assert reject.code == code
    assert reject.seq == (2 if "seq" not in changes else None)


def test_an_entry_naming_another_lane_is_rejected() -> None:
    payload = json.loads(wire.encode_batch("s1", "l1", EPOCH, [_raw(1), _raw(2)]))
    payload["entries"][1]["lane"] = "l2"
    batch = wire.decode_batch("s1", "l1", json.dumps(payload).encode())
    assert [e.seq for e in batch.entries] == [1]
    assert batch.rejects[0].code == "lane_mismatch"
    assert batch.rejects[0].seq == 2


def test_acks_round_trip_and_refuse_another_lane_or_garbage() -> None:
    ack = wire.decode_ack("s1", "l1", wire.encode_ack("s1", "l1", EPOCH, 42))
    assert ack == wire.Ack(epoch=EPOCH, seq=42)
    for payload, code in [
        (wire.encode_ack("s1", "l2", EPOCH, 1), "lane_mismatch"),
        (b"{}", "bad_version"),
        (b'{"v":1,"store":"s1","lane":"l1","epoch":"' + EPOCH.encode() + b'","seq":-1}', "bad_seq"),
        (b'{"v":1,"store":"s1","lane":"l1","epoch":"' + EPOCH.encode() + b'","seq":true}', "bad_seq"),
        (b"ack", "not_json"),
    ]:
        with pytest.raises(wire.WireError) as caught:
            wire.decode_ack("s1", "l1", payload)
        assert caught.value.code == code


def test_states_round_trip_with_their_session_and_figures() -> None:
    state = wire.decode_state("s1", "l1", wire.encode_state("s1", "l1", "online", 7, backlog=3))
    assert (state.state, state.session, state.info["backlog"]) == ("online", 7, 3)
    with pytest.raises(wire.WireError):
        wire.decode_state("s1", "l1", wire.encode_state("s1", "l1", "online", -1))


def test_topics() -> None:
    assert wire.lane_topic("retail", "s1", "l1", "journal") == "retail/s1/l1/journal"
    assert wire.journal_filter("retail") == "retail/+/+/journal"
    assert wire.journal_filter("chain/cn", "hq") == "$share/hq/chain/cn/+/+/journal"
    assert wire.parse_lane_topic("chain/cn", "chain/cn/s1/l1/ack") == ("s1", "l1", "ack")
    assert wire.parse_lane_topic("retail", "retail/s1/l1/other") is None
    assert wire.parse_lane_topic("retail", "retail/s 1/l1/journal") is None
    assert wire.parse_lane_topic("retail", "other/s1/l1/journal") is None
    with pytest.raises(ValueError, match="topic root"):
        wire.check_root("retail/#")
