"""Head office's configuration file (TOML), validated whole before anything opens.

``load_hq_config`` returns one frozen ``HqConfig`` or raises ConfigError
listing every problem (file, key, reason).  Unknown keys are errors, as in the
lane's file, so a typo never falls back to a default silently.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from agent.basket import issues_from_validation
from agent.config import HashKey, parse_key_text
from agent.errors import ConfigError, Issue
from agent.topics import DEFAULT_ROOT, check_root

DEFAULT_PATH = Path("/etc/lane-hq/hq.toml")
DEFAULT_DATABASE = "sqlite:////var/lib/lane-hq/hq.db"


def _url(value: str) -> str:
    if not value.startswith(("sqlite:///", "postgresql+psycopg://")):
        raise ValueError("sqlite:////absolute/path.db or postgresql+psycopg://user@host/dbname")
    return value


def _root(value: str) -> str:
    return check_root(value)


def _key_id(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise ValueError("1-64 letters, digits, '.', '_' or '-'")
    return value


def _group(value: str) -> str:
    if not value or any(ch in value for ch in "/+#") or len(value) > 64:
        raise ValueError("1-64 characters, no '/', '+' or '#'")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, hide_input_in_errors=True)


class BrokerSection(_Section):
    """The MQTT broker head office consumes from."""

    host: str = Field(default="127.0.0.1", description="broker host name or address")
    port: int = Field(default=1883, ge=1, le=65535, description="broker TCP port")
    topic_root: Annotated[str, AfterValidator(_root)] = Field(
        default=DEFAULT_ROOT, description="first level(s) of every topic: {root}/{store}/{lane}/journal"
    )
    client_id: str = Field(
        default="lane-hq-ingest",
        min_length=1,
        max_length=64,
        description="MQTT client id; give each consumer its own when several share a subscription",
    )
    share_group: Annotated[str, AfterValidator(_group)] | None = Field(
        default=None,
        description="subscribe as $share/{group}/... so several consumers split the lanes' batches",
    )
    username: str | None = Field(default=None, description="MQTT user name")
    password_env: str | None = Field(default=None, description="environment variable holding the MQTT password")
    keepalive_seconds: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive")
    connect_timeout_seconds: float = Field(default=10.0, gt=0, le=120, description="timeout of every broker call")
    reconnect_max_seconds: float = Field(default=30.0, gt=0, le=600, description="cap of the reconnect backoff")
    tls_ca_file: Path | None = Field(default=None, description="CA bundle to verify the broker (enables TLS)")
    tls_cert_file: Path | None = Field(default=None, description="head office's client certificate")
    tls_key_file: Path | None = Field(default=None, description="its private key")


class DatabaseSection(_Section):
    """Where head office keeps the journal, the ledger and the audit."""

    url: Annotated[str, AfterValidator(_url)] = Field(
        default=DEFAULT_DATABASE, description="SQLAlchemy URL: SQLite (embedded default) or PostgreSQL (psycopg)"
    )


class RulesSection(_Section):
    """The rulesets head office has published, for auditing the lanes' pricing, and how it signs new ones."""

    directory: Path | None = Field(default=None, description="directory of ruleset TOML files (every version kept)")
    signing_key_file: Path | None = Field(
        default=None, description="Ed25519 private key (PEM) `lane-hq rules publish` signs with (lane-hq rules keygen)"
    )
    key_id: Annotated[str, AfterValidator(_key_id)] = Field(
        default="hq", description="the signing key's id, as lanes' sync.rules_keys name it"
    )


class MembersSection(_Section):
    """The member table head office keeps and sends to lanes (docs/downlink.md)."""

    card_hash_key: HashKey | None = Field(
        default=None, description="the chain's card-number HMAC key, as on the lanes ('hex:…' or 'base64:…')"
    )
    card_hash_key_env: str | None = Field(default=None, description="environment variable holding card_hash_key")
    snapshot_dir: Path | None = Field(
        default=None, description="where member snapshots for lanes are written; default: beside an SQLite database"
    )
    snapshot_every_changes: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000_000,
        description="write a new snapshot when the last is this many versions old",
    )
    delta_page_members: int = Field(default=5_000, ge=1, le=100_000, description="most members in one delta page")
    hotlist_days: int = Field(default=30, ge=1, le=3650, description="cards stay on the retained hot list this long")
    hotlist_max_cards: int = Field(default=20_000, ge=1, le=200_000, description="most cards on the hot list")
    notify_interval_seconds: float = Field(
        default=0.5, gt=0, le=60, description="how often the member version and hot list are checked for changes"
    )


