"""TLS for the server: certificates re-read when their files change, and mTLS principals.

grpc asks `CertificateFiles.fetch` before every new handshake; it answers with a new
configuration only when a file changed, so a rotated certificate reaches new connections
without a restart, and connections already open (their running streams) are left alone.
With a client CA, client certificates are required and verified by grpc; the principal is
the certificate's first URI SAN, else its first DNS SAN, else its subject CN.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

log = logging.getLogger("sessiongate.tls")


class CertificateFiles:
    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._stamp = self._stamps()
        self._config = self._load()

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._config, self.fetch, require_client_authentication=self.client_ca is not None
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration if a file changed since the last one, else None (grpc's thread)."""
        try:
            stamp = self._stamps()
            if stamp == self._stamp:
                return None
            config = self._load()
        except (OSError, ValueError) as exc:  # half-written files: keep serving the last good ones
            log.warning("certificate files unusable, keeping the last good ones: %s", exc)
            return None
        self._stamp, self._config = stamp, config
        log.info("certificate files changed: new connections get the new certificate")
        return config

    def _stamps(self) -> tuple[tuple[int, int], ...]:
        paths = [self.cert, self.key, *([self.client_ca] if self.client_ca else [])]
        return tuple((os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in paths)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert, key = self.cert.read_bytes(), self.key.read_bytes()
        if b"CERTIFICATE" not in cert or b"PRIVATE KEY" not in key:
            raise ValueError(f"{self.cert} / {self.key} are not a PEM certificate and key")
        root = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=root)


def certificate_name(pem: bytes) -> str:
    """A client certificate's principal name: first URI SAN, else first DNS SAN, else CN."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for kind in (x509.UniformResourceIdentifier, x509.DNSName):
            found = names.get_values_for_type(kind)
            if found:
                return str(found[0])
    except x509.ExtensionNotFound:
        pass
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(common[0].value) if common else ""
