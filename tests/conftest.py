"""Shared fixtures: where the repository is, and one fixed moment to price at."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgdb import fresh_database
from sqlalchemy import create_engine, text

from sync.hq.db import HqDatabase

REPO_ROOT = Path(__file__).resolve().parent.parent
RULES_888 = REPO_ROOT / "config" / "rules" / "888-mall.toml"
# The 888 mall's member day (the 10th), mid-afternoon in Shanghai.
MEMBER_DAY = dt.datetime(2026, 12, 10, 14, 5, tzinfo=dt.timezone(dt.timedelta(hours=8)))


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def rules_888() -> Path:
    return RULES_888


@pytest.fixture
def at() -> dt.datetime:
    return MEMBER_DAY


# --- head office's database, on both engines (test_hq_db, test_hq_members, test_holds) --------


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """One PostgreSQL database for the session; ``db_url`` empties it before each test."""
    with fresh_database("lanehq_hq_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty head-office database: a new SQLite file, or the session's PostgreSQL with its schema dropped."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/hq.db"
    url: str = request.getfixturevalue("pg_url")
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()
    return url


@pytest.fixture
def db(db_url: str) -> Iterator[HqDatabase]:
    database = HqDatabase.open(db_url)
    try:
        yield database
    finally:
        database.close()
