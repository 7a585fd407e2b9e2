"""The machine's pcscd for the IC tests: started if missing, stopped only if the tests started it.

pcscd's socket (``/run/pcscd/pcscd.comm``) is fixed, so there is one per
machine and the tests share it.  ``Pcscd`` records what it found: a pcscd
already running (a developer's, or a socket-activated one) is left running,
or, if a test had to stop it to see what the driver does without pcscd,
started again afterwards with the command line it had.  One the tests
started is stopped at the end.  Debian's ``vsmartcard-vpcd`` package makes
the default configuration show "Virtual PCD 00 00" (TCP 35963) and "Virtual
PCD 00 01" (TCP 35964), whose cards ``tests.card_emulator`` plays.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from smartcard import scard

PCSCD_PIDFILE = Path("/run/pcscd/pcscd.pid")
VPCD_READER = "Virtual PCD 00 00"
START_TIMEOUT_S = 10.0


def _context() -> int | None:
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    return context if hresult == scard.SCARD_S_SUCCESS else None


def service_up() -> bool:
    """Whether a pcscd answers on the machine's socket."""
    context = _context()
    if context is None:
        return False
    scard.SCardReleaseContext(context)
    return True


def readers() -> list[str]:
    """The readers pcscd lists (none if it is not running)."""
    context = _context()
    if context is None:
        return []
    try:
        hresult, names = scard.SCardListReaders(context, [])
        return list(names) if hresult == scard.SCARD_S_SUCCESS else []
    finally:
        scard.SCardReleaseContext(context)


def card_present(reader: str = VPCD_READER) -> bool | None:
    """Whether pcscd sees a card in ``reader`` (None: no such reader, or no pcscd)."""
    context = _context()
    if context is None:
        return None
    try:
        hresult, states = scard.SCardGetStatusChange(context, 0, [(reader, scard.SCARD_STATE_UNAWARE)])
        if hresult != scard.SCARD_S_SUCCESS:
            return None
        return bool(states[0][1] & scard.SCARD_STATE_PRESENT)
    finally:
        scard.SCardReleaseContext(context)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = START_TIMEOUT_S) -> None:
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        time.sleep(0.01)


def running_pid() -> int | None:
    """The pid of the pcscd running on this machine, from its pid file (None: none running)."""
    try:
        pid = int(PCSCD_PIDFILE.read_text().strip("\x00\n "))
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, ValueError):
        return None
    name = status.split("\n", 1)[0].removeprefix("Name:").strip()
    zombie = "State:\tZ" in status
    return pid if name == "pcscd" and not zombie else None


class Pcscd:
    """The machine's pcscd over a test session: what was found, and what must be put back."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._config_dir: Path | None = None
        self._starts = 0
        pid = running_pid()
        # A pcscd that was here first: its command line, to start it again if a test stopped it.
        self._found: list[str] | None = None
        if pid is not None:
            self._found = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]

    @property
    def log_file(self) -> Path:
        return self._log_dir / f"pcscd-{self._starts}.log"

    def ensure_running(self, config_dir: Path | None = None) -> None:
        """pcscd up with the default readers (or ``config_dir``'s), and its readers listed."""
        if running_pid() is not None and config_dir == self._config_dir:
            wait_until(service_up, "pcscd to answer")
            # One started before vsmartcard-vpcd was installed has no virtual reader: restart it.
            if config_dir is not None or VPCD_READER in readers():
                return
        self.stop()
        self._start(config_dir)

    def _start(self, config_dir: Path | None) -> None:
        self._starts += 1
        command = ["pcscd", "--foreground", "--info"]
        if config_dir is not None:
            command += ["--config", str(config_dir)]
        with self.log_file.open("wb") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self._config_dir = config_dir
        try:
            wait_until(service_up, "pcscd to answer")
            if config_dir is None:
                wait_until(lambda: VPCD_READER in readers(), f"pcscd to list {VPCD_READER!r}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; see {self.log_file}:\n{self.log_file.read_text()[-2000:]}") from exc

    def stop(self) -> None:
        """No pcscd running any more, whoever started it."""
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        pid = running_pid()
        if pid is not None:  # the one that was here before the tests
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: running_pid() is None, "pcscd to exit")
        wait_until(lambda: not service_up(), "pcscd to stop answering")

    def restore(self) -> None:
        """Leave the machine as found: ours stopped, the one found running again with its own arguments."""
        if self._process is not None or self._config_dir is not None:
            self.stop()
        if self._found is not None and running_pid() is None:
            # Detached through a shell that backgrounds it: it outlives the session, as the original did.
            subprocess.run(  # its own former command line
                ["/bin/sh", "-c", '"$@" </dev/null >/dev/null 2>&1 &', "sh", *self._found],
                check=True,
            )
            wait_until(service_up, "the original pcscd to answer again")
