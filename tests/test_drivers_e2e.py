"""Devices end to end: reads reach the POS as events on a real agent's ``GET /v1/events``.

A magstripe swipe is written as kernel input_event records into a FIFO the
agent's evdev driver reads (``path`` naming a FIFO: recorded input), and a
simulated device plays a script; the POS API's SSE stream must show the
identifications and refusals, and ``/v1/status`` the devices.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from keyrecords import pack, records_for_text
from lane_harness import GOLD_CARD, LOST_CARD, EventListener, Lane

pytestmark = pytest.mark.timeout(90)


def swipe(number: str) -> str:
    pan = number.replace(" ", "")
    return f"%B{pan}^MEMBER/TEST^2712101?;{pan}=2712101?"


def type_into(fifo: Path, text: str) -> None:
    records = records_for_text(text, t0=int(time.time() * 1_000_000), per_key_us=300)
    with fifo.open("wb", buffering=0) as handle:
        handle.write(pack(records))


def test_a_swipe_on_the_reader_is_a_member_identified_event(tmp_path: Path) -> None:
    fifo = tmp_path / "msr.fifo"
    os.mkfifo(fifo)
    lane = Lane(
        tmp_path / "lane",
        extra_config=f'\n[[devices]]\nname = "msr"\ntype = "evdev_wedge"\npath = "{fifo}"\nrole = "magstripe"\n',
    )
    lane.import_members()
    lane.start()
    try:
        with lane.client() as http:
            for _ in range(100):
                devices = http.get("/v1/status").json()["devices"]
                if devices and devices[0]["state"] == "connected":
                    break
                time.sleep(0.05)
            assert devices[0] | {"since": "", "detail": ""} == {
                "name": "msr",
                "type": "evdev_wedge",
                "state": "connected",
                "detail": "",
                "since": "",
                "reads": 0,
                "unreadable": 0,
            }
        with EventListener(lane) as events:
            type_into(fifo, swipe(GOLD_CARD))
            kind, data = events.next("member.identified", "card.rejected")
            assert kind == "member.identified"
            assert (data["source"], data["member"]["member_id"]) == ("magstripe", "M000123")
            type_into(fifo, swipe(LOST_CARD))
            kind, data = events.next("member.identified", "card.rejected")
            assert (kind, data["reason"], data["source"]) == ("card.rejected", "lost", "magstripe")
            type_into(fifo, swipe(GOLD_CARD)[:25])  # a half swipe
            kind, data = events.next("member.identified", "card.rejected")
            assert (kind, data["reason"]) == ("card.rejected", "unreadable")
            assert data["detail"]
        with lane.client() as http:
            device = http.get("/v1/status").json()["devices"][0]
        assert (device["reads"], device["unreadable"]) == (2, 1)
        assert "62001234" not in lane.log().replace(" ", "")
    finally:
        assert lane.stop() == 0


def test_a_simulated_device_plays_its_script_to_the_pos(tmp_path: Path) -> None:
    steps = (
        f'  {{ after_s = 0.8, swipe = "{swipe(GOLD_CARD)}" }},\n'
        '  { after_s = 0.1, tap = "6200 1234 5678 0003" },\n'
        '  { after_s = 0.1, scan = "CPN20260042" },\n'
        "  { after_s = 0.1, unplug = true },\n"
        "  { after_s = 0.1, plug = true },\n"
    )
    lane = Lane(
        tmp_path / "lane", extra_config=f'\n[[devices]]\nname = "demo"\ntype = "simulated"\nsteps = [\n{steps}]\n'
    )
    lane.import_members()
    lane.start()
    try:
        with EventListener(lane) as events:
            kind, data = events.next("member.identified", "card.rejected")
            assert (kind, data["source"], data["member"]["member_id"]) == ("member.identified", "magstripe", "M000123")
            kind, data = events.next("member.identified", "card.rejected")
            assert (kind, data["source"], data["reason"]) == ("card.rejected", "ic", "not_yet_valid")
            kind, data = events.next("coupon.scanned")
            assert data["code"] == "CPN20260042"
            _, data = events.next("device.changed")
            assert (data["device"], data["state"]) == ("demo", "disconnected")
            _, data = events.next("device.changed")
            assert data["state"] == "connected"
    finally:
        assert lane.stop() == 0
