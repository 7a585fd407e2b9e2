"""The systemd notify protocol (sd_notify(3)), hand-written: readiness, status and watchdog pings.

The protocol is one datagram of ``KEY=value`` lines sent to the AF_UNIX socket
named by ``$NOTIFY_SOCKET``; a library for it would be more code to audit than
the protocol itself.  Outside systemd (no ``$NOTIFY_SOCKET``) every call is a
no-op, so the daemon runs the same way under a terminal or a test.

Sending never raises: the lane must keep selling if the notify socket is gone
(systemd restarted, a test harness exited).  A failure is logged once per
distinct errno, not on every watchdog ping.

Not thread-safe: call it from the event loop that owns the daemon.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Mapping
from types import TracebackType
from typing import Self

log = logging.getLogger(__name__)

_USEC_PER_SECOND = 1_000_000


class SystemdNotifier:
    """Sends sd_notify messages to systemd, or does nothing when not run by systemd.

    Use :meth:`from_env` in the daemon; the constructor is for tests and for
    callers that already know the socket.  Usable as a context manager, which
    closes the socket on exit.
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        """``address``: a socket path, or ``"@name"`` for the abstract namespace; ``None`` disables.

        ``watchdog_usec``: systemd's watchdog timeout in microseconds, or ``None``.
        """
        self._label = address or ""
        # A leading NUL selects Linux's abstract namespace; systemd spells it '@' in the environment.
        self._address = "\0" + address[1:] if address and address.startswith("@") else address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._failed_errnos: set[int] = set()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (default: ``os.environ``)."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "") or None
        if address is not None and not address.startswith(("/", "@")):
            # systemd >= 253 may pass "vsock:CID:PORT" to a VM guest; a lane is never one.
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket; not notifying systemd", address)
            address = None
        return cls(address, watchdog_usec=_watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        """Whether a notify socket is configured (the process was started by systemd with Type=notify)."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of systemd's timeout, as sd_watchdog_enabled(3) advises).

        ``None`` when systemd runs no watchdog for this process.
        """
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / _USEC_PER_SECOND

    def notify(self, fields: Mapping[str, str]) -> bool:
        """Send ``fields`` as one datagram of ``KEY=value`` lines; ``True`` if the kernel took it.

        Newlines in values become spaces (a newline would start a new field).
        Raises ``ValueError`` only for a malformed key, which is a programming error.
        """
        if self._address is None or not fields:
            return False
        lines = []
        for key, value in fields.items():
            if not key or "=" in key or "\n" in key:
                raise ValueError(f"invalid sd_notify key {key!r}")
            lines.append(f"{key}={_one_line(value)}")
        # "replace": a stray surrogate in a status text must not raise into the daemon.
        payload = "\n".join(lines).encode("utf-8", "replace")
        try:
            if self._sock is None:
                # Non-blocking: a full receive queue must drop a ping, never stall the event loop.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            self._report(exc)
            return False
        if self._failed_errnos:
            self._failed_errnos.clear()
            log.info("sd_notify to %s works again", self._label)
        return True

    def ready(self, status: str = "") -> bool:
        """Tell systemd start-up is complete (``READY=1``), optionally with a status line."""
        return self.notify({"READY": "1", "STATUS": status} if status else {"READY": "1"})

    def status(self, text: str) -> bool:
        """Set the one-line status ``systemctl status`` shows."""
        return self.notify({"STATUS": text})

    def watchdog(self) -> bool:
        """Ping the watchdog (``WATCHDOG=1``); call every :meth:`watchdog_interval` seconds."""
        return self.notify({"WATCHDOG": "1"})

    def stopping(self, status: str = "") -> bool:
        """Tell systemd shutdown has begun (``STOPPING=1``), optionally with a status line."""
        return self.notify({"STOPPING": "1", "STATUS": status} if status else {"STOPPING": "1"})

    def close(self) -> None:
        """Close the socket; a later call opens a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _report(self, exc: OSError) -> None:
        code = exc.errno if exc.errno is not None else -1
        if code in self._failed_errnos:
            return
        self._failed_errnos.add(code)
        log.warning(
            "sd_notify to %s failed (%s: %s); systemd sees no readiness or watchdog pings until it works again",
            self._label,
            errno.errorcode.get(code, str(code)),
            exc.strerror or exc,
        )


def _one_line(value: str) -> str:
    # A newline would end the field and start a bogus one; a CR would garble `systemctl status`.
    return value.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    raw_usec = env.get("WATCHDOG_USEC", "")
    if not raw_usec:
        return None
    raw_pid = env.get("WATCHDOG_PID", "")
    if raw_pid:
        try:
            pid = int(raw_pid)
        except ValueError:
            log.warning("WATCHDOG_PID=%r is not a process id; not pinging the watchdog", raw_pid)
            return None
        # The variables leak into children; only the process systemd watches may ping.
        if pid != os.getpid():
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; not pinging the watchdog", raw_usec)
        return None
    if usec <= 0:
        log.warning("WATCHDOG_USEC=%r is not positive; not pinging the watchdog", raw_usec)
        return None
    return usec
