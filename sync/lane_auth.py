"""Lanes' tokens for head office's HTTP API (pure).

Head office keeps one secret; each lane's token is derived from it and the
lane's identity, so head office stores no per-lane token table and a token
proves which lane calls (a lane's token opens only its own
``/v1/sync/{store}/{lane}/...`` paths).  ``lane-hq lanes token STORE LANE``
prints a lane's token for its ``sync.hq_token``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

_CONTEXT = b"lane-membership lane api token v1"


def lane_token(secret: bytes, store: str, lane: str) -> str:
    """The bearer token of ``store``/``lane``: 43 characters of unpadded base64url."""
    message = b"\n".join((_CONTEXT, store.encode(), lane.encode()))
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def check_token(secret: bytes, store: str, lane: str, authorization: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``store``/``lane``'s bearer token (constant time)."""
    if authorization is None:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    return hmac.compare_digest(token.strip().encode(), lane_token(secret, store, lane).encode())
