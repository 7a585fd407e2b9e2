"""The lane agent's configuration file (TOML), validated before anything opens.

``load_config`` reads the file, checks every section against the models below
and returns one frozen ``LaneConfig``, or raises ``ConfigError`` listing every
problem at once, each with the file, the key and the reason.  The models are
the format's single source of truth (their descriptions are the reference
text of ``docs/configuration.md``); unknown keys are errors, so a typo never
falls back silently to a default.

Secrets (the POS API token, the chain's card-number hash key) are held in
``Secret``: ``str``, ``repr`` and every pydantic dump show a mask, so a config
that is logged or printed never carries them.  A secret may be written in the
file, or named there: ``token_env`` (an environment variable) or
``token_credential`` (a systemd credential, read from ``$CREDENTIALS_DIRECTORY``).
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hmac
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError, core_schema

from agent import topics
from agent.basket import issues_from_validation
from agent.errors import ConfigError, Issue
from agent.money import parse_money
from drivers.config import DeviceConfig
from drivers.registry import parse_device

DEFAULT_PATH = Path("/etc/lane-agent/lane.toml")
REDACTED = "***redacted***"
_KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_TIMEZONE = "Asia/Shanghai"
DEFAULT_STORE_PATH = Path("/var/lib/lane-agent/lane.db")
DEFAULT_RULES_PATH = Path("/etc/lane-agent/rules/current.toml")
TOKEN_MIN_CHARS = 24
KEY_MIN_BYTES = 32
DEFAULT_BROKER_PORT = 1883
MIB = 1024 * 1024

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_CREDENTIAL_RE = re.compile(r"[A-Za-z0-9_.@-]{1,255}")
# RFC 6750 b64token: what may follow "Bearer " in an Authorization header, no quoting needed.
_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")
_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# Zone files that exist on many systems but are not places: the lane's clock
# must not depend on how the PC's operating system was set up.
_NOT_PLACES = frozenset({"localtime", "posixrules", "Factory"})

T = TypeVar("T", str, bytes)


def _mask(_: object) -> str:
    return REDACTED


class Secret(Generic[T]):
    """A value that must never reach a log or a terminal.

    ``str()`` is ``***`` and ``repr()`` is ``Secret('***')``; pydantic dumps
    (``model_dump``, ``model_dump_json``) always give ``***redacted***``.  Only
    ``reveal()`` returns the value, so every use of it is easy to find.
    """

    __slots__ = ("_value",)

    def __init__(self, value: T) -> None:
        self._value: T = value

    def reveal(self) -> T:
        """The secret itself: for the code that authenticates or hashes with it, never for output."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        mine, theirs = self._value, other._value
        if type(mine) is not type(theirs):
            return False
        as_bytes = [v.encode() if isinstance(v, str) else v for v in (mine, theirs)]
        return hmac.compare_digest(as_bytes[0], as_bytes[1])  # no timing hint about the value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling would write the value wherever the pickle goes; refuse rather than leak.
        raise TypeError("a Secret cannot be pickled")

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        del source, handler  # validation happens in the BeforeValidator that builds the Secret
        return core_schema.is_instance_schema(
            cls, serialization=core_schema.plain_serializer_function_ser_schema(_mask, when_used="always")
        )


# Field validators.  They raise PydanticCustomError so that each problem has its own
# code (``invalid_id``, ``too_short``…) and a message a technician can act on;
# messages about secrets never include the value.


