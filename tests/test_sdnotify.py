"""The sd_notify client against real AF_UNIX datagram sockets, the way systemd receives it."""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import SystemdNotifier

REPO_ROOT = Path(__file__).resolve().parent.parent


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    # A lost datagram must fail the test, not hang it.
    sock.settimeout(5)
    return sock


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    # AF_UNIX paths are limited to 107 bytes; keep the file name short.
    return str(tmp_path / "n.sock")


@pytest.fixture
def receiver(sock_path: str) -> Iterator[socket.socket]:
    with _receiver(sock_path) as sock:
        yield sock


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "agent.sdnotify" and r.levelno == logging.WARNING]


def test_messages_arrive_as_exact_bytes(receiver: socket.socket, sock_path: str) -> None:
    with SystemdNotifier.from_env({"NOTIFY_SOCKET": sock_path}) as notifier:
        assert notifier.enabled
        assert notifier.ready() is True
        assert receiver.recv(4096) == b"READY=1"
        notifier.ready("serving on 127.0.0.1:8080")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=serving on 127.0.0.1:8080"
        notifier.status("3 sales today")
        assert receiver.recv(4096) == b"STATUS=3 sales today"
        notifier.watchdog()
        assert receiver.recv(4096) == b"WATCHDOG=1"
        notifier.stopping()
        assert receiver.recv(4096) == b"STOPPING=1"
        notifier.stopping("finishing 2 commits")
        assert receiver.recv(4096) == b"STOPPING=1\nSTATUS=finishing 2 commits"
        notifier.notify({"EXTEND_TIMEOUT_USEC": "5000000", "STATUS": "migrating"})
        assert receiver.recv(4096) == b"EXTEND_TIMEOUT_USEC=5000000\nSTATUS=migrating"


def test_values_are_one_line_and_utf8(receiver: socket.socket, sock_path: str) -> None:
    with SystemdNotifier(sock_path) as notifier:
        notifier.status("line one\nline two\r\nthree\rfour")
        assert receiver.recv(4096) == b"STATUS=line one line two three four"
        notifier.status("收银通道 3 已就绪")
        assert receiver.recv(4096) == "STATUS=收银通道 3 已就绪".encode()


def test_malformed_key_is_a_programming_error(receiver: socket.socket, sock_path: str) -> None:
    with SystemdNotifier(sock_path) as notifier:
        for key in ("", "A=B", "A\nB"):
            with pytest.raises(ValueError, match="invalid sd_notify key"):
                notifier.notify({key: "1"})
        receiver.settimeout(0)
        with pytest.raises(BlockingIOError):
            receiver.recv(4096)


def test_abstract_namespace_socket() -> None:
    name = f"lane-agent-test-{os.getpid()}-{uuid.uuid4().hex}"
    with _receiver("\0" + name) as receiver, SystemdNotifier.from_env({"NOTIFY_SOCKET": "@" + name}) as notifier:
        notifier.ready()
        assert receiver.recv(4096) == b"READY=1"


