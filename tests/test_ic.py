"""drivers.ic through a real pcscd and vpcd reader, with tests.card_emulator as the card.

Nothing is faked above the TCP socket vpcd reads the card from: pyscard,
pcsc-lite's client library, pcscd and the vpcd IFD handler are the real
ones.  Tests that stop pcscd come last and each leaves it running again;
every test that needs pcscd asks for it through the ``pcsc`` fixture, which
starts it if an earlier test left it down.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from card_emulator import DEFAULT_AID, VirtualCard, VpcdCard
from pcsc import VPCD_READER, Pcscd, card_present, wait_until
from pydantic import ValidationError
from smartcard import scard

from drivers.apdu import member_file_bytes, select_aid
from drivers.base import CardRead, CardRemoved, DeviceChanged, DriverEvent, Unreadable
from drivers.ic import ICCardDriver, ICConfig, PcscError, code_name

pytestmark = pytest.mark.timeout(60)

NUMBER = "6200123456780001"
MEMBER = VirtualCard(applications={DEFAULT_AID: member_file_bytes(NUMBER, "271231", 1)})
UID = bytes.fromhex("04A1B2C3D4E5F6")
CONNECTED = DeviceChanged("ic", "connected", f"reader {VPCD_READER}")


def member(number: str, **faults: Any) -> VirtualCard:
    return VirtualCard(applications={DEFAULT_AID: member_file_bytes(number)}, **faults)


def read(number: str, expiry: str | None = None) -> CardRead:
    return CardRead("ic", "ic", number, expiry=expiry)


@pytest.fixture(scope="module")
def pcscd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pcscd]:
    daemon = Pcscd(tmp_path_factory.mktemp("pcscd"))
    daemon.ensure_running()
    yield daemon
    daemon.restore()


@pytest.fixture
def pcsc(pcscd: Pcscd) -> Pcscd:
    """pcscd up with the vpcd readers, and no card left in ours by an earlier test."""
    pcscd.ensure_running()
    wait_until(lambda: card_present(VPCD_READER) is False, "the vpcd reader to be empty")
    return pcscd


def config(**overrides: Any) -> ICConfig:
    settings: dict[str, Any] = {
        "name": "ic",
        "reader": VPCD_READER,
        "apdu_timeout_s": 1.0,
        "poll_s": 0.5,
        "retry_initial_s": 0.05,
        "retry_max_s": 0.2,
    }
    return ICConfig.model_validate(settings | overrides)


def run(scenario: Coroutine[Any, Any, None]) -> None:
    asyncio.run(scenario)


class Events:
    """A driver's events as they arrive, each awaited with a timeout."""

    def __init__(self, driver: ICCardDriver) -> None:
        self._driver = driver
        self._queue: asyncio.Queue[tuple[float, DriverEvent]] = asyncio.Queue()
        self.seen: list[DriverEvent] = []
        self.ended = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _pump(self) -> None:
        async for event in self._driver.events():
            self.seen.append(event)
            self._queue.put_nowait((time.monotonic(), event))
        self.ended.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._pump(), name="test-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def timed(self, within: float = 5.0) -> tuple[float, DriverEvent]:
        getter = asyncio.ensure_future(self._queue.get())
        assert self._task is not None
        done, _ = await asyncio.wait({getter, self._task}, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            if self._task in done:
                self._task.result()  # the driver's own failure, if that is why
            pytest.fail(f"no event within {within:g} s; seen so far: {self.seen}")
        return getter.result()

    async def next(self, within: float = 5.0) -> DriverEvent:
        return (await self.timed(within))[1]

    async def quiet(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        assert self._queue.empty(), f"unexpected events: {list(self._queue._queue)}"


def ic_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("ic-")]


@contextlib.asynccontextmanager
async def started(cfg: ICConfig) -> AsyncIterator[Events]:
    """The driver running with its events recorded; on the way out its thread must be gone."""
    driver = ICCardDriver(cfg)
    events = Events(driver)
    async with driver:
        events.start()
        try:
            yield events
        finally:
            await events.stop()
    assert not ic_threads(), "the driver's PC/SC thread outlived it"


# --- configuration (no pcscd needed) ------------------------------------------


def test_config_defaults():
    cfg = ICConfig(name="ic")
    assert cfg.aid == "F0 4C 41 4E 45 4D 42"
    assert cfg.read_plan().aid == DEFAULT_AID
    assert cfg.apdu_timeout_s == 2.0
    assert cfg.matches("anything")
    assert ICConfig.model_validate({"name": "x", "type": "ic", "aid": "a0:00:00:00:03:10:10", "poll_s": 2}).aid == (
        "A0 00 00 00 03 10 10"
    )
    regex = ICConfig(name="ic", reader=r"^ACS ACR1252 .* PICC", reader_regex=True)
    assert regex.matches("ACS ACR1252 Dual Reader [ACR1252 Dual Reader PICC] 00 00")
    assert not regex.matches("ACS ACR1252 Dual Reader [ACR1252 Dual Reader SAM] 00 01")
    assert ICConfig(name="ic", reader="PICC").matches("ACS ACR1252 Dual Reader [ACR1252 Dual Reader PICC] 00 00")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"aid": "F0 4C 41 4E"}, "5-16 bytes"),
        ({"aid": "F0 4C 41 4E 45 4D 42 " * 3}, "5-16 bytes"),
        ({"aid": "F0 4C 4G 4E 45"}, "hex bytes"),
        ({"aid": "F04C414E454"}, "hex bytes"),
        ({"reader": "(", "reader_regex": True}, "not a regular expression"),
        ({"read_offset": 0x7F00, "read_length": 0x200}, "within 32768"),
        ({"read_offset": 0x7F00}, "within 32768"),
        ({"read_chunk": 0}, "greater than or equal to 1"),
        ({"apdu_timeout_s": 0}, "greater than 0"),
        ({"retry_initial_s": 5, "retry_max_s": 1}, "must not exceed"),
        ({"uid_fallbak": True}, "Extra inputs"),
        ({"uid_fallback": "yes"}, "valid boolean"),
        ({"type": "evdev_wedge"}, "'ic'"),
    ],
)
def test_config_refuses(overrides, message):
    with pytest.raises(ValidationError, match=message):
        ICConfig.model_validate({"name": "ic"} | overrides)


