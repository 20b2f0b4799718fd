"""`bake RECIPE`: the stages in order, on one build directory.

A failure or an interrupt anywhere leaves no mount, loop device or chroot process
behind (the stages' context managers undo them) and no half-made tree: the work
folder is removed and build.json says what failed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from builder.core import events, lifetime, sh
from builder.core.interrupts import deferred
from builder.core.locks import recipe_lock
from builder.core.record import Build
from builder.core.errors import BakeError
from builder.core.log import step
from builder.pipeline.options import BuildOptions
from builder.pipeline.plan import make_plan
from builder.recipe.recipe import Recipe
from builder.pipeline.stages import baseimage, bootstrap, customize, image

log = logging.getLogger("bake")

LATER_STAGES = ("bundle", "publish", "verify")


def _later_stage(name: str):
    return importlib.import_module(f"builder.pipeline.stages.{name}")


def bake(recipe: Recipe, options: BuildOptions | None = None) -> Build:
    """Run the recipe's stages into a new build directory and return the build. Another
    bake of the same recipe is waited for (`options.wait` False: locks.Busy at once)."""
    options = options or BuildOptions()
    base = recipe.base
    if base and base["method"] == "guestfs":
        sh.require("qemu-img", "e2fsck", "resize2fs", "debugfs")
    elif base:
        if os.geteuid() != 0:
            raise BakeError("base.method unpack customizes the base's tree in a chroot, which needs root: run bake "
                            "as root, or use base.method: guestfs to change the image in place without root")
        sh.require("chroot", "mount", "tar", "qemu-img", "debugfs")
    else:
        sh.require("debootstrap", "chroot", "mount", "tar")
    output_root = Path(options.output).resolve()
    # mirrors and packages resolve before anything is made, and before waiting for the
    # recipe: bad input is said at once
    plan = make_plan(recipe, output_root)
    with recipe_lock(recipe.name, wait=options.wait):
        return _bake(recipe, plan, output_root, stop_after=options.stop_after, skip=set(options.skip),
                     cloud=options.cloud, build_id=options.build_id)


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
    events.set_build(build.id, recipe.name)
    events.emit("build", dir=str(build.dir))
    try:
        with step(f"Bake {recipe.name} → {build.dir}"):
            light = bool(recipe.base) and recipe.base["method"] == "guestfs"
            with _stage(build, "bootstrap"):
                if light:
                    opened = baseimage.prepare_light(build, recipe, work)
                elif recipe.base:
                    fresh = baseimage.run(build, recipe, plan, work)
                else:
                    fresh = bootstrap.run(build, recipe, plan, work)
            stages_run.append("bootstrap")
            if stop_after != "bootstrap":
                current = "customize"
                with _stage(build, "customize"):
                    if light:
                        _light_customize(build, recipe, opened)
                    else:
                        plan = make_plan(recipe, output_root)  # the checkpoint key follows the base just made
                        root = customize.run(build, recipe, plan, work, fresh)
                stages_run.append("customize")
                if stop_after != "customize":
                    current = "image"
                    with _stage(build, "image"):
                        if light:
                            baseimage.finish_light(build, recipe, opened)
                        else:
                            image.run(build, recipe, root)
                    stages_run.append("image")
                    shutil.rmtree(work)
                    for name in LATER_STAGES:
                        if stop_after in stages_run:
                            break
                        if name in skip:
                            _skipped(build, name, "--skip")
                            continue
                        section = recipe.section(name)
                        if section.get("enabled") is False:
                            _skipped(build, name, "disabled in the recipe")
                            continue
                        current = name
                        mod = _later_stage(name)
                        with _stage(build, name):
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
        _result_event(build)
        raise
    if build.data.get("result") == "running":
        build.data["result"] = "ok"
    build.data["stages_run"] = stages_run
    build.data["seconds"] = round(time.monotonic() - start, 2)
    build.data["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    build.save()
    _discard(work)
    _result_event(build)
    return build


def _light_customize(build: Build, recipe: Recipe, opened) -> None:
    """The customize stage of `base.method: guestfs`: the recipe's changes made inside
    the base's filesystem through libguestfs."""
    from builder.base import light
    from builder.recipe.distro import suite_at_least
    start = time.monotonic()
    init = opened.record.get("init_system") or recipe.profile.init_system
    # Lucid-era glibc calls into the vsyscall page, which the appliance's kernel lacks
    old_glibc = recipe.release.distro == "ubuntu" and not suite_at_least("ubuntu", recipe.release.suite, "precise")
    with step("Customize in place (libguestfs)"):
        notes = light.apply(build, recipe, opened.unpacked.image, init_system=init, lucid=old_glibc,
                            root_label=recipe.data["label"])
    build.record_stage("customize", method="guestfs", init_system=init, seconds=round(time.monotonic() - start, 2))
    if notes:
        build.set("notes", notes)


@contextlib.contextmanager
def _stage(build: Build, name: str) -> Iterator[None]:
    """Emit the stage's events around the block: started, then finished (with what the
    stage recorded: cached, or skipped by the stage itself) or failed."""
    events.emit("stage", stage=name, status="started")
    start = time.monotonic()
    try:
        yield
    except BaseException as e:
        error = str(e) if isinstance(e, BakeError) else "interrupted" if isinstance(e, KeyboardInterrupt) \
            else type(e).__name__
        events.emit("stage", stage=name, status="failed", seconds=round(time.monotonic() - start, 2),
                    error=error.split("\n", 1)[0])
        raise
    seconds = round(time.monotonic() - start, 2)
    info = (build.data.get("stages") or {}).get(name) or {}
    if info.get("skipped"):
        events.emit("stage", stage=name, status="skipped", reason=str(info["skipped"]))
    elif build.data.get("result") == "failed":
        events.emit("stage", stage=name, status="failed", seconds=seconds,
                    error=str(build.data.get("error") or f"{name} failed").split("\n", 1)[0])
    else:
        extra = {"cached": bool(info["cached"])} if "cached" in info else {}
        events.emit("stage", stage=name, status="finished", seconds=seconds, **extra)


def _skipped(build: Build, name: str, reason: str) -> None:
    build.record_stage(name, skipped=reason)
    events.emit("stage", stage=name, status="skipped", reason=reason)


def _result_event(build: Build) -> None:
    from builder.core import exitcodes
    events.emit("result", result=build.data.get("result", "failed"), failed_stage=build.data.get("failed_stage"),
                error=build.data.get("error"), dir=str(build.dir), exit_status=exitcodes.for_build(build.data))


def _discard(work: Path) -> None:
    if work.exists():
        sh.kill_chroot_processes(work)
        sh.unmount_all_under(work)
        shutil.rmtree(work, ignore_errors=True)
