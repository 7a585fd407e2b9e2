"""Swipe to event: a magstripe swipe's last key record to ``member.identified`` on the POS's event stream.

``python -m bench.swipe [--members 10000] [--swipes 500] [--quick] [--strict]``

One run, one temporary directory:

1. **Set-up.** A snapshot of N members (``bench.store``'s generator: card
   ``6`` + 15 digits per member, and a *replaced* card ``7`` + 15 digits on
   every fifth), a small synthetic ruleset, a ``lane.toml`` from
   ``bench.api.write_config`` with one ``evdev_wedge`` device (role
   magstripe) reading a FIFO, ``lane-agent members import`` through the CLI,
   then ``lane-agent run`` as a subprocess.  A thread holds ``GET /v1/events``
   open and timestamps each event (``perf_counter_ns``) as its ``data:`` line
   arrives.
2. **Swipe.** The kernel ``struct input_event`` records a keyboard-wedge
   reader sends for ``%B<pan>^MEMBER/TEST^2712101?;<pan>=2712101?`` and Enter
   (MSC_SCAN, key down, SYN_REPORT, key up, SYN_REPORT per key; Shift around
   the shifted characters; 2 ms per key in the records' timestamps), written
   to the FIFO in one ``os.write``.  The clock starts when the write returns:
   the reader's last record is in the kernel, so what follows is the lane's
   work only (driver, decoder, store lookup, event bus, SSE).  It stops when
   that member's ``member.identified`` arrives; a wrong member fails the run.
   Every tenth round also swipes a replaced card, timed to its
   ``card.rejected`` (reason ``replaced``).  A *paced* swipe follows: all but
   the Enter key's records, then 10 ms later the Enter's, the clock starting
   at that last write.  A real reader's keys trickle in over the swipe, so
   the driver has decoded most of them before the last one: this row is
   the real case, the one-write row the worst case (the whole swipe decoded
   after the clock starts) and the target's.
3. **The reference, interleaved.** ``POST /v1/identify {"code": <card>}`` on a
   keep-alive client, timed from just before the request to the same
   member's ``member.identified`` on the stream: the POS's own way to the
   same event, measured in the same run.  It shares the swipe's store
   lookup, event bus, SSE and client; in place of the driver it has HTTP,
   auth and request validation.  Its HTTP answer's latency is kept too.

Each card is used once (every measurement takes the next member), the
order swipe/identify alternates per round, and a pause follows each
measurement (a reader cannot be swiped every millisecond, and the pause is
below the driver's gap, which a read ended by Enter never waits for).  Then
the agent gets SIGTERM and must exit 0.  The table goes to stdout (progress
to stderr), the figures to ``bench/results/swipe.json``.

Target (the drivers issue): swipe -> member.identified p99 <= 20 ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import queue
import secrets
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from agent.snapshot import write_snapshot
from bench.api import (
    KEY,
    Agent,
    BenchError,
    _free_port,
    _members,
    _number,
    import_members,
    summary,
    write_config,
)
from bench.run import machine
from bench.synthetic import make_catalogue, make_ruleset
from drivers.keymap import KEY_ENTER, KEY_LEFTSHIFT, KEY_RIGHTALT, KEY_SPACE, Keymap, keymap
from drivers.keystrokes import EV_KEY, EV_MSC, EV_SYN, KEY_PRESSED, KEY_RELEASED, MSC_SCAN, SYN_REPORT

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results" / "swipe.json"
RULES = 10  # identification does not price: the ruleset only has to load
DEVICE = "msr"
KEYMAP = "us"
GAP_MS = 80  # the driver's default
PER_KEY_US = 2_000  # a wedge reader types a swipe at about 2 ms per character
ENTER_RECORDS = 6  # Enter down and up, each MSC_SCAN + EV_KEY + SYN_REPORT
ENTER_AFTER_S = 0.010  # the paced variant: the rest of the swipe this long before its Enter
REJECT_EVERY = 10  # rounds: one replaced card swiped besides the member's
WARM_UP = 20  # rounds discarded
EVENT_SECONDS = 5.0  # longest wait for one event
READY_SECONDS = 60.0
TARGET_SWIPE_P99_MS = 20.0

TITLES = {
    "swipe": "swipe (last record) -> member.identified",
    "identify": "POST /v1/identify -> member.identified (ref)",
    "identify_http": "POST /v1/identify -> its HTTP answer",
    "swipe_paced": "swipe, Enter 10 ms after the rest -> identified",
    "swipe_rejected": "swipe, replaced card -> card.rejected",
}

INPUT_EVENT = struct.Struct("llHHi")  # struct input_event on 64-bit Linux: 24 bytes
Record = tuple[int, int, int, int, int]  # tv_sec, tv_usec, type, code, value


# --- what a reader sends ---------------------------------------------------------------


def swipe_text(pan: str) -> str:
    """Tracks 1 and 2 of a card as a wedge reader types them (expiry 2027-12, service code 101)."""
    return f"%B{pan}^MEMBER/TEST^2712101?;{pan}=2712101?"


def _key(code: int, value: int, t_us: int) -> list[Record]:
    sec, usec = divmod(t_us, 1_000_000)
    # The scan code is made up (HID keyboard page + key code): the driver ignores it.
    return [
        (sec, usec, EV_MSC, MSC_SCAN, 0x70000 + code),
        (sec, usec, EV_KEY, code, value),
        (sec, usec, EV_SYN, SYN_REPORT, 0),
    ]


def _tap(code: int, t_us: int, modifiers: tuple[int, ...]) -> list[Record]:
    step = PER_KEY_US // 4
    out: list[Record] = []
    for mod in modifiers:
        out += _key(mod, KEY_PRESSED, t_us)
    out += _key(code, KEY_PRESSED, t_us + step) + _key(code, KEY_RELEASED, t_us + 2 * step)
    for mod in modifiers:
        out += _key(mod, KEY_RELEASED, t_us + 3 * step)
    return out


def swipe_records(text: str, layout: Keymap, end_us: int) -> list[Record]:
    """The records a reader typing ``text`` and Enter on ``layout`` sends, 2 ms a key, ending by ``end_us``."""
    taps: list[tuple[int, tuple[int, ...]]] = []
    for char in text:
        stroke = layout.keystroke(char)
        if stroke is None:
            raise ValueError(f"keymap {layout.name!r} cannot type {char!r}")
        code, shift, altgr = stroke
        taps.append((code, (KEY_LEFTSHIFT,) if shift else (KEY_RIGHTALT,) if altgr else ()))
        if char in layout.dead and not altgr:
            taps.append((KEY_SPACE, ()))  # a dead key types nothing until the next key
    taps.append((KEY_ENTER, ()))
    # Timestamps end now, as a reader's would: the records are written at the end of the swipe.
    t = end_us - len(taps) * PER_KEY_US
    out: list[Record] = []
    for code, modifiers in taps:
        out += _tap(code, t, modifiers)
        t += PER_KEY_US
    return out


def pack(records: Sequence[Record]) -> bytes:
    return b"".join(INPUT_EVENT.pack(*record) for record in records)


# --- set-up ------------------------------------------------------------------------------


def write_inputs(work: Path, members: int, seed: int) -> tuple[Path, Path]:
    rules = work / "rules.toml"
    rules.write_text(make_ruleset(RULES, seed, make_catalogue(seed)).text, encoding="utf-8")
    snapshot = work / "members.jsonl"
    write_snapshot(snapshot, _members(members), version=1, card_key=KEY)
    return rules, snapshot


def write_lane_config(work: Path, port: int, token: str, rules: Path, fifo: Path) -> Path:
    """``bench.api.write_config``'s lane.toml with the magstripe reader on ``fifo`` appended."""
    config = write_config(work, port, token, rules)
    with config.open("a", encoding="utf-8") as out:
        out.write(
            f"""
[[devices]]
name = "{DEVICE}"
type = "evdev_wedge"
path = {json.dumps(str(fifo))}
role = "magstripe"
gap_ms = {GAP_MS}
keymap = "{KEYMAP}"
"""
        )
    return config


