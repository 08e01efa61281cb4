"""A throw-away certificate authority for loopback federation.

Every TLS listener in the kit (real Synapse federation listeners and the fake
peer's per-server listeners) presents a leaf certificate issued by one CA that
the kit generates. Synapse is told to trust it with ``federation_custom_ca_list``
so certificate verification stays switched on.

The leaf certificate carries ``IP:127.0.0.1``, ``IP:::1`` and ``DNS:localhost``
as subject alternative names: Synapse checks the IP SAN for IP-literal server
names such as ``127.0.0.1:8448``.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class TLSFiles:
    """Paths of a PEM certificate (chain) and its private key."""

    cert_path: str
    key_path: str


def _write_key(path: str, key: ec.EllipticCurvePrivateKey) -> None:
    with open(path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )


def _write_cert(path: str, *certs: x509.Certificate) -> None:
    with open(path, "wb") as f:
        for cert in certs:
            f.write(cert.public_bytes(serialization.Encoding.PEM))


class KitCA:
    """A CA in ``directory`` (``ca.pem`` / ``ca.key``), created on first use."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.cert_path = os.path.join(directory, "ca.pem")
        self.key_path = os.path.join(directory, "ca.key")
        if os.path.exists(self.cert_path) and os.path.exists(self.key_path):
            with open(self.key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            self._key = key
            with open(self.cert_path, "rb") as f:
                self._cert = x509.load_pem_x509_certificate(f.read())
            return
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedkit test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
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
            .sign(self._key, hashes.SHA256())
        )
        _write_key(self.key_path, self._key)
        _write_cert(self.cert_path, self._cert)

    def issue(self, name: str) -> TLSFiles:
        """Issue (or reuse) a loopback leaf certificate stored as ``<name>.pem``.

        Processes sharing the CA directory (a test's child processes) may ask
        for the same name at once: the check and the writes are done under a
        lock file, or one process's key could end up next to another's
        certificate."""
        with open(os.path.join(self.directory, f"{name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._issue_locked(name)

    def _issue_locked(self, name: str) -> TLSFiles:
        cert_path = os.path.join(self.directory, f"{name}.pem")
        key_path = os.path.join(self.directory, f"{name}.key")
        if os.path.exists(cert_path) and os.path.exists(key_path):
            return TLSFiles(cert_path, key_path)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
            )
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=29))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        _write_key(key_path, key)
        _write_cert(cert_path, cert, self._cert)
        return TLSFiles(cert_path, key_path)
