"""The one boto3 setup for Eucalyptus (and EC2-compatible clouds).

Eucalyptus 3.x: EC2 signed with SigV2, Walrus with HmacV1 ('s3') over the real request
path (see `_sign_full_path`), no `Expect: 100-continue`.
Eucalyptus 4.0–4.3 (and 4.x when the exact release is not given): EC2 SigV4, object
storage HmacV1 (same path rule). 4.4 and later, and AWS: SigV4 for both.
Always: path-style addressing, checksum headers only when an operation requires them,
and parameters the Eucalyptus query binding does not know removed before sending.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

# botocore loads urllib3's pyOpenSSL bridge, which loads Debian's older pyOpenSSL; with the
# virtualenv's newer cryptography that warns of DSA on import, a line every bake would print.
warnings.filterwarnings("ignore", message="DSA is deprecated", module="OpenSSL")
import boto3  # noqa: E402 - after the filter above
from botocore.config import Config  # noqa: E402 - after the filter above

from .credentials import Credentials  # noqa: E402 - after the filter above

# botocore fills these in on its own; Eucalyptus' strict binding rejects a request
# carrying any parameter its message type lacks ("Failed to bind the following fields").
STRIPPED_PARAMS = {
    "CreateVolume": ("ClientToken",),
}


@dataclass
class Clients:
    """An EC2 and an S3 client for one cloud, and the settings they were made with."""

    ec2: Any
    s3: Any
    ec2_signature: str
    s3_signature: str


def signatures_for(profile_version: str) -> tuple[str, str]:
    """(EC2 signature version, S3 signature version) for a profile from
    Credentials.profile_version."""
    if profile_version in ("aws", "4.4+"):
        return "v4", "s3v4"
    if profile_version == "4.0-4.3":
        return "v4", "s3"
    return "v2", "s3"


def _sign_full_path(request, **_):
    # botocore's HmacV1 signs auth_path ("/bucket/" for bucket operations, no endpoint
    # path). Walrus computes the resource from the request path, first in full
    # ("/services/Walrus/bucket") and then without the service prefix, never with a
    # trailing slash, so sign the path actually sent.
    request.auth_path = urlsplit(request.url).path


def _drop_expect(request, **_):
    # Walrus before 4.0 does not answer `Expect: 100-continue` properly.
    if "Expect" in request.headers:
        del request.headers["Expect"]


def _strip_params(names: tuple[str, ...]):
    def handler(params, **_):
        body = params.get("body")
        if isinstance(body, dict):
            for n in names:
                body.pop(n, None)
        # returning None lets the call proceed
    return handler


def make_clients(creds: Credentials, *, retries: int = 3, connect_timeout: float = 10,
                 read_timeout: float = 120) -> Clients:
    """EC2 and S3 clients set up for `creds`' cloud. S3 calls are not retried by botocore
    (publish retries uploads itself, with backoff, so that a retry is visible and counted)."""
    ec2_sig, s3_sig = signatures_for(creds.profile_version)
    session = boto3.session.Session(aws_access_key_id=creds.access_key, aws_secret_access_key=creds.secret_key,
                                    region_name=creds.region)
    common = dict(connect_timeout=connect_timeout, read_timeout=read_timeout,
                  request_checksum_calculation="when_required", response_checksum_validation="when_required")
    ec2 = session.client("ec2", endpoint_url=creds.ec2_url, config=Config(
        signature_version=ec2_sig, retries={"mode": "standard", "total_max_attempts": retries}, **common))
    s3 = session.client("s3", endpoint_url=creds.s3_url, config=Config(
        signature_version=s3_sig, s3={"addressing_style": "path", "payload_signing_enabled": True},
        retries={"mode": "standard", "total_max_attempts": 1}, **common))
    if s3_sig == "s3":
        s3.meta.events.register("before-sign.s3", _sign_full_path)
    if creds.profile_version == "3":
        s3.meta.events.register_first("before-sign.s3", _drop_expect)
    for op, names in STRIPPED_PARAMS.items():
        ec2.meta.events.register(f"before-call.ec2.{op}", _strip_params(names))
    return Clients(ec2, s3, ec2_sig, s3_sig)
