"""The lane configuration file: every key's bad values, all problems at once, secrets never shown.

A technician runs ``lane-agent config check`` on a file before the agent
starts; what comes back must name the file, the key and the reason.  So these
tests assert exact (field, code) pairs and that every issue carries the source
file, never merely that something was raised.
"""

from __future__ import annotations

import base64
import copy
import json
import pickle
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from strategies import to_toml

from agent.config import (
    REDACTED,
    SECTIONS,
    LaneConfig,
    Secret,
    file_keys,
    is_loopback,
    load_config,
    parse_config,
    redacted,
)
from agent.config_cli import to_toml as render_toml
from agent.errors import ConfigError, InputError, Issue
from drivers.registry import DRIVERS

EXAMPLE = REPO_ROOT / "config" / "lane.example.toml"
DOCS = REPO_ROOT / "docs" / "configuration.md"
SOURCE = "/etc/lane-agent/lane.toml"
TOKEN = "tok-" + "s3cr3t" * 6  # 40 characters
KEY_BYTES = bytes(range(100, 132))  # 32 bytes
KEY = "hex:" + KEY_BYTES.hex()


def base() -> dict[str, Any]:
    """The smallest valid file: the ids and the two secrets.  Each case breaks one thing in a fresh copy."""
    return {
        "lane": {"store": "s01", "lane": "l03"},
        "api": {"token": TOKEN},
        "store": {"card_hash_key": KEY},
    }


def problems(doc: dict[str, Any], environ: dict[str, str] | None = None) -> list[Issue]:
    with pytest.raises(ConfigError) as caught:
        parse_config(to_toml(doc), source=SOURCE, environ=environ or {})
    issues = list(caught.value.issues)
    assert issues, "a ConfigError lists its problems"
    for issue in issues:
        assert issue.source == SOURCE
        assert issue.message
        assert str(issue).startswith(f"{SOURCE}: ")
    assert caught.value.code == "invalid_config"
    assert isinstance(caught.value, InputError)
    return issues


def pairs(doc: dict[str, Any], environ: dict[str, str] | None = None) -> list[tuple[str, str]]:
    return [(issue.field, issue.code) for issue in problems(doc, environ)]


Mutation = Callable[[dict[str, Any]], object]


def _set(path: str, value: object) -> Mutation:
    """Set ``value`` at a dotted path ("api.port"), creating the section if needed."""

    def apply(doc: dict[str, Any]) -> None:
        section, _, key = path.partition(".")
        if key:
            doc.setdefault(section, {})[key] = value
        else:
            doc[section] = value

    return apply


def _drop(path: str) -> Mutation:
    def apply(doc: dict[str, Any]) -> None:
        section, _, key = path.partition(".")
        if key:
            del doc[section][key]
        else:
            del doc[section]

    return apply


# --- the valid files ------------------------------------------------------------------------------


def test_the_example_file_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.lane.store == "store-0101"
    assert config.lane.lane == "lane-03"
    assert str(config.lane.zone) == "Asia/Shanghai"
    assert config.api.host == "127.0.0.1"
    assert config.api.port == 8765
    assert len(config.api.token.reveal()) >= 24
    assert len(config.store.card_hash_key.reveal()) == 32
    assert config.returns.window_days == 15


def test_the_example_file_sets_every_key_or_shows_it_commented() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    raw = tomllib.loads(text)
    assert set(raw) == {*SECTIONS, "devices"}, "every section appears in the example"
    for name, model in SECTIONS.items():
        for key in file_keys(model):
            written = key in raw[name]
            commented = re.search(rf"^# {re.escape(key)} = ", text, re.MULTILINE) is not None
            assert written or commented, f"[{name}] {key} is missing from the example"


def test_the_example_file_gives_the_defaults() -> None:
    """The example says "Default: …" for each key; it must also set exactly that value."""
    example = redacted(load_config(EXAMPLE))
    defaults = redacted(parse_config(to_toml(base()), environ={}))
    for section in ("api", "store", "rules", "offline", "returns", "logging", "sync"):
        for key, value in defaults[section].items():
            if key not in {"token", "card_hash_key"}:
                assert example[section][key] == value, f"{section}.{key}"
    assert example["lane"]["timezone"] == defaults["lane"]["timezone"]


def test_the_docs_describe_every_key() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for name, model in SECTIONS.items():
        assert f"[{name}]" in text, name
        for key in file_keys(model):
            assert f"`{key}`" in text, f"[{name}] {key} is not in docs/configuration.md"


def test_defaults() -> None:
    config = parse_config(to_toml(base()), environ={})
    assert config.lane.timezone == "Asia/Shanghai"
    assert (config.api.host, config.api.port, config.api.allow_remote) == ("127.0.0.1", 8765, False)
    assert config.api.max_body_bytes == 256 * 1024
    assert config.api.request_timeout_seconds == 10.0
    assert config.store.path == Path("/var/lib/lane-agent/lane.db")
    assert config.store.busy_timeout_ms == 5000
    assert config.store.disk_warn_free_mb == 512
    assert config.rules.path == Path("/etc/lane-agent/rules/current.toml")
    assert (config.offline.points_floor, config.offline.rebate_floor_fen) == (0, 0)
    assert (config.returns.window_days, config.returns.require_member_card) == (15, True)
    assert (config.logging.level, config.logging.json_format) == ("INFO", False)


