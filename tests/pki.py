"""Certificates for tests, made with `cryptography`: a CA and the leaf certificates it signs.

`Pki.make(dir, name)` writes `<name>-ca.pem`; `issue()` writes a leaf certificate and its key
(an IP SAN for a server, a URI SAN or CN naming a client principal).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Pki:
    """A CA and the PEM files it signed, under one directory."""

    root: Path
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, root: Path, name: str) -> Pki:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
        cert = (
            _builder(subject, subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        pki = cls(root, name, key, cert)
        pki.write("ca.pem", cert.public_bytes(serialization.Encoding.PEM))
        return pki

    def path(self, name: str) -> Path:
        return self.root / f"{self.name}-{name}"

    def write(self, name: str, data: bytes) -> Path:
        path = self.path(name)
        path.write_bytes(data)
        return path

    def issue(self, name: str, *, ip: str = "", uri: str = "", cn: str = "leaf") -> tuple[Path, Path]:
        """A leaf certificate and key signed by this CA; returns (cert path, key path)."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        if ip:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        if uri:
            names.append(x509.UniformResourceIdentifier(uri))
        builder = _builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]), self.cert.subject, key.public_key()
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return (
            self.write(f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM)),
            self.write(f"{name}.key", key_pem),
        )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
