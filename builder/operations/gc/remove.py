"""`bake gc`'s removal: each recipe's builds under the recipe lock, each build under its
own lock, each cache entry under its lock, all taken without waiting and skipped when held.

A build is held by its folder's lock (when this box has its folder) and by its name's
(`operations.buildlock`, which `bake release` holds too), and its release state is read
again under them immediately before anything of it is deleted: its build.json, and on
the cloud the release marker beside its bundles. A build released since the survey stays.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from builder.core import locks, sh
from builder.core.cache import TreeCache
from builder.core.errors import BakeError
from builder.core.record import RECORD, Build
from builder.core.removal import remove_tree
from builder.operations.buildlock import name_lock
from builder.operations.gc.plan import BuildVerdict, CacheVerdict, GcPlan
from builder.operations.gc.facts import RELEASE_MARKER, Survey
from builder.operations.gc.survey import held_by, in_use

log = logging.getLogger("bake.gc")


def execute(plan: GcPlan, survey: Survey, clients=None, creds=None) -> GcPlan:
    """Remove what `plan` says goes, each recipe's builds under its recipe lock, each
    build under its own lock and each cache entry under its lock, all taken without
    waiting: whatever is held now is skipped, and its `outcome` says by whom. A build's
    cloud side goes before its folder, so that a failure leaves the record that says
    where its images are."""
    plan.dry_run = False
    going: dict[str, list[BuildVerdict]] = {}
    for v in plan.builds:
        if v.goes:
            going.setdefault(v.recipe, []).append(v)
    for recipe, verdicts in going.items():
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(locks.recipe_lock(recipe, wait=False))
            except locks.Busy as e:
                for v in verdicts:
                    v.outcome = f"skipped: {e}"
                continue
            used = {}
            if clients is not None and any(v.deregister for v in verdicts):
                from builder.cloud import inventory  # noqa: PLC0415 (boto3: only when gc goes to the cloud)
                used = in_use(inventory.instances(clients, creds))    # an instance started since the survey
            for v in verdicts:
                try:
                    v.outcome = _remove_build(v, used, clients, creds)
                except (BakeError, OSError) as e:
                    # the others are still tried; the command's status says one failed
                    v.outcome = f"failed: {e}"
    # a build that was to go but stays (held, or an instance started since) still needs its entries
    facts = {(b.recipe, b.build_id): b for b in survey.builds}
    still_used = {k: f"{v.recipe}/{v.build_id}" for v in plan.builds if v.goes and v.outcome != "removed"
                  for k in facts[(v.recipe, v.build_id)].cache_keys}
    for c in plan.cache:
        if c.goes:
            user = still_used.get((c.namespace, c.key))
            c.outcome = f"skipped: {user} stays, and uses it" if user else _remove_cache_entry(survey.cache_root, c)
    return plan


def _remove_build(v: BuildVerdict, used: dict[str, list[str]], clients, creds) -> str:
    busy = [f"{i} is used by {', '.join(used[i])}" for i in v.deregister if i in used]
    if busy:
        return "skipped: " + "; ".join(busy)
    with contextlib.ExitStack() as stack:
        build = Build(Path(v.dir)) if v.dir else None
        if build is not None:
            try:
                stack.enter_context(build.lock(wait=False))
            except locks.Busy as e:
                return f"skipped: {e}"
            mounts = sh.mounts_under(build.dir)
            if mounts:
                return f"skipped: {mounts[0]} is mounted in it (`bake doctor` undoes what a killed bake left)"
        try:
            stack.enter_context(name_lock(v.recipe, v.build_id, wait=False))
        except locks.Busy as e:
            return f"skipped: {e}"
        released = _released_now(v, build, clients, creds)
        if released:
            return f"skipped: released since the survey ({released})"
        if clients is not None:
            # the cloud's clients import boto3: only a gc that goes to the cloud loads it
            from builder.cloud.images import deregister  # noqa: PLC0415
            from builder.cloud.publish import PublishOptions  # noqa: PLC0415
            from builder.cloud.store import delete_object  # noqa: PLC0415

            for image_id in v.deregister:
                log.info("deregistering %s (%s/%s)", image_id, v.recipe, v.build_id)
                deregister(clients, image_id, creds)
            opts = PublishOptions()
            for bucket, keys in v.delete.items():
                log.info("deleting %d object(s) of %s/%s from %s", len(keys), v.recipe, v.build_id, bucket)
                for key in keys:
                    delete_object(clients, bucket, key, opts, creds)
        if build is not None and build.dir.exists():
            log.info("removing %s", build.dir)
            remove_tree(build.dir)
            build.lock_path.unlink(missing_ok=True)     # held by us: nobody waits on a folder that is gone
    return "removed"


def _released_now(v: BuildVerdict, build: Build | None, clients, creds) -> str | None:
    """What says the build is released now, read again under its locks; None when nothing does."""
    if build is not None and (build.dir / RECORD).is_file():
        try:
            data = Build.load(build.dir).data
        except BakeError as e:
            return f"its build.json cannot be read to tell: {e}"
        if data.get("released"):
            return "its build.json says so"
    if clients is not None:
        from builder.cloud.inventory import has_object  # noqa: PLC0415 (boto3: only when gc goes to the cloud)

        for where in v.folders:
            bucket, _, folder = where.partition("/")
            if has_object(clients, bucket, f"{folder}/{RELEASE_MARKER}", creds):
                return f"the release marker {where}/{RELEASE_MARKER} is beside its bundles"
    return None


def _remove_cache_entry(root: Path, c: CacheVerdict) -> str:
    cache = TreeCache(root, c.namespace)
    try:
        with locks.held(cache.lock_path(c.key), f"the {c.namespace} cache entry {c.key}", wait=False):
            # a bake that started since the survey may need any entry: it holds its recipe
            state = locks.recipe_locks_dir()
            started = [p.stem for p in state.glob("*.lock") if held_by(p)] if state.is_dir() else []
            if started:
                return f"skipped: a bake of {', '.join(started)} started meanwhile"
            cache.remove(c.key)
    except locks.Busy as e:
        return f"skipped: {e}"
    return "removed"
