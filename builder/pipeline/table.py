"""The stage table: the one list of a bake's stages.

`bake plan`, the build loop, the stage events and timings, `--stop-after`/`--skip` and
build.json's stage list all read this table, so they cannot disagree. A stage that does
not apply to a route is absent from that route's plan, not skipped by a test inside the
loop: the route (debootstrap or an existing image; chroot or appliance) is chosen once,
when the plan is made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from builder.pipeline.context import BuildContext
from builder.pipeline.options import STAGE_NAMES
from builder.pipeline.plan import CacheEntry, Plan, Route, image_base, make_plan
from builder.pipeline.stages import baseimage, bootstrap, bundle, customize, image, publish, verify
from builder.recipe.recipe import Recipe

DEBOOTSTRAP = Route("debootstrap", "chroot")
IMAGE_CHROOT = Route("image", "chroot")
APPLIANCE = Route("image", "appliance")
ROUTES = (DEBOOTSTRAP, IMAGE_CHROOT, APPLIANCE)
CHROOT_ROUTES = (DEBOOTSTRAP, IMAGE_CHROOT)


@dataclass(frozen=True)
class Stage:
    """One stage of one or more routes: its name, what it runs, what `bake plan` says it
    will do, the cache entry it reads or makes, the recipe section whose `enabled: false`
    turns it off, and whether the work folder is done with once it has run."""

    name: str
    run: Callable[[BuildContext], None]
    routes: tuple[Route, ...]
    describe: Callable[[Plan], str]
    cache: Callable[[Plan], CacheEntry | None] = lambda plan: None
    section: str | None = None
    last_use_of_work: bool = False


def _source_of(plan: Plan) -> str:
    base = image_base(plan.recipe)
    return str(base.get("image") or base.get("emi"))


def _debootstrap(plan: Plan) -> str:
    d = plan.recipe.data
    return "cached" if plan.bootstrap.hit else f"debootstrap --variant={d['variant']} {plan.recipe.profile.suite}"


def _unpack(plan: Plan) -> str:
    return "cached" if plan.bootstrap.hit else f"open {_source_of(plan)} and take out its root tree"


def _open_in_place(plan: Plan) -> str:
    base = image_base(plan.recipe)
    return f"copy of {_source_of(plan)} ({base['partition']} partition), grown by {base['grow']}"


def _customize_chroot(plan: Plan) -> str:
    return (("packages cached; " if plan.checkpoint.hit else f"install {len(plan.packages)} packages; ")
            + "run element hooks, files, commands; initramfs once")


def _customize_appliance(plan: Plan) -> str:
    return ("in the image through libguestfs, no root: static files, element hooks, "
            "users, files, commands (no packages, no initramfs)")


def _image_chroot(plan: Plan) -> str:
    r = plan.recipe
    base = r.base
    boot = "kernel, ramdisk" if not base or base["kernel"] == "from-image" else "kernel and ramdisk from the source"
    return f"mkfs.{r.data['filesystem']} -d (features for {r.profile.distro}/{r.profile.suite}), {boot}"


def _image_in_place(plan: Plan) -> str:
    return f"the customized copy; kernel and ramdisk {image_base(plan.recipe)['kernel']}"


def _bundle(plan: Plan) -> str:
    return "off" if plan.recipe.bundle.get("enabled") is False else "bundle kernel, ramdisk, image (EC2 format)"


def _publish(plan: Plan) -> str:
    p = plan.recipe.publish
    cloud_env = any(os.environ.get(v) for v in ("EC2_URL", "S3_URL"))
    return ("off" if p.get("enabled") is False else
            "upload to Walrus/S3, register EKI/ERI/EMI" if (p or cloud_env) else "off (no cloud configured)")


def _verify(plan: Plan) -> str:
    v = plan.recipe.verify
    return ("off" if v.get("enabled") is False else
            f"boot a verification instance ({v.get('mode', 'local')}, {v.get('instance_type', 'm1.small')})")


TABLE: tuple[Stage, ...] = (
    Stage("bootstrap", bootstrap.run, (DEBOOTSTRAP,), _debootstrap, cache=lambda plan: plan.bootstrap),
    Stage("bootstrap", baseimage.run, (IMAGE_CHROOT,), _unpack, cache=lambda plan: plan.bootstrap),
    Stage("bootstrap", baseimage.open_in_place, (APPLIANCE,), _open_in_place),
    Stage("customize", customize.run, CHROOT_ROUTES, _customize_chroot, cache=lambda plan: plan.checkpoint),
    Stage("customize", customize.run, (APPLIANCE,), _customize_appliance),
    Stage("image", image.run, CHROOT_ROUTES, _image_chroot, last_use_of_work=True),
    Stage("image", baseimage.image_in_place, (APPLIANCE,), _image_in_place, last_use_of_work=True),
    Stage("bundle", bundle.run, ROUTES, _bundle, section="bundle"),
    Stage("publish", publish.run, ROUTES, _publish, section="publish"),
    Stage("verify", verify.run, ROUTES, _verify, section="verify"),
)


def stages_for(route: Route) -> list[Stage]:
    """The stages a bake on `route` runs, in order."""
    return [s for s in TABLE if route in s.routes]


def plan_build(recipe: Recipe, output_root: Path) -> Plan:
    """The plan of a bake of `recipe` under `output_root`: what make_plan finds (mirrors,
    packages, hooks, cache hits, the route), with the route's stages from the table."""
    plan = make_plan(recipe, output_root)
    plan.stages = [(s.name, s.describe(plan)) for s in stages_for(plan.route)]
    return plan


# Every route runs every stage name once, in the order the options and the events name them.
for _route in ROUTES:
    if tuple(s.name for s in stages_for(_route)) != STAGE_NAMES:
        raise AssertionError(f"the stage table's {_route} route does not run {STAGE_NAMES} in order")