def _check_id(value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise PydanticCustomError(
            "invalid_id",
            "must be 1 to 32 characters, each a letter, digit, '_' or '-' (it becomes part of MQTT topics)",
        )
    return value


def _check_store_id(value: str) -> str:
    _check_id(value)
    if value.lower() == "hq":
        # {root}/hq/... carries head office's member notices, hot list and rulesets.
        raise PydanticCustomError("reserved_id", "'hq' is reserved for head office's topics")
    return value


def _check_timezone(value: str) -> str:
    if value in _NOT_PLACES:
        raise PydanticCustomError("unknown_timezone", "give a place's IANA time zone such as 'Asia/Shanghai'")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # unknown, malformed, or a directory
        raise PydanticCustomError(
            "unknown_timezone", "unknown time zone '{zone}'; give an IANA name such as 'Asia/Shanghai'", {"zone": value}
        ) from None
    return value


def _check_env_name(value: str) -> str:
    if not _ENV_RE.fullmatch(value):
        raise PydanticCustomError("invalid_env_name", "must be an environment variable name such as 'LANE_API_TOKEN'")
    return value


def _check_credential_name(value: str) -> str:
    if not _CREDENTIAL_RE.fullmatch(value) or value in {".", ".."}:
        raise PydanticCustomError(
            "invalid_credential_name", "must be a systemd credential name such as 'lane-api-token' (no '/')"
        )
    return value


def _to_path(value: object) -> Path:
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "must be a string: an absolute file path")
    if "\x00" in value:
        raise PydanticCustomError("invalid_path", "contains a NUL character")
    if not value.startswith("/"):
        raise PydanticCustomError(
            "relative_path", "must be an absolute path (the daemon runs from '/', so a relative path is ambiguous)"
        )
    if value.endswith("/"):
        raise PydanticCustomError("invalid_path", "names a directory; give the file's path")
    return Path(value)


def _check_money_text(value: object) -> object:
    parse_money(value)  # its ValueError names the problem: not a string, not a decimal, negative, too big
    return value


def _parse_token(value: object) -> Secret[str]:
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "must be a string")
    if len(value) < TOKEN_MIN_CHARS:
        raise PydanticCustomError(
            "too_short",
            "must be at least {min} characters; generate one with `openssl rand -base64 32`",
            {"min": TOKEN_MIN_CHARS},
        )
    if len(value) > 512:
        raise PydanticCustomError("too_long", "must be at most 512 characters")
    if not _TOKEN_RE.fullmatch(value):
        raise PydanticCustomError(
            "invalid_characters",
            "may contain only letters, digits and - . _ ~ + / with '=' padding at the end (a bearer token)",
        )
    return Secret(value)


def _parse_key(value: object) -> Secret[bytes]:
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "must be a string: 'hex:…' or 'base64:…'")
    # An explicit encoding: 64 hex digits are also valid base64, and lanes and head office
    # must turn the same text into the same key bytes or no card would ever match.
    encoding, _, text = value.partition(":")
    if encoding not in {"hex", "base64"}:
        raise PydanticCustomError(
            "invalid_key", "must start with 'hex:' or 'base64:' to say how the key bytes are written"
        )
    key: bytes | None = None
    try:
        if encoding == "base64":
            key = base64.b64decode(text, validate=True)
        elif re.fullmatch(r"[0-9A-Fa-f]*", text):  # fromhex alone would accept spaces
            key = bytes.fromhex(text)
    except (ValueError, binascii.Error):
        key = None
    if key is None:
        raise PydanticCustomError("invalid_key", "is not valid {encoding}", {"encoding": encoding})
    if len(key) < KEY_MIN_BYTES:
        raise PydanticCustomError(
            "too_short",
            "must decode to at least {min} bytes; generate one with `openssl rand -hex 32`",
            {"min": KEY_MIN_BYTES},
        )
    if len(key) > 1024:
        raise PydanticCustomError("too_long", "must decode to at most 1024 bytes")
    return Secret(key)


def parse_key_text(text: str) -> bytes | None:
    """Key bytes from ``hex:…`` / ``base64:…`` text (as in the files), or None when it is not a valid key."""
    try:
        return _parse_key(text).reveal()
    except PydanticCustomError:
        return None


def _parse_password(value: object) -> Secret[str]:
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "must be a string")
    if not value:
        raise PydanticCustomError("too_short", "must not be empty; leave the key out for no password")
    if len(value.encode("utf-8")) > 65535:
        raise PydanticCustomError("too_long", "must be at most 65535 bytes (MQTT's limit)")
    return Secret(value)


def _check_root(value: str) -> str:
    try:
        return topics.check_root(value)
    except ValueError as exc:
        raise PydanticCustomError("invalid_topic_root", str(exc)) from None


def _check_client_id(value: str) -> str:
    if not _CLIENT_ID_RE.fullmatch(value):
        raise PydanticCustomError(
            "invalid_client_id", "must be 1 to 128 characters, each a letter, digit, '_', '.', ':' or '-'"
        )
    return value


