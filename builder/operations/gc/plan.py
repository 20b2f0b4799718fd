"""`bake gc`'s plan (`plan_gc`, pure): from a survey alone, per recipe, what goes and,
for everything kept, why."""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from typing import Any

from builder.core.errors import BakeError
from builder.operations import records
from builder.operations.gc.facts import (
    BUILD_ID,
    BUNDLE_FILE,
    RELEASE_MARKER,
    BuildFacts,
    CacheFacts,
    CloudImage,
    Survey,
)


@dataclass
class BuildVerdict:
    recipe: str
    build_id: str
    goes: bool
    reasons: list[str]                      # why it is kept, or why it goes
    dir: str | None = None
    bytes: int = 0
    deregister: list[str] = field(default_factory=list)     # image ids, machine images first
    keep_images: list[str] = field(default_factory=list)    # its kernel/ramdisk others still use
    delete: dict[str, list[str]] = field(default_factory=dict)  # bucket -> keys
    folders: list[str] = field(default_factory=list)        # "BUCKET/FOLDER": where a release marker says kept
    notes: list[str] = field(default_factory=list)
    outcome: str | None = None              # after a real run: "removed", or why it was skipped


@dataclass
class CacheVerdict:
    namespace: str
    key: str
    goes: bool
    reason: str
    bytes: int = 0
    outcome: str | None = None


@dataclass
class GcPlan:
    keep: int
    older_than: str | None
    cloud: bool
    builds: list[BuildVerdict]
    cache: list[CacheVerdict]
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = True

    def as_dict(self) -> dict[str, Any]:
        """The JSON form of `bake gc --json`."""
        return asdict(self)


def _rank_key(b: BuildFacts) -> tuple:
    m = BUILD_ID.match(b.build_id)
    epoch = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)
    return (b.when or epoch, int(m.group(2) or 1) if m else 1, b.build_id)


def plan_gc(survey: Survey, keep: int, older_than: _dt.timedelta | None = None,
            now: _dt.datetime | None = None, *, older_than_text: str | None = None) -> GcPlan:
    """Decide, from `survey` alone, which builds and cache entries go and why each kept
    one is kept. Per recipe, the `keep` newest builds made whole are kept, and a failed
    or killed build among the `keep` newest of all (to be looked into); whatever is
    released, held by a command, baked now, used by an instance, public or younger than
    `older_than` is kept whatever its rank."""
    if keep < 1:
        raise BakeError("--keep must be at least 1: gc never removes every build of a recipe")
    now = now or _dt.datetime.now(_dt.timezone.utc)
    verdicts: list[BuildVerdict] = []
    by_recipe: dict[str, list[BuildFacts]] = {}
    for b in survey.builds:
        by_recipe.setdefault(b.recipe, []).append(b)
    remaining_images = list(survey.other_images)
    pending: list[tuple[BuildFacts, BuildVerdict]] = []
    for recipe in sorted(by_recipe):
        ranked = sorted(by_recipe[recipe], key=_rank_key, reverse=True)
        # a build still being made may yet fail: it takes no place among the N
        newest_whole = {id(b) for b in [b for b in ranked if not b.failed and b.state != records.BUILDING][:keep]}
        newest = {id(b) for b in ranked[:keep]}
        for b in ranked:
            reasons: list[str] = []
            if id(b) in newest_whole:
                reasons.append(f"one of the {keep} newest")
            elif id(b) in newest and b.failed:
                reasons.append(f"{_state_words(b)}, among the {keep} newest: kept to be looked into")
            reasons += _keep_reasons(b, survey, older_than, now)
            goes = not reasons
            if goes:
                reasons = [f"{_state_words(b)}, beyond the {keep} newest" if b.failed else f"beyond the {keep} newest"]
            v = BuildVerdict(recipe, b.build_id, goes, reasons, str(b.dir) if b.dir else None, b.bytes,
                             folders=list(b.folders))
            verdicts.append(v)
            if goes:
                pending.append((b, v))
                emi = (b.record_cloud or {}).get("image_id")
                if not survey.cloud and emi:
                    v.notes.append(f"its images ({emi} …) stay on the cloud: `bake gc --cloud` finds them there")
            else:
                remaining_images += b.images
    in_use = set(survey.instances) | survey.instance_refs
    for b, v in pending:
        _cloud_removal(b, v, remaining_images, in_use)
    going = {(v.recipe, v.build_id) for v in verdicts if v.goes}
    kept_keys: dict[tuple[str, str], str] = dict(survey.other_cache_users)
    for b in survey.builds:
        if (b.recipe, b.build_id) not in going:
            for k in b.cache_keys:
                kept_keys.setdefault(k, b.name)
    cache = [_cache_verdict(c, survey, kept_keys, older_than, now) for c in survey.cache]
    return GcPlan(keep, older_than_text, survey.cloud, verdicts, cache, list(survey.warnings))


