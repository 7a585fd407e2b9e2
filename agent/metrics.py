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
        # The uplink (sync/uplink.py).  The backlog in entries is lane_journal_backlog above.
        self.sync_connected = Gauge("lane_sync_connected", "1 while the uplink is connected to the broker", registry=r)
        self.sync_backlog_bytes = Gauge(
            "lane_sync_backlog_bytes", "bytes of journal entry bodies head office has not acknowledged", registry=r
        )
        self.sync_oldest_unacked_age = Gauge(
            "lane_sync_oldest_unacked_age_seconds",
            "age of the oldest journal entry head office has not acknowledged (0: none)",
            registry=r,
        )
        self.sync_last_ack_age = Gauge(
            "lane_sync_last_ack_age_seconds",
            "seconds since head office last acknowledged new entries (NaN: not since the agent started)",
            registry=r,
        )
        self.sync_lag = Gauge(
            "lane_sync_lag_seconds",
            "from publishing the batch holding the acknowledged seq to receiving the acknowledgement (latest)",
            registry=r,
        )
        self.sync_batches = Counter("lane_sync_batches_sent", "journal batches published", registry=r)
        self.sync_entries = Counter("lane_sync_entries_sent", "journal entries published, resends included", registry=r)
        self.sync_resends = Counter(
            "lane_sync_resends", "times the uplink went back to the last ack (stalled acks)", registry=r
        )
        self.sync_acks = Counter("lane_sync_acks", "acknowledgements that moved acked_seq forward", registry=r)
        self.sync_acks_rejected = Counter(
            "lane_sync_acks_rejected",
            "acknowledgements ignored, by reason (malformed, wrong_epoch, beyond_last)",
            ["reason"],
            registry=r,
        )
        # Signed rulesets from head office (sync/rules_downlink.py).
        self.rules_rejected = Counter(
            "lane_rules_rejected",
            "head-office rulesets refused, by code (bad_signature, stale_serial, …: docs/downlink.md)",
            ["code"],
            registry=r,
        )
        self.rules_serial = Gauge(
            "lane_rules_serial", "serial of the head-office ruleset in force (0: the rules.path file)", registry=r
        )
        # Redemption holds at head office (sync/holds_client.py).
        self.holds = Counter(
            "lane_holds",
            "holds asked of head office, by result (held, refused, offline, released...)",
            ["result"],
            registry=r,
        )
        # The member table and the hot list from head office (sync/downlink.py); the cached version is
        # lane_member_table_version above.
        self.member_head_version = Gauge(
            "lane_member_head_version", "head office's member-table version, as last heard (0: not yet)", registry=r
        )
        self.member_behind = Gauge(
            "lane_member_behind", "member-table versions the cache is behind head office (as last heard)", registry=r
        )
        self.member_fetch_errors = Counter(
            "lane_member_fetch_errors",
            "member-table fetches that failed, by code (unreachable, timeout, http_NNN, bad_delta, member_gap, …)",
            ["code"],
            registry=r,
        )
        self.member_deltas = Counter("lane_member_deltas_applied", "member-delta pages applied", registry=r)
        self.member_delta_members = Counter(
            "lane_member_delta_members", "member lines of applied pages that replaced the cached member", registry=r
        )
        self.member_snapshots = Counter("lane_member_snapshots", "member snapshots downloaded and imported", registry=r)
        self.member_notices_rejected = Counter(
            "lane_member_notices_rejected",
            "member and hot-list notices refused, by topic and code (bad_json, bad_envelope, …)",
            ["topic", "code"],
            registry=r,
        )
        self.member_hot_cards = Gauge(
            "lane_member_hot_cards", "hot-list cards kept (those the member cache has not caught up with)", registry=r
        )
        self.sync_last_ack_age.set(float("nan"))
