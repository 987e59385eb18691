"""Throw-away X.509 certificates for TLS tests, made with `cryptography` at test time.

Nothing here needs pytest, so fixtures and standalone scripts can both use it::

    ca = make_ca("mailgate test CA")
    good = ca.issue()                                    # localhost + 127.0.0.1
    wrong_host = ca.issue(hostnames=["wrong.example"], ips=[])
    expired = ca.issue(not_before=days_ago(30), not_after=days_ago(1))
    ca_file = ca.write(tmp_dir)
    cert_file, key_file = good.write(tmp_dir)
    context = good.server_context()

Key generation is cheap (EC P-256 by default) but not free: callers should make
a CA once and cache it, e.g. in a session-scoped fixture.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

__all__ = [
    "CA",
    "PKI",
    "Cert",
    "KeyType",
    "days_ago",
    "days_from_now",
    "make_ca",
    "make_pki",
    "server_context",
]


def days_ago(days: float) -> datetime.datetime:
    """A UTC timestamp `days` in the past (for `not_before` / `not_after`)."""
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days)


def days_from_now(days: float) -> datetime.datetime:
    """A UTC timestamp `days` in the future."""
    return days_ago(-days)


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server-side context (TLS 1.2+) that presents the given certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class Cert:
    """A leaf (server) certificate and its private key."""

    certificate: x509.Certificate
    private_key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.private_key)

    def write(self, directory: Path, name: str = "server") -> tuple[Path, Path]:
        """Write `<name>.crt` and `<name>.key` (PEM) into `directory`."""
        directory = Path(directory)
        cert_file = directory / f"{name}.crt"
        key_file = directory / f"{name}.key"
        cert_file.write_bytes(self.cert_pem)
        key_file.write_bytes(self.key_pem)
        key_file.chmod(0o600)
        return cert_file, key_file

    def server_context(self) -> ssl.SSLContext:
        """A server-side SSLContext presenting this certificate (TLS 1.2+)."""
        # The ssl module can only load a certificate chain from files.
        with tempfile.TemporaryDirectory(prefix="mailgate-cert-") as tmp:
            return server_context(*self.write(Path(tmp)))


@dataclass(frozen=True)
class CA:
    """A self-signed certificate authority that can issue leaf certificates."""

    certificate: x509.Certificate
    private_key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path, name: str = "ca") -> Path:
        """Write the CA certificate as `<name>.crt` (PEM); usable as a `ca_file`."""
        ca_file = Path(directory) / f"{name}.crt"
        ca_file.write_bytes(self.cert_pem)
        return ca_file

    def client_context(self) -> ssl.SSLContext:
        """A verifying client-side SSLContext that trusts only this CA."""
        return ssl.create_default_context(cadata=self.cert_pem.decode("ascii"))

    def issue(
        self,
        hostnames: Sequence[str] = ("localhost",),
        ips: Sequence[str] = ("127.0.0.1",),
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        key_type: KeyType = "ec",
    ) -> Cert:
        """Issue a server certificate whose SubjectAlternativeName lists exactly
        `hostnames` and `ips`.

        For a wrong-hostname certificate pass `ips=[]` as well, otherwise a client
        connecting to 127.0.0.1 would still match the IP entry. For an expired one
        pass e.g. `not_before=days_ago(30), not_after=days_ago(1)`.
        """
        if not hostnames and not ips:
            raise ValueError("a certificate needs at least one hostname or IP")
        key = _new_key(key_type)
        common_name = hostnames[0] if hostnames else ips[0]
        names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        ca_key_identifier = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        # Python 3.13+ verifies with VERIFY_X509_STRICT, which insists on the key
        # identifiers and a key usage matching the key type.
        is_rsa = isinstance(key, rsa.RSAPrivateKey)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or days_ago(1))
            .not_valid_after(not_after or days_from_now(30))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=is_rsa,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_identifier),
                critical=False,
            )
            .sign(self.private_key, hashes.SHA256())
        )
        return Cert(certificate, key)


def make_ca(common_name: str = "mailgate test CA", key_type: KeyType = "ec") -> CA:
    """Create a self-signed CA valid from yesterday for 30 days."""
    key = _new_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(days_ago(1))
        .not_valid_after(days_from_now(30))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CA(certificate, key)


@dataclass(frozen=True)
class PKI:
    """A CA plus a localhost/127.0.0.1 server certificate, written to disk."""

    ca: CA
    server: Cert
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        return server_context(self.cert_file, self.key_file)


def make_pki(directory: Path, common_name: str = "mailgate test CA") -> PKI:
    """Make a CA and a server certificate for localhost/127.0.0.1 and write them
    (`ca.crt`, `server.crt`, `server.key`) into `directory`.

    The one call a session-scoped fixture or a script needs; cache the result.
    """
    ca = make_ca(common_name)
    server = ca.issue()
    cert_file, key_file = server.write(directory)
    return PKI(ca, server, ca.write(directory), cert_file, key_file)
