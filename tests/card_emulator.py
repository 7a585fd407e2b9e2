"""A contact/contactless card that speaks vpcd's protocol, for tests through a real pcscd.

vsmartcard's ``vpcd`` IFD handler makes pcscd show the readers "Virtual PCD 00
00" (TCP 35963) and "Virtual PCD 00 01" (TCP 35964).  The *card* is the TCP
client: connecting inserts it, disconnecting pulls it.  Every message in
either direction is a 2-byte big-endian length and the bytes.  From vpcd a
one-byte message is a control code (0 power off, 1 power on, 2 reset, 4 "send
your ATR", which is also how vpcd polls for presence); anything longer is a
command APDU, answered with data + SW1 SW2.

The card served is described by ``VirtualCard``: its ATR, applications (AID →
the bytes of the file READ BINARY returns once selected), a contactless UID
answered to GET DATA (FF CA 00 00 00), and the faults the driver must survive:
latency per APDU, a pull after N APDUs (the connection drops where the answer
should be), and configurable status words for what it does not support.

Debian's own ``vicc`` is not used on purpose: it is broken on Python 3 (see
docs/hardware.md), and tests need faults it cannot produce.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

VPCD_HOST = "127.0.0.1"
VPCD_PORT = 35963  # "Virtual PCD 00 00" in Debian's /etc/reader.conf.d/vpcd
# TS 3B, T0 8A (TD1 follows, 10 historical bytes), TD1 80 (TD2 follows, T=0), TD2 01 (T=1),
# the historical bytes "LANE-CARD1", and TCK (the XOR of T0 to the last historical byte).
DEFAULT_ATR = bytes.fromhex("3B 8A 80 01 4C 41 4E 45 2D 43 41 52 44 31 05")
DEFAULT_AID = bytes.fromhex("F04C414E454D42")

_POWER_OFF, _POWER_ON, _RESET, _GET_ATR = 0, 1, 2, 4
_SW_OK = b"\x90\x00"


@dataclass(frozen=True, slots=True)
class VirtualCard:
    """What the emulated card holds and how it misbehaves."""

    atr: bytes = DEFAULT_ATR
    # AID -> the transparent file READ BINARY reads once that application is selected.
    applications: Mapping[bytes, bytes] = field(default_factory=dict)
    uid: bytes | None = None  # None: GET DATA (FF CA) is answered with ``no_uid_sw``
    no_uid_sw: bytes = b"\x6a\x81"  # some cards say 6D00 (INS not supported) instead
    latency_s: float = 0.0  # before answering each APDU (not control messages)
    slow_ins: frozenset[int] | None = None  # INS bytes that get the latency; None: every APDU
    pull_after_apdus: int | None = None  # drop the connection instead of answering APDU number N+1
    get_response_chunk: int | None = None  # answer SELECT with 61xx and serve the FCI by GET RESPONSE
    fci: bytes = b""  # data returned to a successful SELECT
    exact_le: bool = False  # READ BINARY past the end: 6Cxx (ask again for xx bytes), not data + 6282


class VpcdCard:
    """One card in one vpcd reader slot; ``insert()`` and ``remove()`` are the cashier's hands."""

    def __init__(self, card: VirtualCard, *, host: str = VPCD_HOST, port: int = VPCD_PORT) -> None:
        self.card = card
        self.host = host
        self.port = port
        self.apdus: list[bytes] = []  # every command APDU received, in order
        self.received_at: list[float] = []  # time.monotonic() of each, for latency checks
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._selected: bytes | None = None
        self._pending: bytes = b""  # data waiting for GET RESPONSE

    async def __aenter__(self) -> Self:
        await self.insert()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.remove()

    @property
    def inserted(self) -> bool:
        return self._task is not None and not self._task.done()

    async def insert(self) -> None:
        if self.inserted:
            raise RuntimeError("card already inserted")
        reader, writer = await asyncio.open_connection(self.host, self.port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._writer = writer
        self._selected = None
        self._task = asyncio.create_task(self._serve(reader, writer), name=f"vpcd-card-{self.port}")

    async def remove(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close()

    async def wait_removed(self) -> None:
        """Until the card dropped its connection on its own (``pull_after_apdus``)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            while True:
                # vpcd writes the length and the body separately; its Nagle holds the body until the
                # length is ACKed, and Linux leaves quick-ACK mode on its own: re-arm it after every
                # read, or each message waits out a ~40 ms delayed ACK.
                header = await reader.readexactly(2)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                message = await reader.readexactly(struct.unpack(">H", header)[0])
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                answer = await self._answer(message)
                if answer is None:
                    continue
                writer.write(struct.pack(">H", len(answer)) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # vpcd went away (pcscd stopped): the card is out of a reader that no longer exists
        except _PulledError:
            pass
        finally:
            await self._close()

    async def _answer(self, message: bytes) -> bytes | None:
        if len(message) == 1:
            if message[0] == _GET_ATR:
                return self.card.atr
            if message[0] in {_POWER_OFF, _RESET}:
                self._selected = None
                self._pending = b""
            return None  # power on/off and reset are not answered
        self.apdus.append(message)
        self.received_at.append(time.monotonic())
        if self.card.pull_after_apdus is not None and len(self.apdus) > self.card.pull_after_apdus:
            raise _PulledError
        if self.card.latency_s and (self.card.slow_ins is None or message[1] in self.card.slow_ins):
            await asyncio.sleep(self.card.latency_s)
        return self.respond(message)

    def respond(self, apdu: bytes) -> bytes:
        """The card's answer to one command APDU (a small ISO 7816-4 subset)."""
        cla, ins, p1, p2 = apdu[0], apdu[1], apdu[2], apdu[3]
        body = apdu[4:]
        if cla == 0xFF and ins == 0xCA and p1 == 0x00:
            return self.card.uid + _SW_OK if self.card.uid is not None else self.card.no_uid_sw
        if cla != 0x00:
            return b"\x6e\x00"
        if ins == 0xA4 and p1 == 0x04:
            return self._select(body)
        if ins == 0xB0:
            return self._read_binary(p1, p2, body)
        if ins == 0xC0:
            return self._get_response(body)
        return b"\x6d\x00"

    def _select(self, body: bytes) -> bytes:
        if not body or len(body) < 1 + body[0]:
            return b"\x67\x00"
        aid = body[1 : 1 + body[0]]
        if aid not in self.card.applications:
            self._selected = None
            return b"\x6a\x82"
        self._selected = aid
        chunk = self.card.get_response_chunk
        if chunk is not None and self.card.fci:
            self._pending = self.card.fci
            return bytes([0x61, min(len(self._pending), chunk) & 0xFF])
        return self.card.fci + _SW_OK

    def _read_binary(self, p1: int, p2: int, body: bytes) -> bytes:
        if self._selected is None:
            return b"\x69\x86"  # command not allowed: no current EF
        if p1 & 0x80:
            return b"\x6a\x81"  # short-EF addressing is not supported by this card
        data = self.card.applications[self._selected]
        offset = (p1 << 8) | p2
        if offset > len(data):
            return b"\x6b\x00"
        le = (body[0] or 256) if len(body) == 1 else 256
        chunk = data[offset : offset + le]
        if len(chunk) < le and self.card.exact_le and chunk:
            return bytes((0x6C, len(chunk)))
        return chunk + (_SW_OK if len(chunk) == le else b"\x62\x82")

    def _get_response(self, body: bytes) -> bytes:
        if not self._pending:
            return b"\x69\x85"
        le = (body[0] or 256) if len(body) == 1 else 256
        chunk, self._pending = self._pending[:le], self._pending[le:]
        tail = bytes([0x61, min(len(self._pending), 256) & 0xFF]) if self._pending else _SW_OK
        return chunk + tail


class _PulledError(Exception):
    """The card leaves the field where it should have answered."""