@pytest.mark.parametrize(
    ("path", "value", "check"),
    [
        ("api.host", "::1", lambda c: c.api.host == "::1"),
        ("api.host", "localhost", lambda c: c.api.host == "localhost"),
        ("api.host", "127.0.0.53", lambda c: c.api.host == "127.0.0.53"),
        ("api.port", 1, lambda c: c.api.port == 1),
        ("api.port", 65535, lambda c: c.api.port == 65535),
        ("api.request_timeout_seconds", 6, lambda c: c.api.request_timeout_seconds == 6.0),
        ("api.token", "A" * 23 + "=", lambda c: c.api.token.reveal() == "A" * 23 + "="),
        (
            "store.card_hash_key",
            "base64:" + base64.b64encode(KEY_BYTES).decode(),
            lambda c: c.store.card_hash_key.reveal() == KEY_BYTES,
        ),
        (
            "store.card_hash_key",
            "hex:" + KEY_BYTES.hex().upper(),
            lambda c: c.store.card_hash_key.reveal() == KEY_BYTES,
        ),
        ("offline.rebate_floor", "12.5", lambda c: c.offline.rebate_floor_fen == 1250),
        ("offline.points_floor", 500, lambda c: c.offline.points_floor == 500),
        ("returns.window_days", 0, lambda c: c.returns.window_days == 0),
        ("logging.json", True, lambda c: c.logging.json_format is True),
        ("lane.timezone", "UTC", lambda c: str(c.lane.zone) == "UTC"),
        ("lane.store", "A" * 32, lambda c: c.lane.store == "A" * 32),
    ],
)
def test_valid_values(path: str, value: object, check: Callable[[LaneConfig], bool]) -> None:
    doc = base()
    _set(path, value)(doc)
    assert check(parse_config(to_toml(doc), environ={}))


def test_a_remote_host_is_accepted_when_allowed() -> None:
    doc = base()
    doc["api"].update(host="0.0.0.0", allow_remote=True)
    assert parse_config(to_toml(doc), environ={}).api.host == "0.0.0.0"


def test_the_config_is_frozen() -> None:
    config = parse_config(to_toml(base()), environ={})
    with pytest.raises(ValidationError):
        config.api.port = 1  # type: ignore[misc]


# --- one problem at a time ------------------------------------------------------------------------

