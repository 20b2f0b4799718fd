"""The stage cache shared through the farm's store: a base made on one box is used by
the others.

An entry of a local namespace (bootstrap, base, packages) is mirrored at
`cache/<namespace>/<key>.tar` with `cache/<namespace>/<key>.json` beside it (the
entry's own meta, and the tar's SHA-256). The meta is written last, so an entry is
there for others only once both are. Making an entry is guarded, across boxes, by the
lease `cache:<namespace>:<key>`, held from the look-up to the upload: a second box that
needs the same base waits for it and then downloads it (checked against its SHA-256)
instead of making it again.

Whoever can write to the store could change a tar and the SHA-256 beside it, and so
every later image made from the entry. So the meta record is signed: an HMAC-SHA256,
with the farm key every box holds (the file `BAKE_FARM_KEY_FILE` names, mode 600), over
the entry's namespace, key and record. An entry whose signature does not match (a tar
or a record changed, signed with another key, or not at all) or whose tar does not
match its signed SHA-256 is refused with a warning naming it, and made on this box
instead, which then uploads it again. With no farm key the shared cache is off.

A bake uses this when its worker says so (BAKE_FARM_SHARED_CACHE=1 and the farm's
Redis, store and key in its environment); a bake on its own box never does. The stage
cache (core/cache.py) asks `current()` for it once the farm's hooks are installed
(builder/farm/hooks.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import socket
import stat
from pathlib import Path
from typing import Any, Iterator

from builder.core import lifetime
from builder.core.errors import BakeError
from .connect import EUCARC_ENV, REDIS_ENV, STORE_ENV, Farm
from .lease import Lease, describe

log = logging.getLogger("bake.farm")

ENV = "BAKE_FARM_SHARED_CACHE"
KEY_ENV = "BAKE_FARM_KEY_FILE"
SIGNED = ("meta", "tar_sha256", "size", "host")     # what of an entry's record its signature covers


def env_said() -> tuple:
    """The variables from_env reads, as they are now."""
    return tuple(os.environ.get(k) for k in (ENV, REDIS_ENV, STORE_ENV, EUCARC_ENV, KEY_ENV))


def farm_key() -> bytes | None:
    """The farm key from the file BAKE_FARM_KEY_FILE names, None when it names none; a
    BakeError when that file cannot be read, others may read it, or it is too short."""
    path = os.environ.get(KEY_ENV)
    if not path:
        return None
    try:
        mode = os.stat(path).st_mode
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise BakeError(f"the farm key {KEY_ENV}={path}: cannot read it ({e})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BakeError(f"the farm key {KEY_ENV}={path}: others than its owner may read it (mode "
                        f"{stat.S_IMODE(mode):04o}); chmod 600 it")
    if len(key) < 32:
        raise BakeError(f"the farm key {KEY_ENV}={path}: {len(key)} bytes; it needs at least 32 "
                        "(e.g. `openssl rand -hex 32`), the same on every box")
    return key


def sign(key: bytes, namespace: str, name: str, record: dict[str, Any]) -> str:
    """The HMAC-SHA256 of the entry `namespace`/`name`'s record (its SIGNED fields)."""
    body = json.dumps({"namespace": namespace, "key": name, **{k: record.get(k) for k in SIGNED}},
                      sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def from_env():
    """The shared cache this bake was told to use, or None (also when no farm key is
    there to check its entries, which a warning says)."""
    if os.environ.get(ENV) != "1":
        return None
    key = farm_key()
    if key is None:
        log.warning("the farm's shared stage cache is off: no farm key to check its entries (%s, the same on "
                    "every box)", KEY_ENV)
        return None
    farm = Farm(os.environ.get(REDIS_ENV, ""), os.environ.get(STORE_ENV, ""), os.environ.get(EUCARC_ENV) or None)
    return SharedCache(farm, key)


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
    def __init__(self, farm: Farm, secret: bytes):
        self.farm = farm
        self.secret = secret            # the farm key, which signs and checks the entries' records
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

    def refusal(self, namespace: str, key: str, record: object) -> str | None:
        """Why the store's record of an entry must not be used, or None."""
        if not isinstance(record, dict):
            return "its record is not a JSON object"
        if not isinstance(record.get("hmac"), str) or not hmac.compare_digest(
                record["hmac"], sign(self.secret, namespace, key, record)):
            return "its signature does not match (changed in the store, or not signed with this farm's key)"
        if not isinstance(record.get("tar_sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", record["tar_sha256"]):
            return "its record names no SHA-256"
        return None

    def fetch(self, cache, key: str) -> bool:
        """Download the store's entry `key` into the local cache; False when it has none,
        or has one that is refused (a warning names it and why)."""
        tar_name, meta_name = self.names(cache.namespace, key)
        try:
            meta = self.store.get_json(meta_name)
        except BakeError as e:
            meta = e
        if meta is None:
            return False
        why = str(meta) if isinstance(meta, BakeError) else self.refusal(cache.namespace, key, meta)
        if why is not None:
            log.warning("refused the farm's %s cache entry %s: %s; it is made on this box instead",
                        cache.namespace, key, why)
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
                try:
                    self.store.get_file(tar_name, tmp, sha256=meta["tar_sha256"])
                except BakeError as e:
                    log.warning("refused the farm's %s cache entry %s: %s; it is made on this box instead",
                                cache.namespace, key, e)
                    return False
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
        """Upload the local entry `key` (the tar first, its signed record last)."""
        tar_name, meta_name = self.names(cache.namespace, key)
        sent = self.store.put_file(tar_name, cache.path(key))
        record = {"meta": cache.meta(key), "tar_sha256": sent["sha256"], "size": sent["size"],
                  "host": socket.gethostname()}
        record["hmac"] = sign(self.secret, cache.namespace, key, record)
        self.store.put_json(meta_name, record)
        log.info("the %s cache entry %s is in the farm's store", cache.namespace, key)
