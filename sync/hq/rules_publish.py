"""``lane-hq rules keygen`` and ``lane-hq rules publish``: head office signs rulesets for the lanes.

``publish`` (docs/downlink.md, "Rulesets"; docs/head-office.md):

1. reads hq.toml, the signing key (``rules.signing_key_file``) and the
   ruleset library (``rules.directory``): a problem with any is exit 78;
2. compiles the ruleset TOML with every check of ``rules check``: exit 1;
3. connects to the broker as hq.toml says (TLS, user, password; exit 3 when
   it cannot), reads the retained envelope on ``{root}/hq/rules`` with a short
   subscription and takes the next serial (``--serial`` overrides it, but may
   not go back: lanes would refuse it as ``stale_serial``);
4. signs, copies the TOML into ``rules.directory`` (``{id}-{version}.toml``,
   so the audit finds the version lanes will report) and publishes the
   envelope retained, QoS 1, waiting for the broker's PUBACK.

A PUBACK says the broker took the message, not that any lane did: each lane's
``GET /v1/status`` (``rules``) and retained state (``rules_version``) say what
it prices with.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import InputError, Issue
from agent.ruleset import Ruleset, parse_ruleset
from sync import wire
from sync.hq.audit import RulesetLibrary
from sync.hq.config import HqConfig, load_hq_config
from sync.hq.ingest import broker_client
from sync.signing import MAX_SERIAL, build_envelope, public_key_text

EXIT_OK = 0
EXIT_INVALID = 1  # the ruleset (or an option) is invalid
EXIT_BROKER = 3  # the broker cannot be reached, or did not acknowledge the publish
EXIT_CONFIG = 78  # EX_CONFIG: hq.toml, the signing key or the ruleset library

RETAINED_WAIT_SECONDS = 1.0  # a broker sends the retained message right after the SUBACK


class PublishError(Exception):
    """A publish that cannot go on; ``exit_code`` says why (EXIT_INVALID, EXIT_BROKER, EXIT_CONFIG)."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


# --- keys --------------------------------------------------------------------------------------


