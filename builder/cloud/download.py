"""Download an image registered in the cloud and decrypt it with the user's own key, as
`euca-download-bundle` and `euca-unbundle` do: where an image evolved from an EMI
(a recipe's `base: {emi: ...}`) starts.

DescribeImages says where the EMI's manifest is (`bucket/prefix.manifest.xml`), which
account owns it, and which kernel (EKI) and ramdisk (ERI) it boots with. Every manifest
is read first, and each must open with the user's private key: a bundle's AES key is
sealed to the certificate of whoever bundled it (`user_encrypted_key`) and to the
cloud's (`ec2_encrypted_key`, which only the cloud can open), so an image bundled by
another account cannot be decrypted here however readable its parts are, and that is
said before any part is fetched. The parts are then fetched from beside the manifest,
each part's SHA-1 checked as it arrives, and unbundled by `builder.bundle.reader`, which
checks the tar stream's digest and the size the manifest declares, and, when the user's
certificate (EC2_CERT) is given, the manifest's signature: anyone may seal a bundle to a
public certificate, only its owner can sign it.

Everything is written in a hidden work folder inside `dest`, removed however the
download ends; the decrypted files are moved into `dest` only once all are complete,
and a `dest` this call created is removed again when it fails.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from botocore.exceptions import BotoCoreError, ClientError

from builder.core import events
from builder.core.record import sha256_file
from ..bundle import crypto
from ..bundle.files import first_missing, os_errors_as_bake_errors, private_directory, removed_on_failure
from ..bundle.manifest import Manifest, parse
from ..bundle.reader import opens_user_key, unbundle
from builder.core.errors import BakeError
from builder.core.log import step
from .calls import MISSING_CODES, cloud_error, error_code, with_retries
from .clients import Clients, make_clients
from .credentials import Credentials

log = logging.getLogger("bake.cloud")

# Progress is reported under the stage a base image stands in for.
PROGRESS_STAGE = "bootstrap"
CHUNK = 1 << 20
MAX_MANIFEST = 16 << 20         # a manifest lists ~100 parts per GB: a few kB
DENIED_CODES = {"AccessDenied", "403", "Forbidden"}
UNKNOWN_CODES = {"InvalidAMIID.NotFound", "InvalidAMIID.Malformed", "InvalidAMIID.Unavailable"}
GONE_STATES = ("deregistered", "failed")
KIND = {"machine": "machine image (EMI)", "kernel": "kernel image (EKI)", "ramdisk": "ramdisk image (ERI)"}


@dataclass
class DownloadedImage:
    """An image taken back from the cloud, decrypted, in `dest`."""

    image_id: str               # the EMI
    image: Path                 # the decrypted partition image (sparse)
    kernel: Path | None         # the EMI's kernel, decrypted likewise, when it has one and it was asked for
    ramdisk: Path | None        # its ramdisk, likewise
    manifest: str               # "bucket/prefix.manifest.xml" of the EMI
    owner: str                  # the image's owner account id as the cloud reports it
    sha256: str                 # of the decrypted image


@dataclass
class _Retry:
    """How often a failed transfer is tried again (see calls.with_retries)."""

    attempts: int = 4
    backoff: float = 1.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)


class _Missing(Exception):
    pass


class _Denied(Exception):
    pass


@dataclass
class _Bundle:
    """One image to download: what the cloud says of it and, once read, its manifest."""

    role: str                   # "image", "kernel" or "ramdisk"
    image_id: str
    what: str                   # how messages name it: "emi-…", "eki-… (the kernel of emi-…)"
    owner: str
    location: str
    bucket: str
    key: str
    manifest: Manifest | None = None

    def object_key(self, filename: str) -> str:
        """The key of a file the manifest names: parts lie beside the manifest."""
        folder = self.key.rpartition("/")[0]
        return f"{folder}/{filename}" if folder else filename


def download_image(creds: Credentials, image_id: str, dest: Path, *, with_boot: bool = True) -> DownloadedImage:
    """Download EMI `image_id` (and, with `with_boot`, the kernel and ramdisk it names)
    from the cloud of `creds`, decrypt it with the user's private key (EC2_PRIVATE_KEY)
    and check it against its manifest; the files are written into `dest` under the names
    their manifests give them (replacing files of those names).

    BakeErrors say what to do when the id is unknown or not a machine image, a manifest
    cannot be read, the bundle was sealed to another account's certificate, or a part is
    missing or damaged. On any failure, KeyboardInterrupt included, `dest` is left as it
    was (a `dest` this call created is removed)."""
    dest = Path(dest)
    private_key = _private_key(creds, image_id)
    clients = make_clients(creds)
    bundles = _bundles_of(clients, creds, image_id, with_boot)
    created = first_missing(dest)
    with removed_on_failure(created):
        private_directory(dest)
        with os_errors_as_bake_errors(f"downloading {image_id} into {dest}"):
            work = Path(tempfile.mkdtemp(prefix=f".{image_id}.", suffix=".download", dir=dest))
        try:
            with step(f"Downloading {image_id} from {bundles[0].bucket}"):
                for b in bundles:
                    _read_manifest(clients, creds, b, work / b.role, private_key)
                images = _download_and_unbundle(clients, creds, bundles, work, private_key)
            digest = sha256_file(images["image"])
            placed = _place(images, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    emi = bundles[0]
    log.info("downloaded %s (%s) into %s", image_id, emi.location, dest)
    return DownloadedImage(image_id=image_id, image=placed["image"], kernel=placed.get("kernel"),
                           ramdisk=placed.get("ramdisk"), manifest=emi.location, owner=emi.owner, sha256=digest)


def _private_key(creds: Credentials, image_id: str) -> Path:
    if not creds.private_key:
        raise BakeError(f"downloading {image_id} needs your private key to decrypt it: set EC2_PRIVATE_KEY "
                        f"(credentials from {creds.source}), or use the eucarc of your cloud credentials")
    path = Path(creds.private_key)
    if not path.is_file():
        raise BakeError(f"EC2_PRIVATE_KEY={path} (from {creds.source}): no such file")
    crypto.load_private_key(path)   # a passphrase or a file that is no key is said now
    return path


# --- what the cloud says -----------------------------------------------------------------

def _describe(clients: Clients, creds: Credentials, image_id: str) -> dict | None:
    try:
        r = clients.ec2.describe_images(ImageIds=[image_id])
    except ClientError as e:
        if error_code(e) in UNKNOWN_CODES:
            return None
        raise cloud_error(e, f"looking up {image_id}", creds) from None
    except BotoCoreError as e:
        raise cloud_error(e, f"looking up {image_id}", creds) from None
    return next((im for im in r.get("Images", []) if im.get("ImageId") == image_id), None)


def _bundle(image: dict, role: str, what: str) -> _Bundle:
    image_id = image["ImageId"]
    state = image.get("State", "available")
    if state in GONE_STATES:
        raise BakeError(f"{what} is {state} in the cloud: its bundle can no longer be used; "
                        "choose an available image (euca-describe-images)")
    location = (image.get("ImageLocation") or "").lstrip("/")
    bucket, _, key = location.partition("/")
    if image.get("RootDeviceType") == "ebs":
        raise BakeError(f"{what} is EBS-backed: it has no bundle to download; start from an instance-store image "
                        "(one registered from a bundle)")
    if not key:
        raise BakeError(f"{what}: the cloud gives its image location as {location!r}, not bucket/manifest; "
                        "it has no bundle to download")
    return _Bundle(role, image_id, what, str(image.get("OwnerId") or ""), location, bucket, key)


def _bundles_of(clients: Clients, creds: Credentials, image_id: str, with_boot: bool) -> list[_Bundle]:
    """The EMI's bundle, then (with `with_boot`) those of its kernel and ramdisk."""
    image = _describe(clients, creds, image_id)
    if image is None:
        raise BakeError(f"{image_id}: no such image in the cloud at {creds.ec2_url} (or none this account may "
                        "see); check the id with euca-describe-images")
    kind = image.get("ImageType") or "machine"
    if kind != "machine":
        raise BakeError(f"{image_id} is a {KIND.get(kind, kind + ' image')}, not a machine image: give the EMI "
                        "to start from (euca-describe-images lists them)")
    out = [_bundle(image, "image", image_id)]
    if with_boot:
        for role, ref in (("kernel", image.get("KernelId")), ("ramdisk", image.get("RamdiskId"))):
            if not ref:
                continue
            what = f"{ref} (the {role} of {image_id})"
            found = _describe(clients, creds, ref)
            if found is None:
                raise BakeError(f"{what}: the cloud knows no such image; {image_id} cannot boot as registered")
            out.append(_bundle(found, role, what))
    return out


