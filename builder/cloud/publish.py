"""Publish a build's bundles: upload them to Walrus/S3 and register the kernel (EKI),
the ramdisk (ERI) and the machine image (EMI); unpublish undoes it.

Safe to run again at any point: parts already in the bucket with the same MD5 are not
sent again, and an image already registered for the same manifest location is reused.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError

from ..build import Build
from ..errors import BakeError
from ..log import step
from .clients import Clients, make_clients
from .credentials import Credentials, mask

log = logging.getLogger("bake.cloud")

# Build outputs and the bundle image types they become, in registration order.
ROLES = (("kernel", "kernel"), ("ramdisk", "ramdisk"), ("image", "machine"))
AUTH_CODES = {"SignatureDoesNotMatch", "AuthFailure", "InvalidAccessKeyId", "InvalidClientTokenId",
              "AccessDenied", "MissingAuthenticationToken", "UnrecognizedClientException", "403", "Forbidden"}
RETRY_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed",
               "500", "502", "503", "504"}
MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
ACL = "aws-exec-read"   # what euca-upload-bundle uses: the cloud may read the bundle to run it


@dataclass
class Bundle:
    """One role's bundle on disk: its manifest and parts, in upload order."""

    role: str
    image_type: str
    manifest: Path
    parts: list[Path]
    arch: str


@dataclass
class PublishOptions:
    """Where and how to publish; defaults come from the build."""

    bucket: str | None = None
    prefix: str | None = None
    image_name: str | None = None
    attempts: int = 5
    backoff: float = 1.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    @classmethod
    def from_section(cls, publish: dict | None, **overrides: Any) -> "PublishOptions":
        """Options from a recipe's `publish` section (bucket, prefix, image_name)."""
        publish = publish or {}
        kw = {k: publish.get(k) for k in ("bucket", "prefix", "image_name")}
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


# --- errors ---------------------------------------------------------------------------

def _error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def _cloud_error(e: Exception, what: str, creds: Credentials) -> BakeError:
    """A BakeError for a failed cloud call, naming the call and never a secret."""
    if isinstance(e, ClientError):
        code = _error_code(e)
        msg = e.response.get("Error", {}).get("Message") or ""
        if code in AUTH_CODES:
            return BakeError(
                f"{what}: the cloud refused our credentials ({code}{': ' + msg if msg else ''}). "
                f"Check the secret key for access key {mask(creds.access_key)} (from {creds.source}) and "
                f"that EC2_URL/S3_URL point at the right cloud.")
        return BakeError(f"{what}: {code}{': ' + msg if msg else ''}")
    if isinstance(e, BotoConnectionError):
        return BakeError(f"{what}: cannot reach the cloud ({e}); is {creds.ec2_url} / {creds.s3_url} right?")
    return BakeError(f"{what}: {e}")


class _Mismatch(Exception):
    """An upload the store acknowledged with an ETag other than the file's MD5."""


def _retryable(e: Exception) -> bool:
    if isinstance(e, _Mismatch):
        return True
    if isinstance(e, ClientError):
        return _error_code(e) in RETRY_CODES or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    return isinstance(e, (BotoConnectionError, BotoCoreError))


def _with_retries(fn: Callable[[], Any], what: str, opts: PublishOptions, creds: Credentials) -> Any:
    delay = opts.backoff
    for attempt in range(1, opts.attempts + 1):
        try:
            return fn()
        except (ClientError, BotoCoreError, _Mismatch) as e:
            if not _retryable(e) or attempt == opts.attempts:
                err = _cloud_error(e, what, creds)
                if _retryable(e):
                    err = BakeError(f"{err} (gave up after {attempt} attempts; run publish again to resume)")
                raise err from None
            log.warning("%s failed (%s); retrying in %.1f s", what, e, delay)
            opts.sleep(delay)
            delay = min(delay * 2, 60)
    raise AssertionError("unreachable")


# --- the build's bundles --------------------------------------------------------------

def _manifest_module():
    from ..bundle import manifest  # the only place that knows the manifest's XML
    return manifest


