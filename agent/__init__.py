"""The lane agent: identification, pricing, awards and the journal (no device or network code)."""
