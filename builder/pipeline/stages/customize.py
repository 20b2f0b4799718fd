"""Stage customize: the recipe's packages, element hooks, users, files and commands.

The operations are `builder.customize`'s, written once; this stage picks the route's
backend, keeps the package checkpoint and records what it did in build.json.

- chroot route: the tree from the base stage (or the cache) in a chroot on the host, in
  two halves. The first (apt sources, root.d/extra-data.d/pre-install.d hooks, packages)
  is saved as a checkpoint in the cache, keyed by everything it depends on, so changing
  a later hook re-runs only the second (static files, install.d, users, files,
  commands, post-install.d, the initramfs, finalise.d, cleanup.d).
- appliance route (`base.method: guestfs`): the base's filesystem changed in place
  inside libguestfs's appliance, without root.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from builder.core import sh
from builder.core.cache import TreeCache, cache_root
from builder.core.log import step
from builder.core.record import Build
from builder.customize import inplace
from builder.customize.chroot import ChrootBackend, detect_init_system
from builder.customize.tree import Packages, TreeCustomizer
from builder.pipeline.context import BuildContext
from builder.pipeline.plan import Plan
from builder.recipe.distro import suite_at_least
from builder.recipe.recipe import Recipe


def run(ctx: BuildContext) -> None:
    """Customize the bake's image by its route: in a chroot, leaving the customized tree
    in `ctx.root` for the image stage, or in the appliance, changing `ctx.opened`'s
    filesystem in place."""
    if ctx.route.backend == "appliance":
        in_appliance(ctx.build, ctx.recipe, ctx.opened)
    else:
        ctx.root = in_chroot(ctx.build, ctx.recipe, ctx.plan, ctx.work, ctx.fresh_tree)


# --- the chroot route ---------------------------------------------------------------------

def in_chroot(build: Build, recipe: Recipe, plan: Plan, work: Path, fresh_tree: Path | None) -> Path:
    """Customize the image's root tree under `work` (from `fresh_tree`, the tree the base
    stage made in this bake, or from the cache); returns the tree."""
    root = work / "rootfs"
    if root.exists():
        sh.discard_tree(root)
    output_root = build.dir.parent.parent
    ckpt = TreeCache(cache_root(output_root), "packages")
    archives = cache_root(output_root) / "apt-archives" / \
        f"{recipe.release.distro}-{recipe.release.suite}-{recipe.arch}"
    with step("Customize"):
        c = TreeCustomizer(ChrootBackend(root), recipe, init_system=recipe.profile.init_system,
                           packages=Packages(plan.apt_sources, plan.package_names, archives, plan.image_sources),
                           logs=build.dir, dib_work=work)
        cached = _to_checkpoint(c, ckpt, plan, output_root, fresh_tree)
        deferred = c.finish()
    extra = {}
    if c.dib is not None and recipe.dib is not None:
        extra["dib"] = {"phases": c.dib.ran, "elements": recipe.dib.names, "env": recipe.dib_env.public(),
                        "notes": c.notes_dib}
    build.record_stage("customize", cached_packages=cached, checkpoint_key=plan.checkpoint.key,
                       init_system=c.init_system, initramfs_deferred=deferred, scrub=c.scrubbed, **extra)
    if c.notes or recipe.notes:
        build.set("notes", [*recipe.notes, *c.notes])
    return root


def _to_checkpoint(c: TreeCustomizer, ckpt: TreeCache, plan: Plan, output_root: Path,
                   fresh_tree: Path | None) -> bool:
    """Bring `c.root` to the package checkpoint: unpacked from the cache, or made (and
    saved) from the base tree. Returns whether it came from the cache. The checkpoint's
    lock is held throughout, so two bakes that need the same checkpoint make it once."""
    root = c.root
    with ckpt.lock(plan.checkpoint.key):
        if ckpt.has(plan.checkpoint.key):
            with step("Unpacking the package checkpoint"):
                ckpt.restore(plan.checkpoint.key, root)
            meta = ckpt.meta(plan.checkpoint.key)
            c.init_system = meta.get("init_system", c.init_system)
            c.dib_python_added = bool(meta.get("dib_python_added"))
            return True
        if fresh_tree is not None:
            os.rename(fresh_tree, root)
        else:
            with step("Unpacking the base tree"):
                TreeCache(cache_root(output_root), plan.bootstrap.namespace).restore(plan.bootstrap.key, root)
        c.init_system = detect_init_system(root, c.recipe.profile.init_system)
        c.to_checkpoint()
        with step("Saving the package checkpoint"):
            ckpt.save(plan.checkpoint.key, root, {"init_system": c.init_system, "packages": plan.package_names,
                                                  "dib_python_added": c.dib_python_added,
                                                  "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    return False


# --- the appliance route ------------------------------------------------------------------

def in_appliance(build: Build, recipe: Recipe, opened: Any) -> None:
    """The recipe's changes made inside the base's filesystem (`opened`, the base stage's
    `stages.baseimage.Opened`) through libguestfs."""
    init = opened.record.get("init_system") or recipe.profile.init_system
    # Lucid-era glibc calls into the vsyscall page, which the appliance's kernel lacks
    old_glibc = recipe.release.distro == "ubuntu" and not suite_at_least("ubuntu", recipe.release.suite, "precise")
    with step("Customize in place (libguestfs)"):
        notes, scrubbed = inplace.apply(recipe, opened.unpacked.image, init_system=init, lucid=old_glibc,
                                        root_label=recipe.data["label"])
    build.record_stage("customize", method="guestfs", init_system=init, scrub=scrubbed)
    if notes:
        build.set("notes", notes)