def _check_hq_url(value: str) -> str:
    scheme, sep, rest = value.partition("://")
    host = rest.split("/", 1)[0].rsplit(":", 1)[0] if rest else ""
    if scheme not in {"http", "https"} or not sep or not host:
        raise PydanticCustomError(
            "invalid_url", "an http:// or https:// URL of head office's API, e.g. 'https://hq:8780'"
        )
    if any(ch in value for ch in " ?#"):
        raise PydanticCustomError("invalid_url", "a base URL without spaces, query or fragment")
    return value.rstrip("/")


def _check_public_keys(value: dict[str, str]) -> dict[str, str]:
    if not value:
        return value
    for key_id, text in value.items():
        if not _KEY_ID_RE.fullmatch(key_id):
            raise PydanticCustomError("invalid_key_id", "key ids: 1-64 letters, digits, '.', '_' or '-'")
        encoding, _, digits = text.partition(":")
        if encoding != "hex" or not re.fullmatch(r"[0-9a-fA-F]{64}", digits):
            raise PydanticCustomError(
                "invalid_key", "an Ed25519 public key written 'hex:<64 hex digits>' (lane-hq rules keygen prints it)"
            )
    return value


def _check_host(host: str) -> str:
    if host.startswith("["):
        raise PydanticCustomError("invalid_host", "write an IPv6 address without brackets, e.g. '::1'")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.split(".")
        if len(host) > 253 or not all(_HOST_LABEL_RE.fullmatch(label) for label in labels):
            raise PydanticCustomError(
                "invalid_host", "'{host}' is neither an IP address nor a host name", {"host": host}
            ) from None
    return host


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a server reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name may resolve to a public address


Ident = Annotated[str, AfterValidator(_check_id)]
StoreIdent = Annotated[str, AfterValidator(_check_store_id)]
TimeZoneName = Annotated[str, AfterValidator(_check_timezone)]
EnvName = Annotated[str, AfterValidator(_check_env_name)]
CredentialName = Annotated[str, AfterValidator(_check_credential_name)]
AbsPath = Annotated[Path, BeforeValidator(_to_path)]
MoneyText = Annotated[str, BeforeValidator(_check_money_text)]
Token = Annotated[Secret[str], BeforeValidator(_parse_token)]
Password = Annotated[Secret[str], BeforeValidator(_parse_password)]
TopicRoot = Annotated[str, AfterValidator(_check_root)]
ClientId = Annotated[str, AfterValidator(_check_client_id)]
HostName = Annotated[str, AfterValidator(_check_host)]
HashKey = Annotated[Secret[bytes], BeforeValidator(_parse_key)]
HqUrl = Annotated[str, AfterValidator(_check_hq_url)]
PublicKeys = Annotated[dict[str, str], AfterValidator(_check_public_keys)]


class _Section(BaseModel):
    # strict: a TOML string "8765" is not a port and 1 is not true; hide_input_in_errors:
    # a ValidationError printed anywhere (a traceback, a log) must not show a secret.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, hide_input_in_errors=True)

    #: keys holding a secret, each of which may instead be named by ``<key>_env`` or ``<key>_credential``
    secrets: ClassVar[tuple[str, ...]] = ()


class LaneSection(_Section):
    """Who this lane is."""

    store: StoreIdent = Field(description="store id, as head office knows it; part of MQTT topics")
    lane: Ident = Field(description="lane (till) id, unique within the store; part of MQTT topics")
    timezone: TimeZoneName = Field(
        default=DEFAULT_TIMEZONE,
        description="IANA time zone of the store: business days, member days and return windows are local dates",
    )

    @property
    def zone(self) -> ZoneInfo:
        """The time zone as an object (ZoneInfo caches it)."""
        return ZoneInfo(self.timezone)


