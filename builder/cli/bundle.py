"""`bake bundle` and `bake unbundle`, with the options of euca-bundle-image and
euca-unbundle, which operators already know.

On success each prints only the path(s) it made on stdout (manifest or image), one per
line; progress goes to stderr, errors are BakeErrors.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import tempfile
from pathlib import Path

from builder.bundle.build import bundle_and_record
from builder.bundle.files import first_missing, removed_on_failure
from builder.bundle.keys import credentials_wanted, resolve_keys
from builder.bundle.reader import unbundle
from builder.bundle.writer import PART_SIZE, bundle_image
from builder.core.errors import BakeError
from builder.core.record import Build


def parse_block_device_mappings(text: str) -> dict[str, str]:
    """`ami=sda1,root=/dev/sda1,...` as a dict; "none" or "" for no mappings."""
    if text.strip().lower() in ("", "none"):
        return {}
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        virtual, eq, device = item.partition("=")
        if not eq or not virtual.strip() or not device.strip():
            raise BakeError(f"block device mapping {item.strip()!r}: must be VIRTUAL=DEVICE, e.g. ami=sda1")
        out[virtual.strip()] = device.strip()
    return out


def register(subparsers) -> None:
    """Add the `bundle` and `unbundle` subcommands."""
    p = subparsers.add_parser(
        "bundle",
        help="make EC2/Eucalyptus bundles (euca-bundle-image): of an image, or of a build's kernel, ramdisk and image",
        description="Bundle one image (-i IMAGE), or the kernel, ramdisk and image of a build directory, "
                    "for upload to Walrus/S3. Credentials default to EC2_CERT, EC2_PRIVATE_KEY, EUCALYPTUS_CERT "
                    "and EC2_USER_ID. With none at all, a build directory is bundled locally, as a bake does: "
                    "with a key pair of the build's own (BUILD_DIR/bundle-keys/), marked local, and bundled "
                    "again for the cloud by `bake publish`. Prints the manifest path(s).")
    p.add_argument("build", nargs="?", metavar="BUILD_DIR", help="a build directory (output/<recipe>/<id>) to bundle")
    p.add_argument("-i", "--image", metavar="FILE", help="the image file to bundle")
    p.add_argument("-c", "--cert", metavar="FILE", help="your X.509 certificate (default: $EC2_CERT)")
    p.add_argument("-k", "--privatekey", metavar="FILE",
                   help="your private key, which signs the manifest (default: $EC2_PRIVATE_KEY)")
    p.add_argument("--ec2cert", metavar="FILE", help="the cloud's X.509 certificate (default: $EUCALYPTUS_CERT)")
    p.add_argument("-u", "--user", metavar="ACCOUNT", help="your 12-digit account id (default: $EC2_USER_ID)")
    p.add_argument("-d", "--destination", metavar="DIR",
                   help="where to write the bundle (default: a new bundle-XXXXXX under $TMPDIR or /var/tmp; "
                        "for a build, BUILD_DIR/bundle)")
    p.add_argument("-p", "--prefix", help="file name prefix and image name (default: the image's file name)")
    p.add_argument("-r", "--arch", choices=("i386", "x86_64", "armhf"),
                   help="the image's architecture (default: x86_64, or the build's)")
    p.add_argument("--kernel", metavar="ID", help="kernel id for a machine image, or 'true' if the image is a kernel")
    p.add_argument("--ramdisk", metavar="ID",
                   help="ramdisk id for a machine image, or 'true' if the image is a ramdisk")
    p.add_argument("-B", "--block-device-mappings", "--block-device-mapping", dest="block_device_mappings",
                   metavar="VIRTUAL=DEVICE,...",
                   help="machine image block device mappings "
                        "(default: ami=sda1,root=/dev/sda1,ephemeral0=sda2,swap=sda3; "
                        "'none' for none)")
    p.add_argument("--image-type", choices=("machine", "kernel", "ramdisk"), help=argparse.SUPPRESS)
    p.add_argument("--part-size", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bundle)

    u = subparsers.add_parser(
        "unbundle", help="check and decode a bundle back into its image (euca-unbundle)",
        description="Verify every part's digest, the image digest and size, and, only when -c names the "
                    "signer's certificate, the manifest's signature; then write the image. Prints the image path.")
    u.add_argument("-m", "--manifest", metavar="FILE", required=True, help="the bundle's manifest")
    u.add_argument("-k", "--privatekey", metavar="FILE",
                   help="the private key that opens the bundle: the user's, or the cloud's (default: $EC2_PRIVATE_KEY)")
    u.add_argument("-s", "--source", metavar="DIR", help="directory holding the parts (default: the manifest's)")
    u.add_argument("-d", "--destination", metavar="DIR", default=".", help="where to write the image (default: .)")
    u.add_argument("-c", "--cert", metavar="FILE", help="verify the manifest's signature against this certificate")
    u.set_defaults(func=cmd_unbundle)


def _type_and_ids(args) -> tuple[str, str | None, str | None]:
    image_type = args.image_type or "machine"
    if args.kernel == "true":
        image_type = "kernel"
    if args.ramdisk == "true":
        if image_type == "kernel":
            raise BakeError("--kernel true and --ramdisk true: an image is a kernel or a ramdisk, not both")
        image_type = "ramdisk"
    return image_type, args.kernel, args.ramdisk


def _check_readable_image(image: Path) -> None:
    # Checked before any destination folder is made, so that a typo costs nothing.
    try:
        with open(image, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise BakeError(f"{image}: not a regular file")
    except OSError as e:
        raise BakeError(f"{image}: cannot read the image ({e.strerror})") from None


def _default_destination_parent() -> Path:
    return Path(os.environ.get("TMPDIR") or os.environ.get("TEMP") or os.environ.get("TMP") or "/var/tmp")


def cmd_bundle(args) -> int:
    keys = resolve_keys({"cert": args.cert, "private_key": args.privatekey,
                         "cloud_cert": args.ec2cert, "user_id": args.user})
    bdm = parse_block_device_mappings(args.block_device_mappings) if args.block_device_mappings is not None else None
    part_size = args.part_size or PART_SIZE
    if args.build:
        return _bundle_build_dir(args, keys, bdm, part_size)
    if not args.image:
        raise BakeError("nothing to bundle: give -i IMAGE or a build directory")
    if keys is None:
        raise BakeError(f"bundling an image needs {credentials_wanted()} (a build directory, `bake bundle BUILD_DIR`, "
                        "is bundled locally without them)")
    return _bundle_one_image(args, keys, bdm, part_size)


def _bundle_build_dir(args, keys, bdm, part_size: int) -> int:
    if args.image:
        raise BakeError("give either a build directory or -i IMAGE, not both")
    for opt, value in (("-p/--prefix", args.prefix), ("--kernel", args.kernel), ("--ramdisk", args.ramdisk),
                       ("-d/--destination", args.destination), ("--image-type", args.image_type)):
        if value:
            raise BakeError(f"{opt} applies to a single image (-i), not to a build directory")
    build = Build.load(args.build)
    with build.lock():
        records, local = bundle_and_record(build, keys, arch=args.arch, block_device_mapping=bdm, part_size=part_size)
    for entry in records.values():
        print(build.dir / entry["manifest"])
    if local:
        own = build.dir / "bundle-keys"
        print(f"note: bundled locally, as no credentials were given ({credentials_wanted(short=True)}): these bundles "
              f"are signed and sealed with the build's own key pair ({own}/) and addressed to no cloud; "
              "`bake publish` bundles the build again with the cloud's certificate\n"
              f"note: to check one: bake unbundle -m MANIFEST -k {own / 'local-pk.pem'} -c {own / 'local-cert.pem'}",
              file=sys.stderr)
    return 0


def _bundle_one_image(args, keys, bdm, part_size: int) -> int:
    image = Path(args.image)
    image_type, kernel_id, ramdisk_id = _type_and_ids(args)
    _check_readable_image(image)
    if args.destination:
        destination = Path(args.destination)
        made = first_missing(destination)
    else:
        parent = _default_destination_parent()
        try:
            destination = made = Path(tempfile.mkdtemp(prefix="bundle-", dir=parent))
        except OSError as e:
            raise BakeError(f"{parent}: cannot make a folder for the bundle there ({e.strerror}); "
                            "give -d DIR or set TMPDIR") from None
    with removed_on_failure(made):
        result = bundle_image(
            image, destination, prefix=args.prefix, image_type=image_type, arch=args.arch or "x86_64",
            user_id=keys.user_id, user_cert=keys.cert, user_key=keys.private_key, cloud_cert=keys.cloud_cert,
            kernel_id=kernel_id, ramdisk_id=ramdisk_id, block_device_mapping=bdm, part_size=part_size,
        )
    print(result.manifest)
    return 0


def cmd_unbundle(args) -> int:
    key = args.privatekey or os.environ.get("EC2_PRIVATE_KEY") or os.environ.get("EUCA_PRIVATE_KEY")
    if not key:
        raise BakeError("unbundling needs the private key that opens the bundle: give -k or set EC2_PRIVATE_KEY")
    destination = Path(args.destination)
    with removed_on_failure(first_missing(destination)):
        image = unbundle(Path(args.manifest), private_key=Path(os.path.expanduser(key)),
                         source_dir=Path(args.source) if args.source else None,
                         destination=destination, cert=Path(args.cert) if args.cert else None)
    if not args.cert:
        print("note: the manifest's signature was NOT checked (give -c CERT, the certificate of the key that "
              "signed it, to check it); every part's digest, the image's digest and its size were", file=sys.stderr)
    print(image)
    return 0
