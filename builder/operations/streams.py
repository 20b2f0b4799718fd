"""The stream index of released images under an output root (`streams/v1/`, simplestreams
v1, the format Ubuntu publishes its cloud images in): per recipe and architecture, a
version per released and published build, whose items are its EMI, EKI and ERI. Rebuilt
from the build records by every release."""

from __future__ import annotations

import email.utils
import json
import re
from pathlib import Path
from typing import Any

from builder.core import locks
from builder.core.atomic import write_text
from builder.core.state import state_dir
from builder.operations.records import find_builds, image_ids, load_build

STREAMS = "streams/v1"
CONTENT_ID = "bake:released:image-ids"


def stream_products(output_root: Path) -> dict[str, Any]:
    """The products of the stream: per recipe and architecture, a version per released
    and published build (keyed by build id), whose items are its EMI, EKI and ERI."""
    builds, _ = find_builds(output_root)
    products: dict[str, Any] = {}
    for s in builds:
        if not s.released:
            continue
        build = load_build(s.dir)
        ids = image_ids(build)
        if not ids["emi"]:
            continue        # a release that was never published has no image ids to list
        distro, _, suite = str(build.data.get("release") or "/").partition("/")
        arch = str(build.data.get("arch") or "unknown")
        cloud = build.data.get("cloud") or {}
        released = build.data["released"] if isinstance(build.data["released"], dict) else {}
        product = products.setdefault(f"bake:{s.recipe}:{arch}", {
            "recipe": s.recipe, "arch": arch, "os": distro, "release": suite, "versions": {}})
        where = {"crsn": cloud.get("region") or "eucalyptus", "endpoint": cloud.get("ec2_url") or "",
                 "root_store": "instance-store", "virt": "paravirtual"}
        items = {}
        for key, role in (("emi", "machine"), ("eki", "kernel"), ("eri", "ramdisk")):
            if ids[key]:
                items[key] = {"id": ids[key], "itype": role, **where}
        items["emi"].update(kernel_id=ids["eki"], ramdisk_id=ids["eri"])
        product["versions"][build.id] = {
            "build_id": build.id, "label": "release", "pubname": f"{s.recipe}-{build.id}",
            "released": released.get("at"), "public": bool(released.get("public")), "items": items}
    return products


def write_streams(output_root: Path) -> Path:
    """Rebuild the stream index under `output_root` from the build records: `streams/v1/
    index.json` and its products file, each written atomically. Returns the index."""
    output_root = Path(output_root)
    lock = state_dir() / "streams" / (re.sub(r"[^A-Za-z0-9]", "_", str(output_root.resolve()))[-100:] + ".lock")
    with locks.held(lock, f"the stream index of {output_root}"):
        products = stream_products(output_root)
        updated = email.utils.formatdate(usegmt=True)
        products_path = f"{STREAMS}/{CONTENT_ID}.json"
        doc = {"content_id": CONTENT_ID, "format": "products:1.0", "datatype": "image-ids", "updated": updated,
               "products": products}
        index = {"format": "index:1.0", "updated": updated,
                 "index": {CONTENT_ID: {"format": "products:1.0", "datatype": "image-ids", "path": products_path,
                                        "updated": updated, "products": sorted(products)}}}
        write_text(output_root / products_path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
        index_path = output_root / STREAMS / "index.json"
        write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index_path
