"""`bake RECIPE`: the stages in order, on one build directory.

A failure or an interrupt anywhere leaves no mount, loop device or chroot process
behind (the stages' context managers undo them) and no half-made tree: the work
folder is removed and build.json says what failed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import time
from pathlib import Path
from typing import Iterator

from builder.core import events, exitcodes, lifetime, sh
from builder.core.interrupts import deferred
from builder.core.locks import recipe_lock
from builder.core.record import Build
from builder.core.removal import MountBoundaryError
from builder.core.errors import BakeError
from builder.core.log import step
from builder.pipeline.options import BuildOptions
from builder.pipeline.context import BuildContext
from builder.pipeline.inputs import record_inputs
from builder.pipeline.plan import Plan
from builder.pipeline.table import plan_build, stages_for
from builder.pipeline import workspace
from builder.recipe.recipe import Recipe

log = logging.getLogger("bake")

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
        sh.require("unshare", "mount", "tar", "qemu-img", "debugfs")
    else:
        sh.require("debootstrap", "chroot", "unshare", "mount", "tar")
    output_root = Path(options.output).resolve()
    # mirrors and packages resolve before anything is made, and before waiting for the
    # recipe: bad input is said at once
    plan = plan_build(recipe, output_root)
    with recipe_lock(recipe.name, wait=options.wait):
        return _bake(recipe, plan, options, output_root)


def _bake(recipe: Recipe, plan: Plan, options: BuildOptions, output_root: Path) -> Build:
    build = Build.create(output_root, recipe.name, options.build_id)
    build.data.update({
        "recipe": {"name": recipe.name, "path": str(recipe.path)},
        "release": str(recipe.release), "arch": recipe.arch, "mirror": plan.mirror,
        "image_mirror": plan.image_mirror,
        "elements": [{"name": u.name, "params": u.params} for u in recipe.elements],
        "inputs": record_inputs(recipe),
        "result": "running", "pid": os.getpid(),
    })
    build.save()
    work = build.dir / "work"
    with build.lock(), lifetime.tracked("build", build.dir), lifetime.tracked("path", work, what="work tree"):
        ctx = BuildContext(recipe, options, plan, build, output_root, work)
        return _run_stages(ctx)


def _run_stages(ctx: BuildContext) -> Build:
    """Run the route's stages from the table in order, up to `--stop-after`, leaving out
    `--skip`ped ones and those the recipe turns off; stop at the first failure. The work
    tree is in memory or on disk as `workspace` chooses."""
    with contextlib.ExitStack() as work_mount:
        return _run_stages_in(ctx, work_mount)


def _run_stages_in(ctx: BuildContext, work_mount: contextlib.ExitStack) -> Build:
    build, recipe, options = ctx.build, ctx.recipe, ctx.options
    ctx.work.mkdir()
    start = time.monotonic()
    stages_run: list[str] = []
    current = None
    events.set_build(build.id, recipe.name)
    events.emit("build", dir=str(build.dir))
    try:
        with step(f"Bake {recipe.name} → {build.dir}"):
            workspace.place(ctx, work_mount)
            for stage in stages_for(ctx.route):
                current = stage.name
                if stage.name in options.skip:
                    _skipped(build, stage.name, "--skip")
                elif stage.section and recipe.section(stage.section).get("enabled") is False:
                    _skipped(build, stage.name, "disabled in the recipe")
                else:
                    with _stage(build, stage.name):
                        stage.run(ctx)
                    stages_run.append(stage.name)
                    if stage.last_use_of_work:
                        sh.discard_tree(ctx.work)
                    if build.data.get("result") == "failed":
                        build.data["failed_stage"] = stage.name
                        break
                if stage.name == options.stop_after:
                    break
    except BaseException as e:
        build.data["result"] = "failed"
        build.data["failed_stage"] = current
        build.data["stages_run"] = stages_run
        build.data["error"] = workspace.explain(
            str(e) if isinstance(e, BakeError) else "interrupted" if isinstance(e, KeyboardInterrupt)
            else f"{type(e).__name__}: {e}", ctx)
        build.data["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        build.save()
        with deferred():
            _discard(ctx.work)
        _result_event(build)
        if isinstance(e, BakeError) and build.data["error"] != str(e):
            raise BakeError(build.data["error"]) from e
        raise
    if build.data.get("result") == "running":
        build.data["result"] = "ok"
    build.data["stages_run"] = stages_run
    build.data["seconds"] = round(time.monotonic() - start, 2)
    build.data["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    build.save()
    _discard(ctx.work)
    _result_event(build)
    return build


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
        build.record_stage(name, seconds=seconds)
        extra = {"cached": bool(info["cached"])} if "cached" in info else {}
        events.emit("stage", stage=name, status="finished", seconds=seconds, **extra)


def _skipped(build: Build, name: str, reason: str) -> None:
    build.record_stage(name, skipped=reason)
    events.emit("stage", stage=name, status="skipped", reason=reason)


def _result_event(build: Build) -> None:
    events.emit("result", result=build.data.get("result", "failed"), failed_stage=build.data.get("failed_stage"),
                error=build.data.get("error"), dir=str(build.dir), exit_status=exitcodes.for_build(build.data))


def _discard(work: Path) -> None:
    """Remove the work tree at the end of a bake. A mount left in it that bake could not
    undo keeps it (and what is under that mount) in place, said as an error, without
    taking the place of the error the bake ends with."""
    if work.exists():
        sh.kill_chroot_processes(work)
        try:
            sh.discard_tree(work, ignore_errors=True)
        except MountBoundaryError as e:
            log.error("%s", e)
