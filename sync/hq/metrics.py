"""Head office's Prometheus metrics: one registry per process, label values from small fixed sets."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class HqMetrics:
    """Ingest, acknowledgement and audit figures (``GET /metrics``)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connected = Gauge("hq_broker_connected", "1 while connected to the broker", registry=r)
        self.batches = Counter("hq_batches", "journal messages handled, by outcome", ["outcome"], registry=r)
        self.entries = Counter("hq_entries", "journal entries, by outcome", ["outcome"], registry=r)
        self.rejected = Counter("hq_messages_rejected", "whole messages dead-lettered, by code", ["code"], registry=r)
        self.gaps = Counter("hq_gaps", "batches that started past the lane's next seq", registry=r)
        self.acks = Counter("hq_acks_published", "acknowledgements published", registry=r)
        self.states = Counter("hq_lane_states", "lane state messages, by outcome", ["outcome"], registry=r)
        self.audits = Counter("hq_audits", "sales audited, by status", ["status"], registry=r)
        self.audit_backlog = Gauge("hq_audit_backlog", "sales ingested and not yet audited (last look)", registry=r)
        self.unknown_members = Counter(
            "hq_unknown_members", "members whose points a batch moved but head office does not hold", registry=r
        )
        self.member_version = Gauge("hq_member_version", "head office's member version (last look)", registry=r)
        self.downlink = Counter("hq_downlink_published", "retained notices published, by topic", ["topic"], registry=r)
        self.holds = Counter("hq_holds", "lanes' holds, by result (held, a refusal's code...)", ["result"], registry=r)
        self.spend_flags = Counter("hq_spend_flags", "sales flagged at ingest, by code", ["code"], registry=r)
        self.batch_seconds = Histogram(
            "hq_batch_seconds",
            "decode + database transaction of one journal message",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