class ApiSection(_Section):
    """The POS API: HTTP on the lane PC, used by the POS software."""

    secrets: ClassVar[tuple[str, ...]] = ("token",)

    # Declared before host: the host check reads it.
    allow_remote: bool = Field(
        default=False, description="allow a non-loopback host, for a POS on another machine of a trusted network"
    )
    host: str = Field(default=DEFAULT_HOST, description="address to listen on; loopback unless allow_remote = true")
    port: int = Field(default=DEFAULT_PORT, ge=1, le=65535, description="TCP port to listen on")
    token: Token = Field(
        description=f"bearer token the POS sends (Authorization: Bearer …); at least {TOKEN_MIN_CHARS} characters"
    )
    token_env: EnvName | None = Field(default=None, description="read the token from this environment variable")
    token_credential: CredentialName | None = Field(
        default=None, description="read the token from this systemd credential ($CREDENTIALS_DIRECTORY/NAME)"
    )
    max_body_bytes: int = Field(
        default=256 * 1024,
        ge=16 * 1024,
        le=16 * 1024 * 1024,
        description="largest request body accepted; larger ones get 413 before they are read",
    )
    request_timeout_seconds: float = Field(
        default=10.0,
        ge=0.5,
        le=300.0,
        allow_inf_nan=False,
        description="longest the API works on one request before answering with a timeout error",
    )

    @field_validator("host")
    @classmethod
    def _loopback_unless_allowed(cls, host: str, info: ValidationInfo) -> str:
        _check_host(host)
        if "allow_remote" not in info.data:
            return host  # allow_remote itself is invalid and reported; don't guess
        if not info.data["allow_remote"] and not is_loopback(host):
            raise PydanticCustomError(
                "remote_host",
                "'{host}' is not a loopback address: the POS API would be reachable from the network. "
                "Use 127.0.0.1 when the POS runs on this PC, or set allow_remote = true for a POS on "
                "another machine of a trusted network",
                {"host": host},
            )
        return host


class StoreSection(_Section):
    """The local SQLite database: member cache and journal."""

    secrets: ClassVar[tuple[str, ...]] = ("card_hash_key",)

    path: AbsPath = Field(default=DEFAULT_STORE_PATH, description="SQLite database file (created if missing)")
    card_hash_key: HashKey = Field(
        description=f"the chain's HMAC key for card numbers: 'hex:…' or 'base64:…', at least {KEY_MIN_BYTES} bytes"
    )
    card_hash_key_env: EnvName | None = Field(
        default=None, description="read card_hash_key from this environment variable"
    )
    card_hash_key_credential: CredentialName | None = Field(
        default=None, description="read card_hash_key from this systemd credential"
    )
    busy_timeout_ms: int = Field(
        default=5000, ge=100, le=60_000, description="how long SQLite waits for a lock before giving up"
    )
    disk_warn_free_mb: int = Field(
        default=512, ge=0, le=1_048_576, description="warn (status, logs) below this much free space; 0: never"
    )


class RulesSection(_Section):
    """Where the ruleset is."""

    path: AbsPath = Field(
        default=DEFAULT_RULES_PATH, description="ruleset file the lane prices with until head office sends a newer one"
    )


class OfflineSection(_Section):
    """Spending balances while head office cannot be asked to hold them."""

    points_floor: int = Field(
        default=0, ge=0, le=1_000_000_000, description="points a member keeps that a lane may not spend offline"
    )
    rebate_floor: MoneyText = Field(
        default="0.00", description="rebate money (decimal string) a member keeps that a lane may not spend offline"
    )

    points_per_day: int = Field(
        default=500,
        ge=0,
        le=1_000_000_000,
        description="most points one member may spend per local day at this lane without a hold from head office",
    )
    rebate_per_day: MoneyText = Field(
        default="50.00",
        description="most rebate money (decimal string) one member may spend per day here without a hold",
    )
    single_use_coupons: Literal["refuse", "accept"] = Field(
        default="refuse",
        description="a single-use coupon tender head office cannot hold: refuse it, or accept it (reuse is flagged)",
    )

    @property
    def rebate_floor_fen(self) -> int:
        """``rebate_floor`` in fen."""
        return parse_money(self.rebate_floor)

    @property
    def rebate_per_day_fen(self) -> int:
        """``rebate_per_day`` in fen."""
        return parse_money(self.rebate_per_day)


class ReturnsSection(_Section):
    """What the lane accepts as a return."""

    window_days: int = Field(
        default=15, ge=0, le=365, description="days after the sale day a return is accepted (0: same day only)"
    )
    require_member_card: bool = Field(
        default=True, description="a return of a member sale needs the member's card, so points can be reversed"
    )


