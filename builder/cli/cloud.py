"""`bake publish BUILD_DIR` and `bake unpublish BUILD_DIR`."""

from __future__ import annotations

import argparse
from dataclasses import replace

from builder.cloud.credentials import load_credentials
from builder.core.errors import BakeError
from builder.core.record import Build
from builder.recipe.recipe import recipe_of


def _recipe_publish_section(build) -> dict:
    """The publish section of the recipe the build was baked from, when it is still there."""
    recipe = recipe_of(build)
    return recipe.publish if recipe is not None else {}


def _setup(args, *, where_published: bool = False):
    """The build, credentials and options of a publish or unpublish command. With
    `where_published`, the bucket and prefix build.json records from publishing come
    before the recipe's: what was uploaded is where it was uploaded, even if the recipe
    was edited since."""
    from builder.cloud.publish import PublishOptions  # noqa: PLC0415 (boto3: loaded by the commands that reach a cloud)

    build = Build.load(args.build_dir)
    section = _recipe_publish_section(build)
    creds = load_credentials(section, eucarc=args.eucarc)
    if creds is None:
        raise BakeError("no cloud configured: source an eucarc (or pass --eucarc), or set EC2_URL, S3_URL, "
                        "EC2_ACCESS_KEY and EC2_SECRET_KEY")
    opts = PublishOptions.from_section(section, bucket=args.bucket, prefix=args.prefix,
                                       image_name=getattr(args, "name", None))
    if where_published:
        recorded = build.data.get("cloud") or {}
        opts = replace(opts, **{k: recorded[k] for k in ("bucket", "prefix")
                                if getattr(args, k) is None and recorded.get(k)})
    return build, creds, opts


def cmd_publish(args) -> int:
    from builder.cloud.publish import publish  # noqa: PLC0415 (boto3: loaded by the commands that reach a cloud)

    build, creds, opts = _setup(args)
    with build.lock():
        cloud = publish(build, creds, opts)
    for role in ("kernel", "ramdisk", "image"):
        if cloud.get(role + "_id"):
            print(f"{role}\t{cloud[role + '_id']}")
    return 0


def cmd_unpublish(args) -> int:
    from builder.cloud.publish import unpublish  # noqa: PLC0415 (boto3: loaded by the commands that reach a cloud)

    build, creds, opts = _setup(args, where_published=True)
    with build.lock():
        removed = unpublish(build, creds, opts)
    for image_id in removed["images"]:
        print(f"deregistered\t{image_id}")
    print(f"deleted\t{len(removed['objects'])} object(s)"
          + (f" and bucket {removed['bucket']}" if removed["bucket"] else ""))
    return 0


def _common(sp: argparse.ArgumentParser, *, bucket: str, prefix: str) -> None:
    sp.add_argument("build_dir", metavar="BUILD_DIR", help="a build directory, output/<recipe>/<build-id>")
    sp.add_argument("--eucarc", help="read endpoints and credentials from this eucarc (default: the environment)")
    sp.add_argument("--bucket", help=bucket)
    sp.add_argument("--prefix", help=prefix)


def register(subparsers) -> None:
    """Add `publish` and `unpublish` to the `bake` command."""
    sp = subparsers.add_parser("publish", help="upload a build's bundles and register its kernel, ramdisk and image",
                               description="Upload the build's bundles (bundling first if needed) to Walrus/S3 and "
                                           "register EKI, ERI and EMI. Safe to re-run: only missing or changed files "
                                           "are sent, registered images are reused. Prints the image ids.")
    _common(sp, bucket="bucket to upload to (default: the recipe's publish.bucket, else the bucket of an earlier "
                       "publish, else bake-images-<account number>)",
            prefix="a folder in the bucket above the build's own, PREFIX/<recipe>/<build-id>/ (default: the "
                   "recipe's publish.prefix, else the folder of an earlier publish, else none); also the front "
                   "of the image names")
    sp.add_argument("-n", "--name", help="image name before -<build-id> (default: the recipe's name)")
    sp.set_defaults(func=cmd_publish)
    sp = subparsers.add_parser("unpublish", help="deregister a build's images and delete its uploaded bundles")
    _common(sp, bucket="bucket to delete the build's bundles from (default: the bucket build.json records from "
                       "publishing, else the recipe's publish.bucket, else bake-images-<account number>)",
            prefix="the folder the bundles were uploaded under, PREFIX/<recipe>/<build-id>/ (default: the one "
                   "build.json records, else the recipe's publish.prefix, else <recipe>/<build-id>)")
    sp.set_defaults(func=cmd_unpublish)