def _state_words(b: BuildFacts) -> str:
    if b.state == records.FAILED:
        return f"failed at {b.failed_stage}" if b.failed_stage else "failed"
    return b.state or "published"


def _keep_reasons(b: BuildFacts, survey: Survey, older_than: _dt.timedelta | None, now: _dt.datetime) -> list[str]:
    reasons = []
    if b.released_record:
        reasons.append("released (its build.json says so)")
    if b.released_cloud:
        reasons.append(f"released (the release marker {RELEASE_MARKER} is beside its bundles)")
    if b.held_by:
        reasons.append(f"{'building' if b.state == records.BUILDING else 'in use'}: held by {b.held_by}")
    if b.recipe in survey.recipes_held:
        reasons.append(f"recipe {b.recipe} is being baked now (held by {survey.recipes_held[b.recipe]})")
    for im in b.images:
        if im.id in survey.instances:
            reasons.append(f"its {_kind(im)} {im.id} is used by {', '.join(survey.instances[im.id])}")
    public = [im.id for im in b.images if im.public]
    if public:
        reasons.append(f"public (anyone may launch {', '.join(public)})")
    if older_than is not None:
        if b.when is None:
            reasons.append("its age is unknown (no time in its id or record)")
        elif now - b.when < older_than:
            reasons.append(f"younger than {_words(older_than)}")
    if b.mounts:
        reasons.append(f"something is still mounted in its folder ({b.mounts[0]}; `bake doctor` undoes it)")
    return reasons


def _kind(im: CloudImage) -> str:
    return {"machine": "EMI", "kernel": "EKI", "ramdisk": "ERI"}.get(im.type, "image")


def _words(age: _dt.timedelta) -> str:
    s = int(age.total_seconds())
    for unit, n in (("week", 604800), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if s % n == 0 and s >= n:
            return f"{s // n} {unit}{'s' if s // n != 1 else ''}"
    return f"{s} seconds"


def _cloud_removal(b: BuildFacts, v: BuildVerdict, remaining: list[CloudImage], in_use: set[str]) -> None:
    """Fill in what deleting build `b` from the cloud means: its machine images, then
    its kernel and ramdisk unless a remaining image or an instance still names them, and
    the bundle files under its prefix except those of images that stay."""
    referenced = {ref for im in remaining for ref in (im.kernel_id, im.ramdisk_id) if ref} | in_use
    staying: set[tuple[str, str, str]] = set()
    order = {"machine": 0, "ramdisk": 1, "kernel": 2}
    for im in sorted(b.images, key=lambda im: (order.get(im.type, 0), im.id)):
        if im.type != "machine" and im.id in referenced:
            v.keep_images.append(im.id)
            staying.add((im.bucket, im.folder, im.bundle_name))
        else:
            v.deregister.append(im.id)
    for bucket, keys in b.objects.items():
        gone = []
        for key in keys:
            folder, _, base = key.rpartition("/")
            m = BUNDLE_FILE.match(base)
            if m and (bucket, folder, m.group("name")) not in staying:
                gone.append(key)
        if gone:
            v.delete[bucket] = sorted(gone)


def _cache_verdict(c: CacheFacts, survey: Survey, kept_keys: dict[tuple[str, str], str],
                   older_than: _dt.timedelta | None, now: _dt.datetime) -> CacheVerdict:
    def kept(reason: str) -> CacheVerdict:
        return CacheVerdict(c.namespace, c.key, False, reason, c.bytes)
    if c.held_by:
        return kept(f"being made: held by {c.held_by}")
    if survey.recipes_held:
        who = ", ".join(f"{r} ({h})" for r, h in sorted(survey.recipes_held.items()))
        return kept(f"a bake is under way and may need it: {who}")
    user = kept_keys.get((c.namespace, c.key))
    if user:
        return kept(f"used by {user}")
    if not survey.local_builds:
        # more likely a wrong --output, or a cache shared with other output roots
        # (BAKE_CACHE), than a cache nobody needs
        return kept(f"there is no build under {survey.output} to tell which entries are needed")
    if older_than is not None and now - c.modified < older_than:
        return kept(f"younger than {_words(older_than)}")
    return CacheVerdict(c.namespace, c.key, True, "no kept build uses it", c.bytes)