class LanesSection(_Section):
    """How lanes authenticate to the HTTP API, and what head office holds for them."""

    auth_secret_env: str | None = Field(
        default=None, description="environment variable holding the secret lanes' API tokens derive from"
    )
    auth_secret_file: Path | None = Field(default=None, description="file holding that secret (first line)")
    hold_seconds: int = Field(default=300, ge=5, le=86_400, description="a hold not used by a sale lapses after this")


class AuditSection(_Section):
    """Re-pricing every sale with the ruleset version the lane reported."""

    enabled: bool = Field(default=True, description="audit every ingested sale")
    batch: int = Field(default=200, ge=1, le=5000, description="sales re-priced per database round trip")


class ApiSection(_Section):
    """Head office's HTTP API (figures, dead letters, metrics)."""

    enabled: bool = Field(default=True, description="serve the HTTP API")
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8780, ge=1, le=65535, description="TCP port to listen on")
    tls_cert_file: Path | None = Field(default=None, description="serve HTTPS with this certificate (and tls_key_file)")
    tls_key_file: Path | None = Field(default=None, description="the HTTPS certificate's private key")


class CentreSection(_Section):
    """The member centre (docs/member-centre.md): the programme it runs, personal data, staff access."""

    ruleset: str | None = Field(
        default=None,
        description="id of the ruleset whose [centre] section is the programme (its newest version in rules.directory)",
    )
    personal_data_key_env: str | None = Field(
        default=None, description="environment variable holding the personal-data key ('hex:' + 64 hex digits)"
    )
    personal_data_key_file: Path | None = Field(
        default=None, description="file holding the personal-data key (first line), readable by head office only"
    )
    staff_secret_env: str | None = Field(
        default=None, description="environment variable holding the secret staff tokens derive from"
    )
    staff_secret_file: Path | None = Field(default=None, description="file holding that secret (first line)")
    card_number_prefix: str = Field(
        default="8800", pattern=r"^[0-9]{1,10}$", description="leading digits of card numbers head office issues"
    )
    card_number_length: int = Field(default=16, ge=12, le=19, description="digits of an issued card number")
    worker_interval_seconds: float = Field(
        default=2.0, gt=0, le=3600, description="how often arrived journals are looked at for tier upgrades"
    )
    churn_factor: float = Field(
        default=3.0, ge=1.0, le=100.0, description="churn warning: quiet this many times the member's usual interval"
    )


class LoggingSection(_Section):
    """What head office logs."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="lowest level logged")


class HqConfig(_Section):
    """A whole head-office configuration file."""

    broker: BrokerSection = Field(default_factory=BrokerSection)
    database: DatabaseSection = Field(default_factory=DatabaseSection)
    rules: RulesSection = Field(default_factory=RulesSection)
    audit: AuditSection = Field(default_factory=AuditSection)
    api: ApiSection = Field(default_factory=ApiSection)
    members: MembersSection = Field(default_factory=MembersSection)
    lanes: LanesSection = Field(default_factory=LanesSection)
    centre: CentreSection = Field(default_factory=CentreSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)

    def password(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The MQTT password, read from the environment variable the file names."""
        if self.broker.password_env is None:
            return None
        return (os.environ if environ is None else environ).get(self.broker.password_env)

    def card_key(self, environ: Mapping[str, str] | None = None) -> bytes | None:
        """The card-number HMAC key: ``members.card_hash_key`` or the variable ``card_hash_key_env`` names."""
        if self.members.card_hash_key is not None:
            return self.members.card_hash_key.reveal()
        if self.members.card_hash_key_env is None:
            return None
        text = (os.environ if environ is None else environ).get(self.members.card_hash_key_env)
        return None if text is None else parse_key_text(text)

    def personal_data_key(self, environ: Mapping[str, str] | None = None) -> bytes | None:
        """The member centre's personal-data key (32 bytes), from the variable or file ``[centre]`` names."""
        centre = self.centre
        text = _secret_text(centre.personal_data_key_env, centre.personal_data_key_file, environ)
        return None if text is None else parse_key_text(text)

    def staff_secret(self, environ: Mapping[str, str] | None = None) -> bytes | None:
        """The secret staff tokens derive from (``centre.staff_secret_env`` / ``staff_secret_file``)."""
        text = _secret_text(self.centre.staff_secret_env, self.centre.staff_secret_file, environ)
        return None if text is None else text.encode()

    def lane_auth_secret(self, environ: Mapping[str, str] | None = None) -> bytes | None:
        """The secret lanes' API tokens derive from (``lanes.auth_secret_env`` / ``auth_secret_file``)."""
        lanes = self.lanes
        if lanes.auth_secret_env is not None:
            text = (os.environ if environ is None else environ).get(lanes.auth_secret_env)
            return None if not text else text.encode()
        if lanes.auth_secret_file is not None:
            try:
                first = lanes.auth_secret_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError):
                return None
            return first[0].strip().encode() if first and first[0].strip() else None
        return None


