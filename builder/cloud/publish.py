"""Publish a build's bundles: upload them to Walrus/S3 and register the kernel (EKI),
the ramdisk (ERI) and the machine image (EMI); unpublish undoes it.

Every build publishes under names of its own (`names`): its folder
`[PREFIX/]<recipe>/<build-id>/` and its images `[PREFIX-]<name>-<build-id>`; a name
another build holds is refused before anything is written. Safe to run again at any
point: parts already in the bucket with the same MD5 are not sent again, and an image
already registered for the same manifest location (the build's own) is reused.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from botocore.exceptions import ClientError

from builder.bundle import manifest as manifest_format  # the only module that knows the manifest's XML
from builder.bundle.build import bundle_build as bundle_stage_build
from builder.bundle.keys import BundleKeys
from builder.core.record import Build
from builder.core import events, fence
from builder.core.errors import BakeError
from builder.core.log import step
from .calls import MISSING_CODES, cloud_error, error_code
from .clients import Clients, make_clients
from .credentials import Credentials
from .images import check_credentials, deregister, find_images, register
from .names import OWNER_META, build_folder, check_names_free, image_name, object_owner, own_folder, owner_of
from .store import delete_object, ensure_bucket, upload_file

log = logging.getLogger("bake.cloud")

# Build outputs and the bundle image types they become, in registration order.
ROLES = (("kernel", "kernel"), ("ramdisk", "ramdisk"), ("image", "machine"))


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
        kw: dict[str, Any] = {k: publish.get(k) for k in ("bucket", "prefix", "image_name")}
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


# --- the build's bundles --------------------------------------------------------------

def _resolve(build: Build, p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else build.dir / p


def bundles_of(build: Build, creds: Credentials | None = None) -> list[Bundle]:
    """The build's bundles as the bundle stage recorded them (build.json "bundle"),
    in registration order (kernel, ramdisk, image; the image is required).

    With `creds` that can bundle, the bundles are first made sure to be sealed to that
    cloud: bundles made with the same keys are kept, others (local ones, made with a key
    pair of the build's own, or ones for another cloud) are made again."""
    section = build.data.get("bundle")
    local = bool(((build.data.get("stages") or {}).get("bundle") or {}).get("local"))
    if creds is not None and creds.can_bundle:
        section = bundle_build(build, creds)
    elif creds is not None and (not section or local):
        why = "has no bundles" if not section else "was bundled locally, with a key pair of its own"
        raise BakeError(f"{build.dir} {why}; to bundle it for the cloud, publishing needs EC2_CERT, "
                        "EC2_PRIVATE_KEY, EUCALYPTUS_CERT and EC2_USER_ID (or an eucarc that sets them)")
    elif not section:
        raise BakeError(f"{build.dir}: this build has no bundles (run `bake bundle` first)")
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
        m = manifest_format.parse(manifest_path.read_bytes())
        parts = [manifest_path.parent / p.filename for p in sorted(m.parts, key=lambda p: p.index)]
        for p in parts:
            if not p.is_file():
                raise BakeError(f"{p}: part of the {role} bundle is missing; bundle the build again")
        out.append(Bundle(role, entry.get("image_type") or entry.get("type") or image_type, manifest_path, parts,
                          m.arch))
    return out


def bundle_build(build: Build, creds: Credentials) -> dict[str, Any]:
    """Make sure the build's bundles are sealed to the credentials' cloud and user:
    bundles already made with these certificates are kept as they are; otherwise the
    build is bundled again exactly as the bundle stage does (same settings as the
    bundles it replaces, same record in build.json "bundle"). Returns that section."""
    keys = _bundle_keys(creds)
    section = build.data.get("bundle") or {}
    if _sealed_with(section, keys):
        return section
    settings: dict[str, Any] = next(
        (e["settings"] for e in section.values() if isinstance(e, dict) and e.get("settings")), {})
    kw = {k: settings[k] for k in ("arch", "part_size", "block_device_mapping", "image_prefix")
          if settings.get(k) is not None}
    with step("Bundling the build for the cloud"):
        section = bundle_stage_build(build, keys, **kw)
    if ((build.data.get("stages") or {}).get("bundle") or {}).get("local"):
        build.record_stage("bundle", local=False, note="bundled again with the cloud's certificate for publishing")
    return section


def _bundle_keys(creds: Credentials) -> BundleKeys:
    creds.require_bundling()
    return BundleKeys(user_id=creds.user_id, cert=creds.cert, private_key=creds.private_key,  # type: ignore[arg-type]
                      cloud_cert=creds.cloud_cert)  # type: ignore[arg-type]


def _sealed_with(section: dict[str, Any], keys: BundleKeys) -> bool:
    made_with = keys.describe()
    return bool(section) and all(isinstance(e, dict) and e.get("keys") == made_with for e in section.values())


def check_publishable(build: Build, creds: Credentials) -> None:
    """Raise the BakeError publishing would meet in the build's own folder, without
    contacting the cloud: the bundles it would upload must be there, or, when it would
    bundle first, the kernel, ramdisk and image it would bundle."""
    section = build.data.get("bundle") or {}
    will_bundle = creds.can_bundle and not _sealed_with(section, _bundle_keys(creds))
    if will_bundle or not section:
        outputs = build.data.get("outputs") or {}
        build.require_outputs(*(role for role, _ in ROLES if role in outputs or role == "image"))
    if not will_bundle:
        bundles_of(build, None if creds.can_bundle else creds)


# --- defaults -------------------------------------------------------------------------

def _default_bucket(creds: Credentials) -> str:
    # Bucket names are one namespace for the whole cloud: make ours the account's own.
    return f"bake-images-{creds.user_id}" if creds.user_id else "bake-images"


def _folder(build: Build, opts: PublishOptions, recorded: str | None) -> str:
    """Where the build's objects go: under the prefix asked for, else where an earlier
    publish of this build put them (when that is a folder of its own), else the default."""
    if opts.prefix is None and recorded and build_folder(build, recorded) == recorded.strip("/"):
        return recorded.strip("/")
    return build_folder(build, opts.prefix)


def publish(build: Build, creds: Credentials, opts: PublishOptions | None = None, *,
            clients: Clients | None = None) -> dict[str, Any]:
    """Upload the build's bundles and register EKI, ERI and EMI; record and return the
    build.json "cloud" section (image ids, bucket, prefix, keys)."""
    opts = opts or PublishOptions()
    previous = build.data.get("cloud") or {}
    bucket = opts.bucket or previous.get("bucket") or _default_bucket(creds)
    prefix = _folder(build, opts, previous.get("prefix"))
    check_publishable(build, creds)     # what is missing here is said before the cloud is asked anything
    released = build.data.get("released")
    if released and creds.can_bundle and not _sealed_with(build.data.get("bundle") or {}, _bundle_keys(creds)):
        at = released.get("at", "?") if isinstance(released, dict) else "?"
        raise BakeError(f"{build.dir} was released ({at}) and its bundles are not sealed to these credentials' "
                        "cloud: publishing would bundle it again, and a release's bundles never change; bake the "
                        "recipe again for that cloud")
    clients = clients or make_clients(creds)
    check_credentials(clients, creds)   # before bundling, which can take minutes
    bundles = bundles_of(build, creds)
    key_of = lambda p: f"{prefix}/{p.name}"  # noqa: E731
    owner = owner_of(build)
    name = image_name(build, prefix[:-len(own_folder(build))], opts.image_name)
    suffixes = {"kernel": "-kernel", "ramdisk": "-ramdisk", "image": ""}
    meta = {OWNER_META: owner}
    section: dict[str, Any] = {
        **creds.describe(), "bucket": bucket, "prefix": prefix,
        "bucket_created": bool(previous.get("bucket_created")) and previous.get("bucket") == bucket,
        "images": {},
    }
    sent = skipped = 0
    changed: dict[str, bool] = {}
    total = sum(f.stat().st_size for b in bundles for f in (*b.parts, b.manifest))
    done = 0

    def count(f: Path) -> None:
        nonlocal done
        done += f.stat().st_size
        events.progress("publish", f"uploading to {bucket}", done, total, "bytes", final=done >= total)

    # a farm worker's bake that lost its recipe's lease must not publish beside the new holder
    fence.check(f"uploading {build.id}'s bundles")
    with step(f"Uploading bundles to {bucket}/{prefix}"):
        created = ensure_bucket(clients, bucket, opts, creds)
        if created:
            section["bucket_created"] = True
        try:    # before anything is written: every name it would use is free or the build's own
            check_names_free(clients, creds, bucket=bucket, folder=prefix, owner=owner,
                             names=[name + suffixes[b.role] for b in bundles],
                             locations=[f"{bucket}/{key_of(b.manifest)}" for b in bundles],
                             recorded_folder=str(previous.get("prefix") or "").strip("/") or None)
        except BakeError:
            if created:     # made empty just now: the refused publish leaves the cloud as it was
                clients.s3.delete_bucket(Bucket=bucket)
            raise
        for b in bundles:
            for part in b.parts:
                if upload_file(clients, part, bucket, key_of(part), opts, creds, metadata=meta):
                    sent += 1
                else:
                    skipped += 1
                count(part)
            # the manifest last: a manifest in the bucket means its parts are there
            changed[b.role] = upload_file(clients, b.manifest, bucket, key_of(b.manifest), opts, creds, metadata=meta)
            sent += changed[b.role]
            skipped += not changed[b.role]
            count(b.manifest)
    log.info("uploaded %d file(s), %d already there", sent, skipped)
    ids: dict[str, str] = {}
    fence.check(f"registering {build.id}'s images")
    with step("Registering the kernel, ramdisk and image"):
        for b in bundles:
            location = f"{bucket}/{key_of(b.manifest)}"
            # a machine image without its own kernel/ramdisk takes the cloud's defaults; an
            # image registered for this location is the build's own (its folder was checked)
            image_id, new = register(
                clients, location, name + suffixes[b.role], b.image_type, b.arch, creds,
                replace=changed[b.role] and not released,   # a released image keeps its id
                kernel_id=ids.get("kernel") if b.role == "image" else None,
                ramdisk_id=ids.get("ramdisk") if b.role == "image" else None)
            ids[b.role] = image_id
            section["images"][b.role] = {
                "id": image_id, "type": b.image_type, "manifest_location": location, "registered_now": new,
                "objects": [key_of(p) for p in b.parts] + [key_of(b.manifest)]}
    section.update(kernel_id=ids.get("kernel"), ramdisk_id=ids.get("ramdisk"), image_id=ids["image"],
                   image_name=name, owner=owner, uploaded=sent, already_uploaded=skipped,
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
    bucket = opts.bucket or cloud.get("bucket") or _default_bucket(creds)
    recorded = str(cloud.get("prefix") or "").strip("/")
    if recorded and (opts.prefix is None or opts.prefix.strip("/") == recorded):
        prefix = recorded       # where it was uploaded, as an earlier version of bake named it too
    else:
        prefix = build_folder(build, opts.prefix)
    key_of = (lambda p: f"{prefix}/{p.name}") if prefix else (lambda p: p.name)
    owner = build.data.get("publish_owner")
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
    released = build.data.get("released")
    if isinstance(released, dict) and released.get("marker"):
        keys.append(key_of(Path(released["marker"])))     # the release marker `bake release` put beside them
    removed: dict[str, Any] = {"images": [], "objects": [], "bucket": None}
    with step("Deregistering images"):
        for role in ("image", "ramdisk", "kernel"):   # the EMI names the EKI/ERI: it goes first
            ids = {im["ImageId"] for im in find_images(clients, locations[role], creds)} \
                if role in locations and _ours(clients, locations[role], owner, creds) else set()
            if images.get(role, {}).get("id"):
                ids.add(images[role]["id"])
            for image_id in sorted(ids):
                deregister(clients, image_id, creds)
                removed["images"].append(image_id)
    with step(f"Deleting the bundles from {bucket}"):
        for key in keys:
            if not _ours(clients, f"{bucket}/{key}", owner, creds):
                continue
            if delete_object(clients, bucket, key, opts, creds):
                removed["objects"].append(key)
        if cloud.get("bucket_created"):
            try:
                clients.s3.delete_bucket(Bucket=bucket)
                removed["bucket"] = bucket
            except ClientError as e:
                if error_code(e) not in ("BucketNotEmpty", "409", *MISSING_CODES):
                    raise cloud_error(e, f"deleting bucket {bucket}", creds) from None
                log.info("bucket %s kept: %s", bucket, error_code(e))
    build.data.pop("cloud", None)
    build.save()
    return removed


def _ours(clients: Clients, location: str, owner: str | None, creds: Credentials) -> bool:
    """Whether the object at `location` (BUCKET/KEY) may be removed by the build `owner`:
    it carries no other build's owner tag."""
    bucket, _, key = location.partition("/")
    who = object_owner(clients, bucket, key, creds)
    if who and who != owner:
        log.warning("%s is kept: it belongs to build %s", location, who.rpartition("/")[0])
        return False
    return True
