"""Durable build records of the farm, in the store: `builds/<recipe>/<build-id>.json`,
with the build's log at `logs/<recipe>/<build-id>.log` and its artifacts under
`artifacts/<recipe>/<build-id>/`.

A record is written when a worker starts a build (state "building"), at every stage
it finishes, and when it ends (its state, stage times, digests, image ids, where its
log and artifacts are). Redis may be lost with everything in it; these are not, and
`bake ls --farm`, `bake status` and `bake gc --farm` read only them (and, for whether a
build is still going, the recipe's lease when Redis answers).

The state of a farm build, as `ls --farm` shows it: released (a `released` section),
building (state "building" and its recipe's lease is held for it), killed (state
"building" and nobody holds the lease for it: its worker died), else the state the
worker recorded: ok, verified, published, failed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from builder.core.errors import BakeError
from builder.farm.lease import Lease, holder

log = logging.getLogger("bake.farm")

BUILDING, KILLED, RELEASED = "building", "killed", "released"
FARM_BUILD_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{4,16}$")   # jobs.new_build_id's form


def record_name(recipe: str, build_id: str) -> str:
    return f"builds/{recipe}/{build_id}.json"


def log_name(recipe: str, build_id: str) -> str:
    return f"logs/{recipe}/{build_id}.log"


def artifact_folder(recipe: str, build_id: str) -> str:
    return f"artifacts/{recipe}/{build_id}/"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class FarmRecord:
    """One build's durable record, written through `store` as it changes."""

    store: Any
    recipe: str
    build_id: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return record_name(self.recipe, self.build_id)

    def save(self) -> None:
        self.store.put_json(self.name, self.data)

    def update(self, **values: Any) -> None:
        self.data.update(values)
        self.save()

    def stage(self, name: str, **info: Any) -> None:
        """Merge `info` into the record of stage `name` (kept in memory; saved by the
        caller when the stage ends)."""
        self.data.setdefault("stages", {}).setdefault(name, {}).update(info)


def list_records(store, recipe: str | None = None) -> list[dict[str, Any]]:
    """Every durable record (of `recipe`), oldest build first per recipe. A record that
    cannot be read is reported (a warning) and left out."""
    folder = f"builds/{recipe}/" if recipe else "builds/"
    found = []
    for name in store.list(folder):
        if not name.endswith(".json"):
            continue
        try:
            data = store.get_json(name)
        except BakeError as e:
            log.warning("%s", e)
            continue
        if not isinstance(data, dict) or not data.get("recipe") or not data.get("build_id"):
            log.warning("%s: not a farm build record; left out", name)
            continue
        data["_name"] = name
        found.append(data)
    return sorted(found, key=lambda d: (d["recipe"], d["build_id"]))


def lease_holders(conn, recipes: set[str]) -> dict[str, str | None] | None:
    """The build id each recipe's lease is held for now; None when Redis cannot be read
    (then nobody can say a build is still going: `ls` says "building?")."""
    if conn is None:
        return None
    try:
        return {r: (holder(conn, f"recipe:{r}") or {}).get("build_id") for r in recipes}
    except Exception as e:           # Redis gone: the records still stand
        log.warning("the farm's Redis does not answer (%s); leases unknown", e)
        return None


def state_of(rec: dict[str, Any], holders: dict[str, str | None] | None) -> str:
    if rec.get("released"):
        return RELEASED
    state = rec.get("state") or BUILDING
    if state == BUILDING:
        if holders is None:
            return "building?"
        return BUILDING if holders.get(rec["recipe"]) == rec["build_id"] else KILLED
    return state


@contextlib.contextmanager
def build_lease(conn, recipe: str, build_id: str, what: str) -> Iterator[None]:
    """Hold the farm lease of one build (`build:<recipe>/<build-id>`) for the block: what
    `bake release` holds while it marks a record released and `gc --farm` while it reads
    a record again and deletes it. Without Redis (`conn` None) nothing is held: gc still
    reads the record again immediately before it deletes."""
    if conn is None:
        yield
        return
    lease = Lease(conn, f"build:{recipe}/{build_id}", ttl=120, what=what, extra={"build_id": build_id})
    lease.acquire(timeout=60)
    try:
        yield
    finally:
        lease.release()


def mark_released(store, recipe: str, build_id: str, released: dict[str, Any], conn=None) -> dict[str, Any]:
    """Write `released` into the build's durable record (so `gc --farm` keeps it and `ls
    --farm` says released), under the build's lease; a BakeError when the store has no
    record of it. Returns the record as written."""
    name = record_name(recipe, build_id)
    with build_lease(conn, recipe, build_id, f"releasing {recipe}/{build_id}"):
        data = store.get_json(name)
        if not isinstance(data, dict) or data.get("build_id") != build_id:
            raise BakeError(f"the farm's store {store.url} has no record of {recipe}/{build_id} ({name}): is it "
                            "the store of the farm that made it?")
        data["released"] = released
        store.put_json(name, data)
    return data