SINGLE_PROBLEMS: list[tuple[str, Mutation, list[tuple[str, str]]]] = [
    # unknown keys and sections: a typo must not fall back to a default
    ("unknown section", _set("mqtt", {"host": "broker"}), [("mqtt", "extra_forbidden")]),
    ("top-level key", _set("store_id", "s01"), [("store_id", "extra_forbidden")]),
    ("api typo", _set("api.prot", 80), [("api.prot", "extra_forbidden")]),
    ("lane typo", _set("lane.time_zone", "UTC"), [("lane.time_zone", "extra_forbidden")]),
    ("store typo", _set("store.busy_timeout", 10), [("store.busy_timeout", "extra_forbidden")]),
    ("rules typo", _set("rules.pth", "/x.toml"), [("rules.pth", "extra_forbidden")]),
    ("offline typo", _set("offline.point_floor", 1), [("offline.point_floor", "extra_forbidden")]),
    ("returns typo", _set("returns.window", 15), [("returns.window", "extra_forbidden")]),
    ("attribute name is not a key", _set("logging.json_format", value=True), [("logging.json_format", "extra_forbidden")]),
    ("nested table", _set("api.tls", {"cert": "/x"}), [("api.tls", "extra_forbidden")]),
    ("section as a value", _set("rules", "/etc/rules.toml"), [("rules", "table_type")]),
    # section lane
    ("no [lane]", _drop("lane"), [("lane.store", "missing"), ("lane.lane", "missing")]),
    ("no store id", _drop("lane.store"), [("lane.store", "missing")]),
    ("no lane id", _drop("lane.lane"), [("lane.lane", "missing")]),
    ("store id with a slash", _set("lane.store", "s/01"), [("lane.store", "invalid_id")]),
    ("store id with an MQTT wildcard", _set("lane.store", "s+"), [("lane.store", "invalid_id")]),
    ("empty store id", _set("lane.store", ""), [("lane.store", "invalid_id")]),
    ("33-character store id", _set("lane.store", "a" * 33), [("lane.store", "invalid_id")]),
    ("store id with a newline", _set("lane.store", "s01\n"), [("lane.store", "invalid_id")]),
    ("store id in Chinese", _set("lane.store", "店01"), [("lane.store", "invalid_id")]),
    ("lane id with a space", _set("lane.lane", "lane 3"), [("lane.lane", "invalid_id")]),
    ("lane id as a number", _set("lane.lane", 3), [("lane.lane", "string_type")]),
    ("unknown time zone", _set("lane.timezone", "Mars/Olympus"), [("lane.timezone", "unknown_timezone")]),
    ("time zone in lower case", _set("lane.timezone", "asia/shanghai"), [("lane.timezone", "unknown_timezone")]),
    ("time zone directory", _set("lane.timezone", "Asia"), [("lane.timezone", "unknown_timezone")]),
    ("time zone path", _set("lane.timezone", "../../etc/passwd"), [("lane.timezone", "unknown_timezone")]),
    ("empty time zone", _set("lane.timezone", ""), [("lane.timezone", "unknown_timezone")]),
    ("the PC's time zone", _set("lane.timezone", "localtime"), [("lane.timezone", "unknown_timezone")]),
    ("time zone as an offset", _set("lane.timezone", 8), [("lane.timezone", "string_type")]),
    # section api
    ("all interfaces", _set("api.host", "0.0.0.0"), [("api.host", "remote_host")]),
    ("a LAN address", _set("api.host", "192.168.1.20"), [("api.host", "remote_host")]),
    ("IPv6 any", _set("api.host", "::"), [("api.host", "remote_host")]),
    ("a host name", _set("api.host", "till3.store.example"), [("api.host", "remote_host")]),
    ("bracketed IPv6", _set("api.host", "[::1]"), [("api.host", "invalid_host")]),
    ("host with a space", _set("api.host", "local host"), [("api.host", "invalid_host")]),
    ("host with a port", _set("api.host", "127.0.0.1:8765"), [("api.host", "invalid_host")]),
    ("host as a number", _set("api.host", 127), [("api.host", "string_type")]),
    ("allow_remote as text", _set("api.allow_remote", "yes"), [("api.allow_remote", "bool_type")]),
    ("allow_remote as 1", _set("api.allow_remote", 1), [("api.allow_remote", "bool_type")]),
    ("port 0", _set("api.port", 0), [("api.port", "greater_than_equal")]),
    ("port 65536", _set("api.port", 65536), [("api.port", "less_than_equal")]),
    ("port as text", _set("api.port", "8765"), [("api.port", "int_type")]),
    ("port as a float", _set("api.port", 8765.0), [("api.port", "int_type")]),
    ("port as a boolean", _set("api.port", value=True), [("api.port", "int_type")]),
    ("no token", _drop("api.token"), [("api.token", "missing")]),
    ("no [api]", _drop("api"), [("api.token", "missing")]),
    ("short token", _set("api.token", "x" * 23), [("api.token", "too_short")]),
    ("long token", _set("api.token", "x" * 513), [("api.token", "too_long")]),
    ("token with a space", _set("api.token", "correct horse battery staple"), [("api.token", "invalid_characters")]),
    ("token with a newline", _set("api.token", TOKEN + "\n"), [("api.token", "invalid_characters")]),
    ("token as a number", _set("api.token", 10**30), [("api.token", "string_type")]),
    ("tiny body limit", _set("api.max_body_bytes", 1024), [("api.max_body_bytes", "greater_than_equal")]),
    ("huge body limit", _set("api.max_body_bytes", 2**30), [("api.max_body_bytes", "less_than_equal")]),
    ("body limit as text", _set("api.max_body_bytes", "256k"), [("api.max_body_bytes", "int_type")]),
    ("zero timeout", _set("api.request_timeout_seconds", 0), [("api.request_timeout_seconds", "greater_than_equal")]),
    ("negative timeout", _set("api.request_timeout_seconds", -1.0), [("api.request_timeout_seconds", "greater_than_equal")]),
    ("hour-long timeout", _set("api.request_timeout_seconds", 3600), [("api.request_timeout_seconds", "less_than_equal")]),
    ("nan timeout", _set("api.request_timeout_seconds", float("nan")), [("api.request_timeout_seconds", "finite_number")]),
    ("infinite timeout", _set("api.request_timeout_seconds", float("inf")), [("api.request_timeout_seconds", "finite_number")]),
    ("timeout as text", _set("api.request_timeout_seconds", "10s"), [("api.request_timeout_seconds", "float_type")]),
    # section store
    ("relative database path", _set("store.path", "lane.db"), [("store.path", "relative_path")]),
    ("home-relative database path", _set("store.path", "~/lane.db"), [("store.path", "relative_path")]),
    ("database path is a directory", _set("store.path", "/var/lib/lane-agent/"), [("store.path", "invalid_path")]),
    ("database path with NUL", _set("store.path", "/var/lib/a\x00b.db"), [("store.path", "invalid_path")]),
    ("database path as a number", _set("store.path", 1), [("store.path", "string_type")]),
    ("no card hash key", _drop("store.card_hash_key"), [("store.card_hash_key", "missing")]),
    ("key without encoding", _set("store.card_hash_key", KEY_BYTES.hex()), [("store.card_hash_key", "invalid_key")]),
    ("key with unknown encoding", _set("store.card_hash_key", "b32:" + "A" * 60), [("store.card_hash_key", "invalid_key")]),
    ("short hex key", _set("store.card_hash_key", "hex:" + "ab" * 31), [("store.card_hash_key", "too_short")]),
    ("odd hex key", _set("store.card_hash_key", "hex:" + "a" * 65), [("store.card_hash_key", "invalid_key")]),
    ("hex key with spaces", _set("store.card_hash_key", "hex:" + "ab " * 32), [("store.card_hash_key", "invalid_key")]),
    ("not hex", _set("store.card_hash_key", "hex:" + "zz" * 32), [("store.card_hash_key", "invalid_key")]),
    ("short base64 key", _set("store.card_hash_key", "base64:" + base64.b64encode(b"k" * 31).decode()), [("store.card_hash_key", "too_short")]),
    ("not base64", _set("store.card_hash_key", "base64:" + "!" * 44), [("store.card_hash_key", "invalid_key")]),
    ("huge key", _set("store.card_hash_key", "hex:" + "ab" * 1025), [("store.card_hash_key", "too_long")]),
    ("key as a number", _set("store.card_hash_key", 42), [("store.card_hash_key", "string_type")]),
    ("busy timeout too short", _set("store.busy_timeout_ms", 10), [("store.busy_timeout_ms", "greater_than_equal")]),
    ("busy timeout too long", _set("store.busy_timeout_ms", 600_000), [("store.busy_timeout_ms", "less_than_equal")]),
    ("busy timeout in seconds", _set("store.busy_timeout_ms", 5.0), [("store.busy_timeout_ms", "int_type")]),
    ("negative disk warning", _set("store.disk_warn_free_mb", -1), [("store.disk_warn_free_mb", "greater_than_equal")]),
    ("disk warning as text", _set("store.disk_warn_free_mb", "512MB"), [("store.disk_warn_free_mb", "int_type")]),
    # section rules
    ("relative rules path", _set("rules.path", "rules/current.toml"), [("rules.path", "relative_path")]),
    ("rules path as a list", _set("rules.path", ["/a"]), [("rules.path", "string_type")]),
    # section offline
    ("negative points floor", _set("offline.points_floor", -1), [("offline.points_floor", "greater_than_equal")]),
    ("points floor as text", _set("offline.points_floor", "100"), [("offline.points_floor", "int_type")]),
    ("rebate floor as a number", _set("offline.rebate_floor", 5), [("offline.rebate_floor", "value_error")]),
    ("rebate floor as a float", _set("offline.rebate_floor", 5.5), [("offline.rebate_floor", "value_error")]),
    ("negative rebate floor", _set("offline.rebate_floor", "-1.00"), [("offline.rebate_floor", "value_error")]),
    ("rebate floor in thousandths", _set("offline.rebate_floor", "1.005"), [("offline.rebate_floor", "value_error")]),
    ("rebate floor with a currency", _set("offline.rebate_floor", "¥5"), [("offline.rebate_floor", "value_error")]),
    # section returns
    ("negative return window", _set("returns.window_days", -1), [("returns.window_days", "greater_than_equal")]),
    ("return window over a year", _set("returns.window_days", 366), [("returns.window_days", "less_than_equal")]),
    ("return window as text", _set("returns.window_days", "15"), [("returns.window_days", "int_type")]),
    ("member card as text", _set("returns.require_member_card", "yes"), [("returns.require_member_card", "bool_type")]),
    # section logging
    ("level in lower case", _set("logging.level", "info"), [("logging.level", "literal_error")]),
    ("unknown level", _set("logging.level", "TRACE"), [("logging.level", "literal_error")]),
    ("json as text", _set("logging.json", "true"), [("logging.json", "bool_type")]),
    # across sections
    ("busy timeout beyond the request timeout",
     lambda d: (d["store"].update(busy_timeout_ms=10_000), d["api"].update(request_timeout_seconds=10)),
     [("store.busy_timeout_ms", "inconsistent")]),
    ("database is the ruleset",
     lambda d: (d["store"].update(path="/etc/lane-agent/x"), d.update(rules={"path": "/etc/lane-agent/x"})),
     [("store.path", "inconsistent")]),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "expected"), [pytest.param(m, e, id=name) for name, m, e in SINGLE_PROBLEMS])
