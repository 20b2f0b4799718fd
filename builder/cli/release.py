"""`bake release BUILD [--public]` and `bake latest RECIPE [--released]`: their command
lines and what they print; the work is builder/operations/release.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

from builder.cli.options import add_output
from builder.cloud.credentials import load_credentials
from builder.operations.records import image_ids, resolve_build
from builder.operations.release import check_releasable, latest, release
from builder.operations.streams import STREAMS
from builder.recipe.recipe import load_recipe, recipe_of


def _recipe_name(spec: str) -> str:
    if spec.endswith((".yml", ".yaml")) and Path(spec).is_file():
        return load_recipe(spec).name
    return spec


def cmd_release(args) -> int:
    build = resolve_build(args.build, args.output)
    check_releasable(build, public=args.public)    # said before the recipe and credentials are read
    creds = None
    if args.public or image_ids(build)["emi"]:
        recipe = recipe_of(build)
        creds = load_credentials(recipe.publish if recipe is not None else {}, eucarc=args.eucarc)
    rel = release(build, public=args.public, creds=creds)
    print(f"released\t{build.dir.parent.name}/{build.id}")
    for key in ("sha256sums", "sbom", "notes"):
        print(f"{key}\t{build.dir / rel[key]}")
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
                    "images (OUTPUT/streams/v1, simplestreams). A build never verified, or whose verification "
                    "failed, is refused.")
    sp.add_argument("build", metavar="BUILD", help="a build directory, RECIPE/BUILD_ID, or a build id")
    sp.add_argument("--public", action="store_true",
                    help="also grant launch permission to all on the build's EMI, EKI and ERI")
    sp.add_argument("--eucarc", help="for a published build: its cloud's eucarc (default: the recipe's, else the "
                                     "environment)")
    add_output(sp)
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
