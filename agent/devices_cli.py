"""``lane-agent devices`` and ``lane-agent probe``: the technicians' view of the lane's hardware.

``devices`` lists the input devices (name, paths, vendor:product, whether it
can type) and the PC/SC readers (with the card in each), so the right
selector can be written into lane.toml.  ``probe`` opens the devices that
lane.toml configures and prints what each reads, decoded, card numbers
masked, until Ctrl-C or ``--seconds``.  Run ``probe`` with the agent stopped:
the agent grabs its devices.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import sys
from typing import TYPE_CHECKING, Any

from agent.config import DEFAULT_PATH, load_config
from agent.errors import InputError
from drivers import registry
from drivers.base import CardRead, DriverEvent, mask
from drivers.inventory import take_inventory

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]  # noqa: SLF001 - argparse's only name for it

EXIT_INVALID = 1


def add_devices_parsers(subparsers: SubParsers) -> None:
    """Add ``devices`` and ``probe`` to the ``lane-agent`` command line."""
    devices = subparsers.add_parser("devices", help="list input devices and PC/SC readers")
    devices.add_argument("--json", action="store_true", help="machine-readable output")
    probe = subparsers.add_parser("probe", help="print what the configured devices read, numbers masked")
    probe.add_argument("--config", default=str(DEFAULT_PATH), metavar="FILE", help="lane configuration")
    probe.add_argument("--device", action="append", metavar="NAME", help="only this device (repeatable)")
    probe.add_argument("--seconds", type=float, default=0.0, help="stop after this long (default: until Ctrl-C)")


def run_devices(args: argparse.Namespace) -> int:
    """``lane-agent devices``."""
    inventory = take_inventory()
    if args.json:
        print(
            json.dumps(
                {
                    "inputs": [dataclasses.asdict(i) for i in inventory.inputs],
                    "readers": [dataclasses.asdict(r) for r in inventory.readers],
                    "notes": inventory.notes,
                },
                indent=2,
                ensure_ascii=False,
            )
        )
        return 0
    print("Input devices (keyboard-wedge readers and scanners):")
    if not inventory.inputs:
        print("  none found")
    for item in inventory.inputs:
        kind = "keyboard" if item.keyboard else "no text keys"
        print(f"  {item.path}  {item.name!r}  {item.vendor_product}  phys={item.phys or '-'}  ({kind})")
        for path in item.stable_paths:
            print(f"      {path}")
    print("PC/SC readers (IC cards):")
    if not inventory.readers:
        print("  none found")
    for reader in inventory.readers:
        card = f"card present, ATR {reader.atr}" if reader.card_present else "no card"
        print(f"  {reader.name!r}: {card}")
    for note in inventory.notes:
        print(f"note: {note}")
    return 0


def describe(event: DriverEvent) -> str:
    """One probe line: the event, any card number masked."""
    if isinstance(event, CardRead):
        expiry = f" expiry {event.expiry}" if event.expiry else ""
        return f"card read ({event.source}): {mask(event.number)}{expiry}"
    fields = ", ".join(f"{f.name}={getattr(event, f.name)!r}" for f in dataclasses.fields(event) if f.name != "device")
    return f"{type(event).__name__}: {fields}"


async def _probe(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    devices = [d for d in config.devices if not args.device or d.name in args.device]
    if not devices:
        print("no devices configured (add [[devices]] tables to lane.toml)", file=sys.stderr)
        return EXIT_INVALID

    async def watch(device: Any) -> None:
        async with registry.build(device) as driver:
            async for event in driver.events():
                stamp = dt.datetime.now().astimezone().strftime("%H:%M:%S.%f")[:-3]
                print(f"{stamp} {device.name}: {describe(event)}", flush=True)

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.seconds or None), asyncio.TaskGroup() as group:
            for device in devices:
                group.create_task(watch(device), name=f"probe:{device.name}")
    return 0


def run_probe(args: argparse.Namespace) -> int:
    """``lane-agent probe``."""
    try:
        return asyncio.run(_probe(args))
    except InputError as exc:
        print(f"lane-agent: invalid {exc.what}:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 0
