"""`bake gc`'s survey (reads only): the builds under the output root (their records,
states and locks, through `records`), the stage cache's entries, and with `--cloud` the
images of this account, the instances that use them and the bundles under each build's
prefix in the bucket."""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Iterable

from builder.core import locks, sh
from builder.core.cache import TreeCache, cache_root
from builder.core.errors import BakeError
from builder.operations import records
from builder.operations.gc.facts import (
    BUILD_ID,
    IN_USE_STATES,
    NAMESPACES,
    RELEASE_MARKER,
    BuildFacts,
    CacheFacts,
    CloudImage,
    Survey,
    parse_time,
)


def _tree_bytes(path: Path) -> int:
    total = 0
    for top, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except OSError:
                pass
    return total


def _recorded_keys(data: dict[str, Any]) -> list[tuple[str, str]]:
    """The cache entries a build's record says it used (bootstrap or base key, package checkpoint)."""
    stages: dict[str, Any] = data["stages"] if isinstance(data.get("stages"), dict) else {}
    found = []
    where = (("bootstrap", "bootstrap", "key"), ("packages", "customize", "checkpoint_key"))
    for namespace, stage, field_name in where:
        rec = stages.get(stage)
        if isinstance(rec, dict) and isinstance(rec.get(field_name), str) and rec[field_name]:
            # a base image's root tree is kept in a namespace of its own, which its record names
            found.append((rec.get("namespace") or namespace, rec[field_name]))
    return found


def held_by(path: Path) -> str | None:
    """Who holds the lock file `path` now (None: nobody)."""
    try:
        return locks.holder_of(path) if locks.is_held(path) else None
    except OSError:
        return "a holder that cannot be checked"


def survey_local(output: str | os.PathLike, scope: Iterable[str] | None = None) -> Survey:
    """Builds under `output`, the stage cache's entries and the recipes being baked now.
    Builds of recipes outside `scope` are not planned, but the cache entries they use
    are kept."""
    output = Path(output)
    scope = list(scope) if scope else None
    summaries, warnings = records.find_builds(output)
    survey = Survey(output, cache_root(output), [], [], {}, scope=scope, warnings=list(warnings))
    for s in summaries:
        try:
            build = records.load_build(s.dir)
        except BakeError as e:
            survey.warnings.append(" ".join(str(e).split()) + "; skipped")
            continue
        survey.local_builds += 1
        facts = BuildFacts(s.recipe, s.build_id, s.dir, s.state, s.failed_stage, parse_time(s.created),
                           released_record=bool(s.released), cache_keys=_recorded_keys(build.data),
                           record_cloud=build.data.get("cloud") or {})
        if scope is not None and s.recipe not in scope:
            for k in facts.cache_keys:
                survey.other_cache_users.setdefault(k, facts.name)
            continue
        facts.held_by = held_by(build.lock_path)
        facts.mounts = sh.mounts_under(s.dir)
        facts.bytes = _tree_bytes(s.dir)
        survey.builds.append(facts)
    state = locks.recipe_locks_dir()
    if state.is_dir():
        for lock in sorted(state.glob("*.lock")):
            holder = held_by(lock)
            if holder:
                survey.recipes_held[lock.stem] = holder
    for namespace in NAMESPACES:
        cache = TreeCache(survey.cache_root, namespace)
        for key in cache.keys():
            files = [p for p in (cache.path(key), cache.meta_path(key)) if p.exists()]
            stats = [p.stat() for p in files]
            survey.cache.append(CacheFacts(
                namespace, key, sum(st.st_size for st in stats),
                _dt.datetime.fromtimestamp(max(st.st_mtime for st in stats), _dt.timezone.utc),
                held_by(cache.lock_path(key))))
    return survey


def _attribute(location: str) -> tuple[str, str] | None:
    """(recipe, build id) from a manifest location `BUCKET/<recipe>/<build-id>/FILE`, the
    prefix `bake publish` gives a build; None for any other location."""
    parts = location.split("/")
    if len(parts) >= 4 and BUILD_ID.match(parts[-2]) and parts[-3]:
        return parts[-3], parts[-2]
    return None


def survey_cloud(survey: Survey, clients, creds) -> None:
    """Add to `survey` what the cloud has: this account's images, grouped into builds by
    the records that name them or by bake's prefix; the instances using them; and the
    bundle files and release marker under each build's prefix."""
    # the cloud's listing imports boto3: only a gc that goes to the cloud loads it
    from builder.cloud import inventory  # noqa: PLC0415

    survey.cloud = True
    same_cloud = lambda c: isinstance(c, dict) and c.get("ec2_url") == creds.ec2_url  # noqa: E731
    builds = {(b.recipe, b.build_id): b for b in survey.builds}
    by_id: dict[str, BuildFacts] = {}
    for b in survey.builds:
        if same_cloud(b.record_cloud):
            for im in (b.record_cloud.get("images") or {}).values():
                if isinstance(im, dict) and im.get("id"):
                    by_id[im["id"]] = b
    for raw in inventory.own_images(clients, creds):
        if raw.get("State") in ("deregistered", "failed") or not raw.get("ImageLocation"):
            continue
        im = CloudImage(raw["ImageId"], raw.get("ImageType", "machine"), raw["ImageLocation"].lstrip("/"),
                        raw.get("Name") or "", bool(raw.get("Public")), raw.get("KernelId"), raw.get("RamdiskId"))
        owner = by_id.get(im.id)
        if owner is None:
            found = _attribute(im.location)
            if found and (survey.scope is None or found[0] in survey.scope):
                owner = builds.get(found)
                if owner is None:
                    owner = builds[found] = BuildFacts(found[0], found[1])
                    survey.builds.append(owner)
        if owner is None:
            survey.other_images.append(im)
        else:
            owner.images.append(im)
    live = [i for i in inventory.instances(clients, creds) if i.state in IN_USE_STATES]
    survey.instances = in_use(live)
    survey.instance_refs = {ref for i in live for ref in (i.kernel_id, i.ramdisk_id) if ref}
    for b in survey.builds:
        folders = {(im.bucket, im.folder) for im in b.images}
        if same_cloud(b.record_cloud) and b.record_cloud.get("bucket") and b.record_cloud.get("prefix"):
            folders.add((b.record_cloud["bucket"], str(b.record_cloud["prefix"]).strip("/")))
        for bucket, folder in sorted(folders):
            if not folder:
                continue    # a bundle at the top of a bucket: nothing there says which build it is
            b.folders.append(f"{bucket}/{folder}")
            keys = inventory.keys_under(clients, bucket, folder, creds)
            if f"{folder}/{RELEASE_MARKER}" in keys:
                b.released_cloud = True
            listed = b.objects.setdefault(bucket, [])
            listed += [k for k in keys if k not in listed]


def in_use(instances) -> dict[str, list[str]]:
    """EMI -> the instances started from it that have not ended, as "i-… (state)"."""
    found: dict[str, list[str]] = {}
    for inst in instances:
        if inst.state in IN_USE_STATES and inst.image_id:
            found.setdefault(inst.image_id, []).append(f"{inst.id} ({inst.state})")
    return found
