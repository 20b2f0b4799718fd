"""Test identities of the stand-in cloud: access keys, the user's and the cloud's RSA keys
and certificates, and an eucarc that names them the way Eucalyptus writes one."""

from __future__ import annotations

import datetime as _dt
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


def _self_signed(key: rsa.RSAPrivateKey, common_name: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _dt.datetime.now(_dt.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(days=1))
            .not_valid_after(now + _dt.timedelta(days=365))
            .sign(key, hashes.SHA256()))


def _write_pair(directory: Path, stem: str, common_name: str) -> tuple[Path, Path, rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = _self_signed(key, common_name)
    key_path = directory / f"{stem}-pk.pem"
    cert_path = directory / f"{stem}-cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path, key, cert


@dataclass
class TestIdentity:
    """Everything a client of the stand-in needs, as files and values."""

    __test__ = False  # not a test class, whatever its name

    directory: Path
    account_id: str
    access_key: str
    secret_key: str = field(repr=False)
    user_key: Path = None  # type: ignore[assignment]
    user_cert: Path = None  # type: ignore[assignment]
    cloud_key: Path = None  # type: ignore[assignment]
    cloud_cert: Path = None  # type: ignore[assignment]
    user_cert_obj: x509.Certificate = field(default=None, repr=False)  # type: ignore[assignment]
    cloud_key_obj: rsa.RSAPrivateKey = field(default=None, repr=False)  # type: ignore[assignment]

    @classmethod
    def create(cls, directory: Path) -> "TestIdentity":
        """Fresh keys and certificates written into `directory` (created)."""
        directory.mkdir(parents=True, exist_ok=True)
        account = "".join(secrets.choice("0123456789") for _ in range(12))
        ident = cls(directory, account, "AKI" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30))
        fp = secrets.token_hex(4)
        ident.user_key, ident.user_cert, _, ident.user_cert_obj = _write_pair(directory, f"euca2-admin-{fp}", "admin")
        ident.cloud_key, ident.cloud_cert, ident.cloud_key_obj, _ = _write_pair(directory, "cloud", "eucalyptus")
        return ident

    def write_eucarc(self, ec2_url: str, s3_url: str, path: Path | None = None) -> Path:
        """An eucarc in the shape Eucalyptus' credential download writes (with WARN lines
        for services that are not configured), key files named through ${EUCA_KEY_DIR}."""
        path = path or self.directory / "eucarc"
        lines = [
            "EUCA_KEY_DIR=$(cd $(dirname ${BASH_SOURCE:-$0}); pwd -P)",
            f"export EC2_URL={ec2_url}",
            f"export S3_URL={s3_url}",
            "echo WARN:  Euare service URL is not configured. >&2",
            "echo WARN:  AutoScaling service URL is not configured. >&2",
            "export EUSTORE_URL=http://emis.eucalyptus.com/",
            f"export EC2_PRIVATE_KEY=${{EUCA_KEY_DIR}}/{self.user_key.name}",
            f"export EC2_CERT=${{EUCA_KEY_DIR}}/{self.user_cert.name}",
            "export EC2_JVM_ARGS=-Djavax.net.ssl.trustStore=${EUCA_KEY_DIR}/jssecacerts",
            "export EUCALYPTUS_CERT=${EUCA_KEY_DIR}/cloud-cert.pem",
            f"export EC2_ACCOUNT_NUMBER='{self.account_id}'",
            f"export EC2_ACCESS_KEY='{self.access_key}'",
            f"export EC2_SECRET_KEY='{self.secret_key}'",
            f"export AWS_ACCESS_KEY='{self.access_key}'",
            f"export AWS_SECRET_KEY='{self.secret_key}'",
            "export AWS_CREDENTIAL_FILE=${EUCA_KEY_DIR}/iamrc",
            f"export EC2_USER_ID='{self.account_id}'",
            'alias ec2-bundle-image="ec2-bundle-image --cert ${EC2_CERT} --privatekey ${EC2_PRIVATE_KEY} '
            '--user ${EC2_ACCOUNT_NUMBER} --ec2cert ${EUCALYPTUS_CERT}"',
            'alias ec2-upload-bundle="ec2-upload-bundle -a ${EC2_ACCESS_KEY} -s ${EC2_SECRET_KEY} --url ${S3_URL}"',
        ]
        path.write_text("\n".join(lines) + "\n")
        os.chmod(path, 0o600)
        return path
