"""A real head office for the sync tests: ``lane-hq run`` as a subprocess, and reads of its database.

``Hq`` writes an hq.toml (broker, database URL, the shipped rulesets, a free
API port) and starts ``lane-hq run``; it is ready when ``/healthz`` answers
and ``/metrics`` shows the broker connected.  ``HqReader`` reads the database
directly with SQLAlchemy, so the tests check what was committed, not what
head office says about it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from broker import free_port
from conftest import REPO_ROOT


class Hq:
    """One ``lane-hq run`` process."""

    def __init__(
        self,
        directory: Path,
        *,
        broker_port: int,
        db_url: str,
        client_id: str = "hq-test",
        share_group: str | None = None,
        audit: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        rules = directory / "rules"
        rules.mkdir(exist_ok=True)
        for path in (REPO_ROOT / "config" / "rules").glob("*.toml"):
            shutil.copyfile(path, rules / path.name)
        self.port = free_port()
        self.config = directory / "hq.toml"
        share = "" if share_group is None else f'share_group = "{share_group}"\n'
        self.config.write_text(
            f'[broker]\nport = {broker_port}\nclient_id = "{client_id}"\n{share}reconnect_max_seconds = 1\n\n'
            f'[database]\nurl = "{db_url}"\n\n[rules]\ndirectory = "{rules}"\n\n'
            f"[audit]\nenabled = {'true' if audit else 'false'}\n\n"
            f'[api]\nport = {self.port}\n\n[logging]\nlevel = "INFO"\n',
            encoding="utf-8",
        )
        self.log = directory / f"{client_id}.log"
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sync.hq.cli", "run", "--config", str(self.config)],
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lane-hq exited with {self.process.returncode}: {self.tail()}")
            try:
                metrics = httpx.get(f"{self.url}/metrics", timeout=1).text
                if "hq_broker_connected 1.0" in metrics:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"lane-hq did not connect within {timeout} s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def metric(self, name: str) -> float:
        """The sum of every sample of ``name`` on /metrics."""
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics", timeout=5).text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                head, value = line.rsplit(" ", 1)
                if head == name or head.startswith(name + "{"):
                    total += float(value)
        return total

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        code = self.process.wait(timeout)
        self.process = None
        return code


class HqReader:
    """Direct reads of head office's database."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url)

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))

    def close(self) -> None:
        self.engine.dispose()
