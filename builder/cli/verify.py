"""`bake verify BUILD_DIR [--cloud] [--checks NAME,...]`: verify an existing build."""

from __future__ import annotations

import json

from builder.core import exitcodes
from builder.core.record import Build
from builder.vm import Accel


def cmd_verify(args) -> int:
    # verifying on a cloud needs boto3, which builder.verify loads: only this command does
    from builder.verify import render_table, verify  # noqa: PLC0415

    build = Build.load(args.build_dir)
    only = {n.strip() for part in args.checks or () for n in part.split(",") if n.strip()} or None
    options = {}
    if args.user:
        options["user"] = args.user
    if args.accel:
        options["accel"] = Accel(args.accel, "--accel " + args.accel)
    with build.lock():
        report = verify(build, cloud=args.cloud, only=only, **options)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        print(render_table(report))
    return exitcodes.OK if report.ok else exitcodes.VERIFY_FAILED


def register(subparsers) -> None:
    sp = subparsers.add_parser(
        "verify", help="boot a build (under QEMU, or on the cloud it was published to) and check it",
        description="Boot the build's kernel, ramdisk and image as a Eucalyptus node does and run the checks: "
                    "boots, metadata, acpiphp, volume-hotplug, sync-agent and the recipe's own. "
                    "Writes verify.json in the build directory; exits 5 when a check fails.")
    sp.add_argument("build_dir", metavar="BUILD_DIR", help="a build directory (output/<recipe>/<build-id>)")
    sp.add_argument("--cloud", action="store_true", help="run an instance on the cloud the build was published to")
    sp.add_argument("--checks", action="append", metavar="NAME[,NAME...]",
                    help="run only these checks (boots, metadata, acpiphp, volume-hotplug, sync-agent, recipe:NAME)")
    sp.add_argument("--accel", choices=("kvm", "tcg"), help="use this accelerator instead of probing (local mode)")
    sp.add_argument("--user", help="the image's default user (default: the recipe's first user, else root)")
    sp.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    sp.set_defaults(func=cmd_verify)
