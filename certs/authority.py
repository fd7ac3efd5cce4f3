"""The federation's certificate authority, the SuperLink's TLS certificate and the sites' keys.

One folder (``--dir``, default ``~/.config/fedsite/certs`` or ``$FEDSITE_CERTS``, outside any
repository) holds what the coordinator generates::

    ca.pem          the federation's root certificate: every site gets a copy (public)
    ca.key          the CA's private key: stays with the coordinator (mode 0600)
    server.pem      the SuperLink's TLS certificate, signed by the CA, with its names as SANs
    server.key      the SuperLink's TLS private key (mode 0600)
    sites/NAME.key  a site's SuperNode authentication key, OpenSSH EC private key (mode 0600)
    sites/NAME.pub  its public key (OpenSSH), the only thing a site hands to the coordinator

Reissuing the server certificate touches only ``server.pem``/``server.key``; site keys are
independent of the CA (SuperNode authentication is by registered public key), so adding,
removing or rotating one never invalidates the others.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import FedsiteError
from common.locations import certs_dir

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "SITES_DIR",
    "WARN_DAYS",
    "CertError",
    "CertStatus",
    "default_dir",
    "init_ca",
    "issue_server_cert",
    "make_site_key",
    "status",
]

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
SITES_DIR = "sites"
#: ``status`` warns this many days before a certificate expires.
WARN_DAYS = 30
_CURVE = ec.SECP384R1  # P-384: what `flwr supernode register` expects ("or any other NIST curve")
_SITE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class CertError(FedsiteError):
    """A certificate or key cannot be made or read; the message names the file and the fix."""


def default_dir() -> Path:
    """Where certificates live unless ``--dir`` says otherwise: ``$FEDSITE_CERTS`` or ``~/.config/fedsite/certs``."""
    return certs_dir()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600 from the start, not chmod after)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_ca(d: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = d / CA_CERT, d / CA_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise CertError(
            f"no CA in {d} ({CA_CERT} and {CA_KEY} expected); create it with `fedsite certs init --dir {d}`"
        )
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(
            f"{key_path} is not an EC private key; recreate the CA with `fedsite certs init --dir {d} --force`"
        )
    return cert, key


def init_ca(d: Path, *, name: str = "fedsite federation CA", days: int = 3650, force: bool = False) -> Path:
    """Create the federation's root CA in ``d``.

    Args:
        d: The certificate folder.
        name: The CA's common name.
        days: Validity in days.
        force: Replace an existing CA (every server certificate it signed must then be reissued,
            and every site given the new ``ca.pem``).

    Returns:
        The path of ``ca.pem``.

    Raises:
        CertError: If a CA exists already and ``force`` is False.
    """
    if (d / CA_KEY).exists() and not force:
        raise CertError(
            f"a CA exists already in {d}; keep it (sites trust it), or replace it with --force "
            "and then reissue the server certificate and give every site the new ca.pem"
        )
    key = ec.generate_private_key(_CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private(d / CA_KEY, _pem_key(key))
    _write_public(d / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return d / CA_CERT


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9*.-]{1,253}", host):
            raise CertError(f"--host {host!r} is neither an IP address nor a DNS name") from None
        return x509.DNSName(host)


def issue_server_cert(d: Path, hosts: list[str], *, days: int = 397) -> Path:
    """Issue (or reissue) the SuperLink's TLS certificate, signed by the CA in ``d``.

    Only ``server.pem`` and ``server.key`` are written: the CA and the sites' keys stay as they
    are, so sites keep trusting the SuperLink and keep their registration.

    Args:
        d: The certificate folder holding the CA.
        hosts: The names and IP addresses sites use to reach the SuperLink (the SANs);
            the first is also the common name.
        days: Validity in days (397 is the longest browsers accept; SuperNodes do not mind).

    Returns:
        The path of ``server.pem``.

    Raises:
        CertError: Without a CA in ``d`` or without any host.
    """
    if not hosts:
        raise CertError("give at least one --host: the name or IP address the sites connect to")
    ca_cert, ca_key = _load_ca(d)
    key = ec.generate_private_key(_CURVE())
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(d / SERVER_KEY, _pem_key(key))
    _write_public(d / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return d / SERVER_CERT


def make_site_key(d: Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Create a site's SuperNode authentication key pair (EC P-384, OpenSSH format).

    A site can run this itself and hand only ``NAME.pub`` to the coordinator.

    Args:
        d: The certificate folder; the pair goes to ``d/sites/NAME.key`` and ``NAME.pub``.
        name: The site's public name (letters, digits, ``.``, ``_``, ``-``).
        force: Replace an existing pair (the old public key must then be removed with
            ``fedsite server remove-site`` and the new one added).

    Returns:
        ``(private_key_path, public_key_path)``.

    Raises:
        CertError: For a bad name, or an existing pair without ``force``.
    """
    if not _SITE_NAME.match(name):
        raise CertError(f"site name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (e.g. site-01)")
    priv, pub = d / SITES_DIR / f"{name}.key", d / SITES_DIR / f"{name}.pub"
    if priv.exists() and not force:
        raise CertError(f"{priv} exists already; keep it, or replace it with --force (then re-register the site)")
    key = ec.generate_private_key(_CURVE())
    _write_private(
        priv,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(pub, public + f" fedsite-{name}\n".encode())
    return priv, pub


@dataclass(frozen=True)
class CertStatus:
    """One certificate or key of the folder, as ``fedsite certs status`` shows it."""

    kind: str  # "ca", "server", "site-key", "site-pubkey"
    path: Path
    subject: str
    not_after: dt.datetime | None  # None: a key, which does not expire
    days_left: int | None
    problem: str = ""  # "" when fine; else what is wrong and the fix

    @property
    def warning(self) -> bool:
        """True when expired, within :data:`WARN_DAYS` of expiry, or otherwise unusable."""
        return bool(self.problem) or (self.days_left is not None and self.days_left <= WARN_DAYS)


def _cert_status(kind: str, path: Path, now: dt.datetime, ca: x509.Certificate | None) -> CertStatus:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    not_after = cert.not_valid_after_utc
    days = (not_after - now).days
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = str(cn[0].value) if cn else cert.subject.rfc4514_string()
    problem = ""
    if kind == "server":
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [str(v) for v in sans.get_values_for_type(x509.DNSName)]
            names += [str(v) for v in sans.get_values_for_type(x509.IPAddress)]
            subject += f" (SANs: {', '.join(names)})"
        except x509.ExtensionNotFound:
            problem = "no subject alternative names; reissue with `fedsite certs server --host NAME`"
        if ca is not None and not problem:
            try:
                cert.verify_directly_issued_by(ca)
            except Exception:
                problem = "not signed by this folder's CA; reissue with `fedsite certs server`"
    if days < 0:
        problem = problem or f"expired {-days} days ago; " + (
            "reissue with `fedsite certs server`"
            if kind == "server"
            else "replace the CA (`fedsite certs init --force`)"
        )
    elif days <= WARN_DAYS:
        problem = problem or f"expires in {days} days; " + (
            "reissue with `fedsite certs server`" if kind == "server" else "plan a new CA"
        )
    return CertStatus(kind, path, subject, not_after, days, problem)


def status(d: Path, *, now: dt.datetime | None = None) -> list[CertStatus]:
    """Every certificate and key in ``d`` with its expiry (keys do not expire).

    Args:
        d: The certificate folder.
        now: The time to compare expiry against (default: now, UTC).

    Returns:
        The CA, the server certificate and each site key, in that order; ``problem`` says what
        needs doing (expired or expiring within :data:`WARN_DAYS` days, wrong issuer, bad mode).

    Raises:
        CertError: If ``d`` is not a folder.
    """
    if not d.is_dir():
        raise CertError(f"{d} is not a folder; create the CA with `fedsite certs init --dir {d}`")
    now = now or _now()
    out: list[CertStatus] = []
    ca = None
    if (d / CA_CERT).is_file():
        ca = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
        out.append(_cert_status("ca", d / CA_CERT, now, None))
    if (d / CA_KEY).is_file():
        out.append(_key_status("ca-key", d / CA_KEY, "CA private key"))
    if (d / SERVER_CERT).is_file():
        out.append(_cert_status("server", d / SERVER_CERT, now, ca))
    if (d / SERVER_KEY).is_file():
        out.append(_key_status("server-key", d / SERVER_KEY, "SuperLink TLS private key"))
    for pub in sorted((d / SITES_DIR).glob("*.pub")):
        out.append(CertStatus("site-pubkey", pub, pub.stem, None, None))
    for priv in sorted((d / SITES_DIR).glob("*.key")):
        out.append(_key_status("site-key", priv, priv.stem))
    return out


def _key_status(kind: str, path: Path, subject: str) -> CertStatus:
    mode = path.stat().st_mode & 0o777
    problem = "" if mode & 0o077 == 0 else f"readable by others (mode {mode:o}); run `chmod 600 {path}`"
    return CertStatus(kind, path, subject, None, None, problem)