# --- the event stream --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    at_ns: int  # perf_counter_ns when the event's data line was read
    kind: str
    data: dict[str, Any]


class EventStream:
    """``GET /v1/events`` read on its own thread; ``next()`` hands the events over in order."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        # No read timeout: the stream is quiet between swipes (the agent pings every 15 s).
        self._client = httpx.Client(base_url=base_url, headers=headers, timeout=httpx.Timeout(10.0, read=None))
        self._arrivals: queue.Queue[Arrival | Exception] = queue.Queue()
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="sse-listener", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._opened.wait(10.0):
            raise BenchError("GET /v1/events did not answer within 10 s")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # The agent's shutdown ends the stream; after an error the agent is killed next, which ends it
        # too, and the thread is a daemon: no waiting for it then.
        if exc_type is None:
            self._thread.join(10.0)
            self._client.close()

    def _listen(self) -> None:
        try:
            with self._client.stream("GET", "/v1/events") as response:
                if response.status_code != 200:
                    self._arrivals.put(BenchError(f"GET /v1/events answered {response.status_code}"))
                    return
                self._opened.set()
                kind = ""
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        at = time.perf_counter_ns()  # before parsing: the arrival is what is timed
                        self._arrivals.put(Arrival(at, kind, json.loads(line[5:])))
                    elif line.startswith("event:"):
                        kind = line[6:].strip()
        except (httpx.HTTPError, ValueError) as exc:  # ValueError: a data line that is not JSON
            self._arrivals.put(exc)
        finally:
            self._opened.set()

    def next(self, *kinds: str, timeout: float = EVENT_SECONDS) -> Arrival:
        """The next event of one of ``kinds``; device.changed and pings in between are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = self._arrivals.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise BenchError(f"no {' or '.join(kinds)} event within {timeout:.0f} s") from None
            if isinstance(got, Exception):
                raise BenchError(f"the event stream ended: {got!r}")
            if got.kind in kinds:
                return got
            if got.kind != "device.changed":
                raise BenchError(f"unexpected {got.kind} event: {got.data}")