class LoggingSection(_Section):
    """Logs to stderr (journald under systemd)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="lowest level logged")
    # ``json`` would shadow BaseModel.json; the file's key is still ``json``.
    json_format: bool = Field(default=False, alias="json", description="one JSON object per line instead of plain text")


class SyncSection(_Section):
    """The uplink: the journal to head office over MQTT (docs/lane-agent.md, "Sync (uplink)")."""

    secrets: ClassVar[tuple[str, ...]] = ("password", "hq_token")

    enabled: bool = Field(default=False, description="run the uplink; off, the journal only grows on this PC")
    host: HostName = Field(default=DEFAULT_HOST, description="MQTT broker host name or address")
    port: int = Field(default=DEFAULT_BROKER_PORT, ge=1, le=65535, description="MQTT broker TCP port")
    topic_root: TopicRoot = Field(
        default=topics.DEFAULT_ROOT, description="first level(s) of every topic: {root}/{store}/{lane}/journal"
    )
    client_id: ClientId | None = Field(
        default=None, description='MQTT client id; not set: "lane-{store}-{lane}" (the session lives at the broker)'
    )
    username: str | None = Field(default=None, min_length=1, max_length=1024, description="MQTT user name")
    password: Password | None = Field(default=None, description="MQTT password (needs username)")
    password_env: EnvName | None = Field(default=None, description="read the password from this environment variable")
    password_credential: CredentialName | None = Field(
        default=None, description="read the password from this systemd credential"
    )
    tls_ca_file: AbsPath | None = Field(
        default=None, description="CA certificate(s) to verify the broker with; any tls_* key turns TLS on"
    )
    tls_cert_file: AbsPath | None = Field(
        default=None, description="this lane's client certificate (with tls_key_file)"
    )
    tls_key_file: AbsPath | None = Field(default=None, description="the client certificate's private key")
    keepalive_seconds: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive interval")
    connect_timeout_seconds: float = Field(
        default=10.0, ge=0.5, le=120.0, allow_inf_nan=False, description="timeout of connecting and of every publish"
    )
    batch_entries: int = Field(
        default=500, ge=1, le=topics.MAX_BATCH_ENTRIES, description="most journal entries in one message"
    )
    batch_bytes: int = Field(
        default=MIB,
        ge=4096,
        le=topics.MAX_PAYLOAD_BYTES,
        description="largest message; a batch is cut before it would exceed this (one entry always goes)",
    )
    in_flight_batches: int = Field(
        default=4, ge=1, le=64, description="batches sent and not yet acknowledged by head office, at most"
    )
    resend_after_seconds: float = Field(
        default=10.0,
        ge=0.1,
        le=3600.0,
        allow_inf_nan=False,
        description="with batches in flight and no ack for this long, send again from the last ack",
    )
    state_interval_seconds: float = Field(
        default=30.0, ge=0.5, le=3600.0, allow_inf_nan=False, description="republish the retained online state"
    )
    reconnect_min_seconds: float = Field(
        default=0.5, ge=0.01, le=60.0, allow_inf_nan=False, description="first reconnect delay (before jitter)"
    )
    reconnect_max_seconds: float = Field(
        default=60.0, ge=0.1, le=3600.0, allow_inf_nan=False, description="cap of the reconnect delay"
    )
    backlog_warn_entries: int = Field(
        default=50_000, ge=0, le=1_000_000_000, description="warn from this many unacknowledged entries on; 0: never"
    )
    backlog_warn_mb: int = Field(
        default=200, ge=0, le=1_048_576, description="warn from this many MB of unacknowledged entries on; 0: never"
    )
    # --- head office's HTTP API: member table, holds (docs/downlink.md) --------------------
    hq_url: HqUrl | None = Field(
        default=None, description="head office's HTTP API, e.g. 'https://hq:8780'; not set: no member fetch, no holds"
    )
    hq_token: Token | None = Field(
        default=None, description="this lane's token for head office's API (lane-hq lanes token STORE LANE)"
    )
    hq_token_env: EnvName | None = Field(default=None, description="read hq_token from this environment variable")
    hq_token_credential: CredentialName | None = Field(
        default=None, description="read hq_token from this systemd credential"
    )
    hq_ca_file: AbsPath | None = Field(
        default=None,
        description="CA to verify head office's HTTPS certificate; default: tls_ca_file, else the system's",
    )
    http_timeout_seconds: float = Field(
        default=10.0, ge=0.5, le=300.0, allow_inf_nan=False, description="timeout of each member-table request"
    )
    hold_timeout_seconds: float = Field(
        default=1.5,
        ge=0.1,
        le=30.0,
        allow_inf_nan=False,
        description="longest a sale waits for head office to hold points, rebate or a coupon; then it is offline",
    )
    member_poll_seconds: float = Field(
        default=60.0,
        ge=1.0,
        le=86_400.0,
        allow_inf_nan=False,
        description="ask head office for its member-table version this often, in case a notice was missed",
    )
    snapshot_after_changes: int = Field(
        default=200_000,
        ge=1,
        le=1_000_000_000,
        description="this many versions behind head office or more, fetch a whole snapshot instead of deltas",
    )
    rules_keys: PublicKeys = Field(
        default_factory=dict,
        description="head office's Ed25519 ruleset-signing public keys by key id; none: its rulesets are refused",
    )

    @property
    def tls(self) -> bool:
        """Whether the broker is reached over TLS."""
        return any(p is not None for p in (self.tls_ca_file, self.tls_cert_file, self.tls_key_file))

    def client_identifier(self, lane: LaneSection) -> str:
        """The MQTT client id: ``client_id``, or ``lane-{store}-{lane}``."""
        return self.client_id or f"lane-{lane.store}-{lane.lane}"

    def backlog_warnings(self, entries: int, size_bytes: int) -> dict[str, str]:
        """What the backlog's size warrants saying (status, logs), by code; empty below both thresholds."""
        warnings: dict[str, str] = {}
        if self.backlog_warn_entries and entries >= self.backlog_warn_entries:
            warnings["backlog_entries"] = (
                f"backlog of {entries} entries reached sync.backlog_warn_entries ({self.backlog_warn_entries})"
                ": head office has not acknowledged them"
            )
        if self.backlog_warn_mb and size_bytes >= self.backlog_warn_mb * MIB:
            warnings["backlog_bytes"] = (
                f"backlog of {size_bytes / MIB:.1f} MB reached sync.backlog_warn_mb ({self.backlog_warn_mb})"
                ": head office has not acknowledged it"
            )
        return warnings


