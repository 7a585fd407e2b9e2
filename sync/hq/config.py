"""Head office's configuration file (TOML), validated whole before anything opens.

``load_hq_config`` returns one frozen ``HqConfig`` or raises ConfigError
listing every problem (file, key, reason).  Unknown keys are errors, as in the
lane's file, so a typo never falls back to a default silently.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from agent.basket import issues_from_validation
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
    """The rulesets head office has published, for auditing the lanes' pricing."""

    directory: Path | None = Field(default=None, description="directory of ruleset TOML files (every version kept)")


class AuditSection(_Section):
    """Re-pricing every sale with the ruleset version the lane reported."""

    enabled: bool = Field(default=True, description="audit every ingested sale")
    batch: int = Field(default=200, ge=1, le=5000, description="sales re-priced per database round trip")


class ApiSection(_Section):
    """Head office's HTTP API (figures, dead letters, metrics)."""

    enabled: bool = Field(default=True, description="serve the HTTP API")
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8780, ge=1, le=65535, description="TCP port to listen on")


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
    logging: LoggingSection = Field(default_factory=LoggingSection)

    def password(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The MQTT password, read from the environment variable the file names."""
        if self.broker.password_env is None:
            return None
        return (os.environ if environ is None else environ).get(self.broker.password_env)


def _paths(data: dict[str, object]) -> None:
    """TOML has no path type: turn the path keys' strings into Paths before strict validation."""
    for section, keys in (("broker", ("tls_ca_file", "tls_cert_file", "tls_key_file")), ("rules", ("directory",))):
        table = data.get(section)
        if isinstance(table, dict):
            for key in keys:
                if isinstance(table.get(key), str):
                    table[key] = Path(table[key])


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