def test_one_problem(mutate: Mutation, expected: list[tuple[str, str]]) -> None:
    doc = base()
    mutate(doc)
    assert pairs(doc) == expected


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (_set("api.prot", 80), "api.prot", ["did you mean 'port'"]),
        (_set("lane.time_zone", "UTC"), "lane.time_zone", ["did you mean 'timezone'"]),
        (_set("retrns", {}), "retrns", ["did you mean 'returns'"]),
        (_set("api.host", "0.0.0.0"), "api.host", ["'0.0.0.0'", "loopback", "allow_remote = true"]),
        (_set("lane.timezone", "Mars/Olympus"), "lane.timezone", ["'Mars/Olympus'"]),
        (_drop("api.token"), "api.token", ["token_env", "token_credential"]),
        (_set("api.token", "x"), "api.token", ["at least 24 characters"]),
        (_set("store.card_hash_key", "ab" * 32), "store.card_hash_key", ["'hex:'", "'base64:'"]),
        (_set("store.card_hash_key", "hex:abcd"), "store.card_hash_key", ["at least 32 bytes"]),
        (_set("store.path", "lane.db"), "store.path", ["absolute"]),
    ],
)
def test_messages_say_what_to_do(mutate: Mutation, field: str, words: list[str]) -> None:
    doc = base()
    mutate(doc)
    [issue] = problems(doc)
    assert issue.field == field
    for word in words:
        assert word in issue.message