# --- transfers ---------------------------------------------------------------------------

def _fetch(clients: Clients, creds: Credentials, bucket: str, key: str, path: Path, *,
           limit: int | None = None, progress: Callable[[int], None] | None = None) -> str:
    """Write object bucket/key to `path` and return its SHA-1; a transfer that fails
    midway is started again. _Missing or _Denied when the store says so."""
    def get() -> str:
        try:
            r = clients.s3.get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if error_code(e) in MISSING_CODES or error_code(e) == "NoSuchEntity":
                raise _Missing() from None
            if error_code(e) in DENIED_CODES:
                raise _Denied() from None
            raise
        if limit is not None and (r.get("ContentLength") or 0) > limit:
            r["Body"].close()
            raise BakeError(f"{bucket}/{key} is {r['ContentLength']} bytes: too big for a bundle manifest")
        sha1, got = hashlib.sha1(), 0
        with open(path, "wb") as f:
            for chunk in r["Body"].iter_chunks(CHUNK):
                f.write(chunk)
                sha1.update(chunk)
                got += len(chunk)
                if progress is not None:
                    progress(got)
        return sha1.hexdigest()

    with os_errors_as_bake_errors(f"downloading {bucket}/{key}"):
        return with_retries(get, f"downloading {bucket}/{key}", _Retry(), creds)