def test_pcsc_errors_carry_the_scard_name():
    error = PcscError("ic", "SCardEstablishContext", int(scard.SCARD_E_NO_SERVICE))
    assert error.code == "SCARD_E_NO_SERVICE"
    assert error.service_gone
    assert error.device == "ic"
    assert "SCardEstablishContext" in str(error)
    assert code_name(0x12345678) == "0x12345678"
    assert not PcscError("ic", "SCardTransmit", int(scard.SCARD_W_REMOVED_CARD)).service_gone


def test_events_need_the_driver_entered():
    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="async with"):
            await anext(ICCardDriver(config()).events())

    run(scenario())


# --- through pcscd ------------------------------------------------------------


def test_emulator_answers_without_delayed_ack_stalls(pcsc):
    """The transport under every other test: pyscard → pcscd → vpcd → emulator, per APDU."""

    def transmit_many(count: int) -> list[float]:
        _, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        try:
            wait_until(lambda: card_present(VPCD_READER) is True, "the card to be seen")
            hresult, handle, protocol = scard.SCardConnect(
                context, VPCD_READER, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1
            )
            assert hresult == scard.SCARD_S_SUCCESS, code_name(hresult)
            apdu = list(select_aid(DEFAULT_AID).to_bytes())
            times = []
            for _ in range(count):
                started_at = time.perf_counter()
                hresult, response = scard.SCardTransmit(handle, protocol, apdu)
                times.append(time.perf_counter() - started_at)
                assert hresult == scard.SCARD_S_SUCCESS
                assert bytes(response) == b"\x90\x00"
            scard.SCardDisconnect(handle, scard.SCARD_LEAVE_CARD)
            return times
        finally:
            scard.SCardReleaseContext(context)

    async def scenario() -> None:
        async with VpcdCard(MEMBER):
            times = await asyncio.to_thread(transmit_many, 200)
        median = statistics.median(times)
        print(f"APDU round trip through pcscd + vpcd: median {median * 1000:.2f} ms, max {max(times) * 1000:.2f} ms")
        assert median < 0.010  # a delayed ACK makes it ~40 ms

    run(scenario())


def test_member_card_read_and_removed(pcsc):
    async def scenario() -> None:
        async with started(config()) as events:
            assert await events.next() == CONNECTED
            card = VpcdCard(MEMBER)
            inserted_at = time.monotonic()
            async with card:
                at, event = await events.timed()
                assert event == read(NUMBER, "2712")
                print(f"insertion to CardRead: {(at - inserted_at) * 1000:.0f} ms")
                assert card.apdus == [select_aid(DEFAULT_AID).to_bytes(), bytes.fromhex("00 B0 00 00 80")]
            assert await events.next() == CardRemoved("ic")
            # The next cashier's card.
            async with VpcdCard(member("6200999900000042")):
                assert await events.next() == read("6200999900000042")
            assert await events.next() == CardRemoved("ic")
            await events.quiet(0.2)

    run(scenario())


