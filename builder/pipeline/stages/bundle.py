"""The bundle stage: the build's kernel, ramdisk and image as EC2/Eucalyptus bundles.

Each recorded output becomes a bundle in its own fresh directory,
`<build>/bundle/<role>/` (kernel → type kernel, ramdisk → type ramdisk, image → a
machine image with the default block device mapping), and build.json's "bundle"
section records, per role, the manifest, its parts with sizes and SHA-1s, the sizes and
digests, and which image and which certificates it was made from.

With no bundle credentials configured at all (recipe `bundle` section, an eucarc named
by the recipe's `publish` section, or EC2_CERT/EC2_PRIVATE_KEY/EUCALYPTUS_CERT/
EC2_USER_ID), the build stays local: the bundles are made with a key pair generated for
this build (`<build>/bundle-keys/`, private), so they are complete and can be checked and
unpacked with `bake unbundle`, and build.json marks them `local`. A bundle is addressed
to one cloud (its AES key is sealed with that cloud's certificate), so publishing makes
new bundles with the cloud's certificate. `bake bundle BUILD_DIR` bundles through the
same function as this stage (`bundle_and_record`), with the credentials of its options
or the environment, locally when there are none. Half-configured credentials are an
error: that is a mistake to fix.

A rerun whose image and certificates did not change keeps the existing bundles (a new
bundle has a new AES key and new parts, which would make an interrupted upload start
over).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from builder.bundle.build import LOCAL_NOTE, ec2_arch, bundle_and_record
from builder.bundle.keys import resolve_keys
from builder.bundle.writer import PART_SIZE
from builder.core.record import Build
from builder.pipeline.context import BuildContext
from builder.cloud.credentials import parse_eucarc

log = logging.getLogger("bake.bundle")


def _eucarc_values(recipe) -> dict[str, str]:
    publish = getattr(recipe, "publish", None) or {}
    rc = publish.get("eucarc") if isinstance(publish, dict) else None
    if not rc:
        return {}

    return parse_eucarc(Path(os.path.expandvars(str(rc))).expanduser())


def _arch_of(recipe, build: Build) -> str:
    return ec2_arch(getattr(recipe, "arch", None) or build.data.get("arch"))


def run(ctx: BuildContext) -> None:
    """Bundle the build (see the module's doc)."""
    run_on(ctx.build, ctx.recipe)


def run_on(build: Build, recipe) -> dict[str, Any]:
    """Bundle `build` as `recipe`'s bundle section says; returns build.json's "bundle"
    section, or {} when the recipe turns the stage off."""
    section = dict(getattr(recipe, "bundle", None) or {})
    if section.get("enabled") is False:
        build.record_stage("bundle", skipped="disabled in the recipe")
        return {}
    keys = resolve_keys({k: section.get(k) for k in ("cert", "private_key", "cloud_cert", "user_id")},
                        eucarc=_eucarc_values(recipe), wording="recipe")
    if keys is None:
        log.warning("note: %s", LOCAL_NOTE)
    records, _ = bundle_and_record(build, keys, arch=_arch_of(recipe, build),
                                   block_device_mapping=section.get("block_device_mapping"),
                                   part_size=int(section.get("part_size") or PART_SIZE),
                                   image_prefix=section.get("prefix"), reuse=True)
    return records
