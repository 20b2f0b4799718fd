"""A content-addressed store of stage outputs: a root tree saved as a tar under its key.

An entry is written to a temporary name of its writer's own and renamed into place, so
an interrupted build never leaves a half-written entry that a later build would trust,
and two writers never share a file. Whoever makes an entry holds its lock (`lock`)
from the look-up to the save, so two bakes that need the same entry make it once: the
second waits and finds it made. A bake run by a farm worker also holds the entry's
lease across the farm and shares the entry through the farm's store (farm/remote.py,
which the CLI makes known here at start: the core imports nothing of the farm). A
temporary file a killed writer left is removed by the next bake (it is in the writer's
journal) or by the next holder of the entry's lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Protocol

from builder.core import exposure, lifetime, locks, sh


class SharedCache(Protocol):
    """A cache shared beyond this box (the farm's, builder/farm/remote.py)."""

    def held(self, cache: TreeCache, key: str) -> ContextManager[None]:
        """Hold the entry `key` across boxes; bring it into `cache` when only the shared cache has it."""
        ...

    def push(self, cache: TreeCache, key: str) -> None:
        """Share the entry `key` of `cache`, just saved."""
        ...


_shared_provider: Callable[[], SharedCache | None] | None = None


def set_shared_provider(provider: Callable[[], SharedCache | None] | None) -> None:
    """Have `shared()` ask `provider` for the shared cache (None: there is none)."""
    global _shared_provider
    _shared_provider = provider


def shared() -> SharedCache | None:
    """The shared stage cache this bake is to use (a farm worker's, when the farm's hooks
    are installed and the environment names one), else None."""
    return _shared_provider() if _shared_provider is not None else None


TAR_FLAGS = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "--sparse"]


def cache_root(output_root: Path) -> Path:
    """BAKE_CACHE, else `<output_root>/.cache`."""
    return Path(os.environ.get("BAKE_CACHE") or Path(output_root) / ".cache")


def key_of(*parts: Any) -> str:
    """A stable key over JSON-able parts."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


@dataclass
class TreeCache:
    """Root trees saved by key, one namespace (bootstrap, packages, ...) per folder."""

    root: Path
    namespace: str

    @property
    def dir(self) -> Path:
        return self.root / self.namespace

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.tar"

    def meta_path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def has(self, key: str) -> bool:
        return self.path(key).is_file() and self.meta_path(key).is_file()

    def meta(self, key: str) -> dict[str, Any]:
        try:
            return json.loads(self.meta_path(key).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def lock_path(self, key: str) -> Path:
        """The lock file of the entry `key` (held while the entry is made or removed)."""
        return self.dir / f"{key}.lock"

    def keys(self) -> list[str]:
        """The keys of the entries in this namespace, whole or with only one of their two
        files left."""
        if not self.dir.is_dir():
            return []
        return sorted({p.name.split(".", 1)[0] for p in self.dir.iterdir()
                       if p.name.endswith((".tar", ".json")) and p.name.count(".") == 1})

    def remove(self, key: str) -> None:
        """Delete the entry `key`: its meta first, so that `has` stops trusting it before
        the tree goes. The caller holds the entry's lock; the lock file itself stays (a
        waiter may have it open)."""
        self.meta_path(key).unlink(missing_ok=True)
        self.path(key).unlink(missing_ok=True)

    def lock(self, key: str):
        """Hold the entry `key` for making it: a context manager that waits while another
        bake holds it. Leftover temporary files of the entry are removed once held (only
        the holder writes them)."""
        @contextlib.contextmanager
        def held():
            exposure.private_dir(self.dir)
            with locks.held(self.lock_path(key), f"the {self.namespace} cache entry {key}"):
                for left in self.dir.glob(f"{key}.*.tmp"):
                    left.unlink(missing_ok=True)
                farm = shared()
                if farm is None:
                    yield
                else:
                    # across boxes too: made once on the farm, taken from its store elsewhere
                    with farm.held(self, key):
                        yield
        return held()

    def save(self, key: str, tree: Path, meta: dict[str, Any]) -> None:
        """Store `tree` under `key` (atomically), with `meta` beside it. The caller holds
        `lock(key)`."""
        exposure.private_dir(self.dir)
        mine = f"{os.getpid()}-{secrets.token_hex(3)}"
        tmp = self.dir / f"{key}.tar.{mine}.tmp"
        mtmp = self.dir / f"{key}.json.{mine}.tmp"
        with lifetime.tracked("path", tmp, what="half-written cache entry"), \
                lifetime.tracked("path", mtmp, what="half-written cache entry"):
            try:
                sh.run(["tar", *TAR_FLAGS, "-C", tree, "-cf", tmp, "."], what=f"saving {self.namespace} cache entry")
                mtmp.write_text(json.dumps(meta, indent=2))
                # the tree first, its meta last: `has` trusts an entry only once both are there
                os.replace(tmp, self.path(key))
                os.replace(mtmp, self.meta_path(key))
            finally:
                tmp.unlink(missing_ok=True)
                mtmp.unlink(missing_ok=True)
        farm = shared()
        if farm is not None:
            farm.push(self, key)

    def restore(self, key: str, tree: Path) -> None:
        """Unpack the entry `key` into the (empty or absent) directory `tree`."""
        tree.mkdir(parents=True, exist_ok=True)
        sh.run(["tar", *TAR_FLAGS, "-C", tree, "-xpf", self.path(key)], what=f"unpacking {self.namespace} cache entry")
