"""Builds to boot in the vm/verify tests, and the checks that nothing was left behind.

The trio comes from the session's demo build (`demo_build`, baked once per run by
conftest), unless `BAKE_TEST_TRIO` names a folder holding `kernel`, `ramdisk` and
`image` (a quicker trio for working on these tests alone).
Tests get their own copy of the build directory (outputs hard-linked, or copied when a
test damages them), so evidence and disks of one test never mix with another's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import shutil
import time
from pathlib import Path

import pytest

from builder.core.record import Build

ROLES = ("kernel", "ramdisk", "image")


def source_build(request) -> Build:
    """The build whose trio the tests boot (see the module's docstring); fails the test when there is none."""
    trio = os.environ.get("BAKE_TEST_TRIO")
    if not trio:
        try:
            return request.getfixturevalue("demo_build")
        except pytest.FixtureLookupError:
            pytest.fail("no demo build fixture and no BAKE_TEST_TRIO folder with kernel, ramdisk and image")
    src = Path(trio)
    missing = [r for r in ROLES if not (src / r).is_file()]
    if missing:
        pytest.fail(f"BAKE_TEST_TRIO={trio} lacks {', '.join(missing)}")
    cache = request.getfixturevalue("tmp_path_factory").mktemp("trio-build")
    rec = cache / "build.json"
    rec.write_text(json.dumps({"build_id": "trio", "outputs": {}, "stages": {}}))
    b = Build.load(cache)
    for role in ROLES:
        dst = cache / role
        os.link(src / role, dst) if os.stat(src / role).st_dev == os.stat(cache).st_dev else shutil.copy(src / role, dst)
        b.data.setdefault("outputs", {})[role] = {"path": role}
    if "elements" not in b.data:
        elements = os.environ.get("BAKE_TEST_TRIO_ELEMENTS")
        if elements:
            b.data["elements"] = [{"name": n, "params": {}} for n in elements.split(",")]
    b.save()
    return b


def copy_build(src: Build, dest_root: Path, *, copy_roles: tuple[str, ...] = ()) -> Build:
    """A new build directory under `dest_root` with `src`'s outputs (hard links, or real
    copies for `copy_roles`) and its record (recipe, elements) minus earlier verifications."""
    d = Path(dest_root) / "build"
    d.mkdir(parents=True)
    data = {k: v for k, v in src.data.items() if k not in ("verify", "result", "error")}
    data["outputs"] = {}
    for role in ROLES:
        p = src.output_path(role)
        dst = d / role
        if role in copy_roles or os.stat(p).st_dev != os.stat(d).st_dev:
            shutil.copyfile(p, dst)
        else:
            os.link(p, dst)
        data["outputs"][role] = {"path": role}
    (d / "build.json").write_text(json.dumps(data, indent=2))
    return Build.load(d)


def default_user(build: Build) -> str:
    """The user the verification key goes to: the recipe's first user, else BAKE_TEST_TRIO_USER, else root."""
    from builder.verify import recipe_of

    r = recipe_of(build)
    return (r.default_user if r is not None else "") or os.environ.get("BAKE_TEST_TRIO_USER") or "root"


def _qemu_under(path: Path) -> dict[int, str]:
    found = {}
    p = str(Path(path).resolve())
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"qemu-system-x86_64") and any(p.encode() in a for a in cmd):
            found[int(pid)] = b" ".join(cmd).decode(errors="replace")
    return found


def qemu_processes_under(path: Path) -> list[str]:
    """Command lines of live QEMU processes that use files under `path`."""
    return list(_qemu_under(path).values())


def kill_qemu_under(path: Path, timeout: float = 30) -> None:
    """SIGKILL every QEMU process that uses files under `path`, and wait until they are gone."""
    deadline = time.monotonic() + timeout
    while (pids := _qemu_under(path)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def leftovers(build_dir: Path) -> list[str]:
    """Temporary things a verification must never leave: overlays, scratch folders
    (keys, volumes), half-made disks."""
    out = []
    for p in Path(build_dir).rglob("*"):
        if p.name.startswith((".scratch-", ".a-", ".b-")) or p.suffix in (".qcow2", ".partial") \
                or p.name.endswith((".partial", ".swap")):
            out.append(str(p))
    return out
