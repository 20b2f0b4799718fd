"""The object store side of publishing: the bucket, and files uploaded with one PUT
each (no multipart: Walrus 3.x has none), skipped when already there with the same MD5."""

from __future__ import annotations

import base64
import hashlib
import logging
from pathlib import Path

from botocore.exceptions import ClientError

from builder.core.errors import BakeError
from .calls import MISSING_CODES, Mismatch, RetryPolicy, cloud_error, error_code, with_retries
from .clients import Clients
from .credentials import Credentials

log = logging.getLogger("bake.cloud")

ACL = "aws-exec-read"   # what euca-upload-bundle uses: the cloud may read the bundle to run it


def md5_file(path: Path, bufsize: int = 1 << 20) -> str:
    """Hex MD5 of a file: what Walrus and S3 return as the ETag of a single PUT."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


class _NotOurs(Exception):
    pass


def ensure_bucket(clients: Clients, bucket: str, opts: RetryPolicy, creds: Credentials) -> bool:
    """Make sure `bucket` exists (HEAD, then PUT on 404); True when it was created here."""
    def exists() -> bool:
        try:
            clients.s3.head_bucket(Bucket=bucket)
            return True
        except ClientError as e:
            if error_code(e) in MISSING_CODES:
                return False
            if error_code(e) in ("403", "AccessDenied", "Forbidden"):
                raise _NotOurs() from None
            raise
    try:
        if with_retries(exists, f"checking bucket {bucket}", opts, creds):
            return False
    except _NotOurs:
        # The EC2 side accepted these credentials moments ago (check_credentials).
        raise BakeError(f"bucket {bucket}: access denied. Bucket names are shared by every account of the "
                        "cloud, so it probably belongs to someone else: choose another with --bucket or the "
                        "recipe's publish.bucket") from None
    log.info("creating bucket %s", bucket)
    try:
        clients.s3.create_bucket(Bucket=bucket)
    except ClientError as e:
        if error_code(e) == "BucketAlreadyOwnedByYou":
            return False
        if error_code(e) == "BucketAlreadyExists":
            raise BakeError(f"bucket {bucket} belongs to another account: choose another with --bucket or the "
                            "recipe's publish.bucket") from None
        raise cloud_error(e, f"creating bucket {bucket}", creds) from None
    return True


def remote_etag(clients: Clients, bucket: str, key: str, opts: RetryPolicy, creds: Credentials) -> str | None:
    """The ETag (MD5 for a single PUT) of bucket/key, None when there is no such object."""
    def head():
        try:
            return clients.s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        except ClientError as e:
            if error_code(e) in MISSING_CODES:
                return None
            raise
    return with_retries(head, f"checking {bucket}/{key}", opts, creds)


def upload_file(clients: Clients, path: Path, bucket: str, key: str, opts: RetryPolicy,
                creds: Credentials, *, metadata: dict[str, str] | None = None) -> bool:
    """Put `path` at bucket/key (with `metadata`, x-amz-meta-*) unless an object with the
    same MD5 is already there. Returns True when it was sent."""
    md5 = md5_file(path)
    if remote_etag(clients, bucket, key, opts, creds) == md5:
        log.debug("%s/%s is already uploaded", bucket, key)
        return False

    def put():
        with open(path, "rb") as body:
            r = clients.s3.put_object(Bucket=bucket, Key=key, Body=body, ACL=ACL, Metadata=metadata or {},
                                      ContentMD5=base64.b64encode(bytes.fromhex(md5)).decode())
        etag = r.get("ETag", "").strip('"')
        if etag and etag != md5:
            raise Mismatch(f"the store's ETag {etag} of {key} does not match the file's MD5 {md5}")
        return True

    log.info("uploading %s to %s/%s", path.name, bucket, key)
    return with_retries(put, f"uploading {path.name} to {bucket}/{key}", opts, creds)


def delete_object(clients: Clients, bucket: str, key: str, opts: RetryPolicy, creds: Credentials) -> bool:
    """Delete bucket/key; False when it was not there."""
    def delete() -> bool:
        try:
            clients.s3.delete_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if error_code(e) in MISSING_CODES:
                return False
            raise
    return with_retries(delete, f"deleting {bucket}/{key}", opts, creds)