# --- measuring ---------------------------------------------------------------------------


def _member_of(arrival: Arrival) -> str | None:
    if arrival.kind == "member.identified":
        return str(arrival.data["member"]["member_id"])
    return None if arrival.data.get("member_id") is None else str(arrival.data["member_id"])


class Lane:
    """The two ways a card reaches the lane: a swipe on the reader's FIFO, and the POS typing it."""

    def __init__(self, fifo: Path, client: httpx.Client, events: EventStream) -> None:
        self._fifo = os.open(fifo, os.O_WRONLY)  # the agent holds the FIFO open: this does not block
        self._client = client
        self._events = events
        self._layout = keymap(KEYMAP)

    def close(self) -> None:
        os.close(self._fifo)

    def _expect(self, arrival: Arrival, kind: str, member_id: str, source: str, what: str) -> None:
        got = (arrival.kind, _member_of(arrival), arrival.data.get("source"))
        if got != (kind, member_id, source):
            raise BenchError(f"{what}: expected {kind} of {member_id} from {source}, got {got}: {arrival.data}")
        if kind == "card.rejected" and arrival.data.get("reason") != "replaced":
            raise BenchError(f"{what}: rejected as {arrival.data.get('reason')!r}, not 'replaced'")

    def _write(self, records: Sequence[Record]) -> None:
        view = memoryview(pack(records))
        while view:  # one write on a pipe with room; looping only in case a signal cut it short
            view = view[os.write(self._fifo, view) :]

    def swipe_ns(self, number: str, member_id: str, kind: str = "member.identified", *, enter_after: float = 0) -> int:
        """Records written -> the event arrived, in ns; with ``enter_after``, the Enter key's alone that much later."""
        records = swipe_records(swipe_text(number), self._layout, time.time_ns() // 1000)
        if enter_after:
            self._write(records[:-ENTER_RECORDS])
            time.sleep(enter_after)
            records = records[-ENTER_RECORDS:]
        self._write(records)
        started = time.perf_counter_ns()
        arrival = self._events.next("member.identified", "card.rejected")
        self._expect(arrival, kind, member_id, "magstripe", f"swipe of member {member_id}'s card")
        return arrival.at_ns - started

    def identify_ns(self, number: str, member_id: str) -> tuple[int, int]:
        """(POST sent -> the event arrived, POST sent -> its answer arrived), in ns."""
        body = json.dumps({"code": number}).encode("ascii")
        started = time.perf_counter_ns()
        response = self._client.post("/v1/identify", content=body)
        answered = time.perf_counter_ns()
        if response.status_code != 200 or response.json().get("result") != "identified":
            raise BenchError(f"POST /v1/identify answered {response.status_code}: {response.text[:500]}")
        arrival = self._events.next("member.identified", "card.rejected")
        self._expect(arrival, "member.identified", member_id, "manual", f"identify of member {member_id}")
        return arrival.at_ns - started, answered - started


def measure(
    lane: Lane, rounds: int, members: int, pause_s: float, report: Callable[[int], None]
) -> dict[str, list[int]]:
    """``WARM_UP`` + ``rounds`` rounds of a swipe and an identify (order alternating) and a paced swipe.

    Each on a new member's card; every ``REJECT_EVERY``th round also swipes a replaced card.
    """
    samples: dict[str, list[int]] = {key: [] for key in TITLES}
    replaced = iter(range(0, members, 5))  # bench.store gives every fifth member a replaced card
    for r in range(-WARM_UP, rounds):
        n = r + WARM_UP
        steps: tuple[str, ...] = ("swipe", "identify") if n % 2 == 0 else ("identify", "swipe")
        steps += ("swipe_paced",)
        if n % REJECT_EVERY == REJECT_EVERY - 1:
            steps += ("swipe_rejected",)
        for which, step in enumerate(steps):
            card = (3 * n + which) % members
            number, member_id = _number(card), f"M{card:09d}"
            if step == "swipe":
                value = lane.swipe_ns(number, member_id)
            elif step == "swipe_paced":
                value = lane.swipe_ns(number, member_id, enter_after=ENTER_AFTER_S)
            elif step == "identify":
                value, http = lane.identify_ns(number, member_id)
                if r >= 0:
                    samples["identify_http"].append(http)
            else:
                old = next(replaced, 0)
                value = lane.swipe_ns(_number(old, 1), f"M{old:09d}", "card.rejected")
            if r >= 0:
                samples[step].append(value)
            time.sleep(pause_s)
        if r >= 0 and (r + 1) % 100 == 0:
            report(r + 1)
    return samples


def wait_connected(client: httpx.Client, timeout: float) -> None:
    """Until the agent reports the reader connected and the event stream subscribed."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = client.get("/v1/status").json()
        devices = {d["name"]: d["state"] for d in status.get("devices") or []}
        if devices.get(DEVICE) == "connected" and status["events"]["subscribers"] >= 1:
            return
        time.sleep(0.02)
    raise BenchError(f"the reader did not connect, or the stream did not subscribe: {status}")


# --- the report --------------------------------------------------------------------------


def verdict(figures: dict[str, dict[str, float]]) -> dict[str, Any]:
    swipe, identify = figures["swipe"]["p99_ms"], figures["identify"]["p99_ms"]
    return {
        "swipe_p99_ms": {"value": swipe, "target": TARGET_SWIPE_P99_MS, "met": swipe <= TARGET_SWIPE_P99_MS},
        "swipe_over_identify_p99": round(swipe / identify, 3),
        "swipe_minus_identify_p50_ms": round(figures["swipe"]["p50_ms"] - figures["identify"]["p50_ms"], 4),
    }


def render(results: dict[str, Any]) -> str:
    config, figures, goal = results["config"], results["figures"], results["targets"]
    out = [
        (
            f"Swipe to event: {config['members']:,} members, evdev_wedge reader on a FIFO (keymap {KEYMAP}, "
            f"gap_ms {GAP_MS}), {config['records_per_swipe']} records ({config['bytes_per_swipe']:,} bytes) per swipe "
            "in one write"
        ),
        (
            f"{config['rounds']} rounds (a swipe and an identify, order alternating, then a paced swipe; "
            f"a replaced card every {REJECT_EVERY}th); {WARM_UP} rounds of warm-up discarded; "
            f"{config['pause_ms']} ms pause after each; "
            f"load average {config['load_average'][0]:.2f} before, {config['load_average'][1]:.2f} after"
        ),
        "",
    ]
    header = ("measurement", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms")
    rows: list[tuple[str, ...]] = [header]
    for key, title in TITLES.items():
        fig = figures[key]
        cells = (fig["p50_ms"], fig["p90_ms"], fig["p99_ms"], fig["max_ms"], fig["mean_ms"])
        rows.append((title, f"{fig['count']:,}", *(f"{v:.3f}" for v in cells)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for number, row in enumerate(rows):
        out.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if number == 0:
            out.append("  ".join("-" * w for w in widths))
    swipe, identify = figures["swipe"]["p99_ms"], figures["identify"]["p99_ms"]
    met = goal["swipe_p99_ms"]["met"]
    out += [
        "",
        (
            f"swipe p99 / identify p99: {swipe:.3f} / {identify:.3f} ms = {goal['swipe_over_identify_p99']:.2f}x; "
            f"swipe - identify at p50: {goal['swipe_minus_identify_p50_ms']:+.3f} ms"
        ),
        (
            f"target swipe -> member.identified p99 <= {TARGET_SWIPE_P99_MS:.0f} ms: {swipe:.3f} ms, "
            f"{'met' if met else 'NOT met'}"
        ),
        "",
        f"agent stopped by SIGTERM: exit code {results['agent_exit_code']}",
        f"Results: {results['output']}",
    ]
    return "\n".join(out)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rounds = args.swipes or (60 if args.quick else 500)
    if 3 * (rounds + WARM_UP) > args.members:
        _progress(f"note: {rounds + WARM_UP} rounds need {3 * (rounds + WARM_UP)} members; cards will repeat")
    _progress(f"writing a snapshot of {args.members:,} members ...")
    rules, snapshot = write_inputs(work, args.members, args.seed)
    fifo = work / "msr.fifo"
    os.mkfifo(fifo)
    port, token = _free_port(), secrets.token_urlsafe(32)
    config = write_lane_config(work, port, token, rules, fifo)
    _progress("importing them with lane-agent members import ...")
    import_members(config, snapshot)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    base_url = f"http://127.0.0.1:{port}"
    sample = swipe_records(swipe_text(_number(0)), keymap(KEYMAP), 0)
    with (
        httpx.Client(base_url=base_url, headers=headers, timeout=30.0) as client,
        Agent(config, work / "agent.log") as agent,
    ):
        _progress(f"starting lane-agent run on port {port} ...")
        agent.wait_ready(client, READY_SECONDS)
        with EventStream(base_url, headers) as events:
            wait_connected(client, 10.0)
            lane = Lane(fifo, client, events)
            try:
                gc.collect()
                gc.freeze()  # the fixtures live for the whole run: keep the collector from walking them
                _progress(f"measuring: {WARM_UP} rounds of warm-up, then {rounds} ...")
                load_before = os.getloadavg()[0]
                samples = measure(
                    lane, rounds, args.members, args.pause_ms / 1000, lambda r: _progress(f"  round {r}/{rounds}")
                )
                load_after = os.getloadavg()[0]
            finally:
                lane.close()
            _progress("stopping the agent with SIGTERM ...")
            code = agent.stop()
        if code != 0:
            raise BenchError(f"the agent exited {code} after SIGTERM, not 0:\n{agent.tail()}")
    figures = {kind: summary(values) for kind, values in samples.items()}
    return {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {
            "members": args.members,
            "rounds": rounds,
            "warm_up_rounds": WARM_UP,
            "pause_ms": args.pause_ms,
            "keymap": KEYMAP,
            "gap_ms": GAP_MS,
            "per_key_us": PER_KEY_US,
            "records_per_swipe": len(sample),
            "bytes_per_swipe": len(sample) * INPUT_EVENT.size,
            "load_average": [round(load_before, 2), round(load_after, 2)],
        },
        "figures": figures,
        "targets": verdict(figures),
        "agent_exit_code": code,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.swipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=10_000, help="members in the snapshot (default 10,000)")
    parser.add_argument("--swipes", type=int, help="swipes (and identifies) measured (default 500; --quick 60)")
    parser.add_argument("--quick", action="store_true", help="60 swipes: a smoke test")
    parser.add_argument("--pause-ms", type=int, default=30, help="pause after each measurement (default 30)")
    parser.add_argument("--seed", type=int, default=1, help="the synthetic ruleset's seed")
    parser.add_argument("--dir", type=Path, help="where the temporary directory goes")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)
    if args.members < 2:
        parser.error("--members must be at least 2")
    if args.swipes is not None and args.swipes < 1:
        parser.error("--swipes must be at least 1")
    if args.pause_ms < 0:
        parser.error("--pause-ms must not be negative")
    with tempfile.TemporaryDirectory(prefix="bench-swipe-", dir=args.dir) as tmp:
        try:
            results = run(args, Path(tmp))
        except BenchError as exc:
            print(f"bench.swipe: {exc}", file=sys.stderr)
            return 2
    results["output"] = str(args.output)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(render(results))
    return 1 if args.strict and not results["targets"]["swipe_p99_ms"]["met"] else 0


if __name__ == "__main__":
    sys.exit(main())
