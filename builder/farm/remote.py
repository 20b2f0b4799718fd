"""The stage cache shared through the farm's store: a base made on one box is used by
the others.

An entry of a local namespace (bootstrap, base, packages) is mirrored at
`cache/<namespace>/<key>.tar` with `cache/<namespace>/<key>.json` beside it (the
entry's own meta, and the tar's SHA-256). The meta is written last, so an entry is
there for others only once both are. Making an entry is guarded, across boxes, by the
lease `cache:<namespace>:<key>`, held from the look-up to the upload: a second box that
needs the same base waits for it and then downloads it (checked against its SHA-256)
instead of making it again.

A bake uses this when its worker says so (BAKE_FARM_SHARED_CACHE=1 and the farm's
Redis and store in its environment); a bake on its own box never does. The stage cache
(core/cache.py) asks `current()` for it once the farm's hooks are installed
(builder/farm/hooks.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
from typing import Iterator

from builder.core import lifetime
from .connect import EUCARC_ENV, REDIS_ENV, STORE_ENV, Farm
from .lease import Lease, describe

log = logging.getLogger("bake.farm")

ENV = "BAKE_FARM_SHARED_CACHE"


def env_said() -> tuple:
    """The variables from_env reads, as they are now."""
    return tuple(os.environ.get(k) for k in (ENV, REDIS_ENV, STORE_ENV, EUCARC_ENV))


def from_env():
    """The shared cache this bake was told to use, or None."""
    if os.environ.get(ENV) != "1":
        return None
    farm = Farm(os.environ.get(REDIS_ENV, ""), os.environ.get(STORE_ENV, ""), os.environ.get(EUCARC_ENV) or None)
    return SharedCache(farm)


_current: tuple = (None, None)


def current() -> SharedCache | None:
    """The shared cache the environment names now (see `from_env`). Made again when the
    variables that name it change, so one process never keeps a farm it was once told of."""
    global _current
    said = env_said()
    if _current[0] != said:
        _current = (said, from_env())
    return _current[1]


class SharedCache:
    def __init__(self, farm: Farm):
        self.farm = farm
        self._conn = None
        self._store = None

    @property
    def conn(self):
        if self._conn is None:
            self._conn = self.farm.redis()
        return self._conn

    @property
    def store(self):
        if self._store is None:
            self._store = self.farm.store()
        return self._store

    @staticmethod
    def names(namespace: str, key: str) -> tuple[str, str]:
        return f"cache/{namespace}/{key}.tar", f"cache/{namespace}/{key}.json"

    @contextlib.contextmanager
    def held(self, cache, key: str) -> Iterator[None]:
        """Hold the entry `key` of the local TreeCache `cache` across the farm, and bring
        the store's copy into the local cache when only the store has it."""
        lease = Lease(self.conn, f"cache:{cache.namespace}:{key}", what=f"the {cache.namespace} cache entry {key}")
        lease.acquire(on_wait=lambda other: log.warning(
            "waiting for the %s cache entry %s, being made by %s", cache.namespace, key, describe(other)))
        lease.keep()
        try:
            if not cache.has(key):
                self.fetch(cache, key)
            yield
        finally:
            lease.release()

    def fetch(self, cache, key: str) -> bool:
        """Download the store's entry `key` into the local cache; False when it has none."""
        tar_name, meta_name = self.names(cache.namespace, key)
        meta = self.store.get_json(meta_name)
        if not isinstance(meta, dict) or "tar_sha256" not in meta:
            return False
        cache.dir.mkdir(parents=True, exist_ok=True)
        mine = f"{os.getpid()}-{secrets.token_hex(3)}"
        tmp = cache.dir / f"{key}.tar.{mine}.tmp"
        mtmp = cache.dir / f"{key}.json.{mine}.tmp"
        with lifetime.tracked("path", tmp, what="cache entry being downloaded"), \
                lifetime.tracked("path", mtmp, what="cache entry being downloaded"):
            try:
                log.warning("taking the %s cache entry %s from the farm's store (made on %s)",
                            cache.namespace, key, meta.get("host", "?"))
                self.store.get_file(tar_name, tmp, sha256=meta["tar_sha256"])
                own = dict(meta.get("meta") or {})
                own["from_farm_store"] = {"host": meta.get("host"), "sha256": meta["tar_sha256"]}
                mtmp.write_text(json.dumps(own, indent=2))
                os.replace(tmp, cache.path(key))
                os.replace(mtmp, cache.meta_path(key))
            finally:
                tmp.unlink(missing_ok=True)
                mtmp.unlink(missing_ok=True)
        return True

    def push(self, cache, key: str) -> None:
        """Upload the local entry `key` (the tar first, its meta last)."""
        tar_name, meta_name = self.names(cache.namespace, key)
        sent = self.store.put_file(tar_name, cache.path(key))
        self.store.put_json(meta_name, {"meta": cache.meta(key), "tar_sha256": sent["sha256"], "size": sent["size"],
                                        "host": socket.gethostname()})
        log.info("the %s cache entry %s is in the farm's store", cache.namespace, key)
