"""Service-desk staff's tokens for the member centre's API (docs/member-centre.md).

As with lanes (``sync.lane_auth``), head office keeps one secret
(``[centre] staff_secret_*``) and each staff member's token is derived from
it and the name: ``HMAC-SHA256(secret, "staff:{name}")``, unpadded base64url.
No token table to keep; the name a token proves is what ``centre_audit``
records as the actor.  ``lane-hq staff token NAME`` prints one.

A request carries ``Authorization: Bearer <name>:<token>``.  A token is
withdrawn by changing the secret (every token changes with it).

``staff_guard(secret)`` is the FastAPI dependency.  Used as a parameter's
``Annotated[str, Depends(guard)]`` it gives the name, but FastAPI resolves a
route's annotations in its module's globals, so under ``from __future__
import annotations`` an alias built inside a function is not found (the
parameter silently becomes a query parameter).  Modules with postponed
annotations put the guard in the router's ``dependencies`` and read the name
with ``staff_name(request)``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

# A staff name: what the audit shows.  No ':' (it separates the token) and nothing a log could misread.
STAFF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="staff",
    description="`Authorization: Bearer <name>:<token>`; the token from `lane-hq staff token NAME`",
)


def check_name(name: str) -> str:
    """``name`` if it is a valid staff name; ValueError otherwise."""
    if not STAFF_NAME.fullmatch(name):
        raise ValueError("a staff name is 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")
    return name


def staff_token(secret: bytes, name: str) -> str:
    """The token of staff member ``name``: 43 characters of unpadded base64url."""
    digest = hmac.new(secret, f"staff:{check_name(name)}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def bearer_value(secret: bytes, name: str) -> str:
    """What follows ``Bearer `` in the header: ``<name>:<token>``."""
    return f"{name}:{staff_token(secret, name)}"


def staff_of(secret: bytes, credentials: str) -> str | None:
    """The staff name ``<name>:<token>`` proves under ``secret``, or None (compared in constant time)."""
    name, sep, token = credentials.strip().rpartition(":")
    if not sep or not STAFF_NAME.fullmatch(name):
        return None
    return name if hmac.compare_digest(token.encode(), staff_token(secret, name).encode()) else None


def staff_guard(secret: bytes | None) -> Callable[..., str]:
    """The FastAPI dependency that returns the calling staff member's name; 503 without a secret, else 401."""

    def authorized_staff(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> str:
        if secret is None:
            raise HTTPException(
                503,
                detail={
                    "code": "staff_auth_unconfigured",
                    "message": "head office has no centre.staff_secret_env / staff_secret_file: the desk API is closed",
                },
            )
        name = None if credentials is None else staff_of(secret, credentials.credentials)
        if name is None:
            raise HTTPException(
                401,
                detail={"code": "unauthorized", "message": "a staff token is required: Bearer <name>:<token>"},
                headers={"WWW-Authenticate": "Bearer"},
            )
        request.state.staff = name
        return name

    return authorized_staff


def staff_name(request: Request) -> str:
    """The staff name ``staff_guard`` authenticated for this request (when it runs as a router dependency)."""
    name: str = request.state.staff
    return name