def test_a_card_already_in_the_reader_is_read_at_start(pcsc):
    async def scenario() -> None:
        async with VpcdCard(MEMBER):
            await asyncio.to_thread(wait_until, lambda: card_present(VPCD_READER) is True, "the card to be seen")
            async with started(config()) as events:
                assert await events.next() == CONNECTED
                assert await events.next() == read(NUMBER, "2712")

    run(scenario())


@pytest.mark.parametrize(
    ("card", "uid_fallback", "expected"),
    [
        (VirtualCard(uid=UID), True, read("UID04A1B2C3D4E5F6")),
        (VirtualCard(uid=UID), False, "unknown_card"),
        (VirtualCard(no_uid_sw=b"\x6a\x81"), True, "unknown_card"),
        (VirtualCard(no_uid_sw=b"\x6d\x00"), True, "unknown_card"),
        (VirtualCard(uid=bytes.fromhex("08A1B2C3")), True, "random_uid"),
        (VirtualCard(applications={DEFAULT_AID: bytes(64)}), True, "blank_card"),
        (VirtualCard(applications={DEFAULT_AID: b"\x70\x05\x5a\x02\x12\x34"}), True, "truncated"),
    ],
    ids=["uid", "uid-not-allowed", "no-uid-6a81", "no-uid-6d00", "random-uid", "blank", "truncated"],
)
def test_cards_that_are_not_member_cards(pcsc, card, uid_fallback, expected):
    async def scenario() -> None:
        async with started(config(uid_fallback=uid_fallback)) as events:
            assert await events.next() == CONNECTED
            emulated = VpcdCard(card)
            async with emulated:
                event = await events.next()
                if isinstance(expected, CardRead):
                    assert event == expected
                else:
                    assert isinstance(event, Unreadable), event
                    assert (event.reason, event.source) == (expected, "ic")
                if not uid_fallback:
                    assert [apdu[:2] for apdu in emulated.apdus] == [b"\x00\xa4"]  # no GET DATA asked
            assert await events.next() == CardRemoved("ic")

    run(scenario())


def test_unknown_card_detail_names_the_atr_for_the_technician(pcsc):
    async def scenario() -> None:
        async with started(config()) as events:
            assert await events.next() == CONNECTED
            async with VpcdCard(VirtualCard()):
                event = await events.next()
            assert isinstance(event, Unreadable)
            assert event.detail == (
                "no member application (SELECT: SW 6A82 (not_found, 0 data bytes)); "
                "ATR 3B 8A 80 01 4C 41 4E 45 2D 43 41 52 44 31 05"
            )

    run(scenario())


def test_chained_answers_through_pcscd(pcsc):
    fussy = VirtualCard(
        applications={DEFAULT_AID: member_file_bytes(NUMBER) + bytes(200)},
        fci=bytes(range(200)),
        get_response_chunk=0x40,
        exact_le=True,
    )

    async def scenario() -> None:
        async with started(config(read_chunk=250)) as events:
            assert await events.next() == CONNECTED
            async with VpcdCard(fussy) as card:
                assert await events.next() == read(NUMBER)
                # 61 40, then 61 88: two GET RESPONSE; then 6C D4 (212 bytes there): READ BINARY again.
                assert [apdu[1] for apdu in card.apdus] == [0xA4, 0xC0, 0xC0, 0xB0, 0xB0]
                assert card.apdus[1:] == [
                    bytes.fromhex(apdu) for apdu in ("00C0000040", "00C0000088", "00B00000FA", "00B00000D4")
                ]

    run(scenario())


def test_a_slow_card_within_the_timeout_is_read(pcsc):
    async def scenario() -> None:
        async with started(config(apdu_timeout_s=1.0)) as events:
            assert await events.next() == CONNECTED
            async with VpcdCard(member(NUMBER, latency_s=0.3)):
                assert await events.next() == read(NUMBER)

    run(scenario())