def _secret_text(env: str | None, path: Path | None, environ: Mapping[str, str] | None) -> str | None:
    """A secret from the variable ``env`` names, else the first line of ``path``; None when neither has one."""
    if env is not None:
        text = (os.environ if environ is None else environ).get(env, "").strip()
        return text or None
    if path is not None:
        try:
            first = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return None
        return first[0].strip() if first and first[0].strip() else None
    return None


def _paths(data: dict[str, object]) -> None:
    """TOML has no path type: turn the path keys' strings into Paths before strict validation."""
    for section, keys in (
        ("broker", ("tls_ca_file", "tls_cert_file", "tls_key_file")),
        ("rules", ("directory", "signing_key_file")),
        ("members", ("snapshot_dir",)),
        ("lanes", ("auth_secret_file",)),
        ("api", ("tls_cert_file", "tls_key_file")),
        ("centre", ("personal_data_key_file", "staff_secret_file")),
    ):
        table = data.get(section)
        if isinstance(table, dict):
            for key in keys:
                if isinstance(table.get(key), str):
                    table[key] = Path(table[key])


def _check_broker(config: HqConfig, source: str) -> list[Issue]:
    issues: list[Issue] = []
    broker = config.broker
    if (broker.tls_cert_file is None) != (broker.tls_key_file is None):
        issues.append(Issue("broker.tls_cert_file", "tls_pair", "give tls_cert_file and tls_key_file together", source))
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        path = getattr(broker, key)
        if path is not None and not path.is_absolute():
            issues.append(Issue(f"broker.{key}", "relative_path", "an absolute path", source))
    if broker.password_env is not None and broker.username is None:
        issues.append(Issue("broker.password_env", "password_without_user", "give username too", source))
    directory = config.rules.directory
    if directory is not None and not directory.is_dir():
        issues.append(Issue("rules.directory", "not_a_directory", f"{directory} is not a directory", source))
    return issues


def _check_members_and_lanes(config: HqConfig, source: str) -> list[Issue]:
    issues: list[Issue] = []
    api = config.api
    if (api.tls_cert_file is None) != (api.tls_key_file is None):
        issues.append(Issue("api.tls_cert_file", "tls_pair", "give tls_cert_file and tls_key_file together", source))
    members, lanes = config.members, config.lanes
    if members.card_hash_key is not None and members.card_hash_key_env is not None:
        issues.append(Issue("members.card_hash_key", "inconsistent", "give card_hash_key or card_hash_key_env", source))
    if members.card_hash_key_env is not None and config.card_key() is None:
        message = f"the environment variable {members.card_hash_key_env} is not set, or not 'hex:…' / 'base64:…'"
        issues.append(Issue("members.card_hash_key_env", "unset", message, source))
    if lanes.auth_secret_env is not None and lanes.auth_secret_file is not None:
        issues.append(
            Issue("lanes.auth_secret_env", "inconsistent", "give auth_secret_env or auth_secret_file", source)
        )
    if (lanes.auth_secret_env or lanes.auth_secret_file) and config.lane_auth_secret() is None:
        where = lanes.auth_secret_env or lanes.auth_secret_file
        issues.append(Issue("lanes.auth_secret_env", "unset", f"{where} gives no secret", source))
    for key, path in (
        ("rules.signing_key_file", config.rules.signing_key_file),
        ("members.snapshot_dir", members.snapshot_dir),
        ("lanes.auth_secret_file", lanes.auth_secret_file),
        ("api.tls_cert_file", api.tls_cert_file),
        ("api.tls_key_file", api.tls_key_file),
    ):
        if path is not None and not path.is_absolute():
            issues.append(Issue(key, "relative_path", "an absolute path", source))
    return issues


def parse_hq_config(text: str, source: str = "<config>") -> HqConfig:
    """Validate head-office configuration TOML; raises ConfigError listing every problem."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Issue("", "toml_syntax", str(exc), source)], what="configuration") from exc
    _paths(raw)
    try:
        config = HqConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(issues_from_validation(exc, source), what="configuration") from exc
    issues = _check_broker(config, source) + _check_members_and_lanes(config, source)
    if issues:
        raise ConfigError(issues, what="configuration")
    return config


def load_hq_config(path: str | Path = DEFAULT_PATH) -> HqConfig:
    """Read and validate a head-office configuration file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Issue("", "unreadable", f"cannot read: {exc}", str(path))], what="configuration") from exc
    return parse_hq_config(text, source=str(path))
