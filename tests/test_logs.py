"""Log masking and set-up: no card number reaches the journal, in any form or formatter."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.logs import HANDLER_NAME, JsonFormatter, MaskingFilter, MaskingFormatter, mask_card_numbers, setup_logging

PAN = "6222020200112233445"
MASKED = "***************3445"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access = logging.getLogger("uvicorn.access")
    access_level = access.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    access.setLevel(access_level)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (PAN, MASKED),
        (f"member card {PAN} read", f"member card {MASKED} read"),
        ("622202020011", "********0011"),  # 12 digits: the shortest card number
        ("6222 0202 0011 2233", "**** **** **** 2233"),
        ("6222-0202-0011-2233", "****-****-****-2233"),
        ("6222 0202 0011 2233 445", "**** **** **** ***3 445"),
        (f'{{"card": "{PAN}", "lane": 3}}', f'{{"card": "{MASKED}", "lane": 3}}'),
        (f'{{"card":{PAN}}}', f'{{"card":{MASKED}}}'),
        (f"card={PAN}&lane=3", f"card={MASKED}&lane=3"),
        (f"B{PAN}x", f"B{MASKED}x"),  # letters touching the run do not protect it
        (f"{PAN} and 4000123412341234", f"{MASKED} and ************1234"),
        (f"old {PAN}, new 6222020200998877665", f"old {MASKED}, new ***************7665"),
        # An input method in full-width mode types these.
        ("６２２２０２０２００１１２２３３", "************２２３３"),
        # Track 1, with and without sentinels; the name, expiry and discretionary data go.
        (f"swipe %B{PAN}^ZHANG/SAN^28121010000000000000? ok", f"swipe %B{MASKED}^***? ok"),
        (f"swipe B{PAN}^ZHANG/SAN^28121010000000000000", f"swipe B{MASKED}^***"),
        (f'{{"raw": "%B{PAN}^ZHANG/SAN^2812101"}}', f'{{"raw": "%B{MASKED}^***"}}'),
        # Track 2, with and without sentinels.
        (f"swipe ;{PAN}=28121010000000000? ok", f"swipe ;{MASKED}=***? ok"),
        (f"swipe {PAN}=2812101000", f"swipe {MASKED}=***"),
        (";1234=5?", ";****=***?"),  # too short for a card, but sentinels say it is track data
        (f"%B{PAN}^A^1? then ;{PAN}=1? then {PAN}", f"%B{MASKED}^***? then ;{MASKED}=***? then {MASKED}"),
        # Longer than any card: masked all the same (a PAN glued to its expiry date).
        ("62220202001122334452812", "*******************2812"),
        # Not card numbers.
        ("13800138000", "13800138000"),  # 11 digits: a mobile number
        ("138 0013 8000", "138 0013 8000"),
        ("total 1234.56 CNY, 3 items", "total 1234.56 CNY, 3 items"),
        ("2026-12-10 14:05:00.123", "2026-12-10 14:05:00.123"),
        ("6222  0202  0011  2233", "6222  0202  0011  2233"),  # double spaces split the groups
        ("622202020011.2233", "********0011.2233"),
        ("sale 123e4567-e89b-12d3-a456-42661417400a", "sale 123e4567-e89b-12d3-a456-42661417400a"),
        ("sale 123e4567-e89b-12d3-a456-426614174000", "sale 123e4567-e89b-12d3-a***-********4000"),
        ("", ""),
    ],
)
def test_mask_card_numbers(text: str, expected: str) -> None:
    assert mask_card_numbers(text) == expected


def test_masking_keeps_the_layout_of_plain_numbers() -> None:
    line = f"| {PAN} | 6222 0202 0011 2233 |"
    masked = mask_card_numbers(line)
    assert len(masked) == len(line)
    assert [i for i, ch in enumerate(masked) if ch == "|"] == [i for i, ch in enumerate(line) if ch == "|"]


def test_lines_without_digits_are_returned_as_they_are() -> None:
    line = "basket priced for member M-ABC, tier gold: %B^^? ; = ?"
    assert mask_card_numbers(line) is line


_NOT_DIGITS = st.characters(min_codepoint=0, max_codepoint=127, exclude_characters="0123456789")


@settings(max_examples=300, deadline=None)
@given(
    before=st.text(_NOT_DIGITS, max_size=40),
    number=st.text("0123456789", min_size=12, max_size=19),
    after=st.text(_NOT_DIGITS, max_size=40),
)
def test_property_an_embedded_card_number_never_survives(before: str, number: str, after: str) -> None:
    masked = mask_card_numbers(before + number + after)
    assert number[:-4] not in masked
    # Nothing else in the text has digits, so the last four are all that may remain.
    assert "".join(ch for ch in masked if ch.isdigit()) == number[-4:]


@settings(max_examples=200, deadline=None)
@given(
    groups=st.lists(st.text("0123456789", min_size=1, max_size=6), min_size=2, max_size=8),
    separators=st.lists(st.sampled_from([" ", "-", ""]), min_size=7, max_size=7),
    before=st.text(_NOT_DIGITS, max_size=10).map(lambda s: s.rstrip(" -")),
)
def test_property_grouped_numbers_keep_only_their_last_four_digits(
    groups: list[str], separators: list[str], before: str
) -> None:
    text = groups[0] + "".join(sep + group for sep, group in zip(separators, groups[1:], strict=False))
    digits = "".join(groups)
    masked = mask_card_numbers(before + text + ".")
    kept = "".join(ch for ch in masked if ch.isdigit())
    assert kept == (digits[-4:] if len(digits) >= 12 else digits)


def _fail(exc: Exception) -> None:
    raise exc


def _record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            _fail(ValueError(f"card {PAN} rejected"))
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("agent.test", logging.ERROR, __file__, 1, msg, args or None, exc_info)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_filter_masks_the_record_itself() -> None:
    record = _record("card %s at lane %d", PAN, 3, exc=True, raw=f";{PAN}=2812?", count=2)
    assert MaskingFilter().filter(record) is True
    assert record.msg == f"card {MASKED} at lane 3"
    assert record.args is None
    assert record.getMessage() == f"card {MASKED} at lane 3"
    assert record.exc_text is not None
    assert "ValueError: card ***************3445 rejected" in record.exc_text
    assert PAN not in record.exc_text
    assert vars(record)["raw"] == f";{MASKED}=***?"
    assert vars(record)["count"] == 2
    # A plain logging.Formatter now prints only masked text.
    assert PAN not in logging.Formatter().format(record)


def test_filter_masks_stack_info() -> None:
    record = _record("x")
    record.stack_info = f'  File "x.py", line 1, in f\n    read("{PAN}")'
    MaskingFilter().filter(record)
    assert record.stack_info == f'  File "x.py", line 1, in f\n    read("{MASKED}")'


def test_filter_survives_arguments_that_do_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    record = _record("card %d", PAN)
    assert MaskingFilter().filter(record) is True
    assert record.msg == "card %d (log arguments did not fit: TypeError: %d format: a real number is required, not str)"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(MaskingFilter())
    handler.handle(_record("card %d", PAN))
    assert PAN not in stream.getvalue()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("formatter", [MaskingFormatter("%(levelname)s %(name)s: %(message)s"), JsonFormatter()])
def test_formatters_mask_without_the_filter(formatter: logging.Formatter) -> None:
    # A record that reached the formatter some other way: message, arguments and traceback all masked.
    out = formatter.format(_record("card %s", PAN, exc=True))
    assert PAN not in out
    assert PAN[:-4] not in out
    assert MASKED in out
    assert "Traceback (most recent call last)" in out
    assert f"ValueError: card {MASKED} rejected" in out


def test_plain_format(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("DEBUG")
    logging.getLogger("agent.lane").info("member %s identified", PAN)
    logging.getLogger("agent.lane").debug("tick")
    assert capsys.readouterr().err == f"INFO agent.lane: member {MASKED} identified\nDEBUG agent.lane: tick\n"


def test_exception_in_plain_output_is_masked() -> None:
    stream = io.StringIO()
    setup_logging(stream=stream)
    try:
        _fail(RuntimeError(f"reader returned {PAN}"))
    except RuntimeError:
        logging.getLogger("drivers.msr").exception("swipe %s failed", f"%B{PAN}^ZHANG/SAN^2812?")
    out = stream.getvalue()
    assert out.startswith(f"ERROR drivers.msr: swipe %B{MASKED}^***? failed\nTraceback (most recent call last):\n")
    assert f"RuntimeError: reader returned {MASKED}" in out
    assert PAN[:-4] not in out
    assert "ZHANG" not in out


def test_json_lines_parse_and_carry_fields() -> None:
    stream = io.StringIO()
    setup_logging("INFO", json_format=True, stream=stream)
    log = logging.getLogger("agent.api")
    log.info(
        "收银 sale for %s",
        PAN,
        extra={
            "lane": 3,
            "member": f"card {PAN}",
            "card_int": int(PAN),
            "amount": Decimal("12.50"),
            "ok": True,
            "note": None,
            "ratio": 0.5,
            "nan": float("nan"),
            "obj": object(),
            "items": [1, 2],
            "ts": "not the timestamp",
            "exc": "not an exception",
        },
    )
    try:
        _fail(KeyError(PAN))
    except KeyError:
        log.exception("lookup failed\nsecond line")
    log.info("done", stack_info=True)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)

    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert first == {
        "ts": first["ts"],
        "level": "INFO",
        "logger": "agent.api",
        "msg": f"收银 sale for {MASKED}",
        "lane": 3,
        "member": f"card {MASKED}",
        "card_int": MASKED,
        "amount": "12.50",
        "ok": True,
        "note": None,
        "ratio": 0.5,
        "nan": "nan",
    }
    assert "收银" in lines[0]  # ensure_ascii=False: readable in the journal

    assert second["level"] == "ERROR"
    assert second["msg"] == "lookup failed\nsecond line"
    assert second["exc"].startswith("Traceback (most recent call last):")
    assert f"KeyError: '{MASKED}'" in second["exc"]
    assert PAN[:-4] not in lines[1]

    assert third["stack"].startswith("Stack (most recent call last):")
    assert "exc" not in third


def test_json_timestamp_is_utc_with_milliseconds() -> None:
    record = _record("x")
    record.created = 1796882700.1239  # 2026-12-10T06:05:00.123 UTC (14:05 in Shanghai)
    assert json.loads(JsonFormatter().format(record))["ts"] == "2026-12-10T06:05:00.123Z"


def test_setup_logging_is_idempotent() -> None:
    first, second = io.StringIO(), io.StringIO()
    foreign = logging.NullHandler()
    logging.getLogger().addHandler(foreign)
    setup_logging(stream=first)
    setup_logging("WARNING", json_format=True, stream=second)
    root = logging.getLogger()
    ours = [h for h in root.handlers if h.get_name() == HANDLER_NAME]
    assert len(ours) == 1
    assert foreign in root.handlers
    assert root.level == logging.WARNING
    logging.getLogger("agent.x").warning("once")
    logging.getLogger("agent.x").info("filtered out")
    assert first.getvalue() == ""
    assert [json.loads(line)["msg"] for line in second.getvalue().splitlines()] == ["once"]


def test_setup_logging_quiets_uvicorn_access_only() -> None:
    stream = io.StringIO()
    setup_logging("info", stream=stream)
    logging.getLogger("uvicorn.access").info('127.0.0.1 - "POST /v1/sales HTTP/1.1" 200')
    logging.getLogger("uvicorn.error").info("Uvicorn running on http://127.0.0.1:8080")
    assert stream.getvalue() == "INFO uvicorn.error: Uvicorn running on http://127.0.0.1:8080\n"
    assert logging.getLogger("uvicorn.access").level == logging.WARNING


def test_setup_logging_rejects_unknown_levels() -> None:
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        setup_logging("LOUD")
    assert not [h for h in logging.getLogger().handlers if h.get_name() == HANDLER_NAME]


def test_broken_stream_does_not_leak_the_number_through_handle_error(capsys: pytest.CaptureFixture[str]) -> None:
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise OSError("journal gone")

    setup_logging(stream=Broken())
    logging.getLogger("agent.lane").error("member %s", PAN)
    err = capsys.readouterr().err
    # logging reports the failure with the record's message and arguments: masked, thanks to the filter.
    assert "OSError: journal gone" in err
    assert MASKED in err
    assert PAN[:-4] not in err