def test_every_problem_in_a_file_is_reported_at_once() -> None:
    doc = base()
    doc["lane"] = {"store": "s/01", "timezone": "Mars/Olympus"}  # no lane id either
    doc["api"] = {"host": "10.0.0.5", "port": 70000, "token": "short", "timeout": 5}
    doc["store"] = {"path": "lane.db", "busy_timeout_ms": "5000"}  # no key
    doc["offline"] = {"rebate_floor": 10}
    doc["returns"] = {"window_days": 400}
    doc["logging"] = {"level": "debug"}
    doc["mqtt"] = {}
    assert sorted(pairs(doc)) == sorted(
        [
            ("mqtt", "extra_forbidden"),
            ("lane.store", "invalid_id"),
            ("lane.lane", "missing"),
            ("lane.timezone", "unknown_timezone"),
            ("api.host", "remote_host"),
            ("api.port", "less_than_equal"),
            ("api.token", "too_short"),
            ("api.timeout", "extra_forbidden"),
            ("store.card_hash_key", "missing"),
            ("store.path", "relative_path"),
            ("store.busy_timeout_ms", "int_type"),
            ("offline.rebate_floor", "value_error"),
            ("returns.window_days", "less_than_equal"),
            ("logging.level", "literal_error"),
        ]
    )


def test_an_invalid_allow_remote_does_not_add_a_guess_about_the_host() -> None:
    doc = base()
    doc["api"].update(host="0.0.0.0", allow_remote="true")
    assert pairs(doc) == [("api.allow_remote", "bool_type")]


# --- secrets from the environment and from systemd credentials -----------------------------------


def test_token_from_an_environment_variable() -> None:
    doc = base()
    doc["api"] = {"token_env": "LANE_API_TOKEN"}
    config = parse_config(to_toml(doc), environ={"LANE_API_TOKEN": TOKEN})
    assert config.api.token.reveal() == TOKEN
    assert config.api.token_env == "LANE_API_TOKEN"
    assert redacted(config)["api"]["token"] == REDACTED
    assert redacted(config)["api"]["token_env"] == "LANE_API_TOKEN"


def test_key_from_an_environment_variable() -> None:
    doc = base()
    doc["store"] = {"card_hash_key_env": "LANE_CARD_KEY"}
    config = parse_config(to_toml(doc), environ={"LANE_CARD_KEY": KEY})
    assert config.store.card_hash_key.reveal() == KEY_BYTES


def test_an_unset_variable_is_named() -> None:
    doc = base()
    doc["api"] = {"token_env": "LANE_API_TOKEN"}
    [issue] = problems(doc, environ={})
    assert (issue.field, issue.code) == ("api.token_env", "env_unset")
    assert "LANE_API_TOKEN" in issue.message


def test_a_bad_value_from_a_variable_says_where_it_came_from() -> None:
    doc = base()
    doc["api"] = {"token_env": "LANE_API_TOKEN"}
    [issue] = problems(doc, environ={"LANE_API_TOKEN": "too-short"})
    assert (issue.field, issue.code) == ("api.token", "too_short")
    assert "environment variable LANE_API_TOKEN" in issue.message
    assert "too-short" not in issue.message


@pytest.mark.parametrize("name", ["1LANE", "LANE-TOKEN", "", "A B"])
def test_a_malformed_variable_name(name: str) -> None:
    doc = base()
    doc["api"] = {"token_env": name}
    assert pairs(doc, environ={name: TOKEN}) == [("api.token_env", "invalid_env_name")]


def test_only_one_source_per_secret() -> None:
    doc = base()
    doc["api"]["token_env"] = "LANE_API_TOKEN"
    assert pairs(doc, environ={"LANE_API_TOKEN": TOKEN}) == [("api.token", "conflict")]
    doc = base()
    doc["store"] = {"card_hash_key_env": "K", "card_hash_key_credential": "k"}
    assert pairs(doc, environ={"K": KEY}) == [("store.card_hash_key", "conflict")]


