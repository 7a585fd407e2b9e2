"""Request bodies of the POS API beyond the basket (``agent.basket.BasketIn``).

Wire models only: validated all at once, unknown keys refused, money as
decimal strings.  ``agent.service`` does the work; ``agent.api`` binds these
to the routes (and so to the OpenAPI document at ``/docs``).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import Field, field_validator

from agent.basket import BasketIn, Code, Quantity, _Wire

# POS-chosen idempotency keys: printable ASCII without spaces, so they log and quote safely.
Key = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[!-~]+$")]


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.utcoffset() is None:
        raise ValueError("'at' needs a UTC offset, e.g. 2026-12-10T14:00:00+08:00")
    return value


class IdentifyIn(_Wire):
    """``POST /v1/identify``: a code the cashier typed or scanned at the POS."""

    code: str = Field(min_length=1, max_length=128, description="the card number (or member id, with kind)")
    kind: Literal["card", "member_id"] = Field(
        default="card", description="card: a card number, as printed or scanned; member_id: head office's member id"
    )


class SaleIn(BasketIn):
    """``POST /v1/sales``: a basket as priced, with the POS's idempotency key and the tenders taken."""

    sale_id: Key = Field(description="chosen by the POS, unique per sale; a retry sends the same id and body")


class ReturnLineIn(_Wire):
    line_id: Code
    qty: Quantity = Field(description="decimal string, > 0; at most what is left of the line")


class ReturnIn(_Wire):
    """``POST /v1/returns``: goods of one sale brought back."""

    return_id: Key = Field(description="chosen by the POS, unique per return; a retry sends the same id and body")
    sale_id: Key
    lines: list[ReturnLineIn] = Field(min_length=1, max_length=1000)
    member_id: Code | None = Field(
        default=None, description="the member whose card was presented; needed for a member's sale"
    )
    at: dt.datetime | None = Field(default=None, description="ISO 8601 with offset; default: now")

    _check_at = field_validator("at")(_aware)

    @field_validator("lines")
    @classmethod
    def _unique(cls, lines: list[ReturnLineIn]) -> list[ReturnLineIn]:
        if len({line.line_id for line in lines}) != len(lines):
            raise ValueError("each line_id appears once in a return")
        return lines


class VoidIn(_Wire):
    """``POST /v1/sales/{sale_id}/void``: cancel a sale of today entirely."""

    reason: str = Field(default="", max_length=200, description="the cashier's reason, journaled")
    at: dt.datetime | None = Field(default=None, description="ISO 8601 with offset; default: now")

    _check_at = field_validator("at")(_aware)
