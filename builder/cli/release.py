"""`bake release BUILD [--public]` and `bake latest RECIPE [--released]`: their command
lines and what they print; the work is builder/operations/release.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.cli.farm import add_farm_options
from builder.cli.options import add_output
from builder.cloud.credentials import load_credentials
from builder.core.errors import BakeError
from builder.core.record import Build
from builder.farm.connect import STORE_ENV, Farm
from builder.farm.records import FARM_BUILD_ID, mark_released, record_name
from builder.operations.records import image_ids, resolve_build
from builder.operations.attest import verify_release
from builder.operations.release import check_releasable, latest, release
from builder.operations.streams import STREAMS
from builder.recipe.recipe import load_recipe, recipe_of


def _recipe_name(spec: str) -> str:
    if spec.endswith((".yml", ".yaml")) and Path(spec).is_file():
        return load_recipe(spec).name
    return spec


@dataclass
class FarmEntry:
    """The durable record of a farm build in its farm's store, as found before releasing."""

    store: Any
    conn: Any
    name: str
    data: dict[str, Any]


def _farm_record(args, build: Build) -> FarmEntry | None:
    """The farm record of `build` when it is a farm build (its id is a farm job's), found
    before anything changes: a farm build released without its record saying so would be
    collected by `bake gc --farm`."""
    if not FARM_BUILD_ID.match(build.id):
        return None
    if not (args.store or os.environ.get(STORE_ENV)):
        raise BakeError(f"{build.dir} is a farm build (its id {build.id} is a farm job's) and its record in the "
                        f"farm's store must say it is released, or `bake gc --farm` collects it: give the store "
                        f"(--store or {STORE_ENV})")
    farm = Farm.from_args(args, need_redis=False)
    store = farm.store()
    name = record_name(build.dir.parent.name, build.id)
    data = store.get_json(name)
    if not isinstance(data, dict):
        raise BakeError(f"the farm's store {store.url} has no record of {build.dir.parent.name}/{build.id} "
                        f"({name}): is it the store of the farm that made it?")
    conn = None
    if farm.redis_url:
        try:
            conn = farm.redis()
        except BakeError as e:      # the record is still marked; only the lease is not taken
            print(f"bake: warning: {e}", file=sys.stderr)
    return FarmEntry(store, conn, name, data)


def cmd_release_verify(args) -> int:
    """`bake release verify DIR --keyring FILE`: check a signed release."""
    if not args.target or not args.keyring:
        raise BakeError("usage: bake release verify BUILD --keyring FILE (the public key, or keyring, that signs "
                        "the releases)")
    build = resolve_build(args.target, args.output)
    ok, problems = verify_release(build.dir, Path(args.keyring))
    for line in ok:
        print(f"ok\t{line}")
    for line in problems:
        print(f"FAIL\t{line}")
    if problems:
        print(f"bake: error: the release of {build.dir} does not check out: {len(problems)} problem(s)",
              file=sys.stderr)
        return 1
    return 0


