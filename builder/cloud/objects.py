"""A folder of objects in Walrus/S3 that several build boxes share: the farm's stage
cache, durable build records, logs and artifacts.

Every object is written whole or not at all: it is uploaded under a temporary key of
its writer's own (`<prefix>.tmp/...`), then copied to its name and the temporary one
deleted, so a reader never sees half an object and two writers never share one. Each
object carries the SHA-256 of its content in its metadata (`x-amz-meta-sha256`), and a
file fetched is checked against it before it is trusted. One PUT per object, as Walrus
3.x has no multipart uploads (so an object is at most 5 GiB).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from botocore.exceptions import ClientError

from builder.core.record import sha256_file
from builder.core.errors import BakeError
from .calls import MISSING_CODES, error_code, with_retries
from .clients import Clients, make_clients
from .credentials import Credentials, load_credentials
from .store import ensure_bucket

log = logging.getLogger("bake.cloud")

MAX_OBJECT = 5 * 1024 ** 3      # one PUT, one copy


@dataclass
class _Retries:
    attempts: int = 4
    backoff: float = 1.0
    sleep: Callable[[float], None] = field(default=time.sleep)


def parse_store_url(url: str) -> tuple[str, str]:
    """`s3://BUCKET[/PREFIX]` → (bucket, prefix ending in "/" or empty)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise BakeError(f"the farm's store {url!r} is not an s3://BUCKET[/PREFIX] URL")
    prefix = parts.path.strip("/")
    return parts.netloc, (prefix + "/") if prefix else ""


