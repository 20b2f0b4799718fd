"""Small real root trees for tests: the host's own programs and the libraries they link,
copied under the tree's /usr (a merged /usr, as the trees' links into it expect)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from builder.core import sh


def copy_programs(root: Path, programs: tuple[str, ...], search: str = "/usr/sbin:/usr/bin:/sbin:/bin") -> None:
    """Copy each of `programs` (found on `search`) and every library ldd names for it
    into `root`, under usr/."""
    files = set()
    for prog in programs:
        path = shutil.which(prog, path=search)
        assert path, f"the host has no {prog}"
        files.add(path)
        files.update(re.findall(r"(/\S+) \(0x", sh.output(["ldd", path])))
    for f in files:
        usr = f if f.startswith("/usr/") else "/usr" + f
        dest = root / usr.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.realpath(f), dest)
