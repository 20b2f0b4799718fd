"""Recipes that share a base: the demo recipe under other names, each with a file of
its own (so the images differ while the base and packages are the same)."""

from __future__ import annotations

from pathlib import Path

import yaml

from builder.core import sh
from conftest import REPO


def recipes(tmp_path: Path, skip_checks: list[str] | None = None) -> list[Path]:
    """The demo recipe and a copy under another name (a file of its own, so the images
    differ while base and packages are the same); their verification leaves out
    `skip_checks`."""
    demo = yaml.safe_load((REPO / "recipes" / "debian-demo.yml").read_text())
    paths = []
    for name in ("shared-base-a", "shared-base-b"):
        data = dict(demo, name=name)
        own = tmp_path / f"{name}.txt"
        own.write_text(f"{name}\n")
        data["files"] = [*(demo.get("files") or []), {"source": str(own), "dest": f"/etc/{name}"}]
        if skip_checks:
            data["verify"] = dict(demo.get("verify") or {}, skip=list(skip_checks))
        p = tmp_path / f"{name}.yml"
        p.write_text(yaml.safe_dump(data))
        paths.append(p)
    return paths


def intact(tar: Path) -> bool:
    return sh.run(["tar", "-tf", tar], check=False, quiet=True).returncode == 0