class LaneConfig(_Section):
    """A whole lane configuration file, validated."""

    lane: LaneSection
    api: ApiSection
    store: StoreSection
    rules: RulesSection = Field(default_factory=RulesSection)
    offline: OfflineSection = Field(default_factory=OfflineSection)
    returns: ReturnsSection = Field(default_factory=ReturnsSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    sync: SyncSection = Field(default_factory=SyncSection)
    # [[devices]]: each table validated by its driver's own model (drivers.registry).
    devices: tuple[SerializeAsAny[DeviceConfig], ...] = ()


def _section_models() -> dict[str, type[_Section]]:
    models: dict[str, type[_Section]] = {}
    for name, info in LaneConfig.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, _Section):
            models[name] = annotation
    return models


SECTIONS = _section_models()


def file_keys(model: type[BaseModel]) -> list[str]:
    """The keys a section accepts in the file (aliases where they differ from attribute names)."""
    return [info.alias or name for name, info in model.model_fields.items()]


def _unknown(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {name!r}; {hint}known: {', '.join(known)}"


class _UnresolvedError(Exception):
    """A secret reference that names nothing usable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _fetch_secret(via: str, ref: str, key: str, environ: Mapping[str, str]) -> tuple[str, str]:
    """The value a ``<key>_env`` or ``<key>_credential`` reference names, and where it came from."""
    if via.endswith("_env"):
        value = environ.get(ref)
        if value is None:
            raise _UnresolvedError("env_unset", f"environment variable {ref} is not set")
        return value, f"from environment variable {ref}"
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise _UnresolvedError(
            "credential_unavailable",
            "CREDENTIALS_DIRECTORY is not set: systemd sets it for a unit with LoadCredential= "
            f"or LoadCredentialEncrypted=; outside systemd use {key} or {key}_env",
        )
    try:
        # Credential files usually end with the newline of the command that wrote them.
        value = (Path(directory) / ref).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise _UnresolvedError(
            "credential_unreadable", f"cannot read systemd credential {ref!r}: {exc.strerror}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise _UnresolvedError("credential_unreadable", f"systemd credential {ref!r} is not UTF-8 text") from exc
    return value, f"from systemd credential {ref}"


def _resolve_secrets(
    name: str, model: type[_Section], data: dict[str, Any], environ: Mapping[str, str], source: str
) -> tuple[list[Issue], dict[str, str]]:
    """Replace ``<key>_env`` / ``<key>_credential`` references in one section by the secret they name.

    Returns the problems found and, per field, where its value came from (added to
    any later message about that value).  ``data`` is this function's own copy.
    """
    issues: list[Issue] = []
    origins: dict[str, str] = {}
    for key in model.secrets:
        field = f"{name}.{key}"
        given = [k for k in (key, f"{key}_env", f"{key}_credential") if k in data]
        if len(given) > 1:
            issues.append(Issue(field, "conflict", f"give only one of {', '.join(given)}", source))
            continue
        if not given:
            if not model.model_fields[key].is_required():
                continue  # an optional secret (sync.password): absent is fine
            message = (
                f'required; give {key} = "…", {key}_env = "VARIABLE" (an environment variable) '
                f'or {key}_credential = "name" (a systemd credential)'
            )
            issues.append(Issue(field, "missing", message, source))
            continue
        via = given[0]
        ref = data[via]
        valid_ref = _ENV_RE if via.endswith("_env") else _CREDENTIAL_RE
        if via == key or not isinstance(ref, str) or not valid_ref.fullmatch(ref) or ref in {".", ".."}:
            continue  # an inline value, or a malformed reference: the model reports either
        try:
            data[key], origins[field] = _fetch_secret(via, ref, key, environ)
        except _UnresolvedError as exc:
            issues.append(Issue(f"{name}.{via}", exc.code, exc.message, source))
    return issues, origins


def _validate_section(
    name: str, model: type[_Section], raw: object, environ: Mapping[str, str], source: str
) -> tuple[_Section | None, list[Issue]]:
    if not isinstance(raw, dict):
        return None, [Issue(name, "table_type", f"must be a table: write the keys under [{name}]", source)]
    data = dict(raw)
    issues, origins = _resolve_secrets(name, model, data, environ, source)
    try:
        return model.model_validate(data), issues
    except ValidationError as exc:
        known = file_keys(model)
        for issue in issues_from_validation(exc, source):
            field = f"{name}.{issue.field}" if issue.field else name
            key = field.removeprefix(f"{name}.")
            if issue.code == "missing" and key in model.secrets:
                continue  # _resolve_secrets has said how to give it, or why the reference failed
            message = issue.message
            if issue.code == "extra_forbidden" and "." not in key:
                message = _unknown(key, known)
            elif field in origins:
                message = f"{message} ({origins[field]})"
            issues.append(Issue(field, issue.code, message, source))
        return None, issues


def _cross_check(sections: Mapping[str, _Section], source: str) -> list[Issue]:
    issues: list[Issue] = []
    api, store, rules = sections.get("api"), sections.get("store"), sections.get("rules")
    if (
        isinstance(api, ApiSection)
        and isinstance(store, StoreSection)
        and store.busy_timeout_ms >= api.request_timeout_seconds * 1000
    ):
        message = (
            f"{store.busy_timeout_ms} ms is not less than api.request_timeout_seconds "
            f"({api.request_timeout_seconds:g} s): a sale waiting for the database would time out at the "
            "POS before SQLite gives its answer"
        )
        issues.append(Issue("store.busy_timeout_ms", "inconsistent", message, source))
    if isinstance(store, StoreSection) and isinstance(rules, RulesSection) and store.path == rules.path:
        issues.append(Issue("store.path", "inconsistent", "is the same file as rules.path", source))
    sync = sections.get("sync")
    if isinstance(sync, SyncSection):
        issues.extend(_check_sync(sync, source))
    return issues


def _check_sync(sync: SyncSection, source: str) -> list[Issue]:
    issues: list[Issue] = []
    if (sync.tls_cert_file is None) != (sync.tls_key_file is None):
        given, missing = (
            ("tls_cert_file", "tls_key_file") if sync.tls_key_file is None else ("tls_key_file", "tls_cert_file")
        )
        message = f"is given without {missing}: a client certificate needs its key, and the key its certificate"
        issues.append(Issue(f"sync.{given}", "inconsistent", message, source))
    if sync.password is not None and sync.username is None:
        issues.append(
            Issue("sync.password", "inconsistent", "needs sync.username (MQTT sends no password alone)", source)
        )
    if sync.hq_url is not None and sync.hq_token is None:
        message = "is given without hq_token (or hq_token_env / hq_token_credential): head office's API needs it"
        issues.append(Issue("sync.hq_url", "inconsistent", message, source))
    if sync.reconnect_max_seconds < sync.reconnect_min_seconds:
        message = f"is less than sync.reconnect_min_seconds ({sync.reconnect_min_seconds:g})"
        issues.append(Issue("sync.reconnect_max_seconds", "inconsistent", message, source))
    return issues


def parse_config(text: str, source: str = "<config>", *, environ: Mapping[str, str] | None = None) -> LaneConfig:
    """Validate lane configuration TOML; raises ConfigError listing every problem.

    ``environ`` is where ``*_env`` references and ``CREDENTIALS_DIRECTORY`` are
    looked up (default: the process environment).
    """
    env = os.environ if environ is None else environ
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message gives the line and column
        raise ConfigError([Issue("", "toml_syntax", str(exc), source)], what="configuration") from exc
    issues: list[Issue] = []
    known = [*SECTIONS, "devices"]
    for name in raw:
        if name not in known:
            message = _unknown(name, known).replace("known:", "known sections:")
            issues.append(Issue(name, "extra_forbidden", message, source))
    sections: dict[str, _Section] = {}
    for name, model in SECTIONS.items():
        # A missing section is validated as empty, so the message names the missing key in it.
        section, found = _validate_section(name, model, raw.get(name, {}), env, source)
        issues.extend(found)
        if section is not None:
            sections[name] = section
    issues.extend(_cross_check(sections, source))
    devices, found = _validate_devices(raw.get("devices", []), source)
    issues.extend(found)
    if issues:
        raise ConfigError(issues, what="configuration")
    return LaneConfig.model_validate({**sections, "devices": devices})


def _validate_devices(raw: object, source: str) -> tuple[tuple[DeviceConfig, ...], list[Issue]]:
    """``[[devices]]``: each table by its driver's model; names unique."""
    if not isinstance(raw, list):
        return (), [Issue("devices", "table_type", "write each device as a [[devices]] table", source)]
    devices: list[DeviceConfig] = []
    issues: list[Issue] = []
    seen: dict[str, int] = {}
    for index, table in enumerate(raw):
        where = f"devices[{index}]"
        if not isinstance(table, dict):
            issues.append(Issue(where, "table_type", "must be a [[devices]] table", source))
            continue
        device, problems = parse_device(table)
        issues.extend(Issue(f"{where}.{p.key}" if p.key else where, p.code, p.message, source) for p in problems)
        if device is None:
            continue
        if device.name in seen:
            message = f"device name {device.name!r} is also devices[{seen[device.name]}]'s"
            issues.append(Issue(f"{where}.name", "duplicate", message, source))
        seen.setdefault(device.name, index)
        devices.append(device)
    return tuple(devices), issues


def load_config(path: str | Path = DEFAULT_PATH, *, environ: Mapping[str, str] | None = None) -> LaneConfig:
    """Read and validate a lane configuration file; raises ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([Issue("", "unreadable", f"cannot read: {reason}", str(path))], what="configuration") from exc
    except UnicodeDecodeError as exc:
        issue = Issue("", "unreadable", f"not UTF-8 text (byte {exc.start})", str(path))
        raise ConfigError([issue], what="configuration") from exc
    return parse_config(text, source=str(path), environ=environ)


def redacted(config: LaneConfig) -> dict[str, Any]:
    """The whole configuration as plain data, keys as in the file, every secret ``***redacted***``.

    Safe to log at start-up.  Keys never given (``token_env`` when the token is
    inline) are ``None``.
    """
    return config.model_dump(mode="json", by_alias=True)
