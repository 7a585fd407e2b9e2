"""``lane-agent doctor``: check the lane end to end and say what to fix.

Each check is a small pure function from what a probe found to a ``Check``
(name, ``ok`` | ``warn`` | ``fail`` | ``skip``, a one-line detail, a fix);
the probes around them are thin and each has its own timeout, and the
independent ones run at once, so a lane with everything down still answers
within a few seconds (``PROBE_TIMEOUT_S``).

Safe while the agent runs: the store is opened read-only (a WAL reader never
blocks the agent's commits, and takes no write lock), devices are opened and
closed without ``grab()``, the broker is reached under a client id of the
doctor's own with a clean session (the lane's own id would take over the
agent's persistent session), and nothing is published.

Nothing printed carries a secret: tokens, passwords and keys are only ever
sent where they authenticate; a simulated device's card numbers are never
shown; every line passes through the same card-number mask as the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import errno
import json
import os
import shutil
import sqlite3
import ssl
import stat
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiomqtt
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from agent import migrations
from agent.config import LaneConfig, SyncSection, load_config
from agent.errors import ConfigError, InputError
from agent.logs import mask_card_numbers
from agent.ruleset import load_ruleset
from agent.snapshot import key_check
from drivers.config import DeviceConfig
from drivers.evdev_wedge import EvdevWedgeConfig
from drivers.ic import ICConfig
from drivers.inventory import InputInfo, Inventory, input_devices, pcsc_readers
from sync import hq_http

Status = Literal["ok", "warn", "fail", "skip"]
T = TypeVar("T")

#: Longest any one network or device probe may take; they run concurrently.
PROBE_TIMEOUT_S = 5.0
API_TIMEOUT_S = 2.0
STORE_DEADLINE_S = 5.0
CERT_WARN_DAYS = 30
SKEW_WARN_S = 5.0
SKEW_FAIL_S = 60.0
#: With sync on, an unacknowledged entry older than this means the uplink is not getting through.
OLDEST_WARN_S = 3600.0
#: Below this much free space a sale may be refused at any moment, whatever disk_warn_free_mb says.
DISK_FAIL_BYTES = 16 * 1024 * 1024
MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the doctor's report."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def to_wire(self) -> dict[str, str]:
        """The JSON form: ``{name, status, detail, fix}``, card numbers masked."""
        return {key: mask_card_numbers(value) for key, value in dataclasses.asdict(self).items()}


class ProbeError(Exception):
    """A probe could not find out what it looks for: ``detail`` says why, ``fix`` what to do."""

    def __init__(self, detail: str, fix: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


# --- small helpers -------------------------------------------------------------------------------


def ago(seconds: float) -> str:
    """A duration as a technician reads it: ``45 s``, ``12 min``, ``3.5 h``, ``4 d``."""
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"


def _parse_time(text: object) -> dt.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _age_of(text: object, now: dt.datetime) -> str:
    moment = _parse_time(text)
    if moment is None:
        return ""
    return f"{moment.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC, {ago((now - moment).total_seconds())} ago"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: BaseException) -> str:
    """The most specific message of an exception and its causes (httpx and aiomqtt wrap the useful one)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    for candidate in reversed(seen):
        text = str(candidate).strip()
        if text:
            return text
    return type(exc).__name__


def _kind_of(exc: BaseException) -> str:  # noqa: PLR0911 - one answer per kind of failure
    """What a connection failure was: refused, timeout, dns, tls, or other."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    text = " ".join(str(item) for item in chain).lower()
    if any(isinstance(item, ssl.SSLCertVerificationError) for item in chain) or "certificate_verify_failed" in text:
        return "tls"
    if any(isinstance(item, ConnectionRefusedError) for item in chain) or "connection refused" in text:
        return "refused"
    if any(isinstance(item, TimeoutError | httpx.TimeoutException) for item in chain) or "timed out" in text:
        return "timeout"
    if "name or service not known" in text or "name resolution" in text or "nodename nor servname" in text:
        return "dns"
    if any(isinstance(item, ssl.SSLError) for item in chain):
        return "tls"
    if "not authori" in text or "bad user name or password" in text:
        return "auth"
    return "other"


async def _in_thread(fn: Callable[[], T], seconds: float, name: str) -> T:
    """Run a blocking probe on a daemon thread of its own; TimeoutError after ``seconds``.

    Not the default executor: a device or socket call that hangs must not keep
    the doctor from exiting (asyncio.run waits for executor threads), and a
    daemon thread does not.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():  # the waiter may have timed out and gone
            outcome()

    def work() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine, which decides
            failure = exc
            callback = lambda: settle(lambda: future.set_exception(failure))  # noqa: E731
        else:
            callback = lambda: settle(lambda: future.set_result(result))  # noqa: E731
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            loop.call_soon_threadsafe(callback)

    threading.Thread(target=work, name=f"doctor-{name}", daemon=True).start()
    async with asyncio.timeout(seconds):
        return await future


# --- config ---------------------------------------------------------------------------------------


def config_check(path: Path, error: ConfigError | None) -> Check:
    """The configuration file: valid, or every problem in it (one per detail line)."""
    if error is None:
        return Check("config", "ok", f"{path} valid")
    lines = [f"{path}: {len(error.issues)} problem(s)"]
    lines += [f"{issue.field or '(top level)'}: {issue.message} [{issue.code}]" for issue in error.issues]
    return Check("config", "fail", "\n".join(lines), f"edit {path}; `lane-agent config check {path}` checks it again")


# --- state directory and disk -----------------------------------------------------------------------


def probe_state_dir(directory: Path) -> None:
    """Create, write, fsync and remove a probe file in ``directory``; raises OSError when that fails."""
    probe = directory / f".lane-doctor-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, b"lane-agent doctor probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        probe.unlink(missing_ok=True)


def state_dir_check(directory: Path, error: OSError | None, user: str) -> Check:  # noqa: PLR0911 - one verdict per errno
    """Whether the store's directory takes a new file (the WAL, a snapshot download need it)."""
    if error is None:
        return Check("state-dir", "ok", f"{directory} writable (probe file created, fsynced, removed)")
    code = error.errno
    if code == errno.ENOENT:
        return Check(
            "state-dir",
            "fail",
            f"{directory} does not exist",
            "create it for the agent's user (the unit's StateDirectory=lane-agent creates /var/lib/lane-agent), "
            "or correct store.path",
        )
    if code in (errno.EACCES, errno.EPERM):
        return Check(
            "state-dir",
            "fail",
            f"{directory} is not writable by {user}",
            f"chown lane-agent:lane-agent {directory} (the agent's user must create files there), "
            "and run the doctor as that user or root",
        )
    if code == errno.EROFS:
        return Check("state-dir", "fail", f"{directory} is on a read-only file system", "remount it read-write")
    if code == errno.ENOSPC:
        return Check("state-dir", "fail", f"{directory}: the disk is full", "free space on that file system")
    if code == errno.ENOTDIR:
        return Check("state-dir", "fail", f"{directory} is not a directory", "correct store.path")
    return Check("state-dir", "fail", f"{directory}: cannot write a file: {error.strerror or error}", "")


