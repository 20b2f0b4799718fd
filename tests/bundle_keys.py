"""Test credentials for bundle tests: RSA keys and self-signed certificates made with
`cryptography`, written as PEM files the way a eucarc's key directory holds them."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

ACCOUNT = "123456789012"


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Credentials:
    user: KeyPair  # the bundling user's certificate and private key
    cloud: KeyPair  # the cloud's certificate (and the key only the cloud holds)
    stranger: KeyPair  # someone else's, for "wrong key" cases
    account: str = ACCOUNT


def make_key_pair(directory: Path, name: str, bits: int = 2048, *, traditional: bool = True) -> KeyPair:
    """An RSA key and a self-signed certificate for it, as `name-pk.pem` and `name-cert.pem`."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=365))
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / f"{name}-pk.pem", directory / f"{name}-cert.pem"
    fmt = serialization.PrivateFormat.TraditionalOpenSSL if traditional else serialization.PrivateFormat.PKCS8
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return KeyPair(cert_path, key_path)


def make_credentials(directory: Path) -> Credentials:
    """A user (2048-bit, PKCS#1 key file), a cloud (1024-bit, PKCS#8, as old clouds had)
    and a stranger."""
    return Credentials(
        user=make_key_pair(directory, "user"),
        cloud=make_key_pair(directory, "cloud", 1024, traditional=False),
        stranger=make_key_pair(directory, "stranger"),
    )