def test_socket_is_opened_lazily_and_closed_by_the_context_manager(receiver: socket.socket, sock_path: str) -> None:
    with SystemdNotifier(sock_path) as notifier:
        assert notifier._sock is None
        notifier.watchdog()
        assert notifier._sock is not None
        assert receiver.recv(4096) == b"WATCHDOG=1"
    assert notifier._sock is None
    # Closed is not dead: the next call opens a new socket.
    notifier.watchdog()
    assert receiver.recv(4096) == b"WATCHDOG=1"
    notifier.close()
    notifier.close()


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"WATCHDOG_USEC": "30000000"}])
def test_disabled_notifier_is_a_no_op(environ: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.sdnotify")
    notifier = SystemdNotifier.from_env(environ)
    assert not notifier.enabled
    assert notifier.ready("up") is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    assert notifier._sock is None
    assert caplog.records == []


def test_from_env_defaults_to_the_process_environment(
    monkeypatch: pytest.MonkeyPatch, receiver: socket.socket, sock_path: str
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with SystemdNotifier.from_env() as notifier:
        assert notifier.watchdog_interval() == 2.0
        notifier.ready()
        assert receiver.recv(4096) == b"READY=1"


def test_unsupported_socket_address_disables_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert len(_warnings(caplog)) == 1


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1"}, 0.0000005),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, 15.0),
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        # Inherited by a child process: the watchdog is the parent's, not ours.
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
    ],
)
def test_watchdog_interval(
    environ: dict[str, str], interval: float | None, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": sock_path, **environ})
    assert notifier.watchdog_interval() == interval
    assert _warnings(caplog) == []


@pytest.mark.parametrize(
    "environ",
    [
        {"WATCHDOG_USEC": "abc"},
        {"WATCHDOG_USEC": "30s"},
        {"WATCHDOG_USEC": "1.5"},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-30000000"},
        {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"},
    ],
)
def test_garbage_watchdog_values_give_none_and_a_warning(
    environ: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify", **environ})
    assert notifier.watchdog_interval() is None
    assert len(_warnings(caplog)) == 1


def test_vanished_receiver_never_raises_and_warns_once_per_errno(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.sdnotify")
    with SystemdNotifier(sock_path) as notifier:
        with _receiver(sock_path) as receiver:
            assert notifier.ready()
            assert receiver.recv(4096) == b"READY=1"
        # Closed, but the socket file is still there: ECONNREFUSED, warned once for many pings.
        for _ in range(5):
            assert notifier.watchdog() is False
        assert [r.getMessage() for r in _warnings(caplog)] == [
            (
                f"sd_notify to {sock_path} failed (ECONNREFUSED: Connection refused); "
                "systemd sees no readiness or watchdog pings until it works again"
            )
        ]
        # Deleted: a different errno is worth one more warning.
        Path(sock_path).unlink()
        for _ in range(5):
            assert notifier.watchdog() is False
        assert len(_warnings(caplog)) == 2
        assert "ENOENT" in _warnings(caplog)[1].getMessage()

        # systemd is back: the pings flow, the recovery is logged, and a new failure warns again.
        with _receiver(sock_path) as receiver:
            assert notifier.watchdog() is True
            assert receiver.recv(4096) == b"WATCHDOG=1"
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
            f"sd_notify to {sock_path} works again"
        ]
        assert notifier.watchdog() is False
        assert len(_warnings(caplog)) == 3


def test_full_receive_queue_drops_pings_without_blocking(
    receiver: socket.socket, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Nobody reads: after the kernel's queue fills, a blocking send would hang the daemon.
    with SystemdNotifier(sock_path) as notifier:
        sent = [notifier.watchdog() for _ in range(500)]
    assert sent[0] is True
    assert False in sent
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert "EAGAIN" in warnings[0].getMessage()


def test_child_process_readiness_reaches_the_socket_with_its_pid(receiver: socket.socket, sock_path: str) -> None:
    # systemd (NotifyAccess=main) accepts a datagram only from the main PID, read from the kernel's credentials.
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    code = (
        "from agent.sdnotify import SystemdNotifier\n"
        "n = SystemdNotifier.from_env()\n"
        "n.ready('child up')\n"
        "n.watchdog() if n.watchdog_interval() == 15.0 else n.status('no watchdog')\n"
        "n.close()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in {"WATCHDOG_PID", "PYTHONPATH"}}
    env |= {"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "30000000", "PYTHONPATH": str(REPO_ROOT)}
    with subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO_ROOT) as child:
        pid = child.pid
        assert child.wait(timeout=30) == 0

    creds_size = struct.calcsize("iII")
    datagrams = []
    for _ in range(2):
        data, ancdata, _flags, _addr = receiver.recvmsg(4096, socket.CMSG_SPACE(creds_size))
        ((level, kind, creds),) = ancdata
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
        sender_pid, _uid, _gid = struct.unpack("iII", creds[:creds_size])
        assert sender_pid == pid
        datagrams.append(data)
    assert datagrams == [b"READY=1\nSTATUS=child up", b"WATCHDOG=1"]