def disk_check(directory: Path, free_bytes: int | None, warn_mb: int) -> Check:
    """Free space on the store's file system against ``store.disk_warn_free_mb``."""
    if free_bytes is None:
        return Check("disk", "warn", f"cannot read the free space of {directory}", "check that store.path is right")
    free = f"{free_bytes / MB:,.0f} MB free on {directory}'s file system"
    if free_bytes < DISK_FAIL_BYTES:
        return Check(
            "disk", "fail", f"only {free}: sales are refused when it is full", "free space now (old logs, backups)"
        )
    if warn_mb and free_bytes < warn_mb * MB:
        return Check(
            "disk",
            "warn",
            f"{free}, below store.disk_warn_free_mb ({warn_mb})",
            "free space (journalctl --vacuum-size=200M, old backups); a full disk refuses sales",
        )
    suffix = f" (warning below {warn_mb} MB)" if warn_mb else " (store.disk_warn_free_mb = 0: no warning)"
    return Check("disk", "ok", free + suffix)


def free_bytes_of(directory: Path) -> int | None:
    """Free bytes on ``directory``'s file system, or of its nearest existing parent."""
    for candidate in (directory, *directory.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


# --- the store ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreFacts:
    """What the store says, read read-only."""

    schema_version: int
    quick_check: tuple[str, ...] | None  # None: did not finish within the deadline
    db_bytes: int
    member_version: int
    members: int
    cards: int
    snapshot_created: str | None
    card_key_ok: bool
    last_seq: int
    acked_seq: int
    backlog_bytes: int | None  # None: not counted within the deadline
    oldest_unacked_at: str | None
    # The member downlink's record (schema 3): head office's version as last heard, when the cache
    # last caught up with it, and the last failure.  None in an older store.
    member_head_version: int | None = None
    member_synced_at: str | None = None
    member_sync_error: str | None = None


def read_store(path: Path, card_key: bytes, *, deadline_s: float = STORE_DEADLINE_S) -> StoreFacts:
    """Open the store read-only and read its health, versions and backlog; ProbeError when it cannot.

    ``mode=ro``: no write lock, no migration, no checkpoint at close.  A WAL
    reader sees the last committed state and never delays the agent's
    commits.  It may create the -wal and -shm files beside a database closed
    cleanly; run as root, SQLite gives them the database file's owner and
    mode, so a technician's ``sudo lane-agent doctor`` leaves nothing the
    agent's own user cannot open.  The long reads are cut at ``deadline_s`` by SQLite's progress
    handler, so a huge database or a slow disk costs a warning, not a hang.
    """
    if not path.exists():
        raise ProbeError(
            f"no database at {path}",
            "check store.path; the agent creates it at its first start, "
            "and `lane-agent members import FILE` loads the member table into it",
        )
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=2.0, isolation_level=None)
    except sqlite3.Error as exc:
        raise _store_error(path, exc) from exc
    try:
        return _read(conn, card_key, deadline_s)
    except sqlite3.Error as exc:
        raise _store_error(path, exc) from exc
    finally:
        conn.close()


def _interruptible(conn: sqlite3.Connection, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)


def _read(conn: sqlite3.Connection, card_key: bytes, deadline_s: float) -> StoreFacts:
    schema = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if schema == 0:
        raise ProbeError("the database has no lane schema (an empty or foreign file)", "correct store.path")
    _interruptible(conn, deadline_s)
    try:
        problems: tuple[str, ...] | None = tuple(str(row[0]) for row in conn.execute("PRAGMA quick_check(20)"))
    except sqlite3.OperationalError as exc:
        if "interrupt" not in str(exc):
            raise
        problems = None
    conn.set_progress_handler(None, 0)
    if problems is not None and problems != ("ok",):
        # A damaged file's other tables may not read either: report the damage, not a second error.
        return StoreFacts(schema, problems, 0, 0, 0, 0, None, card_key_ok=True, last_seq=0, acked_seq=0,
                          backlog_bytes=None, oldest_unacked_at=None)  # fmt: skip
    cursor = conn.execute("SELECT * FROM lane_state")
    state = dict(zip([column[0] for column in cursor.description], cursor.fetchone(), strict=True))
    last = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM journal").fetchone()[0])
    acked = int(state["acked_seq"])
    oldest = conn.execute("SELECT at FROM journal WHERE seq = ?", (acked + 1,)).fetchone()
    _interruptible(conn, min(deadline_s, 2.0))
    try:
        size: int | None = int(
            conn.execute(
                "SELECT COALESCE(SUM(LENGTH(CAST(body AS BLOB))), 0) FROM journal WHERE seq > ?", (acked,)
            ).fetchone()[0]
        )
    except sqlite3.OperationalError as exc:
        if "interrupt" not in str(exc):
            raise
        size = None
    conn.set_progress_handler(None, 0)
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    check = state.get("card_key_check")
    return StoreFacts(
        schema_version=schema,
        quick_check=problems,
        db_bytes=pages * page_size,
        member_version=int(state["member_version"]),
        members=int(state["member_count"]),
        cards=int(state["card_count"]),
        snapshot_created=state.get("snapshot_created"),
        card_key_ok=check is None or check == key_check(card_key),
        last_seq=last,
        acked_seq=acked,
        backlog_bytes=size,
        oldest_unacked_at=None if oldest is None else str(oldest[0]),
        member_head_version=state.get("member_head_version"),
        member_synced_at=state.get("member_synced_at"),
        member_sync_error=state.get("member_sync_error"),
    )


def _store_error(path: Path, exc: sqlite3.Error) -> ProbeError:
    text = str(exc)
    if "unable to open" in text:
        return ProbeError(
            f"cannot open {path} read-only: {text}",
            "run the doctor as root or the agent's user (the file, its -wal and -shm must be readable)",
        )
    if "readonly database" in text:
        # A WAL reader needs the -shm index beside the file: SQLite could not create it (nor can the agent).
        return ProbeError(
            f"cannot open {path} read-only: {text} (no -wal/-shm beside it and no right to create them)",
            "make the state directory writable for the agent's user (see state-dir)",
        )
    if "not a database" in text or "malformed" in text:
        return ProbeError(
            f"{path} is damaged: {text}",
            "stop the agent and copy the file (with -wal, -shm) aside before anything else: unsynced sales are in it",
        )
    return ProbeError(f"{path}: {text}", "")


