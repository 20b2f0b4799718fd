"""`bake gc --keep N`: retention of builds, cache entries and published images.

Three steps, so that `--dry-run` and a real run cannot disagree:

1. **survey** (reads only): the builds under the output root (their records, states and
   locks, through `records`), the stage cache's entries, and with `--cloud` the images
   of this account (DescribeImages), the instances that use them (DescribeInstances) and
   the bundles under each build's prefix in the bucket;
2. **plan** (`plan_gc`, pure): per recipe, what goes and, for everything kept, why;
3. **execute**: each recipe's builds under the recipe lock, each build under its own
   lock, each cache entry under its lock, all taken without waiting and skipped when held.

On the cloud, a build is found from the cloud's own listing, not only from build.json: an
image whose manifest is at `BUCKET/<recipe>/<build-id>/FILE.manifest.xml` (the prefix
`bake publish` uses) is that build's; images a local record names are attributed by id,
whatever their prefix. A build only the cloud knows of counts as released when the
release marker is in the bucket beside its bundles: the object `<prefix>/released.json`
(`RELEASE_MARKER`), which `bake release` writes.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from builder.core import locks
from builder.operations import records
from builder.core.record import Build
from builder.core.cache import TreeCache, cache_root
from builder.core.errors import BakeError

log = logging.getLogger("bake.gc")

NAMESPACES = ("bootstrap", "base", "packages")  # the TreeCache namespaces gc looks after
RELEASE_MARKER = "released.json"                # beside a build's bundles: `<prefix>/released.json`
IN_USE_STATES = ("pending", "running", "stopping", "stopped")
BUILD_ID = re.compile(r"^(\d{8}-\d{6})(?:\.(\d+))?$")
BUNDLE_FILE = re.compile(r"^(?P<name>.+)\.(?:manifest\.xml|part\.\d+)$")
_AGE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> _dt.timedelta:
    """"7d", "12h", "30m", "90s" or "2w" as a timedelta; a BakeError otherwise."""
    m = _AGE.match(text or "")
    if not m:
        raise BakeError(f"--older-than {text!r}: expected an age such as 7d, 12h, 30m or 2w")
    return _dt.timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def id_time(build_id: str) -> _dt.datetime | None:
    """The UTC time a bake-made build id says (ids are the time the build started)."""
    m = BUILD_ID.match(build_id)
    if not m:
        return None
    return _dt.datetime.strptime(m.group(1), "%Y%m%d-%H%M%S").replace(tzinfo=_dt.timezone.utc)


def _parse_time(stamp: Any) -> _dt.datetime | None:
    if not isinstance(stamp, str) or not stamp:
        return None
    try:
        t = _dt.datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


# --- what the survey finds ------------------------------------------------------------

@dataclass
class CloudImage:
    """One registered image of this account."""

    id: str
    type: str                   # machine, kernel, ramdisk
    location: str               # BUCKET/KEY of its manifest
    name: str = ""
    public: bool = False
    kernel_id: str | None = None
    ramdisk_id: str | None = None

    @property
    def bucket(self) -> str:
        return self.location.partition("/")[0]

    @property
    def manifest_key(self) -> str:
        return self.location.partition("/")[2]

    @property
    def folder(self) -> str:
        """The key prefix its bundle is under ("" at the top of the bucket)."""
        return self.manifest_key.rpartition("/")[0]

    @property
    def bundle_name(self) -> str:
        return self.manifest_key.rpartition("/")[2].removesuffix(".manifest.xml")


@dataclass
class BuildFacts:
    """What the survey found of one build, in the output root and/or on the cloud."""

    recipe: str
    build_id: str
    dir: Path | None = None                 # None: only the cloud has it
    state: str | None = None                # records' state; None for a cloud-only build
    failed_stage: str | None = None
    created: _dt.datetime | None = None
    released_record: bool = False
    held_by: str | None = None              # who holds the build's lock now
    mounts: list[str] = field(default_factory=list)
    cache_keys: list[tuple[str, str]] = field(default_factory=list)
    bytes: int = 0
    images: list[CloudImage] = field(default_factory=list)
    objects: dict[str, list[str]] = field(default_factory=dict)     # bucket -> keys under its prefix
    released_cloud: bool = False            # the release marker is beside its bundles
    record_cloud: dict[str, Any] = field(default_factory=dict, repr=False)  # build.json's "cloud"

    @property
    def name(self) -> str:
        return f"{self.recipe}/{self.build_id}"

    @property
    def when(self) -> _dt.datetime | None:
        return id_time(self.build_id) or self.created

    @property
    def failed(self) -> bool:
        return self.state in (records.FAILED, records.KILLED)


@dataclass
class CacheFacts:
    namespace: str
    key: str
    bytes: int
    modified: _dt.datetime
    held_by: str | None = None


@dataclass
class Survey:
    """Everything `plan_gc` decides from."""

    output: Path
    cache_root: Path
    builds: list[BuildFacts]
    cache: list[CacheFacts]
    recipes_held: dict[str, str]            # recipe -> who holds its lock (a bake under way)
    cloud: bool = False
    instances: dict[str, list[str]] = field(default_factory=dict)   # EMI -> ["i-… (running)"] started from it
    instance_refs: set[str] = field(default_factory=set)            # kernels and ramdisks instances run with
    other_images: list[CloudImage] = field(default_factory=list)    # the account's images of no build
    scope: list[str] | None = None          # recipes gc was asked about (None: all)
    other_cache_users: dict[tuple[str, str], str] = field(default_factory=dict)  # entries builds out of scope use
    local_builds: int = 0                   # builds found under the output root, of any recipe
    warnings: list[str] = field(default_factory=list)


# --- the plan ---------------------------------------------------------------------------

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
            v = BuildVerdict(recipe, b.build_id, goes, reasons, str(b.dir) if b.dir else None, b.bytes)
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
    goes = {(v.recipe, v.build_id) for v in verdicts if v.goes}
    kept_keys: dict[tuple[str, str], str] = dict(survey.other_cache_users)
    for b in survey.builds:
        if (b.recipe, b.build_id) not in goes:
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


# --- the survey (reads only) ------------------------------------------------------------

def _tree_bytes(path: Path) -> int:
    total = 0
    for top, dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except OSError:
                pass
    return total


def _recorded_keys(data: dict[str, Any]) -> list[tuple[str, str]]:
    """The cache entries a build's record says it used (bootstrap or base key, package checkpoint)."""
    stages = data.get("stages") if isinstance(data.get("stages"), dict) else {}
    found = []
    where = (("bootstrap", "bootstrap", "key"), ("packages", "customize", "checkpoint_key"))
    for namespace, stage, field_name in where:
        rec = stages.get(stage)
        if isinstance(rec, dict) and isinstance(rec.get(field_name), str) and rec[field_name]:
            # a base image's root tree is kept in a namespace of its own, which its record names
            found.append((rec.get("namespace") or namespace, rec[field_name]))
    return found


