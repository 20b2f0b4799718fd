"""Which certificates, key and account a bundle is made with, and where they came from.

Looked up as euca2ools does: an explicit value (command-line option, recipe `bundle`
section) first, then an eucarc's variables when one is named, then the environment
(`EC2_CERT`, `EC2_PRIVATE_KEY`, `EUCALYPTUS_CERT`, `EC2_USER_ID`). Only paths are held;
the files are read when a bundle is written. A half-configured set is an error that
names what is missing; nothing configured at all is reported as None so that the
caller can decide (the CLI asks for them, the pipeline stays local).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from builder.core.record import and_list
from builder.core.errors import BakeError
from .files import create_private, private_directory

# field → (environment variables, first found wins; the option that sets it; recipe key).
# Publishing reads the same variables (cloud/credentials.py takes them from here).
FIELDS = {
    "cert": (("EC2_CERT", "EUCA_CERT"), "-c/--cert", "cert"),
    "private_key": (("EC2_PRIVATE_KEY", "EUCA_PRIVATE_KEY"), "-k/--privatekey", "private_key"),
    "cloud_cert": (("EUCALYPTUS_CERT",), "--ec2cert", "cloud_cert"),
    "user_id": (("EC2_USER_ID", "EC2_ACCOUNT_NUMBER"), "-u/--user", "user_id"),
}
PATH_FIELDS = ("cert", "private_key", "cloud_cert")


@dataclass(frozen=True)
class BundleKeys:
    """The user's certificate and private key, the cloud's certificate, the account id."""

    user_id: str
    cert: Path
    private_key: Path
    cloud_cert: Path

    def describe(self) -> dict[str, str]:
        """What may be recorded: the account and the certificates' SHA-256 (public data);
        nothing about the private key."""
        return {
            "user_id": self.user_id,
            "cert_sha256": _file_sha256(self.cert),
            "cloud_cert_sha256": _file_sha256(self.cloud_cert),
        }


def _file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as e:
        raise BakeError(f"{path}: cannot read ({e.strerror})") from None


def _expand(value: str) -> str:
    return os.path.expanduser(os.path.expandvars(value))


def resolve_keys(given: Mapping[str, str | None] | None = None, *,
                 environ: Mapping[str, str] | None = None,
                 eucarc: Mapping[str, str] | None = None,
                 wording: str = "option") -> BundleKeys | None:
    """The bundle keys from `given` (field → value), then `eucarc`'s variables, then
    `environ`. None when none of the four is set anywhere; a BakeError naming each
    missing one (by option when `wording` is "option", by recipe key when "recipe")
    when only some are, or when a named file does not exist."""
    given = dict(given or {})
    environ = os.environ if environ is None else environ
    values: dict[str, str | None] = {}
    for name, (env_names, _, _) in FIELDS.items():
        value = given.get(name)
        for source in (eucarc or {}, environ):
            if value:
                break
            value = next((source[v] for v in env_names if source.get(v)), None)
        values[name] = str(value).strip() if value else None
    if not any(values.values()):
        return None
    missing = [n for n, v in values.items() if not v]
    if missing:
        how = [(f"bundle.{FIELDS[n][2]}" if wording == "recipe" else FIELDS[n][1]) + " or " + FIELDS[n][0][0]
               for n in missing]
        raise BakeError("bundling needs the " + ", the ".join(_WHAT[n] for n in missing)
                        + ": give " + "; ".join(how))
    paths = {n: Path(_expand(values[n])) for n in PATH_FIELDS}  # type: ignore[arg-type]
    for n, p in paths.items():
        if not p.is_file():
            raise BakeError(f"{_WHAT[n]} {p}: no such file")
    return BundleKeys(user_id=values["user_id"], **paths)  # type: ignore[arg-type]


_WHAT = {"cert": "user certificate", "private_key": "user private key", "cloud_cert": "cloud certificate",
         "user_id": "account id"}
_ASKED = {"cert": "your certificate", "private_key": "private key", "cloud_cert": "the cloud's certificate",
          "user_id": "your account id"}


def credentials_wanted(*, short: bool = False) -> str:
    """What bundling asks for, by option and by environment variable (from FIELDS)."""
    options = [FIELDS[n][1].split("/")[0] for n in FIELDS]
    variables = [FIELDS[n][0][0] for n in FIELDS]
    if short:
        return ", ".join(options) + ", or " + ", ".join(variables)
    asked = [f"{_ASKED[n]} ({o})" for n, o in zip(FIELDS, options, strict=True)]
    return and_list(asked) + ", or " + and_list(variables)


LOCAL_USER_ID = "000000000000"


def local_keys(directory: Path) -> BundleKeys:
    """A key pair and self-signed certificate made for one build (kept in `directory`,
    0700/0600, reused when already there), standing for both the user and the cloud.

    A bundle sealed with it is complete and checkable (`bake unbundle -k KEY`) but is
    addressed to no cloud; bundling for a cloud makes new bundles with its certificate.
    """
    directory = Path(directory)
    key_path, cert_path = directory / "local-pk.pem", directory / "local-cert.pem"
    if not (key_path.is_file() and cert_path.is_file()):
        private_directory(directory)
        for p in (key_path, cert_path):
            p.unlink(missing_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bake local bundle key")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=3650)).sign(key, hashes.SHA256()))
        with create_private(key_path) as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption()))
        with create_private(cert_path) as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
    return BundleKeys(user_id=LOCAL_USER_ID, cert=cert_path, private_key=key_path, cloud_cert=cert_path)