def test_secrets_from_systemd_credentials(tmp_path: Path) -> None:
    (tmp_path / "lane-api-token").write_text(TOKEN + "\n", encoding="utf-8")  # as `echo … >` writes it
    (tmp_path / "lane-card-key").write_text(KEY, encoding="utf-8")
    doc = base()
    doc["api"] = {"token_credential": "lane-api-token"}
    doc["store"] = {"card_hash_key_credential": "lane-card-key"}
    config = parse_config(to_toml(doc), environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.api.token.reveal() == TOKEN
    assert config.store.card_hash_key.reveal() == KEY_BYTES


def test_credential_problems(tmp_path: Path) -> None:
    doc = base()
    doc["api"] = {"token_credential": "lane-api-token"}
    assert pairs(doc, environ={}) == [("api.token_credential", "credential_unavailable")]
    [issue] = problems(doc, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert (issue.field, issue.code) == ("api.token_credential", "credential_unreadable")
    assert "lane-api-token" in issue.message
    (tmp_path / "lane-api-token").write_bytes(b"\xff" * 30)
    assert pairs(doc, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)}) == [
        ("api.token_credential", "credential_unreadable")
    ]
    doc["api"] = {"token_credential": "../lane-api-token"}
    assert pairs(doc, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)}) == [
        ("api.token_credential", "invalid_credential_name")
    ]


# --- secrets never shown -------------------------------------------------------------------------


def test_secrets_never_appear_in_repr_str_or_dumps() -> None:
    config = parse_config(to_toml(base()), environ={})
    key_forms = [KEY, KEY_BYTES.hex(), repr(KEY_BYTES), base64.b64encode(KEY_BYTES).decode()]
    shown = [
        repr(config),
        str(config),
        repr(config.api),
        str(config.api.token),
        repr(config.api.token),
        f"{config.api.token}",
        repr(config.store.card_hash_key),
        json.dumps(redacted(config)),
        str(config.model_dump()),
        config.model_dump_json(),
        render_toml(redacted(config)),
    ]
    for text in shown:
        assert TOKEN not in text
        for form in key_forms:
            assert form not in text
    assert str(config.api.token) == "***"
    assert redacted(config)["api"]["token"] == REDACTED
    assert redacted(config)["store"]["card_hash_key"] == REDACTED


def test_secrets_never_appear_in_errors() -> None:
    bad_token = "a leaked secret with spaces"
    bad_key = "hex:" + "5ec12e7" * 3
    doc = base()
    doc["api"]["token"] = bad_token
    doc["store"]["card_hash_key"] = bad_key
    doc["api"]["port"] = 0
    with pytest.raises(ConfigError) as caught:
        parse_config(to_toml(doc), source=SOURCE, environ={})
    texts = [str(caught.value), repr(caught.value.issues)]
    cause = caught.value.__cause__
    while cause is not None:
        texts.append(str(cause))
        cause = cause.__cause__
    for text in texts:
        assert bad_token not in text
        assert "5ec12e7" not in text


def test_a_secret_cannot_be_pickled() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Secret(TOKEN))


def test_secret_equality() -> None:
    assert Secret(TOKEN) == Secret(TOKEN)
    assert Secret(TOKEN) != Secret(TOKEN + "x")
    assert Secret(b"k") != Secret("k")
    assert Secret("非ASCII") == Secret("非ASCII")
    assert parse_config(to_toml(base()), environ={}) == parse_config(to_toml(base()), environ={})


# --- unreadable files and broken TOML -------------------------------------------------------------


def test_toml_syntax_errors_give_line_and_column() -> None:
    text = '[lane]\nstore = "s01"\nlane = l03\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source=SOURCE, environ={})
    [issue] = caught.value.issues
    assert (issue.field, issue.code, issue.source) == ("", "toml_syntax", SOURCE)
    assert "line 3" in issue.message
    assert "column" in issue.message


def test_unreadable_files(tmp_path: Path) -> None:
    for path, words in [
        (tmp_path / "missing.toml", "No such file"),
        (tmp_path, "directory"),
    ]:
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ={})
        [issue] = caught.value.issues
        assert (issue.code, issue.source) == ("unreadable", str(path))
        assert words in issue.message
    latin = tmp_path / "latin1.toml"
    latin.write_bytes('[lane]\nstore = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(latin, environ={})
    assert [(i.code, i.source) for i in caught.value.issues] == [("unreadable", str(latin))]


def config_or_error(text: str) -> LaneConfig | ConfigError:
    """Anything else escaping parse_config (a TypeError, a ValidationError) fails the test."""
    try:
        return parse_config(text, source=SOURCE, environ={})
    except ConfigError as exc:
        return exc


KEYS = [(name, key) for name, model in SECTIONS.items() for key in file_keys(model)]
ANY_TOML_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=80),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), ANY_TOML_VALUE), max_size=6))
def test_any_value_for_any_key_is_a_config_or_a_config_error(changes: list[tuple[tuple[str, str], Any]]) -> None:
    doc = copy.deepcopy(base())
    for (section, key), value in changes:
        if value is None:
            doc.get(section, {}).pop(key, None)
        else:
            doc.setdefault(section, {})[key] = value
    outcome = config_or_error(to_toml(doc))
    if isinstance(outcome, ConfigError):
        assert outcome.issues
        assert all(issue.source == SOURCE and issue.code for issue in outcome.issues)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_a_config_or_a_config_error(text: str) -> None:
    outcome = config_or_error(text)
    assert isinstance(outcome, LaneConfig) or outcome.issues