def default_key_id(key: Ed25519PrivateKey) -> str:
    """``hq-`` and the first 8 hex digits of the public key's SHA-256: distinct for every key generated."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "hq-" + hashlib.sha256(raw).hexdigest()[:8]


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """PEM (PKCS #8, unencrypted), created 0600; an existing file is never overwritten."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The signing key; PublishError(EXIT_CONFIG) when unreadable or not an Ed25519 private key."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PublishError(EXIT_CONFIG, f"rules.signing_key_file {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: the PEM is encrypted
        raise PublishError(EXIT_CONFIG, f"rules.signing_key_file {path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise PublishError(EXIT_CONFIG, f"rules.signing_key_file {path}: not an Ed25519 key")
    return key


def cmd_keygen(args: argparse.Namespace) -> int:
    """``lane-hq rules keygen --out FILE [--key-id ID]``."""
    key = Ed25519PrivateKey.generate()
    key_id = args.key_id or default_key_id(key)
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", key_id):
        print("lane-hq: --key-id: 1-64 letters, digits, '.', '_' or '-'", file=sys.stderr)
        return EXIT_INVALID
    out = Path(args.out)
    try:
        write_private_key(out, key)
    except OSError as exc:
        print(f"lane-hq: cannot write {out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    public = public_key_text(key.public_key())
    print(f"key_id: {key_id}")
    print(f"public_key: {public}")
    print(f'hq.toml [rules]: signing_key_file = "{out.resolve()}"  key_id = "{key_id}"')
    print(f'lane.toml [sync]: rules_keys = {{ {key_id} = "{public}" }}')
    return EXIT_OK


# --- publishing --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Published:
    """What ``publish`` did."""

    ruleset: Ruleset
    serial: int
    effective_from: str
    topic: str
    library_file: Path
    copied: bool
    payload_bytes: int


def parse_effective_from(text: str | None, ruleset: Ruleset) -> dt.datetime:
    """``--effective-from`` (ISO 8601 with a UTC offset), or now in the ruleset's time zone."""
    if text is None:
        return dt.datetime.now(ruleset.timezone).replace(microsecond=0)
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise PublishError(EXIT_INVALID, f"--effective-from: {text!r} is not an ISO 8601 time") from exc
    if moment.utcoffset() is None:
        raise PublishError(EXIT_INVALID, "--effective-from: give a UTC offset, e.g. 2026-12-05T00:00:00+08:00")
    return moment


def library_name(ruleset: Ruleset) -> str:
    """The file name in ``rules.directory``: ``{id}-{version}.toml``, with anything unusual in a name as '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{ruleset.id}-{ruleset.version}") + ".toml"


def _settings(config_path: str) -> tuple[HqConfig, Ed25519PrivateKey, Path]:
    try:
        config = load_hq_config(config_path)
    except InputError as exc:
        lines = "\n".join(f"  {issue}" for issue in exc.issues)
        raise PublishError(EXIT_CONFIG, f"invalid {exc.what}:\n{lines}") from exc
    rules = config.rules
    missing = [key for key in ("signing_key_file", "directory") if getattr(rules, key) is None]
    if missing:
        raise PublishError(EXIT_CONFIG, f"{config_path}: [rules] {' and '.join(missing)} must be set to publish")
    name = config.broker.password_env
    if name is not None and config.password() is None:
        raise PublishError(EXIT_CONFIG, f"broker.password_env: environment variable {name} is not set")
    assert rules.signing_key_file is not None
    assert rules.directory is not None
    return config, load_private_key(rules.signing_key_file), rules.directory


def _read_ruleset(path: Path) -> tuple[str, Ruleset]:
    try:
        # As load_ruleset reads it (newlines translated), so lanes, the library and the audit see one digest.
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError([Issue("", "unreadable", str(exc), str(path))], what="ruleset") from exc
    return text, parse_ruleset(text, source=str(path))


def _library_file(directory: Path, ruleset: Ruleset) -> tuple[Path, bool]:
    """Where the library has (or will have) this version; True when it must be copied there."""
    try:
        library = RulesetLibrary.load(directory)
    except InputError as exc:
        lines = "\n".join(f"  {issue}" for issue in exc.issues)
        raise PublishError(EXIT_CONFIG, f"rules.directory {directory} holds invalid rulesets:\n{lines}") from exc
    target = directory / library_name(ruleset)
    known = library.find(ruleset.id, ruleset.version)
    if known is None:
        return target, True
    if known.digest != ruleset.digest:
        raise PublishError(
            EXIT_INVALID,
            f"{ruleset.id} {ruleset.version} was already published with other content ({known.source}):"
            " give this text a new [ruleset] version, so the audit can tell the two apart",
        )
    return Path(known.source), False


def _copy(text: str, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PublishError(EXIT_CONFIG, f"cannot copy the ruleset to {target}: {exc.strerror or exc}") from exc


def _retained_serial(payload: bytes, topic: str) -> int:
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        doc = None
    serial = doc.get("serial") if isinstance(doc, dict) else None
    if not isinstance(serial, int) or isinstance(serial, bool) or not 0 <= serial <= MAX_SERIAL:
        raise PublishError(
            EXIT_INVALID, f"the retained message on {topic} is not a ruleset envelope: give --serial explicitly"
        )
    return serial


async def _retained(client: aiomqtt.Client, topic: str, call_timeout: float) -> bytes | None:
    await client.subscribe(topic, qos=1, timeout=call_timeout)
    try:
        async with asyncio.timeout(RETAINED_WAIT_SECONDS):
            async for message in client.messages:
                if message.topic.matches(topic) and message.retain:
                    payload = message.payload
                    return payload if isinstance(payload, bytes) else str(payload).encode()
    except TimeoutError:
        return None
    finally:
        await client.unsubscribe(topic, timeout=call_timeout)
    return None


async def publish(
    config: HqConfig,
    key: Ed25519PrivateKey,
    text: str,
    ruleset: Ruleset,
    *,
    effective_from: dt.datetime,
    serial: int | None,
) -> Published:
    """Read the retained serial, sign, copy into the library, publish retained; raises PublishError."""
    assert config.rules.directory is not None
    library_file, copy = _library_file(config.rules.directory, ruleset)
    broker = config.broker
    topic = wire.hq_topic(broker.topic_root, "rules")
    timeout = broker.connect_timeout_seconds
    try:
        # A short-lived clean session, never under ingest's own id (the broker would drop the consumer).
        identifier = f"{broker.client_id[:40]}-rules-{os.getpid()}"
        async with broker_client(broker, config.password(), identifier=identifier, clean_session=True) as client:
            retained = await _retained(client, topic, timeout)
            last = None if retained is None else _retained_serial(retained, topic)
            if serial is None:
                serial = 1 if last is None else last + 1
            elif last is not None and serial <= last:
                raise PublishError(
                    EXIT_INVALID, f"--serial {serial} is not above {last}, the retained one: lanes would refuse it"
                )
            try:
                payload = build_envelope(
                    text,
                    version=ruleset.version,
                    serial=serial,
                    effective_from=effective_from,
                    key_id=config.rules.key_id,
                    private_key=key,
                )
            except ValueError as exc:
                raise PublishError(EXIT_INVALID, f"cannot be published: {exc}") from exc
            if copy:
                _copy(text, library_file)
            await client.publish(topic, payload, qos=1, retain=True, timeout=timeout)
    except aiomqtt.MqttError as exc:
        raise PublishError(EXIT_BROKER, f"broker {broker.host}:{broker.port}: {exc}") from exc
    return Published(
        ruleset, serial, effective_from.isoformat(), topic, library_file, copied=copy, payload_bytes=len(payload)
    )


def _check_serial_option(serial: int | None) -> None:
    if serial is not None and not 1 <= serial <= MAX_SERIAL:
        raise PublishError(EXIT_INVALID, f"--serial: 1 to {MAX_SERIAL}")


def cmd_publish(args: argparse.Namespace) -> int:
    """``lane-hq rules publish FILE --config hq.toml [--effective-from ISO] [--serial N]``."""
    try:
        config, key, _ = _settings(args.config)
        text, ruleset = _read_ruleset(Path(args.file))
        _check_serial_option(args.serial)
        moment = parse_effective_from(args.effective_from, ruleset)
        done = asyncio.run(publish(config, key, text, ruleset, effective_from=moment, serial=args.serial))
    except PublishError as exc:
        print(f"lane-hq: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except InputError as exc:
        print(f"{args.file}: INVALID", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_INVALID
    library = f"copied to {done.library_file}" if done.copied else f"already in {done.library_file}"
    print(
        f"published {done.ruleset.id} {done.ruleset.version} serial {done.serial} effective {done.effective_from}"
        f" to {done.topic} (key {config.rules.key_id}, sha256 {done.ruleset.digest[:12]}, {done.payload_bytes}"
        f" bytes; {library})"
    )
    return EXIT_OK


def add_rules_parsers(rules_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``keygen`` and ``publish`` under ``lane-hq rules``."""
    keygen = rules_sub.add_parser("keygen", help="write a new Ed25519 signing key and print its public key")
    keygen.add_argument("--out", required=True, metavar="FILE", help="private key (PEM) to create, mode 0600")
    keygen.add_argument("--key-id", metavar="ID", help="its id for lanes' sync.rules_keys (default: hq-<hash>)")
    publish_cmd = rules_sub.add_parser("publish", help="check, sign and publish a ruleset to every lane")
    publish_cmd.add_argument("file", metavar="FILE", help="ruleset TOML")
    publish_cmd.add_argument("--config", required=True, metavar="FILE", help="head office's hq.toml")
    publish_cmd.add_argument(
        "--effective-from", metavar="ISO", help="when lanes switch, with a UTC offset (default: now)"
    )
    publish_cmd.add_argument(
        "--serial", type=int, metavar="N", help="default: one more than the retained envelope's, else 1"
    )


__all__ = [
    "EXIT_BROKER",
    "EXIT_CONFIG",
    "EXIT_INVALID",
    "PublishError",
    "Published",
    "add_rules_parsers",
    "cmd_keygen",
    "cmd_publish",
    "publish",
]