def cmd_release(args) -> int:
    if args.build == "verify":
        return cmd_release_verify(args)
    if args.target or args.keyring:
        raise BakeError("bake release takes one BUILD (--keyring is for `bake release verify BUILD`)")
    build = resolve_build(args.build, args.output)
    farm = _farm_record(args, build)
    if farm is not None and build.data.get("released") and not farm.data.get("released") and not args.public:
        # released here before its farm record could say so: say it now
        mark_released(farm.store, build.dir.parent.name, build.id, build.data["released"], farm.conn)
        print(f"released\t{build.dir.parent.name}/{build.id}")
        print(f"farm\t{farm.store.url}{farm.name}")
        return 0
    # said before the recipe and credentials are read
    check_releasable(build, public=args.public, allow_unverified=args.allow_unverified)
    creds = None
    if args.public or image_ids(build)["emi"]:
        recipe = recipe_of(build)
        creds = load_credentials(recipe.publish if recipe is not None else {}, eucarc=args.eucarc)
    rel = release(build, public=args.public, creds=creds, allow_unverified=args.allow_unverified, sign=args.sign)
    if farm is not None:
        mark_released(farm.store, build.dir.parent.name, build.id, rel, farm.conn)
    print(f"released\t{build.dir.parent.name}/{build.id}")
    if farm is not None:
        print(f"farm\t{farm.store.url}{farm.name}")
    for key in ("sha256sums", "sbom", "notes"):
        print(f"{key}\t{build.dir / rel[key]}")
    if rel.get("signed"):
        print(f"signed\t{rel['signed']['key']}")
        for key in ("sha256sums_signature", "provenance"):
            print(f"{key}\t{build.dir / rel['signed'][key]}")
    if rel["public"]:
        print("public\t" + " ".join(i for i in rel["images"].values() if i))
    print(f"stream\t{build.dir.parent.parent / STREAMS / 'index.json'}")
    return 0


def cmd_latest(args) -> int:
    found = latest(args.output, _recipe_name(args.recipe), released=args.released)
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        print(f"build\t{found['recipe']}/{found['build_id']}")
        for key in ("emi", "eki", "eri"):
            if found.get(key):
                print(f"{key}\t{found[key]}")
    return 0


def register(subparsers) -> None:
    """Add `release` and `latest` to the `bake` command."""
    sp = subparsers.add_parser(
        "release", help="release a verified build: SHA256SUMS, SBOM, release notes, stream index; --public",
        description="Release a build whose verification passed: write SHA256SUMS, an SPDX 2.3 SBOM and release "
                    "notes (packages added, removed, upgraded since the recipe's previous release) into the "
                    "build directory, mark it released (gc keeps it) and rebuild the stream index of released "
                    "images (OUTPUT/streams/v1, simplestreams). A build never verified, not verified by every "
                    "check its recipe names, or whose verification failed, is refused.")
    sp.add_argument("build", metavar="BUILD", help="a build directory, RECIPE/BUILD_ID, or a build id; or `verify` "
                                                   "to check a signed release (`bake release verify BUILD --keyring "
                                                   "FILE`)")
    sp.add_argument("target", metavar="VERIFIED_BUILD", nargs="?", help=argparse.SUPPRESS)
    sp.add_argument("--sign", metavar="KEY",
                    help="sign the release with this GnuPG key (its fingerprint; GNUPGHOME is respected): "
                         "SHA256SUMS.gpg, a signed in-toto SLSA provenance statement (provenance.intoto.jsonl) "
                         "and the signed stream index (index.sjson)")
    sp.add_argument("--keyring", metavar="FILE",
                    help="with `verify`: the public key (armored or binary) or keyring the release must be "
                         "signed by")
    sp.add_argument("--public", action="store_true",
                    help="also grant launch permission to all on the build's EMI, EKI and ERI")
    sp.add_argument("--allow-unverified", action="store_true",
                    help="release a build never verified, or not by every check its recipe names (never one whose "
                         "verification failed); its release notes and record say so")
    sp.add_argument("--eucarc", help="for a published build: its cloud's eucarc (default: the recipe's, else the "
                                     "environment)")
    add_output(sp)
    add_farm_options(sp)    # a farm build's record in the store says it is released too
    sp.set_defaults(func=cmd_release)
    sp = subparsers.add_parser(
        "latest", help="print the newest published (or released) build's EMI, EKI and ERI",
        description="Print the build id and image ids of a recipe's newest build that has them; exit 1 when "
                    "there is none.")
    sp.add_argument("recipe", metavar="RECIPE", help="a recipe's name (or its file)")
    sp.add_argument("--released", action="store_true", help="the newest released build, not the newest published")
    sp.add_argument("--json", action="store_true", help="print a JSON object")
    add_output(sp)
    sp.set_defaults(func=cmd_latest)
