"""The stream index of released images under an output root (`streams/v1/`, simplestreams
v1, the format Ubuntu publishes its cloud images in): per recipe and architecture, a
version per released and published build, whose items are its EMI, EKI and ERI. Rebuilt
from the build records by every release."""

from __future__ import annotations

import email.utils
import json
import re
from pathlib import Path
from typing import Any, Callable

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


def write_streams(output_root: Path, sign: Callable[[str], str] | None = None) -> Path:
    """Rebuild the stream index under `output_root` from the build records: `streams/v1/
    index.json` and its products file, each written atomically. Returns the index.

    With `sign` (text -> the text clearsigned), also their signed forms as simplestreams'
    clients read them: `index.sjson`, whose products' paths name their `.sjson`, and the
    products file's `.sjson`. Without it, signed forms left by an earlier release are
    removed: they would vouch for an index that is no longer this one."""
    output_root = Path(output_root)
    lock = state_dir() / "streams" / (re.sub(r"[^A-Za-z0-9]", "_", str(output_root.resolve()))[-100:] + ".lock")
    with locks.held(lock, f"the stream index of {output_root}"):
        products = stream_products(output_root)
        updated = email.utils.formatdate(usegmt=True)
        products_path = f"{STREAMS}/{CONTENT_ID}.json"
        doc = {"content_id": CONTENT_ID, "format": "products:1.0", "datatype": "image-ids", "updated": updated,
               "products": products}

        def index(path: str) -> dict[str, Any]:
            return {"format": "index:1.0", "updated": updated,
                    "index": {CONTENT_ID: {"format": "products:1.0", "datatype": "image-ids", "path": path,
                                           "updated": updated, "products": sorted(products)}}}

        def text(data: dict[str, Any]) -> str:
            return json.dumps(data, indent=2, sort_keys=True) + "\n"

        signed_products = products_path.removesuffix(".json") + ".sjson"
        index_path = output_root / STREAMS / "index.json"
        signed_index = index_path.with_suffix(".sjson")
        write_text(output_root / products_path, text(doc))
        write_text(index_path, text(index(products_path)))
        if sign is not None:
            write_text(output_root / signed_products, sign(text(doc)))
            write_text(signed_index, sign(text(index(signed_products))))
        else:
            (output_root / signed_products).unlink(missing_ok=True)
            signed_index.unlink(missing_ok=True)
    return index_path
