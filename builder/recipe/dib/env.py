"""The recipe's `dib.env`: the DIB_ variables a build's hooks get, with the values kept
secret out of logs, records, cache keys (an HMAC under the cache's own salt) and the image."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.core.errors import BakeError


@dataclass
class DibEnv:
    """The recipe's `dib.env`, resolved: values as hooks see them, and which are secret."""
    values: dict[str, str]
    secret: set[str]
    missing: dict[str, str] = field(default_factory=dict)   # name -> the unset variable its from_env names

    def check(self) -> None:
        """A BakeError for a from_env variable that is not set (needed to plan or bake;
        verifying a build does not need it)."""
        for name, var in self.missing.items():
            raise BakeError(f"dib.env.{name}: from_env names {var}, which is not set in bake's environment")

    def public(self) -> dict[str, str]:
        """The values as a record may show them: a secret one as "(secret)"."""
        return {k: ("(secret)" if k in self.secret else v) for k, v in self.values.items()}

    def secret_values(self) -> list[str]:
        """The secret values that are set (what logs must not show)."""
        return [self.values[k] for k in self.secret if self.values.get(k)]


def resolve_env(spec: dict[str, Any], recipe_dir: Path, environ: Mapping[str, str] | None = None) -> DibEnv:
    """`dib.env` from a recipe: a value is a string (numbers and booleans as text), or
    a mapping of `value` / `from_env` (a variable of bake's environment) / `file` (a path
    beside the recipe, made absolute) with `secret: true` to keep it out of logs, records
    and the image."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    values: dict[str, str] = {}
    secret: set[str] = set()
    missing: dict[str, str] = {}
    for name, v in (spec or {}).items():
        if isinstance(v, dict):
            if "from_env" in v:
                if v["from_env"] not in env:
                    missing[name] = v["from_env"]
                val = env.get(v["from_env"], "")
            elif "file" in v:
                f = (recipe_dir / v["file"]).resolve()
                if not f.is_file():
                    raise BakeError(f"dib.env.{name}: no such file: {v['file']} (looked for {f})")
                val = str(f)
            else:
                val = _text(v.get("value"))
            if v.get("secret"):
                secret.add(name)
        else:
            val = _text(v)
        values[name] = val
    return DibEnv(values, secret, missing)


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else ""
    return "" if v is None else str(v)


def secret_digest(salt: bytes, name: str, value: str) -> str:
    """What a secret value contributes to a cache key: an HMAC under the cache's own salt,
    so the key changes with the value but cannot be checked against guesses without it."""
    return hmac.new(salt, f"{name}\0{value}".encode(), hashlib.sha256).hexdigest()


def cache_salt(cache_root: Path) -> bytes:
    """The cache's salt for secret digests (made on first use, readable by root only)."""
    f = cache_root / "dib-secret-salt"
    if not f.exists():
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = cache_root / f".dib-secret-salt.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(32))
        try:
            os.link(tmp, f)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return f.read_bytes()


def dib_env_declaration(env: DibEnv) -> str:
    """DIB_ENV as disk-image-create exports it (`declare -p` of the DIB_ variables),
    without the secret ones: the manifests element stores it in the image."""
    return "\n".join(f"declare -x {k}={shlex.quote(v)}" for k, v in sorted(env.values.items()) if k not in env.secret)
