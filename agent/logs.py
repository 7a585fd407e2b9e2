"""Logging for the daemon: stderr (journald under systemd), plain or JSON, card numbers always masked.

Masking happens twice on purpose.  :class:`MaskingFilter` rewrites each record
on the handler (message, arguments, exception and stack text), so nothing that
reads the record afterwards, including ``Handler.handleError``'s dump of a
broken record, sees a card number.  :class:`MaskingFormatter` and
:class:`JsonFormatter` mask what they produce, so a record that reaches them
some other way is masked as well.

What counts as card data (:func:`mask_card_numbers`):

* a run of 12 or more decimal digits, which may be grouped by single spaces
  or hyphens (``6222 0202 0011 2233``).  Every digit but the last four becomes
  ``*``; separators stay, so columns keep their width.  11 digits are left
  alone: that is a Chinese mobile number, and no card is that short.  Runs
  longer than 19 digits are masked too: a reader that drops its separators
  glues the PAN to the expiry date, and that must not leak.  The price is that
  long all-digit ids (a 28-digit payment reference, an EAN-13 barcode) lose
  all but their last four digits in the log.
* the run is masked even when letters touch it (``B6222…``, ``id6222…``):
  keyboard-wedge readers prefix or suffix the PAN with letters, and a hex dump
  of a card's APDU response carries the number as BCD digits
  (``5A0862220202…``).  The price is that a hex digest with twelve digits in a
  row is partly masked.  Canonical UUIDs are the exception, kept whole unless
  their last group is all digits.
* any Unicode decimal digit counts, not only ASCII: a cashier whose input
  method is in full-width mode types ``６２２２…``.
* magnetic-stripe track 1 (``%B<PAN>^NAME^YYMM…?``) and track 2
  (``;<PAN>=YYMM…?``), also with the sentinels stripped: the PAN is masked as
  above and the name, expiry and discretionary data become ``***``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import sys
from decimal import Decimal
from typing import TextIO

__all__ = [
    "HANDLER_NAME",
    "PLAIN_FORMAT",
    "JsonFormatter",
    "MaskingFilter",
    "MaskingFormatter",
    "mask_card_numbers",
    "setup_logging",
]

PLAIN_FORMAT = "%(levelname)s %(name)s: %(message)s"
# How setup_logging recognises the handler it added, to replace it rather than add a second one.
HANDLER_NAME = "lane-agent"

_KEEP = 4
_MIN_PAN = 12
# "Leave this extra out of the JSON line" (None is a value an extra may have).
_DROP = object()

# Cheap gate: every pattern below needs a digit, and most log lines have none.
_ANY_DIGIT = re.compile(r"\d")
# Track 1: format code B, PAN, '^', name, '^', expiry, service code, discretionary data, end sentinel.
# Without the '%' sentinel it takes a card-length PAN to be track data.  The tail stops at the end
# sentinel, a line end or a quote (so masking JSON text keeps it valid).
_TRACK1 = re.compile(r"%B(?P<pan>\d{1,19})\^[^?\r\n\"]*\??|B(?P<bare>\d{12,19})\^[^?\r\n\"]*\??")
# Track 2: PAN, '=', expiry, service code, discretionary data; BCD, so only digits and ':<=>' occur.
# Without the ';' sentinel it takes a card-length PAN and a digit after '=' to be track data.
_TRACK2 = re.compile(r";(?P<pan>\d{1,19})=[\d:<=>]*\??|(?<!\d)(?P<bare>\d{12,19})=\d[\d:<=>]*\??")
# A card number: a digit and 11 or more after it, each maybe after a single space or hyphen.  A
# canonical UUID matches first and is kept (request and sale ids must stay greppable), unless its last
# group is all digits, which is where a glued-on card number would sit.
_PAN = re.compile(
    r"(?P<uuid>(?<![0-9A-Fa-f])[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-(?=[0-9]{0,11}[A-Fa-f])[0-9A-Fa-f]{12}(?![0-9A-Fa-f]))"
    r"|(?<!\d)\d(?:[ -]?\d){11,}"
)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
_JSON_KEYS = frozenset({"ts", "level", "logger", "msg", "exc", "stack"})


def _mask_digits(text: str, keep: int) -> str:
    """``*`` for every digit of ``text`` but the last ``keep``; other characters stay."""
    to_mask = sum(ch.isdecimal() for ch in text) - keep
    out = []
    for ch in text:
        if to_mask > 0 and ch.isdecimal():
            out.append("*")
            to_mask -= 1
        else:
            out.append(ch)
    return "".join(out)


def _mask_pan(pan: str) -> str:
    # A "PAN" too short to be a card number is still track data: hide all of it.
    return _mask_digits(pan, _KEEP if len(pan) >= _MIN_PAN else 0)


def _track1(match: re.Match[str]) -> str:
    end = "?" if match.group().endswith("?") else ""
    if match["pan"] is not None:
        return f"%B{_mask_pan(match['pan'])}^***{end}"
    return f"B{_mask_pan(match['bare'])}^***{end}"


def _track2(match: re.Match[str]) -> str:
    end = "?" if match.group().endswith("?") else ""
    if match["pan"] is not None:
        return f";{_mask_pan(match['pan'])}=***{end}"
    return f"{_mask_pan(match['bare'])}=***{end}"


def _pan(match: re.Match[str]) -> str:
    if match["uuid"] is not None:
        return match.group()
    return _mask_digits(match.group(), _KEEP)


def mask_card_numbers(text: str) -> str:
    """``text`` with card numbers and magnetic-stripe track data masked (see the module docstring).

    >>> mask_card_numbers("card 6222020200112233445 read")
    'card ***************3445 read'
    """
    if _ANY_DIGIT.search(text) is None:
        return text
    text = _TRACK1.sub(_track1, text)
    text = _TRACK2.sub(_track2, text)
    return _PAN.sub(_pan, text)


class MaskingFilter(logging.Filter):
    """A handler filter that masks card data in the record itself, before any formatter sees it.

    The message is formatted once (``msg % args``) and stored masked with
    ``args = None``; the exception and stack text are pre-formatted masked into
    ``exc_text`` and ``stack_info``, which ``logging.Formatter`` uses as they
    are.  String ``extra`` attributes are masked too.  Attach it to the
    handler: a logger's filters do not see records from child loggers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception as exc:  # noqa: BLE001 - a bad format call must not raise into the caller
            message = f"{_safe_str(record.msg)} (log arguments did not fit: {type(exc).__name__}: {exc})"
        record.msg = mask_card_numbers(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_card_numbers(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_card_numbers(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _RECORD_ATTRS and isinstance(value, str):
                setattr(record, key, mask_card_numbers(value))
        return True


class MaskingFormatter(logging.Formatter):
    """A ``logging.Formatter`` whose whole output, traceback included, has card data masked."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_card_numbers(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, ``exc``/``stack`` when present, extras.

    ``ts`` is UTC with milliseconds (``2026-12-10T06:05:00.123Z``).  Extras
    are the ``extra=`` attributes whose values are JSON primitives (str, int,
    float, bool, None) or ``Decimal`` (written as a string, as money is
    everywhere else); other values are dropped rather than ``repr``'d, since a
    repr can carry personal data the masking does not know.  An extra never
    replaces one of the fixed keys.  Every string and number is masked before
    serialisation, which keeps the line valid JSON.
    """

    def format(self, record: logging.LogRecord) -> str:
        at = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
        out: dict[str, object] = {
            "ts": f"{at:%Y-%m-%dT%H:%M:%S}.{at.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": mask_card_numbers(record.getMessage()),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = mask_card_numbers(record.exc_text)
        if record.stack_info:
            out["stack"] = mask_card_numbers(self.formatStack(record.stack_info))
        for key, value in vars(record).items():
            if key in _RECORD_ATTRS or key in _JSON_KEYS:
                continue
            primitive = _json_primitive(value)
            if primitive is not _DROP:
                out[mask_card_numbers(key)] = primitive
        return json.dumps(out, ensure_ascii=False)


def _json_primitive(value: object) -> object:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return mask_card_numbers(value)
    if isinstance(value, int):
        # A card number passed as an int must not escape as a JSON number.
        text = str(value)
        masked = mask_card_numbers(text)
        return value if masked == text else masked
    if isinstance(value, float):
        # NaN and infinities are not JSON; a string keeps the line parseable.
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal):
        return mask_card_numbers(str(value))
    return _DROP


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - the fallback of a fallback: never raise from logging
        return f"<unprintable {type(value).__name__}>"


def setup_logging(level: str = "INFO", *, json_format: bool = False, stream: TextIO | None = None) -> None:
    """Log from the root logger to stderr (or ``stream``), masked, plain or as JSON lines.

    The plain format is ``LEVEL logger: message`` with no timestamp: journald
    stamps each line itself.  Calling it again replaces the handler it added
    before (so a reloaded config takes effect) and leaves other handlers alone.
    ``uvicorn.access`` is lowered to WARNING, because the API counts requests
    in its own metrics and a line per request would drown the journal;
    ``uvicorn.error`` (start-up, bind failures) stays at ``level``.  Pass
    ``log_config=None`` to uvicorn so its loggers propagate to this handler.

    Raises ``ValueError`` for an unknown level name.
    """
    levels = logging.getLevelNamesMapping()
    name = level.upper()
    if name not in levels:
        raise ValueError(f"unknown log level {level!r}; expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.set_name(HANDLER_NAME)
    handler.addFilter(MaskingFilter())
    handler.setFormatter(JsonFormatter() if json_format else MaskingFormatter(PLAIN_FORMAT))
    root.addHandler(handler)
    root.setLevel(levels[name])
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