def _read_manifest(clients: Clients, creds: Credentials, b: _Bundle, folder: Path, private_key: Path) -> None:
    """Fetch and parse `b`'s manifest into `folder`, and make sure the user's key opens it."""
    folder.mkdir(mode=0o700)
    path = folder / Path(b.key).name
    yours = b.owner == creds.user_id
    try:
        _fetch(clients, creds, b.bucket, b.key, path, limit=MAX_MANIFEST)
    except _Missing:
        fix = ("upload its bundle again (bake publish)" if yours
               else f"ask its owner (account {b.owner}) to upload it again")
        raise BakeError(f"{b.what}: its manifest {b.location} cannot be read: it is not in the bucket (deleted after "
                        f"the image was registered?); {fix}, or deregister the image") from None
    except _Denied:
        if yours:
            raise BakeError(f"{b.what}: its manifest {b.location} cannot be read: access denied, although the image "
                            f"is this account's; check that S3_URL ({creds.s3_url}) is the object storage of the "
                            f"cloud at EC2_URL ({creds.ec2_url})") from None
        raise BakeError(f"{b.what}: its manifest {b.location} cannot be read: access denied. The image belongs to "
                        f"account {b.owner}, whose bucket this account may not read; only the account that bundled "
                        "it can decrypt it anyway — ask its owner to re-bundle it for you or to share the image "
                        "file") from None
    try:
        b.manifest = parse(path.read_bytes())
    except BakeError as e:
        raise BakeError(f"{b.what}: its manifest {b.location} cannot be read: {e}") from None
    if not opens_user_key(b.manifest, private_key):
        raise BakeError(_foreign(b, creds))


def _foreign(b: _Bundle, creds: Credentials) -> str:
    msg = (f"{b.what} was bundled with another account's certificate (owner {b.owner or 'unknown'}); only the "
           "account that bundled it can decrypt it — ask its owner to re-bundle it for you or to share the image file")
    if b.owner and b.owner == creds.user_id:
        msg += (f". The owner is this account: it was bundled with a certificate other than the one of your "
                f"private key {creds.private_key} (an earlier one, or another user's)")
    return msg


def _download_and_unbundle(clients: Clients, creds: Credentials, bundles: list[_Bundle], work: Path,
                           private_key: Path) -> dict[str, Path]:
    """Fetch every part (its SHA-1 checked on arrival), unbundle each image, and drop
    its parts once it is out. Returns the decrypted file of each role."""
    total = sum(b.manifest.bundled_size for b in bundles if b.manifest is not None)
    done = 0
    label = f"downloading {bundles[0].image_id}"

    def report(n: int) -> None:
        events.progress(PROGRESS_STAGE, label, n, total, "bytes", final=n >= total)

    out: dict[str, Path] = {}
    for b in bundles:
        m, folder = b.manifest, work / b.role
        assert m is not None
        for part in m.parts:
            key = b.object_key(part.filename)
            before = done

            def progress(got: int, offset: int = before) -> None:  # this part's offset, bound now
                report(offset + got)

            try:
                sha1 = _fetch(clients, creds, b.bucket, key, folder / part.filename, progress=progress)
            except (_Missing, _Denied) as e:
                why = "is missing from the bucket" if isinstance(e, _Missing) else "cannot be read (access denied)"
                raise BakeError(f"{b.what}: part {part.index} of its bundle ({b.bucket}/{key}) {why}: the bundle "
                                "in the cloud is incomplete; it must be uploaded again by its owner") from None
            if sha1 != part.sha1:
                raise BakeError(f"{b.what}: part {part.index} of its bundle ({b.bucket}/{key}) is damaged: its SHA-1 "
                                f"is {sha1}, the manifest says {part.sha1}; the bundle must be uploaded again by "
                                "its owner")
            done = before + (folder / part.filename).stat().st_size
        report(done)
        manifest = folder / Path(b.key).name
        try:
            # the manifest's signature, when the certificate that pairs with the private key
            # is at hand: opening the key proves only that the bundle was sealed to this
            # user's certificate, which is public; the signature, that this user made it
            out[b.role] = unbundle(manifest, private_key=private_key, source_dir=folder,
                                   destination=work / "out" / b.role,
                                   cert=creds.cert if creds.cert is not None and creds.cert.is_file() else None)
        except BakeError as e:
            raise BakeError(f"{b.what}: its bundle ({b.location}) does not decode: {e}") from None
        for part in m.parts:
            (folder / part.filename).unlink(missing_ok=True)
    return out


def _place(images: dict[str, Path], dest: Path) -> dict[str, Path]:
    """Move the decrypted files into `dest`, each under its own name (a role's name
    first when two share one); all of them or, should a move fail, none."""
    names: dict[str, str] = {}
    for role, path in images.items():
        name = path.name
        names[role] = f"{role}-{name}" if name in names.values() else name
    placed: dict[str, Path] = {}
    try:
        with os_errors_as_bake_errors(f"moving the downloaded images into {dest}"):
            for role, path in images.items():
                target = dest / names[role]
                os.replace(path, target)
                placed[role] = target
    except BaseException:
        for target in placed.values():
            target.unlink(missing_ok=True)
        raise
    return placed
