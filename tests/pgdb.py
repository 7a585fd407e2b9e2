"""A fresh PostgreSQL database per test session on the machine's server, dropped afterwards.

``initdb`` refuses to run as root, so the tests use the running server
(../shared/REAL_COMPONENTS.md).  On a machine where it is installed but
stopped, it is started with ``pg_ctlcluster``; where the role running the
tests does not exist yet (a fresh Debian install has only ``postgres``), it is
created as a superuser through ``runuser -u postgres``.  ``LANE_TEST_PG`` may
name another server as a libpq connection string.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

SOCKET_DIR = "/var/run/postgresql"


def _server_dsn() -> str:
    return os.environ.get("LANE_TEST_PG", f"host={SOCKET_DIR} dbname=postgres")


def _connect(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True, connect_timeout=3)


def _start_server() -> None:
    versions = sorted(Path("/etc/postgresql").iterdir()) if Path("/etc/postgresql").is_dir() else []
    if not versions or shutil.which("pg_ctlcluster") is None:
        raise RuntimeError("PostgreSQL is not installed (scripts/ensure-system.sh installs it)")
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1].name, "main", "start"],
        check=False,
        capture_output=True,
    )


def _ensure_role() -> None:
    user = getpass.getuser()
    subprocess.run(
        ["runuser", "-u", "postgres", "--", "psql", "-q", "-c", f'CREATE ROLE "{user}" SUPERUSER LOGIN'],
        check=False,
        capture_output=True,
    )


def server() -> psycopg.Connection:
    """An autocommit connection to the server's maintenance database, starting the server if needed."""
    dsn = _server_dsn()
    last: Exception | None = None
    for attempt in range(40):
        try:
            return _connect(dsn)
        except psycopg.OperationalError as exc:
            last = exc
            if attempt == 0:
                _start_server()
            elif attempt == 1 and "role" in str(exc):
                _ensure_role()
            time.sleep(0.25)
    raise RuntimeError(f"cannot reach PostgreSQL ({dsn}): {last}")


@contextmanager
def fresh_database(prefix: str = "lanehq_test") -> Iterator[str]:
    """Create a new, empty database; yield its SQLAlchemy URL; drop it afterwards."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with server() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = _server_dsn()
    host = SOCKET_DIR
    for part in dsn.split():
        if part.startswith("host="):
            host = part.removeprefix("host=")
    try:
        yield f"postgresql+psycopg:///{name}?host={host}"
    finally:
        with server() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
