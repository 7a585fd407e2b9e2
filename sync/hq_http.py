"""The lane's HTTP client for head office's API (docs/downlink.md).

One ``httpx.AsyncClient`` per use (member fetches, holds), each built here so
that the base URL, the lane's token, the CA and the timeouts are the same
everywhere.  Paths are relative to ``/v1/sync/{store}/{lane}/``.
"""

from __future__ import annotations

import ssl
from urllib.parse import quote

import httpx

from agent.config import LaneConfig
from agent.errors import ConfigError, Issue


def lane_prefix(config: LaneConfig) -> str:
    """``/v1/sync/{store}/{lane}``: the paths this lane's token opens."""
    return f"/v1/sync/{quote(config.lane.store, safe='')}/{quote(config.lane.lane, safe='')}"


def make_client(config: LaneConfig, *, timeout: float | None = None) -> httpx.AsyncClient:
    """A client for head office's API; ConfigError when ``sync.hq_url`` / ``hq_token`` are not set."""
    sync = config.sync
    if sync.hq_url is None or sync.hq_token is None:
        raise ConfigError([Issue("sync.hq_url", "missing", "head office's API is not configured")])
    verify: ssl.SSLContext | bool = True
    ca = sync.hq_ca_file or sync.tls_ca_file
    if sync.hq_url.startswith("https://") and ca is not None:
        verify = ssl.create_default_context(cafile=str(ca))
    seconds = sync.http_timeout_seconds if timeout is None else timeout
    return httpx.AsyncClient(
        base_url=sync.hq_url + lane_prefix(config),
        headers={"Authorization": f"Bearer {sync.hq_token.reveal()}", "User-Agent": "lane-agent"},
        verify=verify,
        timeout=httpx.Timeout(seconds, connect=min(seconds, 5.0)),
        # A lane talks to one head office; a proxy from the environment would be a surprise.
        trust_env=False,
    )