def store_check(path: Path, facts: StoreFacts | ProbeError) -> Check:
    """The store opens, passes ``quick_check`` and has a schema this program knows."""
    if isinstance(facts, ProbeError):
        return Check("store", "fail", facts.detail, facts.fix)
    if facts.quick_check is not None and facts.quick_check != ("ok",):
        return Check(
            "store",
            "fail",
            f"{path} fails SQLite's quick_check: " + "; ".join(facts.quick_check[:3]),
            "stop the agent and copy the file (with -wal, -shm) aside before anything else: unsynced sales are in it",
        )
    if facts.schema_version > migrations.latest():
        return Check(
            "store",
            "fail",
            f"{path} has schema version {facts.schema_version}, newer than this program's {migrations.latest()}",
            "install the agent version that wrote it",
        )
    size = f"{facts.db_bytes / MB:,.1f} MB, schema {facts.schema_version}"
    if facts.quick_check is None:
        return Check(
            "store",
            "warn",
            f"{path} opens ({size}); quick_check did not finish within {STORE_DEADLINE_S:g} s",
            "run it when the lane is quiet: sqlite3 -readonly FILE 'PRAGMA quick_check'",
        )
    return Check("store", "ok", f"{path} opens read-only, quick_check ok ({size})")


# --- the running agent (the POS API) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentProbe:
    """What ``GET /v1/status`` on the configured address answered, if anything."""

    address: str
    status: Mapping[str, Any] | None = None
    http_status: int | None = None
    error: str = ""
    kind: str = ""


async def probe_agent(config: LaneConfig, seconds: float = API_TIMEOUT_S) -> AgentProbe:
    """Ask the running agent for its status with the configured token."""
    host = config.api.host
    if host in {"0.0.0.0", "::"}:  # noqa: S104 - a wildcard bind is reached over loopback
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"  # noqa: S104
    address = _host_port(host, config.api.port)
    headers = {"Authorization": f"Bearer {config.api.token.reveal()}"}
    try:
        async with httpx.AsyncClient(timeout=seconds, trust_env=False) as client:
            answer = await client.get(f"http://{address}/v1/status", headers=headers)
    except httpx.HTTPError as exc:
        return AgentProbe(address, error=_reason(exc), kind=_kind_of(exc))
    if answer.status_code != 200:
        return AgentProbe(address, http_status=answer.status_code)
    try:
        document = answer.json()
    except ValueError:
        return AgentProbe(address, http_status=answer.status_code, error="not JSON", kind="other")
    if not isinstance(document, dict) or "lane" not in document:
        return AgentProbe(address, http_status=answer.status_code, error="not a lane agent's status", kind="other")
    return AgentProbe(address, status=document, http_status=200)


def agent_check(probe: AgentProbe, config: LaneConfig) -> Check:
    """Whether the agent runs and answers the POS API with this configuration's token."""
    if probe.status is not None:
        lane = probe.status.get("lane", {})
        who = f"{lane.get('store')}/{lane.get('lane')}"
        uptime = probe.status.get("agent", {}).get("uptime_seconds")
        up = f", up {ago(float(uptime))}" if isinstance(uptime, int | float) else ""
        if (lane.get("store"), lane.get("lane")) != (config.lane.store, config.lane.lane):
            return Check(
                "agent",
                "fail",
                f"the agent on {probe.address} is lane {who}, not {config.lane.store}/{config.lane.lane}",
                "another configuration runs here: check --config and the unit's ExecStart",
            )
        return Check("agent", "ok", f"running on {probe.address} as {who}{up}")
    if probe.http_status == 401:
        return Check(
            "agent",
            "fail",
            f"the agent on {probe.address} refused this configuration's api.token",
            "the running agent has another configuration: restart it (systemctl restart lane-agent) or use --config",
        )
    if probe.http_status is not None:
        return Check(
            "agent",
            "fail",
            f"{probe.address} answered {probe.http_status}{': ' + probe.error if probe.error else ''}: "
            "not this lane's agent",
            "another program holds api.port: find it with `ss -ltnp`",
        )
    if probe.kind == "refused":
        return Check(
            "agent",
            "warn",
            f"not running: nothing listens on {probe.address}",
            "systemctl start lane-agent; `journalctl -u lane-agent` says why it stopped",
        )
    return Check(
        "agent",
        "warn",
        f"no answer from {probe.address} within {API_TIMEOUT_S:g} s: {probe.error}",
        "journalctl -u lane-agent (a wedged agent is restarted by the watchdog)",
    )


# --- devices ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PcscFacts:
    """pcscd as a client sees it."""

    reachable: bool
    readers: tuple[str, ...] = ()
    note: str = ""


def probe_pcsc() -> PcscFacts:
    """pcscd's readers, through the inventory the ``devices`` command uses."""
    inventory = Inventory()
    pcsc_readers(inventory)
    # drivers.inventory words a failed SCardEstablishContext "PC/SC unavailable (…)"; anything else
    # (no readers) means the service answered.
    down = [note for note in inventory.notes if note.startswith("PC/SC unavailable")]
    readers = tuple(reader.name for reader in inventory.readers)
    return PcscFacts(reachable=not down, readers=readers, note=(down or inventory.notes or [""])[0])


def pcscd_check(any_ic: bool, facts: PcscFacts | ProbeError | None) -> Check:
    """The PC/SC service, when an IC reader is configured."""
    if not any_ic:
        return Check("pcscd", "skip", "no IC reader configured")
    if isinstance(facts, ProbeError):
        return Check("pcscd", "fail", facts.detail, facts.fix)
    if facts is None or not facts.reachable:
        note = facts.note if facts is not None else ""
        return Check("pcscd", "fail", note or "PC/SC unavailable", "start pcscd (systemctl start pcscd.socket)")
    names = ", ".join(repr(name) for name in facts.readers) or "no readers"
    return Check("pcscd", "ok", f"reachable; {len(facts.readers)} reader(s): {names}")


@dataclass(frozen=True, slots=True)
class PathFacts:
    """What a configured evdev ``path`` is: ``fifo``, ``input`` (an opened evdev device) or an error."""

    kind: Literal["fifo", "input", "missing", "denied", "not_device", "error"]
    description: str = ""


def probe_evdev_path(path: str) -> PathFacts:  # noqa: PLR0911 - one answer per kind of file
    """Open the device read-only and close it again (no grab: the agent may hold it)."""
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        return PathFacts("missing")
    except PermissionError as exc:
        return PathFacts("denied", exc.strerror or str(exc))
    except OSError as exc:
        return PathFacts("error", exc.strerror or str(exc))
    if stat.S_ISFIFO(mode):
        return PathFacts("fifo", "a FIFO of recorded input (replay)")
    if not stat.S_ISCHR(mode):
        return PathFacts("not_device", "a regular file" if stat.S_ISREG(mode) else "not a character device")
    try:
        import evdev  # noqa: PLC0415 - the C extension only where an input device is checked

        device = evdev.InputDevice(path)
    except PermissionError as exc:
        return PathFacts("denied", exc.strerror or str(exc))
    except OSError as exc:
        return PathFacts("error", exc.strerror or str(exc))
    try:
        return PathFacts("input", f"{device.name!r} {device.info.vendor:04x}:{device.info.product:04x}")
    finally:
        device.close()


