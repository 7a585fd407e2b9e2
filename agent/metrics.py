"""Prometheus metrics of the lane agent, served at ``GET /metrics``.

One registry per agent (not the client library's global one), so a test or
a second agent in the same process starts from zero.  Labels are bounded
sets (route templates, status codes, reason codes), never ids or card data.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets for a loopback API that answers in about a millisecond.
_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    """The agent's counters and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lane_api_requests", "POS API requests answered", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "lane_api_request_seconds", "POS API time to answer", ["route"], buckets=_LATENCY, registry=r
        )
        self.errors = Counter("lane_api_errors", "POS API error answers by error code", ["code"], registry=r)
        self.identifications = Counter(
            "lane_identifications",
            "identifications by result (identified or the refusal's reason)",
            ["result"],
            registry=r,
        )
        self.journal = Counter(
            "lane_journal_commits", "sales, returns and voids journaled (replays not counted)", ["kind"], registry=r
        )
        self.replays = Counter("lane_idempotent_replays", "retries answered from the journal", ["kind"], registry=r)
        self.backlog = Gauge("lane_journal_backlog", "journal entries head office has not acknowledged", registry=r)
        self.last_seq = Gauge("lane_journal_last_seq", "the journal's last sequence number", registry=r)
        self.disk_free = Gauge("lane_store_disk_free_bytes", "free space on the database's file system", registry=r)
        self.db_bytes = Gauge("lane_store_db_bytes", "size of the lane database", registry=r)
        self.member_version = Gauge("lane_member_table_version", "the cached member table's version", registry=r)
        self.event_streams = Gauge("lane_event_streams", "open GET /v1/events streams", registry=r)
        self.events_dropped = Counter(
            "lane_events_dropped", "events a slow stream lost (its queue was full)", registry=r
        )