def _held(path: Path) -> str | None:
    try:
        return locks.holder_of(path) if locks.is_held(path) else None
    except OSError:
        return "a holder that cannot be checked"


def survey_local(output: str | os.PathLike, scope: Iterable[str] | None = None) -> Survey:
    """Builds under `output`, the stage cache's entries and the recipes being baked now.
    Builds of recipes outside `scope` are not planned, but the cache entries they use
    are kept."""
    from builder.core import sh

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
        facts = BuildFacts(s.recipe, s.build_id, s.dir, s.state, s.failed_stage, _parse_time(s.created),
                           released_record=bool(s.released), cache_keys=_recorded_keys(build.data),
                           record_cloud=build.data.get("cloud") or {})
        if scope is not None and s.recipe not in scope:
            for k in facts.cache_keys:
                survey.other_cache_users.setdefault(k, facts.name)
            continue
        facts.held_by = _held(build.lock_path)
        facts.mounts = sh.mounts_under(s.dir)
        facts.bytes = _tree_bytes(s.dir)
        survey.builds.append(facts)
    state = locks.recipe_locks_dir()
    if state.is_dir():
        for lock in sorted(state.glob("*.lock")):
            holder = _held(lock)
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
                _held(cache.lock_path(key))))
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
    from builder.cloud import inventory

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
    survey.instances = _in_use(live)
    survey.instance_refs = {ref for i in live for ref in (i.kernel_id, i.ramdisk_id) if ref}
    for b in survey.builds:
        folders = {(im.bucket, im.folder) for im in b.images}
        if same_cloud(b.record_cloud) and b.record_cloud.get("bucket") and b.record_cloud.get("prefix"):
            folders.add((b.record_cloud["bucket"], str(b.record_cloud["prefix"]).strip("/")))
        for bucket, folder in sorted(folders):
            if not folder:
                continue    # a bundle at the top of a bucket: nothing there says which build it is
            keys = inventory.keys_under(clients, bucket, folder, creds)
            if f"{folder}/{RELEASE_MARKER}" in keys:
                b.released_cloud = True
            listed = b.objects.setdefault(bucket, [])
            listed += [k for k in keys if k not in listed]


def _in_use(instances) -> dict[str, list[str]]:
    """EMI -> the instances started from it that have not ended, as "i-… (state)"."""
    found: dict[str, list[str]] = {}
    for inst in instances:
        if inst.state in IN_USE_STATES and inst.image_id:
            found.setdefault(inst.image_id, []).append(f"{inst.id} ({inst.state})")
    return found


# --- doing it -------------------------------------------------------------------------------

def execute(plan: GcPlan, survey: Survey, clients=None, creds=None) -> GcPlan:
    """Remove what `plan` says goes, each recipe's builds under its recipe lock, each
    build under its own lock and each cache entry under its lock, all taken without
    waiting: whatever is held now is skipped, and its `outcome` says by whom. A build's
    cloud side goes before its folder, so that a failure leaves the record that says
    where its images are."""
    import contextlib

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
                from builder.cloud import inventory
                used = _in_use(inventory.instances(clients, creds))    # an instance started since the survey
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
    import contextlib

    from builder.core import sh

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
        if clients is not None:
            from builder.cloud.images import deregister
            from builder.cloud.publish import PublishOptions
            from builder.cloud.store import delete_object

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
            shutil.rmtree(build.dir)
            build.lock_path.unlink(missing_ok=True)     # held by us: nobody waits on a folder that is gone
    return "removed"


def _remove_cache_entry(root: Path, c: CacheVerdict) -> str:
    cache = TreeCache(root, c.namespace)
    try:
        with locks.held(cache.lock_path(c.key), f"the {c.namespace} cache entry {c.key}", wait=False):
            # a bake that started since the survey may need any entry: it holds its recipe
            state = locks.recipe_locks_dir()
            started = [p.stem for p in state.glob("*.lock") if _held(p)] if state.is_dir() else []
            if started:
                return f"skipped: a bake of {', '.join(started)} started meanwhile"
            cache.remove(c.key)
    except locks.Busy as e:
        return f"skipped: {e}"
    return "removed"