def probe_inputs() -> tuple[list[InputInfo], list[str]]:
    """The input devices the inventory sees, and its notes."""
    inventory = Inventory()
    input_devices(inventory)
    return inventory.inputs, inventory.notes


def evdev_check(
    device: EvdevWedgeConfig, path: PathFacts | None, inputs: tuple[list[InputInfo], list[str]] | None, user: str
) -> Check:
    """A keyboard-wedge device: its path present and openable, or its selector matched."""
    name = f"device:{device.name}"
    if device.path is not None and path is not None:
        return _evdev_path_check(name, device.path, path, user)
    found, notes = inputs or ([], [])
    for item in found:
        if (
            (device.device_name is not None and item.name == device.device_name)
            or (device.vendor_product is not None and item.vendor_product == device.vendor_product.lower())
            or (device.phys is not None and item.phys == device.phys)
        ):
            return Check(name, "ok", f"evdev {item.path} {item.name!r} {item.vendor_product}")
    selector = device.device_name or device.vendor_product or device.phys
    why = f" ({'; '.join(notes)})" if notes else ""
    return Check(
        name,
        "fail",
        f"no input device matches {selector!r}{why}",
        "plug the reader in; `lane-agent devices` lists what this PC sees",
    )


def _evdev_path_check(name: str, path: str, facts: PathFacts, user: str) -> Check:
    if facts.kind == "input":
        return Check(name, "ok", f"evdev {path} {facts.description}")
    if facts.kind == "fifo":
        return Check(name, "ok", f"{path}: {facts.description}")
    if facts.kind == "missing":
        return Check(
            name,
            "fail",
            f"{path} does not exist: the reader is not plugged in, or the path is wrong",
            "plug it in (another USB port?); `lane-agent devices` lists the stable /dev/input/by-id paths",
        )
    if facts.kind == "denied":
        return Check(
            name,
            "fail",
            f"{path} is not readable by {user}: {facts.description}",
            "the agent's user needs group input (the unit has SupplementaryGroups=input); run the doctor as root",
        )
    if facts.kind == "not_device":
        return Check(name, "fail", f"{path} is {facts.description}", "give the reader's /dev/input/by-id/… path")
    return Check(name, "fail", f"{path}: cannot open: {facts.description}", "")


def ic_check(device: ICConfig, facts: PcscFacts | ProbeError | None) -> Check:
    """An IC reader: pcscd answers and lists a reader this device watches."""
    name = f"device:{device.name}"
    if isinstance(facts, ProbeError) or facts is None or not facts.reachable:
        return Check(name, "fail", "PC/SC service unreachable (see pcscd)", "start pcscd")
    matching = [reader for reader in facts.readers if device.matches(reader)]
    wanted = f"{device.reader!r}" if device.reader else "any reader"
    if not matching:
        listed = ", ".join(repr(reader) for reader in facts.readers) or "none"
        return Check(
            name,
            "fail",
            f"no PC/SC reader matches {wanted} (readers: {listed})",
            "plug the reader in, or correct devices.reader from `lane-agent devices`",
        )
    return Check(name, "ok", f"PC/SC reader {', '.join(repr(reader) for reader in matching)}")


def device_checks(
    config: LaneConfig,
    paths: Mapping[str, PathFacts],
    inputs: tuple[list[InputInfo], list[str]] | None,
    pcsc: PcscFacts | ProbeError | None,
    agent_devices: Sequence[Mapping[str, Any]],
    user: str,
) -> list[Check]:
    """One check per ``[[devices]]`` table, with the running agent's view added where it disagrees."""
    if not config.devices:
        return [Check("devices", "skip", "no [[devices]] configured: members are identified at the POS only")]
    states = {str(item.get("name")): item for item in agent_devices}
    checks = []
    for device in config.devices:
        check = _device_check(device, paths.get(device.name), inputs, pcsc, user)
        state = states.get(device.name)
        if check.status == "ok" and state is not None and state.get("state") in {"disconnected", "error"}:
            said = f"{state.get('state')}: {state.get('detail')}" if state.get("detail") else str(state.get("state"))
            check = Check(
                check.name,
                "warn",
                f"{check.detail}; but the agent reports it {said}",
                "journalctl -u lane-agent; the agent retries by itself, or restart it",
            )
        checks.append(check)
    return checks


def _device_check(
    device: DeviceConfig,
    path: PathFacts | None,
    inputs: tuple[list[InputInfo], list[str]] | None,
    pcsc: PcscFacts | ProbeError | None,
    user: str,
) -> Check:
    if isinstance(device, EvdevWedgeConfig):
        return evdev_check(device, path, inputs, user)
    if isinstance(device, ICConfig):
        return ic_check(device, pcsc)
    # A simulated device reads its script: nothing to plug in, and its card numbers are never shown.
    return Check(f"device:{device.name}", "ok", f"{device.type} driver: no hardware to check")


# --- the client certificate ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertFacts:
    """The lane's client certificate, as read from its file."""

    subject_cn: str
    issuer_cn: str
    not_before: dt.datetime
    not_after: dt.datetime
    key_matches: bool


