"""`bake RECIPE`: the stages in order, on one build directory.

A failure or an interrupt anywhere leaves no mount, loop device or chroot process
behind (the stages' context managers undo them) and no half-made tree: the work
folder is removed and build.json says what failed.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import logging
import os
import shutil
import time
from pathlib import Path

from . import lifetime, locks, sh
from .interrupts import deferred
from .build import Build
from .errors import BakeError
from .log import step
from .plan import make_plan
from .recipe import Recipe
from .stages import bootstrap, customize, image

log = logging.getLogger("bake")

LATER_STAGES = ("bundle", "publish", "verify")


def _later_stage(name: str):
    return importlib.import_module(f"builder.stages.{name}")


def recipe_lock(name: str, *, wait: bool = True):
    """Hold recipe `name` for the block: one bake of a recipe at a time on this box (a
    second waits, or with `wait=False` raises locks.Busy naming the holder). An flock:
    the kernel releases it when its holder dies, however it dies."""
    return locks.held(lifetime.state_dir() / "recipes" / f"{name}.lock", f"recipe {name}", wait=wait)


def bake(recipe: Recipe, output_root: Path, *, stop_after: str | None = None,
         skip: set[str] | None = None, cloud: bool = False, build_id: str | None = None,
         wait: bool = True) -> Build:
    """Run the recipe's stages into a new build directory and return the build. Another
    bake of the same recipe is waited for (`wait=False`: locks.Busy at once)."""
    sh.require("debootstrap", "chroot", "mount", "tar")
    output_root = Path(output_root).resolve()
    # mirrors and packages resolve before anything is made, and before waiting for the
    # recipe: bad input is said at once
    plan = make_plan(recipe, output_root)
    with recipe_lock(recipe.name, wait=wait):
        return _bake(recipe, plan, output_root, stop_after=stop_after, skip=skip or set(), cloud=cloud,
                     build_id=build_id)


def _bake(recipe: Recipe, plan, output_root: Path, *, stop_after: str | None, skip: set[str], cloud: bool,
          build_id: str | None) -> Build:
    build = Build.create(output_root, recipe.name, build_id)
    build.data.update({
        "recipe": {"name": recipe.name, "path": str(recipe.path)},
        "release": str(recipe.release), "arch": recipe.arch, "mirror": plan.mirror,
        "elements": [{"name": u.name, "params": u.params} for u in recipe.elements],
        "result": "running", "pid": os.getpid(),
    })
    build.save()
    with build.lock(), lifetime.tracked("build", build.dir), \
            lifetime.tracked("path", build.dir / "work", what="work tree"):
        return _run_stages(build, recipe, plan, output_root, stop_after=stop_after, skip=skip, cloud=cloud)


def _run_stages(build: Build, recipe: Recipe, plan, output_root: Path, *, stop_after: str | None,
                skip: set[str], cloud: bool) -> Build:
    work = build.dir / "work"
    work.mkdir()
    start = time.monotonic()
    stages_run: list[str] = []
    current = "bootstrap"
    try:
        with step(f"Bake {recipe.name} → {build.dir}"):
            fresh = bootstrap.run(build, recipe, plan, work)
            stages_run.append("bootstrap")
            if stop_after != "bootstrap":
                current = "customize"
                plan = make_plan(recipe, output_root)  # the checkpoint key follows the base just made
                root = customize.run(build, recipe, plan, work, fresh)
                stages_run.append("customize")
                if stop_after != "customize":
                    current = "image"
                    image.run(build, recipe, root)
                    stages_run.append("image")
                    shutil.rmtree(work)
                    for name in LATER_STAGES:
                        if stop_after in stages_run:
                            break
                        if name in skip:
                            build.record_stage(name, skipped="--skip")
                            continue
                        section = recipe.section(name)
                        if section.get("enabled") is False:
                            build.record_stage(name, skipped="disabled in the recipe")
                            continue
                        current = name
                        mod = _later_stage(name)
                        if name == "verify" and cloud:
                            mod.run(build, recipe, cloud=True)
                        else:
                            mod.run(build, recipe)
                        stages_run.append(name)
                        if build.data.get("result") == "failed":
                            build.data["failed_stage"] = name
                            break
    except BaseException as e:
        build.data["result"] = "failed"
        build.data["failed_stage"] = current
        build.data["stages_run"] = stages_run
        build.data["error"] = (str(e) if isinstance(e, BakeError) else "interrupted" if isinstance(e, KeyboardInterrupt)
                               else f"{type(e).__name__}: {e}")
        build.data["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        build.save()
        with deferred():
            _discard(work)
        raise
    if build.data.get("result") == "running":
        build.data["result"] = "ok"
    build.data["stages_run"] = stages_run
    build.data["seconds"] = round(time.monotonic() - start, 2)
    build.data["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    build.save()
    _discard(work)
    return build


def _discard(work: Path) -> None:
    if work.exists():
        sh.kill_chroot_processes(work)
        sh.unmount_all_under(work)
        shutil.rmtree(work, ignore_errors=True)
