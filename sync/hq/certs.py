"""The chain's PKI for the broker's mutual TLS, and the broker's per-lane ACL (docs/security.md).

One chain CA signs the broker's server certificate, head office's client
certificate and one client certificate per lane whose CN is
``lane-{store}-{lane}``: with ``use_identity_as_username`` the CN is the MQTT
user name.  Mosquitto's ``pattern`` lines cannot express the lane's rights,
because ``%u`` is the whole CN and the topic needs its store and lane as two
levels; so each lane gets an explicit ``user … topic …`` stanza, written here
when its certificate is issued.

Keys are ECDSA P-256 (accepted by Mosquitto's OpenSSL, Python's ssl, uvicorn
and httpx alike); private keys are written 0600, unencrypted, because the
broker and the daemons load them unattended.  Every file is written to a
temporary name and renamed, so a crash leaves the old file or the new one.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import LaneError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
HQ_USER = "hq"
ACL_HEADER = "# lane-hq certs issue: "

# Lanes' clocks may run behind the broker's after a long power-off; a day's head start costs nothing.
_BACKDATE = dt.timedelta(days=1)
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*")


class PkiError(LaneError):
    """A CA directory, certificate or ACL file cannot be used as asked; ``path`` names the file."""

    code = "pki_error"

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        self.path = path
        super().__init__(message if path is None else f"{path}: {message}")


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate written to disk."""

    common_name: str
    cert_file: Path
    key_file: Path
    not_after: dt.datetime


def lane_user(store: str, lane: str) -> str:
    """A lane's certificate CN, MQTT user name and default client id."""
    return f"lane-{store}-{lane}"


