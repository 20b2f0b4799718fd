"""Stage bootstrap: a base root tree from debootstrap, cached.

The cache key covers release, mirror, architecture, variant and components; the entry
also remembers the SHA-256 of the archive's Release file it was built from, and a bake
re-bootstraps when the archive has changed since.
"""

from __future__ import annotations

import hashlib
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

from builder.core import locks, sh
from builder.core.record import Build
from builder.core.cache import TreeCache, cache_root
from builder.recipe.distro import DEB_ARCH
from builder.core.errors import BakeError
from builder.core.log import step
from builder.core.progress import DebootstrapCounter
from builder.pipeline.context import BuildContext
from builder.pipeline.plan import Plan
from builder.recipe.recipe import Recipe

log = logging.getLogger("bake.bootstrap")


def release_digest(mirror: str, suite: str, timeout: float = 30) -> str:
    """SHA-256 of `<mirror>/dists/<suite>/Release`; a BakeError if it cannot be read."""
    url = f"{mirror.rstrip('/')}/dists/{suite}/Release"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return hashlib.sha256(r.read()).hexdigest()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise BakeError(f"cannot read the archive's Release file {url}: {getattr(e, 'reason', e)}") from None


def run(ctx: BuildContext) -> None:
    """Make sure the bootstrap cache entry is current. A tree freshly debootstrapped under
    the work folder is left in `ctx.fresh_tree` (the customize stage may take it over
    instead of unpacking the cache); the plan is made again, as the package checkpoint's
    key follows the base just made."""
    ctx.fresh_tree = _bootstrap(ctx.build, ctx.recipe, ctx.plan, ctx.work)
    ctx.replan()


def _bootstrap(build: Build, recipe: Recipe, plan: Plan, work: Path) -> Path | None:
    prof = recipe.profile
    d = recipe.data
    cache = TreeCache(cache_root(Path(build.dir).parent.parent), "bootstrap")
    key = plan.bootstrap.key
    with step(f"Bootstrap {prof.distro}/{prof.suite} ({d['variant']}, {recipe.arch})"):
        keyring = prof.debootstrap_keyring()   # said before anything is fetched
        try:
            digest = release_digest(plan.mirror, prof.suite)
        except BakeError as e:
            if not cache.has(key):
                raise
            log.warning("%s; using the cached base tree", e)
            digest = cache.meta(key).get("release_sha256", "")
        # Held from the look-up to the save: a second bake of the same base waits here
        # and then finds the entry made, instead of debootstrapping it again.
        with cache.lock(key):
            if cache.has(key) and cache.meta(key).get("release_sha256") == digest:
                build.record_stage("bootstrap", cached=True, key=key, release_sha256=digest)
                return None
            tree = _debootstrap(build, recipe, plan, work, cache, keyring)
            with step("Saving the base tree to the cache"):
                cache.save(key, tree, {"release": d["release"], "mirror": plan.mirror, "arch": recipe.arch,
                                       "variant": d["variant"], "release_sha256": digest,
                                       "created": time.strftime("%Y-%m-%d %H:%M:%S")})
        build.record_stage("bootstrap", cached=False, key=key, release_sha256=digest)
        return tree


def _debootstrap(build: Build, recipe: Recipe, plan: Plan, work: Path, cache: TreeCache, keyring: str) -> Path:
    """debootstrap the recipe's base into `work/bootstrap`; returns the tree."""
    prof = recipe.profile
    d = recipe.data
    sh.require("debootstrap")
    tree = work / "bootstrap"
    if tree.exists():
        sh.discard_tree(tree)
    argv = ["debootstrap", f"--variant={d['variant']}", f"--arch={DEB_ARCH[recipe.arch]}",
            f"--components={','.join(d['components'])}"]
    # --force-check-gpg: a Release file that cannot be checked stops debootstrap
    argv += [f"--keyring={keyring}", "--force-check-gpg"]
    debs = cache.root / "debs" / f"{prof.distro}-{prof.suite}-{recipe.arch}"
    debs.mkdir(parents=True, exist_ok=True)
    argv.append(f"--cache-dir={debs}")
    argv += [prof.suite, str(tree), plan.mirror]
    script = prof.debootstrap_script()
    if script:
        log.info("this debootstrap has no script for %s; using its %s script", prof.suite, script)
        argv.append(script)
    # debootstrap's package cache is one folder per suite and architecture, which
    # debootstrap itself does not guard: one debootstrap at a time uses it.
    with locks.held(debs.with_name(debs.name + ".lock"), f"debootstrap's package cache {debs}"), \
            open(build.dir / "bootstrap.log", "w") as logf, \
            sh.chroot_guard(tree):   # debootstrap mounts /proc and /sys in the target
        counter = DebootstrapCounter()
        sh.run(argv, what="debootstrap", logfile=logf, on_line=counter)
        counter.done()
    return tree