def _common_name(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else name.rfc4514_string()


def read_certificate(cert_path: Path, key_path: Path) -> CertFacts:
    """Parse the PEM certificate and key; ProbeError when either cannot be read or parsed."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except OSError as exc:
        raise ProbeError(f"cannot read {cert_path}: {exc.strerror or exc}", "check sync.tls_cert_file") from exc
    except ValueError as exc:
        raise ProbeError(f"{cert_path} is not a PEM certificate", "check sync.tls_cert_file") from exc
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise ProbeError(f"cannot read {key_path}: {exc.strerror or exc}", "check sync.tls_key_file") from exc
    except TypeError as exc:  # a password-protected key
        raise ProbeError(
            f"{key_path} is encrypted: the agent cannot use it unattended",
            "write it without a passphrase (openssl pkey -in KEY -out KEY.plain), readable by the agent only",
        ) from exc
    except ValueError as exc:
        raise ProbeError(f"{key_path} is not a PEM private key", "check sync.tls_key_file") from exc
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return CertFacts(
        subject_cn=_common_name(cert.subject),
        issuer_cn=_common_name(cert.issuer),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        key_matches=cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki),
    )


def certificate_check(sync: SyncSection, facts: CertFacts | ProbeError | None, now: dt.datetime) -> Check:  # noqa: PLR0911 - flat checks
    """The client certificate: readable, its key matching, valid now and for ``CERT_WARN_DAYS`` more."""
    if not sync.enabled:
        return Check("certificate", "skip", "sync disabled")
    if facts is None:
        return Check("certificate", "skip", "no sync.tls_cert_file: the lane uses no client certificate")
    if isinstance(facts, ProbeError):
        return Check("certificate", "fail", facts.detail, facts.fix)
    who = f"CN={facts.subject_cn} (issuer {facts.issuer_cn})"
    until = f"{facts.not_after:%Y-%m-%d %H:%M} UTC"
    renew = "issue a new certificate for this lane and install it as sync.tls_cert_file / tls_key_file"
    if not facts.key_matches:
        return Check(
            "certificate",
            "fail",
            f"{who}: sync.tls_key_file is not this certificate's key",
            "install the key the certificate was issued for",
        )
    if facts.not_after <= now:
        return Check("certificate", "fail", f"{who} expired on {until}", renew)
    if facts.not_before > now:
        return Check(
            "certificate",
            "fail",
            f"{who} is not valid before {facts.not_before:%Y-%m-%d %H:%M} UTC",
            "check the PC's clock (see clock), or wait for the certificate to become valid",
        )
    left = facts.not_after - now
    if left < dt.timedelta(days=CERT_WARN_DAYS):
        return Check("certificate", "warn", f"{who} expires on {until}, in {ago(left.total_seconds())}", renew)
    return Check("certificate", "ok", f"{who}, expires {until} (in {left.days} d)")


# --- the broker ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BrokerProbe:
    """One connection attempt to the broker with the lane's settings."""

    address: str
    seconds: float
    error: str = ""
    kind: str = ""


async def probe_broker(config: LaneConfig, limit: float = PROBE_TIMEOUT_S) -> BrokerProbe:
    """Connect as the lane would (host, port, TLS, certificate, credentials) and leave; nothing is published.

    Under a client id of its own and with a clean session: connecting with
    the lane's id would take the running agent's connection and session over.
    A connection proves reachability and credentials, not the broker's ACL:
    Mosquitto grants a denied subscription and acknowledges a denied publish
    alike, so only head office's acks (the backlog check) prove the path.
    """
    sync = config.sync
    address = _host_port(sync.host, sync.port)
    tls = None
    if sync.tls:
        tls = aiomqtt.TLSParameters(
            ca_certs=None if sync.tls_ca_file is None else str(sync.tls_ca_file),
            certfile=None if sync.tls_cert_file is None else str(sync.tls_cert_file),
            keyfile=None if sync.tls_key_file is None else str(sync.tls_key_file),
        )
    identifier = f"{sync.client_identifier(config.lane)[:100]}-doctor-{uuid.uuid4().hex[:6]}"
    seconds = min(limit, sync.connect_timeout_seconds)
    started = time.monotonic()
    try:
        async with (
            asyncio.timeout(seconds + 0.5),
            aiomqtt.Client(
                sync.host,
                sync.port,
                identifier=identifier,
                username=sync.username,
                password=None if sync.password is None else sync.password.reveal(),
                clean_session=True,
                keepalive=max(5, min(sync.keepalive_seconds, 60)),
                timeout=seconds,
                tls_params=tls,
            ),
        ):
            connected = time.monotonic() - started  # connected is all this probe asks
    except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
        kind = "timeout" if isinstance(exc, TimeoutError) else _kind_of(exc)
        return BrokerProbe(address, time.monotonic() - started, error=_reason(exc) or "timed out", kind=kind)
    return BrokerProbe(address, connected)


def broker_check(sync: SyncSection, probe: BrokerProbe | None, agent: Mapping[str, Any] | None) -> Check:
    """Whether the broker takes the lane's connection (address, TLS, certificate, credentials)."""
    if not sync.enabled:
        return Check("broker", "skip", "sync disabled ([sync] enabled = false): the journal stays on this PC")
    if probe is None:
        return Check("broker", "skip", "not probed")
    how = "over TLS" if sync.tls else "without TLS"
    if not probe.error:
        live = ""
        if agent is not None:
            live = "; the agent is connected" if agent.get("connected") else "; the agent is NOT connected now"
        return Check("broker", "ok", f"connected to {probe.address} {how} in {probe.seconds:.2f} s{live}")
    fixes = {
        "refused": f"nothing listens on {probe.address}: is the broker running, and is sync.port right "
        "(8883 with TLS)?",
        "timeout": "check the network and firewall to the broker; a broker requiring a client certificate "
        "also lets one it refuses time out (see certificate)",
        "dns": f"cannot resolve {sync.host}: check sync.host and the PC's DNS",
        "tls": "the broker's certificate is not trusted by sync.tls_ca_file, or does not name sync.host",
        "auth": "the broker refused the lane's credentials: sync.username / password, or the certificate's CN "
        "is not enrolled",
    }
    return Check(
        "broker",
        "fail",
        f"cannot connect to {probe.address} {how}: {probe.error}",
        fixes.get(probe.kind, "see the broker's log"),
    )


# --- head office's HTTP API and the clock -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloProbe:
    """One ``GET …/hello``, with the wall-clock times it was sent and answered."""

    url: str
    sent: float
    received: float
    http_status: int | None = None
    hello: Mapping[str, Any] | None = None
    error: str = ""
    kind: str = ""


async def probe_hello(config: LaneConfig, limit: float = PROBE_TIMEOUT_S) -> HelloProbe:
    """Ask head office's API for its clock and versions, with the lane's token."""
    seconds = min(limit, config.sync.http_timeout_seconds)
    url = f"{config.sync.hq_url}{hq_http.lane_prefix(config)}/hello"
    sent = time.time()
    try:
        async with asyncio.timeout(seconds + 0.5), hq_http.make_client(config, timeout=seconds) as client:
            sent = time.time()
            answer = await client.get("hello")
            received = time.time()
    except (httpx.HTTPError, OSError, TimeoutError, ssl.SSLError) as exc:
        kind = "timeout" if isinstance(exc, TimeoutError) else _kind_of(exc)
        return HelloProbe(url, sent, time.time(), error=_reason(exc) or "timed out", kind=kind)
    if answer.status_code != 200:
        return HelloProbe(url, sent, received, http_status=answer.status_code)
    try:
        document = answer.json()
    except ValueError:
        document = None
    if not isinstance(document, dict) or _parse_time(document.get("now")) is None:
        return HelloProbe(url, sent, received, http_status=200, error="not a hello document", kind="other")
    return HelloProbe(url, sent, received, http_status=200, hello=document)


def hq_check(config: LaneConfig, probe: HelloProbe | None) -> Check:  # noqa: PLR0911 - one verdict per kind of answer
    """Head office's API answers the lane's token."""
    sync = config.sync
    if sync.hq_url is None:
        return Check("head-office", "skip", "no sync.hq_url: member tables come as files, no holds")
    if probe is None:
        return Check("head-office", "skip", "not probed")
    rtt = (probe.received - probe.sent) * 1000
    if probe.hello is not None:
        return Check("head-office", "ok", f"{sync.hq_url} answers hello, token accepted ({rtt:.0f} ms)")
    store, lane = config.lane.store, config.lane.lane
    if probe.http_status == 401:
        return Check(
            "head-office",
            "fail",
            f"{sync.hq_url} refused the lane's token (401)",
            f"token wrong: run `lane-hq lanes token {store} {lane}` at head office and set sync.hq_token",
        )
    if probe.http_status == 404:
        return Check(
            "head-office",
            "fail",
            f"{probe.url} not found (404)",
            "sync.hq_url must be head office's API (https://hq:8780), served by a lane-hq with the lanes' API",
        )
    if probe.http_status is not None:
        extra = f" ({probe.error})" if probe.error else ""
        return Check(
            "head-office",
            "fail",
            f"{sync.hq_url} answered {probe.http_status}{extra}",
            "see head office's log (lane-hq)",
        )
    fixes = {
        "refused": "nothing listens there: is lane-hq running, and is the port in sync.hq_url right?",
        "timeout": "check the network and firewall to head office",
        "dns": "cannot resolve head office's host name: check sync.hq_url and the PC's DNS",
        "tls": "head office's certificate is not trusted: set sync.hq_ca_file to the CA that signed it",
    }
    return Check(
        "head-office",
        "fail",
        f"cannot reach {sync.hq_url}: {probe.error}",
        fixes.get(probe.kind, "check sync.hq_url"),
    )


def clock_check(probe: HelloProbe | None, reason: str) -> Check:
    """The lane's clock against head office's ``now``, allowing for half the round trip."""
    if probe is None or probe.hello is None:
        return Check("clock", "skip", reason)
    theirs = _parse_time(probe.hello.get("now"))
    if theirs is None:  # probe_hello refuses a hello without one; kept for the type checker
        return Check("clock", "skip", "head office sent no time")
    half_rtt = (probe.received - probe.sent) / 2
    skew = theirs.timestamp() - (probe.sent + half_rtt)
    beyond = max(abs(skew) - half_rtt, 0.0)
    direction = "behind" if skew > 0 else "ahead of"
    detail = f"the lane's clock is {abs(skew):.1f} s {direction} head office's (±{half_rtt:.2f} s)"
    fix = (
        "set the clock and keep it set: timedatectl set-ntp true (chrony or systemd-timesyncd); business days, "
        "member days and certificate checks depend on it"
    )
    if beyond > SKEW_FAIL_S:
        return Check("clock", "fail", detail, fix)
    if beyond > SKEW_WARN_S:
        return Check("clock", "warn", detail, fix)
    return Check("clock", "ok", detail)


# --- versions and backlog ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LaneFacts:
    """The versions and backlog, from the running agent or else from the store itself."""

    source: Literal["agent", "store"]
    member_version: int
    members: int
    snapshot_created: str | None
    card_key_ok: bool
    rules_version: str | None
    backlog: int
    backlog_bytes: int | None
    oldest_unacked_at: str | None
    member_head_version: int | None = None
    member_synced_at: str | None = None
    member_sync_error: str | None = None
    rules_status: Mapping[str, Any] | None = None  # the agent's ``rules`` object


def lane_facts(agent: Mapping[str, Any] | None, store: StoreFacts | ProbeError) -> LaneFacts | None:
    """From ``GET /v1/status`` when the agent runs (the ruleset in force is only known there), else the store.

    The member downlink's record (last heard, last caught up, last error) is read from the store either way.
    """
    readable = isinstance(store, StoreFacts) and store.quick_check in (None, ("ok",))
    extra: dict[str, Any] = {}
    if isinstance(store, StoreFacts) and readable:
        extra = {
            "member_head_version": store.member_head_version,
            "member_synced_at": store.member_synced_at,
            "member_sync_error": store.member_sync_error,
        }
    if agent is not None:
        table, sync = agent.get("member_table", {}), agent.get("sync", {})
        rules = agent.get("rules")
        # The member sync's live figures, where this agent reports them ("members" in GET /v1/status).
        live = agent.get("members")
        if isinstance(live, dict):
            for key, field in (
                ("head_version", "member_head_version"),
                ("last_sync_at", "member_synced_at"),
                ("last_error", "member_sync_error"),
            ):
                if live.get(key) is not None:
                    extra[field] = live[key]
        return LaneFacts(
            source="agent",
            member_version=int(table.get("version", 0)),
            members=int(table.get("members", 0)),
            snapshot_created=table.get("created"),
            card_key_ok=bool(table.get("card_key_ok", True)),
            rules_version=agent.get("rules", {}).get("version"),
            backlog=int(sync.get("backlog", agent.get("journal", {}).get("backlog", 0))),
            backlog_bytes=sync.get("backlog_bytes"),
            oldest_unacked_at=sync.get("oldest_unacked_at"),
            rules_status=rules if isinstance(rules, dict) else None,
            **extra,
        )
    if not isinstance(store, StoreFacts) or not readable:
        return None
    return LaneFacts(
        source="store",
        member_version=store.member_version,
        members=store.members,
        snapshot_created=store.snapshot_created,
        card_key_ok=store.card_key_ok,
        rules_version=None,
        backlog=store.last_seq - store.acked_seq,
        backlog_bytes=store.backlog_bytes,
        oldest_unacked_at=store.oldest_unacked_at,
        **extra,
    )


def member_check(facts: LaneFacts | None, hello: Mapping[str, Any] | None, now: dt.datetime) -> Check:  # noqa: PLR0911
    """The member table: the right card key, not empty, and not behind head office."""
    if facts is None:
        return Check("member-table", "skip", "the store could not be read (see store)")
    if not facts.card_key_ok:
        return Check(
            "member-table",
            "fail",
            "the member table was written with another store.card_hash_key: no card will be recognised",
            "store.card_hash_key must be the chain's key (head office's); then import the snapshot again",
        )
    if facts.member_version == 0 and facts.members == 0:
        return Check(
            "member-table",
            "warn",
            "empty: every card is unknown",
            "lane-agent members import FILE (or, with sync.hq_url, let the agent fetch a snapshot)",
        )
    detail = f"version {facts.member_version}, {facts.members:,} members"
    if age := _age_of(facts.snapshot_created, now):
        detail += f", snapshot of {age}"
    if caught_up := _age_of(facts.member_synced_at, now):
        detail += f", caught up with head office {caught_up}"
    head = hello.get("member_version") if hello is not None else None
    heard = "head office is at"
    if not isinstance(head, int) or isinstance(head, bool):
        head, heard = facts.member_head_version or None, "head office was at (last heard)"
    if head is None:
        return Check("member-table", "ok", detail)
    error = f"; last error: {facts.member_sync_error}" if facts.member_sync_error else ""
    if facts.member_version < head:
        return Check(
            "member-table",
            "warn",
            f"{detail}; {heard} {head} ({head - facts.member_version} behind){error}",
            "the agent catches up by itself while head office is reachable; if it stays behind, "
            "see journalctl -u lane-agent",
        )
    if facts.member_version > head:
        return Check(
            "member-table",
            "warn",
            f"{detail}; ahead of head office's {head} (a database from another chain, or head office restored?)",
            "the agent takes a whole snapshot from head office (ahead_of_head)",
        )
    return Check("member-table", "ok", f"{detail}, as head office")


@dataclass(frozen=True, slots=True)
class RulesFacts:
    """The ruleset file at ``rules.path``."""

    version: str
    ruleset_id: str
    modified: dt.datetime


def read_rules(path: Path) -> RulesFacts:
    """Load and validate the ruleset file; InputError or OSError when it is not usable."""
    ruleset = load_ruleset(path)
    modified = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
    return RulesFacts(ruleset.version, ruleset.id, modified)


def read_kept_rules(path: Path) -> Mapping[str, Any] | None:
    """The envelope of head office's ruleset kept beside the store (``rules/current.json``), unverified.

    Only its documented fields are shown (version, serial, effective_from; docs/downlink.md); the agent
    verifies the signature when it loads it.  None: none kept, or not readable as one.
    """
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or not isinstance(document.get("version"), str):
        return None
    return {key: document.get(key) for key in ("version", "serial", "effective_from")}


def ruleset_check(
    path: Path,
    rules: RulesFacts | InputError | ProbeError,
    facts: LaneFacts | None,
    kept: Mapping[str, Any] | None,
    hello: Mapping[str, Any] | None,
    now: dt.datetime,
) -> Check:
    """The ruleset file valid (the agent's next start needs it), the version in force, head office's."""
    if isinstance(rules, InputError):
        unreadable = [issue for issue in rules.issues if issue.code == "unreadable"]
        if unreadable:
            return Check("ruleset", "fail", f"cannot read {path}: {unreadable[0].message}", "check rules.path")
        lines = [f"{path} is invalid: the agent will not start with it (exit 78)"]
        lines += [f"{issue.field or '(top level)'}: {issue.message} [{issue.code}]" for issue in rules.issues[:10]]
        return Check("ruleset", "fail", "\n".join(lines), f"lane-agent rules check {path}")
    if isinstance(rules, ProbeError):
        return Check("ruleset", "fail", rules.detail, rules.fix)
    modified = f"modified {_age_of(rules.modified.isoformat(), now)}"
    file_part = f"{rules.ruleset_id} {rules.version} in {path}, {modified}"
    status = facts.rules_status if facts is not None else None
    candidates = {rules.version}
    if status is not None and isinstance(status.get("version"), str):
        # The agent says which ruleset it prices with: the file's, or head office's it keeps.
        in_force = str(status["version"])
        source = status.get("source")
        detail = f"the agent prices with {status.get('id', '')} {in_force}".replace("  ", " ")
        detail += f" (from {source})" if source else ""
        if since := _age_of(status.get("effective_from"), now):
            detail += f", effective {since}"
        detail += f"; {file_part}" if in_force != rules.version else f"; {path} {modified}"
        candidates = {in_force}
    elif kept is not None:
        serial = f"serial {kept['serial']}, " if kept.get("serial") is not None else ""
        detail = f"{file_part}; head office's {kept['version']} kept ({serial}effective {kept.get('effective_from')})"
        candidates.add(str(kept["version"]))
    else:
        detail = file_part
    published = hello.get("rules_version") if hello is not None else None
    if isinstance(published, str) and published and published not in candidates:
        rejected = status.get("last_rejected") if status is not None else None
        why = f"; its last ruleset was refused: {rejected.get('code')}" if isinstance(rejected, dict) else ""
        return Check(
            "ruleset",
            "warn",
            f"{detail}; head office publishes {published}{why}",
            "the lane takes head office's signed ruleset once its uplink is connected, if its key_id is in "
            "sync.rules_keys; see journalctl -u lane-agent for refusals",
        )
    return Check("ruleset", "ok", detail)


def backlog_check(sync: SyncSection, facts: LaneFacts | None, now: dt.datetime) -> Check:
    """Unsynced journal entries against ``sync.backlog_warn_*``, and the oldest one's age."""
    if facts is None:
        return Check("backlog", "skip", "the store could not be read (see store)")
    size = "" if facts.backlog_bytes is None else f" ({facts.backlog_bytes / MB:,.1f} MB)"
    oldest = _parse_time(facts.oldest_unacked_at)
    age = (now - oldest).total_seconds() if oldest is not None else None
    detail = f"{facts.backlog:,} unsynced entries{size}"
    if age is not None:
        detail += f", oldest from {ago(age)} ago"
    if not sync.enabled:
        suffix = "; sync disabled: they stay on this PC" if facts.backlog else ""
        detail += suffix
    warnings = sync.backlog_warnings(facts.backlog, facts.backlog_bytes or 0)
    keep = "nothing is lost: the backlog drains once the broker and head office take it"
    if warnings:
        return Check("backlog", "warn", f"{detail}; " + "; ".join(warnings.values()), f"see broker above; {keep}")
    if sync.enabled and age is not None and age > OLDEST_WARN_S:
        return Check(
            "backlog",
            "warn",
            f"{detail}: head office has acknowledged nothing newer for over {ago(OLDEST_WARN_S)}",
            f"see broker and head-office above; {keep}",
        )
    return Check("backlog", "ok", detail)


# --- the whole run ---------------------------------------------------------------------------------

#: The checks that need a valid configuration, in report order (devices stand for every device:NAME).
_NEED_CONFIG = (
    "state-dir",
    "disk",
    "store",
    "agent",
    "devices",
    "pcscd",
    "broker",
    "certificate",
    "head-office",
    "clock",
    "member-table",
    "ruleset",
    "backlog",
)


def _user() -> str:
    uid = os.geteuid()
    try:
        import pwd  # noqa: PLC0415 - POSIX only, like the rest of the lane

        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


async def _guard(work: Callable[[], Any], seconds: float, name: str, what: str) -> Any:
    """A blocking probe on its own thread: its result, or what it raised (a timeout as a ProbeError)."""
    try:
        return await _in_thread(work, seconds, name)
    except TimeoutError:
        return ProbeError(f"{what}: no answer within {seconds:g} s", "")
    except ProbeError as exc:
        return exc
    except (InputError, OSError) as exc:
        return exc


def _path_probe(path: str) -> Callable[[], PathFacts]:
    return lambda: probe_evdev_path(path)


async def diagnose(
    path: Path, *, environ: Mapping[str, str] | None = None, now: Callable[[], dt.datetime] | None = None
) -> list[Check]:
    """Every check, in report order."""
    clock = now or (lambda: dt.datetime.now(dt.UTC))
    try:
        config = load_config(path, environ=environ)
    except ConfigError as exc:
        skipped = [Check(name, "skip", "needs a valid configuration (see config)") for name in _NEED_CONFIG]
        return [config_check(path, exc), *skipped]
    return [config_check(path, None), *await _with_config(config, clock)]


async def _with_config(config: LaneConfig, clock: Callable[[], dt.datetime]) -> list[Check]:
    user = _user()
    sync = config.sync
    directory = config.store.path.parent
    any_ic = any(isinstance(device, ICConfig) for device in config.devices)
    wedges = [device for device in config.devices if isinstance(device, EvdevWedgeConfig)]
    async with asyncio.TaskGroup() as group:
        state_dir = group.create_task(_guard(lambda: probe_state_dir(directory), 5.0, "dir", "state directory"))
        free = group.create_task(_guard(lambda: free_bytes_of(directory), 5.0, "disk", "free space"))
        store = group.create_task(
            _guard(
                lambda: read_store(config.store.path, config.store.card_hash_key.reveal()),
                STORE_DEADLINE_S + 3,
                "store",
                "store",
            )
        )
        rules = group.create_task(_guard(lambda: read_rules(config.rules.path), 5.0, "rules", "ruleset"))
        kept_rules = group.create_task(
            _guard(lambda: read_kept_rules(directory / "rules" / "current.json"), 3.0, "kept-rules", "kept ruleset")
        )
        agent = group.create_task(probe_agent(config))
        pcsc = group.create_task(_guard(probe_pcsc, 3.0, "pcsc", "pcscd")) if any_ic else None
        inputs = (
            group.create_task(_guard(probe_inputs, 3.0, "inputs", "input devices"))
            if any(device.path is None for device in wedges)
            else None
        )
        paths = {
            device.name: group.create_task(_guard(_path_probe(device.path), 3.0, "evdev", device.path))
            for device in wedges
            if device.path is not None
        }
        broker = group.create_task(probe_broker(config)) if sync.enabled else None
        hello = group.create_task(probe_hello(config)) if sync.hq_url is not None else None
        cert_files = (sync.tls_cert_file, sync.tls_key_file)
        cert = None
        if sync.enabled and cert_files[0] is not None and cert_files[1] is not None:
            cert_path, key_path = cert_files[0], cert_files[1]
            cert = group.create_task(_guard(lambda: read_certificate(cert_path, key_path), 3.0, "cert", "certificate"))
    moment = clock()
    agent_probe = agent.result()
    agent_verdict = agent_check(agent_probe, config)
    # Another lane's agent on this port says nothing about this lane: its figures are not used.
    status = agent_probe.status if agent_verdict.status == "ok" else None
    store_facts = store.result()
    if not isinstance(store_facts, StoreFacts | ProbeError):
        store_facts = ProbeError(f"{config.store.path}: {store_facts}", "")
    dir_error = state_dir.result()
    free_result = free.result()
    facts = lane_facts(status, store_facts)
    hello_probe = hello.result() if hello is not None else None
    hello_doc = hello_probe.hello if hello_probe is not None else None
    path_facts = {
        name: result if isinstance(result, PathFacts) else PathFacts("error", str(result))
        for name, result in ((name, task.result()) for name, task in paths.items())
    }
    input_result = inputs.result() if inputs is not None else None
    pcsc_result = pcsc.result() if pcsc is not None else None
    rules_result = rules.result()
    kept = kept_rules.result() if isinstance(kept_rules.result(), dict) else None
    if isinstance(rules_result, OSError):
        rules_result = ProbeError(f"cannot read {config.rules.path}: {rules_result.strerror}", "check rules.path")
    clock_reason = (
        "no sync.hq_url: nothing to compare the clock with"
        if sync.hq_url is None
        else "head office did not answer (see head-office)"
    )
    return [
        state_dir_check(directory, dir_error if isinstance(dir_error, OSError) else None, user)
        if not isinstance(dir_error, ProbeError)
        else Check("state-dir", "fail", dir_error.detail),
        disk_check(directory, free_result if isinstance(free_result, int) else None, config.store.disk_warn_free_mb),
        store_check(config.store.path, store_facts),
        agent_verdict,
        *device_checks(
            config,
            path_facts,
            input_result if isinstance(input_result, tuple) else None,
            pcsc_result if isinstance(pcsc_result, PcscFacts | ProbeError) else None,
            (status or {}).get("devices", []),
            user,
        ),
        pcscd_check(any_ic, pcsc_result if isinstance(pcsc_result, PcscFacts | ProbeError) else None),
        broker_check(sync, broker.result() if broker is not None else None, (status or {}).get("sync")),
        certificate_check(sync, cert.result() if cert is not None else None, moment),
        hq_check(config, hello_probe),
        clock_check(hello_probe, clock_reason),
        member_check(facts, hello_doc, moment),
        ruleset_check(config.rules.path, rules_result, facts, kept, hello_doc, moment),
        backlog_check(sync, facts, moment),
    ]


# --- the report ------------------------------------------------------------------------------------

EXIT_OK = 0
EXIT_WARN = 1
EXIT_FAIL = 2
EXIT_CONFIG = 78  # EX_CONFIG, as `lane-agent run` for an invalid configuration


def exit_code(checks: Sequence[Check]) -> int:
    """0 all ok or skipped, 1 warnings only, 2 at least one failure, 78 the configuration is invalid."""
    if any(check.name == "config" and check.status == "fail" for check in checks):
        return EXIT_CONFIG
    if any(check.status == "fail" for check in checks):
        return EXIT_FAIL
    if any(check.status == "warn" for check in checks):
        return EXIT_WARN
    return EXIT_OK


def render_text(checks: Sequence[Check]) -> str:
    """One aligned line per check (a failed configuration's problems indented below it), then a summary."""
    width = max(16, *(len(check.name) + 2 for check in checks))
    lines = []
    for check in checks:
        first, *more = mask_card_numbers(check.detail).split("\n")
        fix = f" → fix: {mask_card_numbers(check.fix)}" if check.fix and check.status in {"warn", "fail"} else ""
        lines.append(f"{check.status.upper():<6}{check.name:<{width}}{first}{fix if not more else ''}")
        lines.extend(f"{'':<6}{'':<{width}}  {line}" for line in more)
        if more and fix:
            lines.append(f"{'':<6}{'':<{width}}{fix.strip()}")
    counts = {status: sum(check.status == status for check in checks) for status in ("fail", "warn", "ok", "skip")}
    verdict = {EXIT_OK: "all good", EXIT_WARN: "working, with warnings", EXIT_FAIL: "needs fixing"}.get(
        exit_code(checks), "configuration unusable"
    )
    lines.append(
        f"{verdict}: {counts['fail']} failed, {counts['warn']} warning(s), {counts['ok']} ok, {counts['skip']} skipped"
    )
    return "\n".join(lines)


def render_json(checks: Sequence[Check]) -> str:
    """``{"ok": no check failed, "checks": [{name, status, detail, fix}, …]}``."""
    document = {"ok": not any(check.status == "fail" for check in checks), "checks": [c.to_wire() for c in checks]}
    return json.dumps(document, ensure_ascii=False, indent=2)
