"""Names and limits of the MQTT wire that the lane's configuration checks (docs/protocol.md).

They live here, below both, so that ``agent.config`` can validate ``[sync]``
without importing the sync layer; ``sync.wire`` re-exports them.
"""

from __future__ import annotations

import re

DEFAULT_ROOT = "retail"
# Head office refuses bigger messages outright; a lane's batches stay below (sync.batch_bytes).
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024
MAX_BATCH_ENTRIES = 5000

_ROOT = re.compile(r"[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,3}")


def check_root(root: str) -> str:
    """``root`` if it is a usable topic root (no wildcards, no empty levels), else ValueError."""
    if not _ROOT.fullmatch(root):
        raise ValueError(f"topic root {root!r}: 1-4 levels of letters, digits, '_' or '-', separated by '/'")
    return root
