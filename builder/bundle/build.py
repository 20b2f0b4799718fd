"""A build's kernel, ramdisk and image as EC2/Eucalyptus bundles, recorded in its build.json.

Each recorded output becomes a bundle in its own fresh directory,
`<build>/bundle/<role>/` (kernel → type kernel, ramdisk → type ramdisk, image → a
machine image with the default block device mapping), and build.json's "bundle"
section records, per role, the manifest, its parts with sizes and SHA-1s, the sizes and
digests, and which image and which certificates it was made from. The bundle stage,
`bake bundle BUILD_DIR` and publishing all come here (`bundle_and_record`,
`bundle_build`), so a build bundled any way looks the same to publishing.

A rerun whose image and certificates did not change keeps the existing bundles (a new
bundle has a new AES key and new parts, which would make an interrupted upload start
over).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from builder.bundle.keys import BundleKeys, local_keys
from builder.bundle.writer import PART_SIZE, bundle_image
from builder.core.errors import BakeError
from builder.core.log import step
from builder.core.record import Build

log = logging.getLogger("bake.bundle")

# build output role → bundle image type, in the order a cloud registers them
ROLES = (("kernel", "kernel"), ("ramdisk", "ramdisk"), ("image", "machine"))
LOCAL_NOTE = ("no bundle credentials (EC2_CERT, EC2_PRIVATE_KEY, EUCALYPTUS_CERT, EC2_USER_ID or the recipe's "
              "bundle section): bundled locally with a key pair made for this build (bundle-keys/); "
              "publishing bundles again for the cloud")

def _prefix_for(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", path.name).strip(".") or "image"
    return name


def _up_to_date(build: Build, keys: BundleKeys, roles: list[str], settings: dict) -> bool:
    section = build.data.get("bundle") or {}
    made_with = keys.describe()
    for role in roles:
        entry = section.get(role)
        output = (build.data.get("outputs") or {}).get(role) or {}
        if not entry or entry.get("image_sha256") != output.get("sha256") or entry.get("keys") != made_with:
            return False
        if entry.get("settings") != settings:
            return False
        files = [entry["manifest"]] + [p["path"] for p in entry.get("parts", [])]
        if not all((build.dir / f).is_file() for f in files):
            return False
        if any((build.dir / p["path"]).stat().st_size != p["size"] for p in entry["parts"]):
            return False
    return set(section) == set(roles)


def bundle_build(build: Build, keys: BundleKeys, *, arch: str | None = None,
                 block_device_mapping: dict | None = None, part_size: int = PART_SIZE,
                 image_prefix: str | None = None, reuse: bool = False) -> dict[str, Any]:
    """Bundle the build's kernel, ramdisk and image (those it records; the image is
    required) into `<build>/bundle/<role>/`, record build.json "bundle", return it.

    Bundles are named after the files (`vmlinuz-…`, `initrd…`, which Eucalyptus also
    reads as "kernel" and "ramdisk"); `image_prefix` renames the machine image's.

    The new bundles are written beside the old ones and replace them only once all are
    complete. With `reuse`, bundles already made from the same images and certificates
    are kept.
    """
    outputs = build.data.get("outputs") or {}
    roles = [role for role, _ in ROLES if role in outputs]
    if "image" not in roles:
        build.output_path("image")  # raises the usual "this build has no image"
    arch = arch or build.data.get("arch") or "x86_64"
    settings = {"arch": arch, "part_size": part_size, "block_device_mapping": block_device_mapping,
                "image_prefix": image_prefix}
    if reuse and _up_to_date(build, keys, roles, settings):
        log.info("bundles of %s are up to date", build.dir)
        return build.data["bundle"]

    made_with = keys.describe()
    final = build.dir / "bundle"
    new = Path(tempfile.mkdtemp(prefix=".bundle.", dir=build.dir))
    try:
        records: dict[str, Any] = {}
        for role, image_type in ROLES:
            if role not in roles:
                continue
            image = build.output_path(role)
            result = bundle_image(
                image, new / role, prefix=(image_prefix if role == "image" and image_prefix else _prefix_for(image)),
                image_type=image_type, arch=arch,
                user_id=keys.user_id, user_cert=keys.cert, user_key=keys.private_key, cloud_cert=keys.cloud_cert,
                kernel_id="true" if image_type == "kernel" else None,
                ramdisk_id="true" if image_type == "ramdisk" else None,
                block_device_mapping=block_device_mapping if image_type == "machine" else None,
                part_size=part_size,
            )
            rec = result.record(new)
            rec["manifest"] = f"bundle/{rec['manifest']}"
            for p in rec["parts"]:
                p["path"] = f"bundle/{p['path']}"
            rec["image_type"] = image_type
            rec["image_sha256"] = outputs[role].get("sha256")
            rec["keys"] = made_with
            rec["settings"] = settings
            records[role] = rec
        old = None
        if final.exists():
            old = build.dir / f".bundle.old.{os.getpid()}"
            os.rename(final, old)
        os.rename(new, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    build.set("bundle", records)
    return records


def ec2_arch(arch: str | None) -> str:
    # Debian's and the kernel's names for the same machines, as the manifest spells them
    arch = arch or "x86_64"
    return {"amd64": "x86_64", "i686": "i386"}.get(arch, arch)


def bundle_and_record(build: Build, keys: BundleKeys | None, *, arch: str | None = None,
                      block_device_mapping: dict | None = None, part_size: int = PART_SIZE,
                      image_prefix: str | None = None, reuse: bool = False) -> tuple[dict[str, Any], bool]:
    """Bundle the build with `keys` or, when None, locally with the build's own key pair
    (`<build>/bundle-keys/`, made on first use), and record the bundle stage in
    build.json (seconds, whether local, and the note saying so). Returns build.json's
    "bundle" section and whether the bundles are local.

    The stage and `bake bundle BUILD_DIR` both come here, so a build bundled either way
    looks the same to publishing."""
    for role, _ in ROLES:
        if role == "image" or role in (build.data.get("outputs") or {}):
            build.output_path(role)  # a missing input is reported before any key or folder is made
    arch = ec2_arch(arch or build.data.get("arch"))
    local = keys is None
    if keys is None:
        keys = local_keys(build.dir / "bundle-keys")
    start = time.monotonic()
    with step("Bundle"):
        records = bundle_build(build, keys, arch=arch, block_device_mapping=block_device_mapping,
                               part_size=part_size, image_prefix=image_prefix, reuse=reuse)
    stage = (build.data.get("stages") or {}).get("bundle") or {}
    for stale in ("note", "skipped"):  # said of earlier bundles (or of none), not of these
        stage.pop(stale, None)
    build.record_stage("bundle", seconds=round(time.monotonic() - start, 2), local=local,
                       **({"note": LOCAL_NOTE} if local else {}))
    return records, local


def recorded_bundles(build: Build) -> dict[str, dict[str, Any]]:
    """build.json's bundles by role, paths made absolute; BakeError when there are none."""
    section = build.data.get("bundle") or {}
    if not section:
        why = ((build.data.get("stages") or {}).get("bundle") or {}).get("skipped")
        raise BakeError(f"{build.dir}: this build has no bundles"
                        + (f" ({why})" if why else " (run `bake bundle` first)"))
    out = {}
    for role, entry in section.items():
        entry = dict(entry)
        entry["manifest"] = build.dir / entry["manifest"]
        entry["parts"] = [dict(p, path=build.dir / p["path"]) for p in entry.get("parts", [])]
        out[role] = entry
    if not isinstance(section.get("image"), dict):
        raise BakeError(f"{build.dir}: build.json's bundle section records no image bundle")
    return out