def test_a_slow_card_times_out_at_the_deadline_and_the_next_card_is_read(pcsc):
    slow = member(NUMBER, latency_s=2.5, slow_ins=frozenset({0xB0}))

    async def scenario() -> None:
        async with started(config(apdu_timeout_s=0.3)) as events:
            assert await events.next() == CONNECTED
            card = VpcdCard(slow)
            async with card:
                at, event = await events.timed()
                assert event == Unreadable("ic", "ic", "timeout", "no answer to READ BINARY within 0.3 s")
                late_by = at - card.received_at[1]
                assert 0.25 <= late_by < 1.0, (
                    late_by
                )  # at the deadline (armed just before the card got it), not at 2.5 s
                await events.quiet(0.3)
            assert await events.next() == CardRemoved("ic")
            async with VpcdCard(member("6200999900000042")):
                assert await events.next() == read("6200999900000042")
            assert await events.next() == CardRemoved("ic")

    run(scenario())


def test_a_card_that_answers_after_the_deadline_is_never_read(pcsc):
    """The card does answer (at 1.2 s); the answer is thrown away, and nothing but the timeout is reported."""

    async def scenario() -> None:
        async with started(config(apdu_timeout_s=0.3)) as events:
            assert await events.next() == CONNECTED
            card = VpcdCard(member(NUMBER, latency_s=1.2, slow_ins=frozenset({0xB0})))
            async with card:
                assert (await events.next()).reason == "timeout"  # type: ignore[union-attr]
                await asyncio.sleep(1.5)
                assert len(card.apdus) == 2  # SELECT, READ BINARY: answered late, and nothing more asked
                await events.quiet(0.1)
            assert await events.next() == CardRemoved("ic")

    run(scenario())


@pytest.mark.parametrize("after", [1, 2, 3, 4])
def test_a_card_pulled_mid_read_never_gives_a_number(pcsc, after):
    # 4-byte chunks: SELECT, then five READ BINARY for the 18-byte file; the card leaves at APDU after+1.
    card = VirtualCard(applications={DEFAULT_AID: member_file_bytes(NUMBER, "271231")}, pull_after_apdus=after)

    async def scenario() -> None:
        async with started(config(read_chunk=4)) as events:
            assert await events.next() == CONNECTED
            emulated = VpcdCard(card)
            await emulated.insert()
            await emulated.wait_removed()
            first = await events.next()
            assert isinstance(first, Unreadable), first
            assert first.reason == "removed"
            assert await events.next() == CardRemoved("ic")
            await events.quiet(0.2)

    run(scenario())


def test_a_card_pulled_while_the_card_is_still_answering(pcsc):
    async def scenario() -> None:
        async with started(config(apdu_timeout_s=5.0)) as events:
            assert await events.next() == CONNECTED
            card = VpcdCard(member(NUMBER, latency_s=3.0, slow_ins=frozenset({0xB0})))
            await card.insert()
            await asyncio.to_thread(wait_until, lambda: len(card.apdus) == 2, "READ BINARY to be sent")
            pulled_at = time.monotonic()
            await card.remove()
            at, event = await events.timed()
            assert isinstance(event, Unreadable)
            assert event.reason == "removed"
            assert at - pulled_at < 1.0
            assert await events.next() == CardRemoved("ic")

    run(scenario())


def test_which_readers_are_watched(pcsc):
    async def scenario() -> None:
        async with started(config(reader="No Such Reader")) as events:
            assert await events.next() == DeviceChanged(
                "ic",
                "disconnected",
                "no PC/SC reader matching 'No Such Reader' (pcscd lists: Virtual PCD 00 00, Virtual PCD 00 01)",
            )
        async with started(config(reader="")) as events:
            assert await events.next() == DeviceChanged(
                "ic", "connected", "readers Virtual PCD 00 00, Virtual PCD 00 01"
            )
        async with started(config(reader=r"PCD 00 0[1-9]$", reader_regex=True)) as events:
            assert await events.next() == DeviceChanged("ic", "connected", "reader Virtual PCD 00 01")
            async with VpcdCard(MEMBER):  # in reader 00 00, which this device does not watch
                await events.quiet(1.0)

    run(scenario())


def test_shutdown_is_prompt_and_ends_the_events(pcsc):
    async def scenario() -> None:
        driver = ICCardDriver(config(poll_s=30.0))  # only SCardCancel can end a 30 s wait this soon
        events = Events(driver)
        async with driver:
            events.start()
            assert await events.next() == CONNECTED
            await asyncio.sleep(0.2)  # well inside SCardGetStatusChange
            closing = time.monotonic()
        took = time.monotonic() - closing
        await asyncio.wait_for(events.ended.wait(), 1.0)
        assert not ic_threads()
        assert took < 0.5, took
        print(f"shutdown: {took * 1000:.0f} ms")

    run(scenario())


