"""A content-addressed store of stage outputs: a root tree saved as a tar under its key.

An entry is written to a temporary name and renamed into place, so an interrupted
build never leaves a half-written entry that a later build would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import sh

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

    def save(self, key: str, tree: Path, meta: dict[str, Any]) -> None:
        """Store `tree` under `key` (atomically), with `meta` beside it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path(key).with_suffix(".tar.tmp")
        try:
            sh.run(["tar", *TAR_FLAGS, "-C", tree, "-cf", tmp, "."], what=f"saving {self.namespace} cache entry")
            os.replace(tmp, self.path(key))
        finally:
            tmp.unlink(missing_ok=True)
        m = self.meta_path(key)
        m.with_suffix(".tmp").write_text(json.dumps(meta, indent=2))
        os.replace(m.with_suffix(".tmp"), m)

    def restore(self, key: str, tree: Path) -> None:
        """Unpack the entry `key` into the (empty or absent) directory `tree`."""
        tree.mkdir(parents=True, exist_ok=True)
        sh.run(["tar", *TAR_FLAGS, "-C", tree, "-xpf", self.path(key)], what=f"unpacking {self.namespace} cache entry")