# --- small pieces --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("localhost.example.com", False),
        ("till", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def _given(value: Any) -> Any:
    """A redacted document without its unset (None) keys, as TOML cannot say null."""
    if isinstance(value, dict):
        return {k: _given(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_given(v) for v in value]
    return value


def test_rendered_toml_reads_back_as_the_redacted_config() -> None:
    data = redacted(load_config(EXAMPLE))
    assert data["devices"], "the example shows devices"
    back = tomllib.loads(render_toml(data))
    assert back == _given(data)


def test_devices_are_validated_by_their_driver_with_every_problem_reported() -> None:
    text = (
        to_toml(base())
        + """
[[devices]]
name = "msr"
type = "evdev_wedge"

[[devices]]
name = "msr"
type = "simulated"
steps = [{ after_s = 1.0 }]

[[devices]]
name = "ghost"
type = "teleporter"
"""
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, environ={})
    fields = {issue.field: issue.code for issue in caught.value.issues}
    assert fields.keys() >= {"devices[0]", "devices[1].steps.0", "devices[2].type"}
    assert fields["devices[2].type"] == "unknown_driver"


def test_device_names_are_unique() -> None:
    device = '\n[[devices]]\nname = "demo"\ntype = "simulated"\nsteps = [{ tap = "6200123456780001" }]\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(to_toml(base()) + device + device, environ={})
    assert [(i.field, i.code) for i in caught.value.issues] == [("devices[1].name", "duplicate")]


def test_the_hardware_docs_describe_every_driver_key() -> None:
    text = (REPO_ROOT / "docs" / "hardware.md").read_text(encoding="utf-8")
    for kind, driver in DRIVERS.items():
        assert f"`{kind}`" in text, kind
        for key in file_keys(driver.config):
            assert f"`{key}`" in text, f"{kind}.{key} is not in docs/hardware.md"


# --- the command --------------------------------------------------------------------------------


def config_check(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "agent.config_cli", "config", "check", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout
    return result


def test_cli_ok_prints_the_redacted_config(tmp_path: Path) -> None:
    path = tmp_path / "lane.toml"
    path.write_text(to_toml(base()), encoding="utf-8")
    result = config_check(path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    first, _, rest = result.stdout.partition("\n")
    assert first == f"{path}: ok"
    assert tomllib.loads(rest)["api"]["token"] == REDACTED
    assert tomllib.loads(rest)["lane"]["store"] == "s01"
    for secret in (TOKEN, KEY, KEY_BYTES.hex()):
        assert secret not in result.stdout


def test_cli_json(tmp_path: Path) -> None:
    path = tmp_path / "lane.toml"
    path.write_text(to_toml(base()), encoding="utf-8")
    result = config_check("--json", path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.partition("\n")[2])
    assert data == redacted(load_config(path, environ={}))
    assert TOKEN not in result.stdout


def test_cli_the_example_file() -> None:
    result = config_check(EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{EXAMPLE}: ok\n")
    secret = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))["api"]["token"]
    assert secret not in result.stdout


def test_cli_prints_every_problem_and_exits_1(tmp_path: Path) -> None:
    doc = base()
    doc["api"].update(host="0.0.0.0", prot=8080, token=TOKEN[:10])
    doc["returns"] = {"window_days": -3}
    path = tmp_path / "bad.toml"
    path.write_text(to_toml(doc), encoding="utf-8")
    result = config_check(path)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    for key, code in [
        ("api.host", "remote_host"),
        ("api.prot", "extra_forbidden"),
        ("api.token", "too_short"),
        ("returns.window_days", "greater_than_equal"),
    ]:
        assert any(line.startswith(f"{path}: {key}: ") and line.endswith(f"[{code}]") for line in lines), (key, lines)
    assert lines[-1] == f"{path}: invalid, 4 problem(s)"
    assert TOKEN[:10] not in result.stderr


def test_cli_a_secret_from_the_environment(tmp_path: Path) -> None:
    doc = base()
    doc["api"] = {"token_env": "LANE_TEST_TOKEN"}
    path = tmp_path / "lane.toml"
    path.write_text(to_toml(doc), encoding="utf-8")
    unset = config_check(path, env={"PATH": "/usr/bin:/bin"})
    assert unset.returncode == 1
    assert f"{path}: api.token_env: environment variable LANE_TEST_TOKEN is not set [env_unset]" in unset.stderr
    ok = config_check(path, env={"PATH": "/usr/bin:/bin", "LANE_TEST_TOKEN": TOKEN})
    assert ok.returncode == 0, ok.stderr
    assert TOKEN not in ok.stdout


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'[lane\nstore = "s01"\n', "line 1, column"),
        (b"[api]\nport = 80\nport = 81\n", "line 3"),
        (b"\xff\xfe[lane]\n", "not UTF-8"),
    ],
)
def test_cli_broken_files(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "broken.toml"
    path.write_bytes(content)
    result = config_check(path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"{path}: (top level): ")
    assert words in result.stderr


def test_cli_a_missing_file(tmp_path: Path) -> None:
    result = config_check(tmp_path / "nope.toml")
    assert result.returncode == 1
    assert (
        f"{tmp_path / 'nope.toml'}: (top level): cannot read: No such file or directory [unreadable]" in result.stderr
    )


def test_cli_usage_error_exits_2() -> None:
    result = config_check()
    assert result.returncode == 2
    assert "FILE" in result.stderr


# --- [sync] -------------------------------------------------------------------------------------


def test_sync_defaults_and_the_client_id_from_the_lane() -> None:
    config = parse_config(to_toml(base()), environ={})
    sync = config.sync
    assert sync.enabled is False
    assert (sync.host, sync.port, sync.topic_root) == ("127.0.0.1", 1883, "retail")
    assert sync.client_identifier(config.lane) == "lane-s01-l03"
    assert (sync.batch_entries, sync.batch_bytes, sync.in_flight_batches) == (500, 1024 * 1024, 4)
    assert (sync.resend_after_seconds, sync.state_interval_seconds) == (10.0, 30.0)
    assert (sync.reconnect_min_seconds, sync.reconnect_max_seconds) == (0.5, 60.0)
    assert (sync.keepalive_seconds, sync.connect_timeout_seconds) == (30, 10.0)
    assert (sync.backlog_warn_entries, sync.backlog_warn_mb) == (50_000, 200)
    assert sync.password is None
    assert sync.tls is False
    doc = base()
    doc["sync"] = {"client_id": "till-7", "tls_ca_file": "/etc/lane-agent/ca.pem"}
    config = parse_config(to_toml(doc), environ={})
    assert config.sync.client_identifier(config.lane) == "till-7"
    assert config.sync.tls is True


def test_the_sync_password_is_an_optional_secret() -> None:
    doc = base()
    doc["sync"] = {"username": "lane", "password_env": "LANE_MQTT_PASSWORD"}
    config = parse_config(to_toml(doc), environ={"LANE_MQTT_PASSWORD": "mqtt-secret-1"})
    assert config.sync.password is not None
    assert config.sync.password.reveal() == "mqtt-secret-1"
    assert redacted(config)["sync"]["password"] == REDACTED
    assert "mqtt-secret-1" not in render_toml(redacted(config))
    assert "mqtt-secret-1" not in repr(config)
    assert pairs(doc, environ={}) == [("sync.password_env", "env_unset")]
    doc["sync"]["password"] = "x"
    assert pairs(doc, environ={"LANE_MQTT_PASSWORD": "y"}) == [("sync.password", "conflict")]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"tls_cert_file": "/etc/lane-agent/lane.pem"}, [("sync.tls_cert_file", "inconsistent")]),
        ({"tls_key_file": "/etc/lane-agent/lane.key"}, [("sync.tls_key_file", "inconsistent")]),
        ({"tls_ca_file": "ca.pem"}, [("sync.tls_ca_file", "relative_path")]),
        ({"password": "secret"}, [("sync.password", "inconsistent")]),
        (
            {"reconnect_min_seconds": 5.0, "reconnect_max_seconds": 1.0},
            [("sync.reconnect_max_seconds", "inconsistent")],
        ),
        ({"topic_root": "retail/#"}, [("sync.topic_root", "invalid_topic_root")]),
        ({"client_id": "has space"}, [("sync.client_id", "invalid_client_id")]),
        ({"host": "[::1]"}, [("sync.host", "invalid_host")]),
        ({"port": 0}, [("sync.port", "greater_than_equal")]),
        ({"batch_entries": 0}, [("sync.batch_entries", "greater_than_equal")]),
        ({"batch_bytes": 9 * 1024 * 1024}, [("sync.batch_bytes", "less_than_equal")]),
        ({"in_flight_batches": 0}, [("sync.in_flight_batches", "greater_than_equal")]),
        ({"enabled": "yes"}, [("sync.enabled", "bool_type")]),
        ({"batchentries": 5}, [("sync.batchentries", "extra_forbidden")]),
    ],
)
def test_bad_sync_settings(changes: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    doc = base()
    doc["sync"] = changes
    assert pairs(doc) == expected


def test_backlog_warnings_start_at_their_thresholds() -> None:
    doc = base()
    doc["sync"] = {"backlog_warn_entries": 10, "backlog_warn_mb": 1}
    sync = parse_config(to_toml(doc), environ={}).sync
    assert sync.backlog_warnings(9, 1024 * 1024 - 1) == {}
    assert set(sync.backlog_warnings(10, 0)) == {"backlog_entries"}
    assert set(sync.backlog_warnings(0, 1024 * 1024)) == {"backlog_bytes"}
    doc["sync"] = {"backlog_warn_entries": 0, "backlog_warn_mb": 0}
    assert parse_config(to_toml(doc), environ={}).sync.backlog_warnings(10**9, 10**12) == {}
