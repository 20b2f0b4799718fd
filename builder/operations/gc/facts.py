"""What `bake gc`'s survey finds: the builds (in the output root and on the cloud), the
stage cache's entries and what holds them, and the ages and ids gc reads."""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.core.errors import BakeError
from builder.operations import records


NAMESPACES = ("bootstrap", "base", "packages")  # the TreeCache namespaces gc looks after
RELEASE_MARKER = "released.json"                # beside a build's bundles: `<prefix>/released.json`
IN_USE_STATES = ("pending", "running", "stopping", "stopped")
# a bake's id (the time it started, ".N" when two started in the same second) or a farm
# job's (the time and "-" and a few hex digits, builder.farm.jobs.new_build_id)
BUILD_ID = re.compile(r"^(\d{8}-\d{6})(?:\.(\d+)|-[0-9a-f]{4,16})?$")
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


def parse_time(stamp: Any) -> _dt.datetime | None:
    """An ISO time stamp as an aware datetime (UTC when it names no zone); None when it is none."""
    if not isinstance(stamp, str) or not stamp:
        return None
    try:
        t = _dt.datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


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
    folders: list[str] = field(default_factory=list)  # "BUCKET/FOLDER" its bundles are under
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