def test_shutdown_during_a_slow_command_waits_for_it_then_stops(pcsc):
    async def scenario() -> None:
        card = VpcdCard(member(NUMBER, latency_s=0.6, slow_ins=frozenset({0xB0})))
        driver = ICCardDriver(config(apdu_timeout_s=2.0))
        events = Events(driver)
        async with driver:
            events.start()
            assert await events.next() == CONNECTED
            await card.insert()
            await asyncio.to_thread(wait_until, lambda: len(card.apdus) == 2, "READ BINARY to be sent")
            closing = time.monotonic()
        took = time.monotonic() - closing
        assert not ic_threads()
        assert took < 1.0, took
        await asyncio.wait_for(events.ended.wait(), 1.0)
        assert events.seen == [CONNECTED]  # the card being read when the lane closed is not reported
        await card.remove()

    run(scenario())


def test_shutdown_with_a_hung_card_gives_up_and_the_thread_ends_when_the_card_leaves(pcsc, caplog):
    async def scenario() -> None:
        card = VpcdCard(member(NUMBER, latency_s=30.0, slow_ins=frozenset({0xB0})))
        driver = ICCardDriver(config(apdu_timeout_s=0.3))
        events = Events(driver)
        async with driver:
            events.start()
            assert await events.next() == CONNECTED
            await card.insert()
            event = await events.next()
            assert isinstance(event, Unreadable)
            assert event.reason == "timeout"
            closing = time.monotonic()
        took = time.monotonic() - closing
        assert 1.2 <= took < 2.0, took  # apdu_timeout_s + 1 s, then the driver stops waiting
        assert "still blocked in a card command" in caplog.text
        assert ic_threads(), "the thread is still inside SCardTransmit"
        await card.remove()  # the cashier pulls the card: the pending transmit ends
        await asyncio.to_thread(wait_until, lambda: not ic_threads(), "the PC/SC thread to end", 5.0)

    run(scenario())


# --- pcscd stopped, restarted, reconfigured (last: they stop the shared pcscd) ------


def test_pcscd_not_running_at_start_then_started(pcsc):
    async def scenario() -> None:
        await asyncio.to_thread(pcsc.stop)
        async with started(config()) as events:
            event = await events.next()
            assert isinstance(event, DeviceChanged)
            assert event.state == "disconnected"
            assert event.detail.startswith("pcscd not reachable: SCardEstablishContext: ")
            assert event.detail.endswith("(SCARD_E_NO_SERVICE)")
            await events.quiet(0.5)  # retrying, but not reporting every attempt
            await asyncio.to_thread(pcsc.ensure_running)
            assert await events.next() == CONNECTED
            async with VpcdCard(MEMBER):
                assert await events.next() == read(NUMBER, "2712")

    run(scenario())


def test_pcscd_gone_mid_run_with_a_card_in_the_reader(pcsc):
    async def scenario() -> None:
        async with started(config()) as events:
            assert await events.next() == CONNECTED
            card = VpcdCard(MEMBER)
            async with card:
                assert await events.next() == read(NUMBER, "2712")
                await asyncio.to_thread(pcsc.stop)
                assert await events.next() == CardRemoved("ic")
                event = await events.next()
                assert isinstance(event, DeviceChanged)
                assert (event.state, event.detail[:20]) == ("disconnected", "pcscd not reachable:")
                await card.wait_removed()  # vpcd went with pcscd: the card is out of the reader
            await asyncio.to_thread(pcsc.ensure_running)
            assert await events.next() == CONNECTED
            async with VpcdCard(member("6200999900000042")):
                assert await events.next() == read("6200999900000042")

    run(scenario())


def test_reader_gone_and_back(pcsc, tmp_path: Path):
    no_readers = tmp_path / "reader.conf.d"
    no_readers.mkdir()

    async def scenario() -> None:
        async with started(config()) as events:
            assert await events.next() == CONNECTED
            await asyncio.to_thread(pcsc.ensure_running, no_readers)  # pcscd restarted without the reader
            event = await events.next()
            assert isinstance(event, DeviceChanged)
            assert (event.state, event.detail[:20]) == ("disconnected", "pcscd not reachable:")
            assert await events.next() == DeviceChanged(
                "ic", "disconnected", "no PC/SC reader matching 'Virtual PCD 00 00' (pcscd lists: none)"
            )
            await asyncio.to_thread(pcsc.ensure_running)  # and with it again
            event = await events.next()
            assert isinstance(event, DeviceChanged)
            assert (event.state, event.detail[:20]) == ("disconnected", "pcscd not reachable:")
            assert await events.next() == CONNECTED
            async with VpcdCard(MEMBER):
                assert await events.next() == read(NUMBER, "2712")

    run(scenario())
