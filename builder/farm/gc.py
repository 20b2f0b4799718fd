"""`bake gc --farm`: retention in the farm's store, as `bake gc` keeps builds on one box."""

from __future__ import annotations

from typing import Any

from builder.core.errors import BakeError
from builder.core.locks import Busy
from builder.farm.connect import Farm
from builder.farm.jobs import JOB_TIMEOUT
from builder.farm.records import (
    BUILDING,
    RELEASED,
    artifact_folder,
    build_lease,
    lease_holders,
    list_records,
    log_name,
    state_of,
)

GOOD = ("ok", "published", "verified")


def gc_farm(farm: Farm, keep: int, *, dry_run: bool, recipes: list[str] | None = None,
            temporary_after: float | None = None) -> dict[str, Any]:
    """Keep the `keep` newest good builds of each recipe in the store (and every released
    one, every one still building, a failed or killed one among the `keep` newest); delete the rest:
    artifacts and log first, the record last. Uploads a killed writer left half-done
    (`.tmp/`) go once older than `temporary_after` s (the job timeout: no live job
    writes one for longer). {"kept": [...], "deleted": [...], "temporary": [...]}"""
    store = farm.store()
    limit = JOB_TIMEOUT if temporary_after is None else temporary_after
    temporary = [{"name": name, "age": round(age)} for name, age in store.ages(".tmp/") if age > limit]
    if not dry_run:
        for t in temporary:
            store.delete(t["name"])
    records = list_records(store)
    if recipes:
        records = [r for r in records if r["recipe"] in recipes]
    conn = None
    if farm.redis_url:
        try:
            conn = farm.redis()
        except BakeError:
            conn = None
    holders = lease_holders(conn, {r["recipe"] for r in records})
    kept, deleted = [], []
    by_recipe: dict[str, list[dict]] = {}
    for r in records:
        by_recipe.setdefault(r["recipe"], []).append(r)
    for name, recs in by_recipe.items():
        ranked = sorted(recs, key=lambda d: d["build_id"], reverse=True)
        states = {r["build_id"]: state_of(r, holders) for r in ranked}
        # as on one box: the N newest good builds, and a failed or killed one among the N
        # newest of all (to be looked into); a build still going takes no place among them
        newest_good = {r["build_id"] for r in ranked if states[r["build_id"]] in GOOD}
        newest_good = set(sorted(newest_good, reverse=True)[:keep])
        newest = {r["build_id"] for r in ranked[:keep]}
        for r in ranked:
            state = states[r["build_id"]]
            entry = {"recipe": name, "build_id": r["build_id"], "state": state}
            if state == RELEASED:
                kept.append({**entry, "why": "released"})
            elif state == BUILDING:
                kept.append({**entry, "why": "its lease is held (building)"})
            elif state == "building?":
                kept.append({**entry, "why": "Redis cannot say whether it is building"})
            elif r["build_id"] in newest_good:
                kept.append({**entry, "why": f"one of the {keep} newest"})
            elif r["build_id"] in newest and state not in GOOD:
                kept.append({**entry, "why": f"{state}, among the {keep} newest: kept to be looked into"})
            elif dry_run:
                deleted.append({**entry, "why": f"beyond the {keep} newest"})
            else:
                why = _delete_build(store, r, conn)
                if why:
                    kept.append({**entry, "state": RELEASED if why.startswith("released") else state, "why": why})
                else:
                    deleted.append({**entry, "why": f"beyond the {keep} newest"})
    return {"keep": keep, "dry_run": dry_run, "kept": kept, "deleted": deleted, "temporary": temporary}


def _delete_build(store, r: dict, conn) -> str | None:
    """Delete the build's artifacts, log and record, under its lease, unless its record,
    read again now, says it was released since the listing (then: why it stays)."""
    recipe, build_id = r["recipe"], r["build_id"]
    try:
        with build_lease(conn, recipe, build_id, f"gc of {recipe}/{build_id}"):
            now = store.get_json(r["_name"])
            if isinstance(now, dict) and now.get("released"):
                return "released since the listing"
            for name in list(store.list(artifact_folder(recipe, build_id))):
                store.delete(name)
            store.delete(log_name(recipe, build_id))
            store.delete(r["_name"])
    except Busy as e:
        return f"skipped: {e}"
    return None