# --- files ------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes, mode: int, *, like: Path | None = None) -> None:
    """Write ``path`` through a temporary file in its directory and a rename; ``like`` lends mode and owner."""
    owner: tuple[int, int] | None = None
    if like is not None and like.exists():
        info = like.stat()
        mode, owner = info.st_mode & 0o777, (info.st_uid, info.st_gid)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
        if owner is not None and os.geteuid() == 0:
            # The broker re-reads its ACL as user mosquitto on SIGHUP: keep the group that lets it.
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb", closefd=False) as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    temp.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_pair(out: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    try:
        out.mkdir(parents=True, exist_ok=True)
        key_file, cert_file = out / f"{name}.key", out / f"{name}.pem"
        _write_atomic(key_file, _key_pem(key), 0o600)
        _write_atomic(cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as exc:
        raise PkiError(f"cannot write: {exc.strerror or exc}", path=out) from exc
    common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return Issued(str(common_name), cert_file, key_file, cert.not_valid_after_utc)


# --- the CA -----------------------------------------------------------------------------------


def init_ca(directory: Path, *, name: str = "lane membership chain CA", days: int = 3650) -> Issued:
    """Create the chain CA in ``directory`` (``ca.pem``, ``ca.key`` 0600); refuses to replace one."""
    if (directory / CA_KEY).exists() or (directory / CA_CERT).exists():
        raise PkiError("a CA is already there; refusing to replace it (every certificate it signed would die)",
                       path=directory)  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(directory, "ca", cert, key)


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PkiError("no CA here (make one with: lane-hq certs init-ca DIR)", path=Path(exc.filename)) from exc
    except OSError as exc:
        raise PkiError(f"cannot read: {exc.strerror or exc}", path=directory) from exc
    except (ValueError, TypeError) as exc:
        raise PkiError(f"not a CA certificate and key in PEM: {exc}", path=directory) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise PkiError(f"{CA_KEY} is not the key of {CA_CERT}", path=directory)
    return cert, key


# --- certificates signed by the CA ------------------------------------------------------------


def _sign(
    ca_dir: Path,
    common_name: str,
    *,
    days: int,
    usage: x509.ObjectIdentifier,
    names: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def host_names(hosts: list[str]) -> list[x509.GeneralName]:
    """Subject alternative names for the broker's host names and addresses; PkiError on a malformed one."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not _DNS_NAME.fullmatch(host):
                raise PkiError(f"--host {host!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(host.lower()))
    return names


def issue_server(ca_dir: Path, hosts: list[str], *, out: Path, name: str = "broker", days: int = 825) -> Issued:
    """A server certificate (the broker's, or head office's HTTPS API) for ``hosts``, as ``out/{name}.pem``."""
    if not hosts:
        raise PkiError("give at least one --host")
    names = host_names(hosts)
    cert, key = _sign(ca_dir, hosts[0], days=days, usage=ExtendedKeyUsageOID.SERVER_AUTH, names=names)
    return _write_pair(out, name, cert, key)


def issue_client(ca_dir: Path, common_name: str, *, out: Path, days: int = 730) -> Issued:
    """A client certificate with CN ``common_name`` (the MQTT user name), as ``out/{common_name}.pem``.

    ``out`` also gets a copy of the CA certificate, so that it holds all a lane needs.
    """
    cert, key = _sign(ca_dir, common_name, days=days, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    issued = _write_pair(out, common_name, cert, key)
    if out.resolve() != ca_dir.resolve():
        try:
            _write_atomic(out / CA_CERT, (ca_dir / CA_CERT).read_bytes(), 0o644)
        except OSError as exc:
            raise PkiError(f"cannot copy {CA_CERT}: {exc.strerror or exc}", path=out) from exc
    return issued


# --- the broker's ACL -------------------------------------------------------------------------


def lane_stanza(store: str, lane: str, root: str = "retail") -> str:
    """A lane's ACL stanza: write its journal and state, read its acks and head office's topics."""
    user = lane_user(store, lane)
    base = f"{root}/{store}/{lane}"
    return (
        f"{ACL_HEADER}{user}\n"
        f"user {user}\n"
        f"topic write {base}/journal\n"
        f"topic write {base}/state\n"
        f"topic read {base}/ack\n"
        f"topic read {root}/hq/#\n"
    )


def _user_of(line: str) -> str | None:
    words = line.strip()
    if words.startswith(("user ", "user\t")):
        return words[5:].strip()
    return None


def replace_stanza(text: str, user: str, stanza: str) -> str:
    """``text`` (an ACL file) with ``user``'s stanza replaced by ``stanza`` in place, else appended (pure).

    A stanza runs from its ``user`` line to the next ``user`` line; comments and
    blank lines just before that next line are left to it, as its header.  A
    second stanza of the same user (hand-made) is removed: one user, one place.
    """
    lines = text.splitlines()
    kept: list[str] = []
    placed = False
    index = 0
    while index < len(lines):
        if _user_of(lines[index]) != user:
            kept.append(lines[index])
            index += 1
            continue
        if kept and kept[-1] == f"{ACL_HEADER}{user}":
            kept.pop()
        end = index + 1
        while end < len(lines) and _user_of(lines[end]) is None:
            end += 1
        tail = end
        while tail > index + 1 and (not lines[tail - 1].strip() or lines[tail - 1].lstrip().startswith("#")):
            tail -= 1
        if not placed:
            kept.extend(stanza.splitlines())
            placed = True
        kept.extend(lines[tail:end])
        index = end
    while kept and not kept[-1].strip():
        kept.pop()
    if placed:
        return "\n".join(kept) + "\n"
    return ("\n".join(kept) + "\n\n" if kept else "") + stanza


def update_acl(path: Path, user: str, stanza: str) -> str:
    """Put ``stanza`` for ``user`` into the ACL file ``path`` atomically: 'added', 'replaced' or 'unchanged'."""
    try:
        old = path.read_text(encoding="utf-8") if path.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise PkiError(f"cannot read: {exc}", path=path) from exc
    new = replace_stanza(old, user, stanza)
    if new == old:
        return "unchanged"
    try:
        _write_atomic(path, new.encode(), 0o640, like=path)
    except OSError as exc:
        raise PkiError(f"cannot write: {exc.strerror or exc}", path=path) from exc
    return "replaced" if any(_user_of(line) == user for line in old.splitlines()) else "added"
