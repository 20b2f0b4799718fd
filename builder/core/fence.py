"""The last check before a build writes where others read: a bake run by a farm worker
holds its recipe's lease (builder/farm/lease.py) only as long as it keeps renewing it.
Publishing calls `check(what)` before it uploads and again before it registers; with
no farm lease in the environment (a bake on one box, guarded by its flock) it passes.
"""

from __future__ import annotations

import json
import os

ENV = "BAKE_FARM_LEASE"        # JSON: {"redis": URL, "name": lease name, "token": ...}


def check(what: str) -> None:
    """Raise (a BakeError) when this bake runs for a farm and no longer holds its lease."""
    raw = os.environ.get(ENV)
    if not raw:
        return
    from builder.farm.lease import check_spec
    from builder.farm.connect import redis_from_url

    spec = json.loads(raw)
    conn = redis_from_url(spec["redis"])
    try:
        check_spec(conn, spec, what)
    finally:
        conn.close()
