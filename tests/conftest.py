"""Shared fixtures: where the repository is, and one fixed moment to price at."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

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