class ObjectStore:
    """Objects under `s3://bucket/prefix` of the cloud `creds` name."""

    def __init__(self, creds: Credentials, bucket: str, prefix: str = "", *, clients: Clients | None = None):
        self.creds, self.bucket, self.prefix = creds, bucket, prefix
        self.clients = clients or make_clients(creds)
        self.retries = _Retries()
        self._bucket_checked = False

    @classmethod
    def from_url(cls, url: str, *, eucarc: str | None = None) -> "ObjectStore":
        """The store `s3://BUCKET/PREFIX` on the cloud of the environment (or `eucarc`)."""
        bucket, prefix = parse_store_url(url)
        creds = load_credentials(eucarc=eucarc)
        if creds is None:
            raise BakeError(f"the farm's store {url} needs a cloud: set S3_URL, EC2_URL and the keys, or --eucarc")
        return cls(creds, bucket, prefix)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def key(self, name: str) -> str:
        return self.prefix + name.lstrip("/")

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        return with_retries(fn, what, self.retries, self.creds)

    def ensure(self) -> None:
        """Make the bucket when it is not there (once per store object)."""
        if not self._bucket_checked:
            ensure_bucket(self.clients, self.bucket, self.retries, self.creds)
            self._bucket_checked = True

    # --- writing -----------------------------------------------------------------------

    def _publish(self, name: str, body_of: Callable[[], Any], digest: str, size: int) -> dict[str, Any]:
        if size > MAX_OBJECT:
            raise BakeError(f"{name}: {size} bytes is more than the 5 GiB one PUT may carry")
        self.ensure()
        final = self.key(name)
        tmp = self.key(f".tmp/{secrets.token_hex(8)}-{os.getpid()}")
        meta = {"sha256": digest}

        def put():
            with body_of() as body:
                self.clients.s3.put_object(Bucket=self.bucket, Key=tmp, Body=body, Metadata=meta)
        try:
            self._call(put, f"uploading {name} to {self.bucket}/{tmp}")
            self._call(lambda: self.clients.s3.copy_object(
                Bucket=self.bucket, Key=final, CopySource={"Bucket": self.bucket, "Key": tmp},
                MetadataDirective="REPLACE", Metadata=meta), f"moving {name} into place")
        finally:
            try:
                self.clients.s3.delete_object(Bucket=self.bucket, Key=tmp)
            except Exception as e:   # the next gc of .tmp/ removes it
                log.warning("could not remove the temporary object %s: %s", tmp, e)
        return {"key": final, "sha256": digest, "size": size}

    def put_file(self, name: str, path: Path) -> dict[str, Any]:
        """Upload the file `path` as `name`, whole or not at all; {key, sha256, size}."""
        path = Path(path)
        return self._publish(name, lambda: open(path, "rb"), sha256_file(path), path.stat().st_size)

    def put_bytes(self, name: str, data: bytes) -> dict[str, Any]:
        return self._publish(name, lambda: io.BytesIO(data), hashlib.sha256(data).hexdigest(), len(data))

    def put_json(self, name: str, value: Any) -> dict[str, Any]:
        return self.put_bytes(name, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    # --- reading -----------------------------------------------------------------------

    def head(self, name: str) -> dict[str, Any] | None:
        """{sha256, size} of the object `name`, None when there is none."""
        def head():
            try:
                r = self.clients.s3.head_object(Bucket=self.bucket, Key=self.key(name))
            except ClientError as e:
                if error_code(e) in MISSING_CODES:
                    return None
                raise
            return {"sha256": (r.get("Metadata") or {}).get("sha256"), "size": r.get("ContentLength")}
        return self._call(head, f"looking up {self.bucket}/{self.key(name)}")

    def get_bytes(self, name: str) -> bytes | None:
        def get():
            try:
                r = self.clients.s3.get_object(Bucket=self.bucket, Key=self.key(name))
            except ClientError as e:
                if error_code(e) in MISSING_CODES:
                    return None
                raise
            data = r["Body"].read()
            want = (r.get("Metadata") or {}).get("sha256")
            if want and hashlib.sha256(data).hexdigest() != want:
                raise BakeError(f"{self.bucket}/{self.key(name)}: its content does not match its SHA-256")
            return data
        return self._call(get, f"reading {self.bucket}/{self.key(name)}")

    def get_json(self, name: str) -> Any:
        """The JSON object `name`, None when there is none; a BakeError when it is not JSON."""
        data = self.get_bytes(name)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise BakeError(f"{self.bucket}/{self.key(name)}: not JSON") from None

    def get_file(self, name: str, dest: Path, *, sha256: str | None = None) -> dict[str, Any]:
        """Download `name` to `dest` (through a temporary file beside it) and check its
        SHA-256 against `sha256` or, without one, the object's own; {sha256, size}."""
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(3)}.part")
        key = self.key(name)
        try:
            def fetch():
                r = self.clients.s3.get_object(Bucket=self.bucket, Key=key)
                h = hashlib.sha256()
                with open(tmp, "wb") as f:
                    for chunk in r["Body"].iter_chunks(1 << 20):
                        h.update(chunk)
                        f.write(chunk)
                return h.hexdigest(), (r.get("Metadata") or {}).get("sha256")
            got, own = self._call(fetch, f"downloading {self.bucket}/{key}")
            want = sha256 or own
            if not want:
                raise BakeError(f"{self.bucket}/{key} has no SHA-256 to check it against")
            if got != want:
                raise BakeError(f"{self.bucket}/{key}: downloaded content has SHA-256 {got}, expected {want}; "
                                "not used")
            os.replace(tmp, dest)
            return {"sha256": got, "size": dest.stat().st_size}
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, folder: str = "") -> Iterator[str]:
        """The names (without the store's prefix) of the objects under `folder`."""
        return (name for name, _ in self.ages(folder))

    def ages(self, folder: str = "") -> Iterator[tuple[str, float]]:
        """(name, seconds since it was written) of each object under `folder`."""
        paginator = self.clients.s3.get_paginator("list_objects")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.key(folder)):
                for o in page.get("Contents") or ():
                    when = o["LastModified"]
                    yield o["Key"][len(self.prefix):], time.time() - when.timestamp()
        except ClientError as e:
            if error_code(e) in MISSING_CODES:
                return
            raise

    def delete(self, name: str) -> None:
        def delete():
            try:
                self.clients.s3.delete_object(Bucket=self.bucket, Key=self.key(name))
            except ClientError as e:
                if error_code(e) not in MISSING_CODES:
                    raise
        self._call(delete, f"deleting {self.bucket}/{self.key(name)}")
