"""Stage bootstrap for a recipe whose `base:` is an existing image.

The image (a bare filesystem, a partitioned disk in any format QEMU reads, a UEC tarball,
a bake build folder, or an EMI downloaded from the cloud) is reduced to its bare root
filesystem, inspected with libguestfs (operating system, release, kernels, label, UUID)
and checked against the recipe's release. Then:

- `method: unpack` takes its root tree out (the host's read-only loop mount and tar where
  bake runs as root, libguestfs's tar_out otherwise), points fstab's root entry at the
  label, and caches the tree by the image's SHA-256: the customize and image stages then
  treat it as they treat a debootstrapped tree;
- `method: guestfs` keeps the filesystem as it is, grown by `grow`, for the light path to
  change in place (no root).

build.json's `base` section says what the base was and which path opened it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from builder.core import exposure, sh
from builder.base import disks, extfs, formats
from builder.base.source import check_release, file_digest, kernel_version, release_of, source_digest
from builder.core.record import Build
from builder.core.cache import TreeCache, cache_root
from builder.core.errors import BakeError
from builder.core.log import step
from builder.pipeline.context import BuildContext
from builder.pipeline.plan import Plan, image_base
from builder.recipe.recipe import Recipe
from builder.image.boot import SOURCE_BOOT, dpkg_status_packages
from builder.image.filesystem import parse_size
from builder.base import readout
from builder.base.hostcopy import copy_tree
from builder.cloud.credentials import load_credentials
from builder.cloud.download import download_image

log = logging.getLogger("bake.base")

@dataclass
class Opened:
    """A base reduced to its bare root filesystem (bake's own copy) and what came with it."""

    unpacked: formats.Unpacked
    record: dict        # build.json's `base` section
    emi_boot: tuple[Path | None, Path | None] = (None, None)


def open_method() -> str:
    """How a root tree is taken out: `host` (read-only loop mount + tar) when bake runs as
    root, else `guestfs`; BAKE_BASE_OPEN=host|guestfs chooses."""
    forced = os.environ.get("BAKE_BASE_OPEN", "").strip().lower()
    if forced in ("host", "guestfs"):
        return forced
    if forced:
        raise BakeError(f"BAKE_BASE_OPEN={forced!r}: expected host or guestfs")
    return "host" if os.geteuid() == 0 else "guestfs"


def _source(build: Build, recipe: Recipe, work: Path) -> tuple[formats.Source, dict, tuple]:
    """The recipe's base as a local source, its record so far, and an EMI's kernel and ramdisk."""
    b = image_base(recipe)
    if b.get("emi"):
        creds = load_credentials(recipe.publish)
        if creds is None:
            raise BakeError(f"base.emi {b['emi']}: no cloud configured to download it from (a publish section "
                            "with an eucarc, or EC2_URL/S3_URL and keys in the environment)")
        with step(f"Downloading {b['emi']} and decrypting it with your key"):
            got = download_image(creds, b["emi"], work / "emi", with_boot=b["kernel"] == "from-source")
        src = formats.identify(got.image)
        record = {"source": f"emi:{got.image_id}", "emi": got.image_id, "manifest": got.manifest,
                  "owner": got.owner, "sha256": got.sha256}
        return src, record, (got.kernel, got.ramdisk)
    path = recipe.base_image
    if path is None:
        raise BakeError(f"recipe {recipe.name}: base has neither image nor emi")
    src = formats.identify(path)
    digest = source_digest(recipe) if not b.get("sha256") else \
        (formats.sha256_of(src) if path.is_dir() else file_digest(path))
    if b.get("sha256") and digest != b["sha256"]:
        raise BakeError(f"base.image {path}: its SHA-256 is {digest}, not the {b['sha256']} the recipe pins; "
                        "the file changed (or the pin is wrong): nothing was built")
    return src, {"source": str(path), "sha256": digest}, (None, None)


def open_base(build: Build, recipe: Recipe, work: Path) -> Opened:
    """Reduce the recipe's base to a bare root filesystem under `work`, inspect it and
    check its release; the record for build.json."""
    b = image_base(recipe)
    src, record, emi_boot = _source(build, recipe, work)
    with step(f"Opening the base {record['source']} ({src.kind}, {src.format})"):
        try:
            unpacked = formats.unpack(src, work / "base", partition=b["partition"])
        except disks.NoRootPartition as e:
            # a layout the host cannot read (a root on LVM): libguestfs finds and copies it
            log.info("%s; asking libguestfs", e)
            unpacked, record["root_device"] = _root_by_libguestfs(src, work / "base")
    with step("Inspecting the base with libguestfs"):
        facts = readout.inspect(unpacked.image)
    found = None
    if facts.get("distro") and facts.get("codename"):
        found = (facts["distro"], facts["codename"])
    else:
        found = release_of(*(_text(extfs.read_file(unpacked.image, p))
                             for p in ("/etc/os-release", "/etc/lsb-release", "/etc/debian_version")))
    check_release(recipe, found, f"base {record['source']}")
    assert found is not None  # check_release refuses a base whose release it cannot tell
    fs = unpacked.fs
    record.update({
        "type": src.kind, "format": src.format, "members": dict(src.members),
        "distro": found[0], "release": found[1], "version": facts.get("version"),
        "product": facts.get("product"), "kernels": facts.get("kernels") or [],
        "init_system": facts.get("init_system"),
        "filesystem": {"type": fs.type, "label": fs.label, "uuid": fs.uuid, "features": fs.features,
                       "size": fs.size},
    })
    if unpacked.partition is not None:
        p = unpacked.partition
        record["partition"] = {"number": p.number, "start": p.start, "size": p.size, "type": p.type}
    return Opened(unpacked, record, emi_boot)


def _root_by_libguestfs(src, work: Path):
    """(`formats.Unpacked`, the root's device in the appliance) of a disk whose root
    filesystem only libguestfs can reach."""
    work.mkdir(parents=True, exist_ok=True)
    image = work / formats.IMAGE_NAME
    with step("Copying the root filesystem out with libguestfs (not on a partition the host reads)"):
        device = readout.root_filesystem(src.path, src.format, image)
    facts = extfs.fs_facts(image)
    if os.path.getsize(image) > facts.size:
        os.truncate(image, facts.size)
    return formats.Unpacked(image=image, kernel=None, ramdisk=None, loader=None, partition=None, fs=facts), device


def _text(data: bytes | None) -> str | None:
    return data.decode("utf-8", "replace") if data is not None else None


def root_label(recipe: Recipe, record: dict) -> str:
    """The label the new image's root filesystem gets: the recipe's when it names one,
    else the base's own (UEC images use uec-rootfs), else the recipe's default."""
    if "label" in recipe.given:
        return recipe.data["label"]
    return record["filesystem"]["label"] or recipe.data["label"]


def fstab_by_label(fstab: str, label: str, fstype: str) -> tuple[str, list[str]]:
    """`fstab` with the root filesystem mounted by `LABEL=label` (whatever named it
    before: `UUID=`, a by-uuid path, a device), and the other `UUID=` lines it keeps (a
    Eucalyptus node gives an instance only its root filesystem: those will not be
    found). A root line is added when there is none."""
    out, others, has_root = [], [], False
    for line in fstab.splitlines(keepends=True):
        fields = line.split()
        if len(fields) > 1 and not fields[0].startswith("#"):
            if fields[1] == "/":
                has_root = True
                line = line.replace(fields[0], f"LABEL={label}", 1)
            elif fields[0].startswith(("UUID=", "/dev/disk/by-uuid/")):
                others.append(line.strip())
        out.append(line)
    if not has_root:
        if out and not out[-1].endswith("\n"):
            out.append("\n")
        out.append(f"LABEL={label}\t/\t{fstype}\tdefaults,errors=remount-ro\t0\t1\n")
    return "".join(out), others


def _take_tree(opened: Opened, tree: Path, how: str) -> None:
    if how == "host":
        with step("Taking the root tree out (read-only loop mount, tar)"):
            copy_tree(opened.unpacked.image, tree)
    else:
        with step("Taking the root tree out (libguestfs tar_out)"):
            readout.extract_tree(opened.unpacked.image, tree)


def _boot_from_source(opened: Opened) -> tuple[Path | None, Path | None]:
    if opened.emi_boot != (None, None):
        return opened.emi_boot
    return opened.unpacked.kernel, opened.unpacked.ramdisk


def run(ctx: BuildContext) -> None:
    """`method: unpack`: make sure the base's root tree is in the cache. A tree freshly
    taken out under the work folder is left in `ctx.fresh_tree` (customize takes it over);
    the plan is made again, as the package checkpoint's key follows the base."""
    ctx.fresh_tree = _unpack(ctx.build, ctx.recipe, ctx.plan, ctx.work)
    ctx.replan()


def _unpack(build: Build, recipe: Recipe, plan: Plan, work: Path) -> Path | None:
    b = image_base(recipe)
    cache = TreeCache(cache_root(Path(build.dir).parent.parent), "base")
    key = plan.bootstrap.key
    with cache.lock(key):
        if cache.has(key):
            meta = cache.meta(key)
            # the same content may have come by another path (or as an EMI): this recipe's is recorded
            b_src = f"emi:{b['emi']}" if b.get("emi") else str(recipe.base_image)
            record = dict(meta["base"], source=b_src, opened_by=f"cache (opened by {meta['base'].get('opened_by')})")
            # the key is the image's content, not the release a recipe expects of it
            check_release(recipe, (record["distro"], record["release"]), f"base {record['source']}")
            recipe.data["label"] = root_label(recipe, record)
            build.set("base", record)
            build.record_stage("bootstrap", cached=True, key=key, namespace="base")
            return None
        opened = open_base(build, recipe, work)
        how = open_method()
        tree = work / "bootstrap"
        if tree.exists():
            sh.discard_tree(tree)
        _take_tree(opened, tree, how)
        record = opened.record
        record["opened_by"] = "host loop mount + tar" if how == "host" else "libguestfs tar_out"
        label = root_label(recipe, record)
        _fix_fstab(tree, record, label, recipe.data["filesystem"])
        kernel, ramdisk = _boot_from_source(opened)
        if b["kernel"] == "from-source":
            if kernel is None:
                raise BakeError(f"base {record['source']} has no kernel of its own; use base.kernel: from-image")
            if ramdisk is None:
                raise BakeError(f"base {record['source']} has a kernel but no ramdisk (Lucid's UEC tarballs carry "
                                "none); use base.kernel: from-image, whose initramfs bake generates")
            keep = tree / SOURCE_BOOT
            keep.mkdir(mode=0o700)
            shutil.copyfile(kernel, keep / "kernel")
            shutil.copyfile(ramdisk, keep / "ramdisk")
        with step("Saving the base's root tree to the cache"):
            cache.save(key, tree, {"base": record, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
        sh.discard_tree(work / "base", ignore_errors=True)
        sh.discard_tree(work / "emi", ignore_errors=True)
    recipe.data["label"] = label
    build.set("base", record)
    build.record_stage("bootstrap", cached=False, key=key, namespace="base")
    return tree


def _fix_fstab(tree: Path, record: dict, label: str, fstype: str) -> None:
    fstab = tree / "etc/fstab"
    if fstab.is_symlink():
        raise BakeError(f"base {record['source']}: /etc/fstab is a symbolic link; bake rewrites it in place")
    text = fstab.read_text() if fstab.exists() else ""
    new, others = fstab_by_label(text, label, fstype)
    if new != text:
        st = fstab.stat() if fstab.exists() else None
        fstab.write_text(new)
        if st is not None:
            os.chown(fstab, st.st_uid, st.st_gid)
            os.chmod(fstab, st.st_mode & 0o7777)
    record["fstab"] = f"/ mounted by LABEL={label}"
    for line in others:
        log.warning("the base's fstab keeps %r: a Eucalyptus instance has only its root filesystem", line)


# --- the light path ---------------------------------------------------------------------

def open_in_place(ctx: BuildContext) -> None:
    """`method: guestfs`: the base's bare root filesystem under the work folder, grown by
    `base.grow`, left in `ctx.opened` for the appliance to change in place."""
    build, recipe = ctx.build, ctx.recipe
    opened = open_base(build, recipe, ctx.work)
    grow = parse_size(image_base(recipe)["grow"]) if image_base(recipe)["grow"] not in ("0M", "0G") else 0
    if grow:
        with step(f"Growing the base's filesystem by {image_base(recipe)['grow']}"):
            extfs.grow(opened.unpacked.image, grow)
    opened.record["opened_by"] = "libguestfs in place"
    opened.record["grown_by"] = grow
    recipe.data["label"] = opened.record["filesystem"]["label"] or recipe.data["label"]
    build.set("base", opened.record)
    build.record_stage("bootstrap", cached=False, namespace=None)
    ctx.opened = opened


def image_in_place(ctx: BuildContext) -> None:
    """The image stage of the appliance route: the changed filesystem becomes the build's
    partition image; kernel and ramdisk from the image's /boot or from the source."""
    build, recipe, opened = ctx.build, ctx.recipe, ctx.opened
    image = build.dir / f"{recipe.name}.img"
    with step("Image: the customized base, kernel, ramdisk"):
        sh.run(["e2fsck", "-f", "-n", str(opened.unpacked.image)], what="checking the customized filesystem",
               quiet=True)
        shutil.move(str(opened.unpacked.image), image)
        if image_base(recipe)["kernel"] == "from-source":
            kernel_src, ramdisk_src = _boot_from_source(opened)
            if kernel_src is None or ramdisk_src is None:
                raise BakeError(f"base {opened.record['source']} has no kernel and ramdisk of its own; "
                                "use base.kernel: from-image")
            version = kernel_version(kernel_src) or "source"
            kernel, ramdisk = build.dir / f"vmlinuz-{version}", build.dir / f"initrd.img-{version}"
            shutil.copyfile(kernel_src, kernel)
            shutil.copyfile(ramdisk_src, ramdisk)
        else:
            kernel, found_ramdisk, version = readout.boot_files(image, build.dir)
            if found_ramdisk is None:
                raise BakeError(f"the base's kernel {version} has no initrd in /boot, and the light path makes "
                                "none: use method: unpack")
            ramdisk = found_ramdisk
        for p in (image, kernel, ramdisk):
            exposure.private_file(p)
        build.record_output("kernel", kernel)
        build.record_output("ramdisk", ramdisk)
        build.record_output("image", image)
        build.set("kernel_version", version)
        status = extfs.read_file(image, "/var/lib/dpkg/status")
        build.set("packages", dpkg_status_packages(status.decode("utf-8", "replace")) if status else [])
        fs = extfs.fs_facts(image)
        build.set("filesystem", {"type": fs.type, "label": fs.label, "size": fs.size, "features": fs.features})
    build.record_stage("image")