def _resolve(build: Build, p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else build.dir / p


def bundles_of(build: Build, creds: Credentials | None = None) -> list[Bundle]:
    """The build's bundles as the bundle stage recorded them (build.json "bundle"),
    in registration order (kernel, ramdisk, image; the image is required). When the
    build has none and `creds` can bundle, it is bundled first."""
    section = build.data.get("bundle")
    if not section:
        if creds is None:
            raise BakeError(f"{build.dir}: this build has no bundles (run `bake bundle` first)")
        section = bundle_build(build, creds)
    manifest_mod = _manifest_module()
    out = []
    for role, image_type in ROLES:
        entry = section.get(role)
        if not entry:
            if role == "image":
                raise BakeError(f"{build.dir}: build.json records no image bundle; bundle the build again")
            continue
        manifest_path = _resolve(build, entry["manifest"])
        if not manifest_path.is_file():
            raise BakeError(f"{manifest_path}: recorded as the {role} bundle's manifest but missing")
        m = manifest_mod.parse(manifest_path.read_bytes())
        parts = [manifest_path.parent / p.filename for p in sorted(m.parts, key=lambda p: p.index)]
        for p in parts:
            if not p.is_file():
                raise BakeError(f"{p}: part of the {role} bundle is missing; bundle the build again")
        out.append(Bundle(role, entry.get("image_type") or entry.get("type") or image_type, manifest_path, parts,
                          m.arch))
    return out


def bundle_build(build: Build, creds: Credentials) -> dict[str, Any]:
    """Bundle the build with the credentials' keys and certificates, exactly as the
    bundle stage does (same record in build.json "bundle"); returns that section."""
    from ..bundle.keys import BundleKeys
    from ..stages.bundle import bundle_build as bundle_stage_build

    creds.require_bundling()
    keys = BundleKeys(user_id=creds.user_id, cert=creds.cert, private_key=creds.private_key,  # type: ignore[arg-type]
                      cloud_cert=creds.cloud_cert)  # type: ignore[arg-type]
    with step("Bundling the build for publishing"):
        return bundle_stage_build(build, keys, reuse=True)


# --- upload ---------------------------------------------------------------------------

def md5_file(path: Path, bufsize: int = 1 << 20) -> str:
    """Hex MD5 of a file: what Walrus and S3 return as the ETag of a single PUT."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _default_prefix(build: Build) -> str:
    return f"{build.dir.parent.name}/{build.id}"


def _default_bucket(build: Build) -> str:
    return "bake-images"


def ensure_bucket(clients: Clients, bucket: str, opts: PublishOptions, creds: Credentials) -> bool:
    """Make sure `bucket` exists (HEAD, then PUT on 404); True when it was created here."""
    def exists() -> bool:
        try:
            clients.s3.head_bucket(Bucket=bucket)
            return True
        except ClientError as e:
            if _error_code(e) in MISSING_CODES:
                return False
            raise
    if _with_retries(exists, f"checking bucket {bucket}", opts, creds):
        return False
    log.info("creating bucket %s", bucket)
    try:
        clients.s3.create_bucket(Bucket=bucket)
    except ClientError as e:
        if _error_code(e) == "BucketAlreadyOwnedByYou":
            return False
        raise _cloud_error(e, f"creating bucket {bucket}", creds) from None
    return True


def _remote_etag(clients: Clients, bucket: str, key: str, opts: PublishOptions, creds: Credentials) -> str | None:
    def head():
        try:
            return clients.s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        except ClientError as e:
            if _error_code(e) in MISSING_CODES:
                return None
            raise
    return _with_retries(head, f"checking {bucket}/{key}", opts, creds)


def upload_file(clients: Clients, path: Path, bucket: str, key: str, opts: PublishOptions,
                creds: Credentials) -> bool:
    """Put `path` at bucket/key unless an object with the same MD5 is already there.
    Returns True when it was sent."""
    md5 = md5_file(path)
    if _remote_etag(clients, bucket, key, opts, creds) == md5:
        log.debug("%s/%s is already uploaded", bucket, key)
        return False

    def put():
        with open(path, "rb") as body:
            r = clients.s3.put_object(Bucket=bucket, Key=key, Body=body, ACL=ACL,
                                      ContentMD5=base64.b64encode(bytes.fromhex(md5)).decode())
        etag = r.get("ETag", "").strip('"')
        if etag and etag != md5:
            raise _Mismatch(f"the store's ETag {etag} of {key} does not match the file's MD5 {md5}")
        return True

    log.info("uploading %s to %s/%s", path.name, bucket, key)
    return _with_retries(put, f"uploading {path.name} to {bucket}/{key}", opts, creds)


# --- register -------------------------------------------------------------------------

def find_images(clients: Clients, location: str, creds: Credentials) -> list[dict]:
    """Images (not deregistered) already registered for manifest `location`."""
    try:
        r = clients.ec2.describe_images(Owners=["self"], Filters=[{"Name": "manifest-location", "Values": [location]}])
    except ClientError as e:
        raise _cloud_error(e, f"looking up images for {location}", creds) from None
    return [im for im in r.get("Images", [])
            if im.get("ImageLocation") == location and im.get("State", "available") not in ("deregistered", "failed")]


def register(clients: Clients, bundle: Bundle, location: str, name: str, creds: Credentials, *,
             kernel_id: str | None = None, ramdisk_id: str | None = None, replace: bool = False) -> tuple[str, bool]:
    """The id of the image registered for `location` (an existing one reused unless
    `replace` or its kernel/ramdisk differ); (id, True) when registered now."""
    for im in find_images(clients, location, creds):
        same = (bundle.image_type != "machine"
                or (im.get("KernelId") == kernel_id and im.get("RamdiskId") == ramdisk_id))
        if same and not replace:
            log.info("%s is already registered as %s", location, im["ImageId"])
            return im["ImageId"], False
        log.info("deregistering %s: its bundle or kernel/ramdisk changed", im["ImageId"])
        deregister(clients, im["ImageId"], creds)
    kw: dict[str, Any] = {"ImageLocation": location, "Name": name, "Architecture": bundle.arch}
    if kernel_id:
        kw["KernelId"] = kernel_id
    if ramdisk_id:
        kw["RamdiskId"] = ramdisk_id
    # No RootDeviceName: not allowed with a manifest; the cloud picks its default.
    try:
        image_id = clients.ec2.register_image(**kw)["ImageId"]
    except ClientError as e:
        raise _cloud_error(e, f"registering {location}", creds) from None
    log.info("registered %s as %s", location, image_id)
    return image_id, True


def deregister(clients: Clients, image_id: str, creds: Credentials) -> None:
    try:
        clients.ec2.deregister_image(ImageId=image_id)
    except ClientError as e:
        if _error_code(e) not in ("InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"):
            raise _cloud_error(e, f"deregistering {image_id}", creds) from None


def check_credentials(clients: Clients, creds: Credentials) -> None:
    """One cheap signed call, so that a wrong key fails first and clearly."""
    try:
        clients.ec2.describe_availability_zones()
    except (ClientError, BotoCoreError) as e:
        raise _cloud_error(e, f"connecting to {creds.ec2_url}", creds) from None


# --- the two operations ---------------------------------------------------------------

def _image_name(opts: PublishOptions, build: Build) -> str:
    name = opts.image_name or f"{build.dir.parent.name}-{build.id}"
    return name[:110]


def publish(build: Build, creds: Credentials, opts: PublishOptions | None = None, *,
            clients: Clients | None = None) -> dict[str, Any]:
    """Upload the build's bundles and register EKI, ERI and EMI; record and return the
    build.json "cloud" section (image ids, bucket, prefix, keys)."""
    opts = opts or PublishOptions()
    previous = build.data.get("cloud") or {}
    bucket = opts.bucket or previous.get("bucket") or _default_bucket(build)
    prefix = (opts.prefix if opts.prefix is not None else previous.get("prefix") or _default_prefix(build)).strip("/")
    clients = clients or make_clients(creds)
    check_credentials(clients, creds)   # before bundling, which can take minutes
    bundles = bundles_of(build, creds)
    key_of = (lambda p: f"{prefix}/{p.name}") if prefix else (lambda p: p.name)
    section: dict[str, Any] = {
        **creds.describe(), "bucket": bucket, "prefix": prefix,
        "bucket_created": bool(previous.get("bucket_created")) and previous.get("bucket") == bucket,
        "images": {},
    }
    sent = skipped = 0
    changed: dict[str, bool] = {}
    with step(f"Uploading bundles to {bucket}/{prefix}"):
        if ensure_bucket(clients, bucket, opts, creds):
            section["bucket_created"] = True
        for b in bundles:
            for part in b.parts:
                if upload_file(clients, part, bucket, key_of(part), opts, creds):
                    sent += 1
                else:
                    skipped += 1
            # the manifest last: a manifest in the bucket means its parts are there
            changed[b.role] = upload_file(clients, b.manifest, bucket, key_of(b.manifest), opts, creds)
            sent += changed[b.role]
            skipped += not changed[b.role]
    log.info("uploaded %d file(s), %d already there", sent, skipped)
    ids: dict[str, str] = {}
    name = _image_name(opts, build)
    with step("Registering the kernel, ramdisk and image"):
        for b in bundles:
            location = f"{bucket}/{key_of(b.manifest)}"
            suffix = {"kernel": "-kernel", "ramdisk": "-ramdisk", "image": ""}[b.role]
            # a machine image without its own kernel/ramdisk takes the cloud's defaults
            image_id, new = register(
                clients, b, location, name + suffix, creds, replace=changed[b.role],
                kernel_id=ids.get("kernel") if b.role == "image" else None,
                ramdisk_id=ids.get("ramdisk") if b.role == "image" else None)
            ids[b.role] = image_id
            section["images"][b.role] = {
                "id": image_id, "type": b.image_type, "manifest_location": location, "registered_now": new,
                "objects": [key_of(p) for p in b.parts] + [key_of(b.manifest)]}
    section.update(kernel_id=ids.get("kernel"), ramdisk_id=ids.get("ramdisk"), image_id=ids["image"],
                   uploaded=sent, already_uploaded=skipped,
                   published=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    build.set("cloud", section)
    return section


def unpublish(build: Build, creds: Credentials, opts: PublishOptions | None = None, *,
              clients: Clients | None = None) -> dict[str, Any]:
    """Deregister the images this build published and delete its objects (and the bucket,
    when publishing created it and it is now empty). Works after an interrupted publish
    too: what to remove is derived from the build's bundles. Returns what was removed."""
    opts = opts or PublishOptions()
    cloud = build.data.get("cloud") or {}
    bucket = opts.bucket or cloud.get("bucket") or _default_bucket(build)
    prefix = (opts.prefix if opts.prefix is not None else cloud.get("prefix") or _default_prefix(build)).strip("/")
    key_of = (lambda p: f"{prefix}/{p.name}") if prefix else (lambda p: p.name)
    clients = clients or make_clients(creds)
    check_credentials(clients, creds)
    images: dict[str, dict] = cloud.get("images") or {}
    try:
        bundles = bundles_of(build)
    except BakeError:
        bundles = []
    locations = {b.role: f"{bucket}/{key_of(b.manifest)}" for b in bundles}
    locations.update({role: im["manifest_location"] for role, im in images.items() if im.get("manifest_location")})
    keys: list[str] = []
    for b in bundles:
        keys += [key_of(p) for p in b.parts] + [key_of(b.manifest)]
    for im in images.values():
        keys += [k for k in im.get("objects", []) if k not in keys]
    removed: dict[str, Any] = {"images": [], "objects": [], "bucket": None}
    with step("Deregistering images"):
        for role in ("image", "ramdisk", "kernel"):   # the EMI names the EKI/ERI: it goes first
            ids = {im["ImageId"] for im in find_images(clients, locations[role], creds)} if role in locations else set()
            if images.get(role, {}).get("id"):
                ids.add(images[role]["id"])
            for image_id in sorted(ids):
                deregister(clients, image_id, creds)
                removed["images"].append(image_id)
    with step(f"Deleting the bundles from {bucket}"):
        for key in keys:
            def delete(key=key) -> bool:
                try:
                    clients.s3.delete_object(Bucket=bucket, Key=key)
                    return True
                except ClientError as e:
                    if _error_code(e) in MISSING_CODES:
                        return False
                    raise
            if _with_retries(delete, f"deleting {bucket}/{key}", opts, creds):
                removed["objects"].append(key)
        if cloud.get("bucket_created"):
            try:
                clients.s3.delete_bucket(Bucket=bucket)
                removed["bucket"] = bucket
            except ClientError as e:
                if _error_code(e) not in ("BucketNotEmpty", "409", *MISSING_CODES):
                    raise _cloud_error(e, f"deleting bucket {bucket}", creds) from None
                log.info("bucket %s kept: %s", bucket, _error_code(e))
    build.data.pop("cloud", None)
    build.save()
    return removed
