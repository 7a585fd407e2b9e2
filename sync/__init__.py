"""Synchronisation between lanes and head office (lane uplink and head-office services)."""
