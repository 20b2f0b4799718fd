"""The session's bake of tests/recipes/dib-bookworm.yml (DIB elements, cloud-init with
the Ec2 datasource), made once per run by the `dib_build` fixture (conftest) for every
test that needs an image with cloud-init: tests/test_dib_e2e.py and the cloud-init
half of tests/test_verify_userdata.py.

The bake runs as `bake build` (verification included) with the devuser's key from a
file of the test's own, `HOME` pointing at a user of the host who has an SSH key (which
must not reach the image), and the host's /etc and /usr/share watched around it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

import yaml

from builder import vm
from builder.core.record import Build
from conftest import BAKE, REPO, TEST_OUTPUT

# this run's own folder: a run beside it (its pid in the name) keeps its builds
OUT = TEST_OUTPUT / "dib-e2e" / f"run-{os.getpid()}"
RECIPE = REPO / "tests" / "recipes" / "dib-bookworm.yml"


def tree_state(top: str) -> dict[str, tuple]:
    """Every path under `top` with its mode, size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            out[p] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def changes(before: dict, after: dict) -> list[str]:
    return sorted({p for p in before.keys() | after.keys() if before.get(p) != after.get(p)})


def bake(*args: str, env: dict, timeout: float = 3000) -> subprocess.CompletedProcess:
    return subprocess.run([BAKE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def latest(name: str) -> Build:
    return Build.load(sorted((OUT / name).iterdir(), key=lambda p: p.stat().st_mtime)[-1])


def bake_dib(tmp_path_factory):
    """Bake and verify the DIB recipe; yields what the tests need (see test_dib_e2e)."""
    from vm_builds import kill_qemu_under

    # earlier runs' builds go, but not those of runs still going
    for old in OUT.parent.glob("*"):
        pid = old.name.removeprefix("run-")
        if old != OUT and not (pid.isdigit() and os.path.exists(f"/proc/{pid}")):
            shutil.rmtree(old, ignore_errors=True)
    work = tmp_path_factory.mktemp("dib-e2e")
    key, pub = vm.make_keypair(work, "ops-key")
    ops_keys = work / "ops.pub"
    ops_keys.write_text(pub + "\n")
    # git keeps no mode but 644 and 755: the test element's private file gets its 0750 here
    elements = work / "dib-elements"
    shutil.copytree(REPO / "tests" / "dib-elements", elements, symlinks=True)
    (elements / "bake-test-static" / "static" / "etc" / "bake-test" / "private").chmod(0o750)
    data = yaml.safe_load(RECIPE.read_text())
    data["dib"]["elements_path"] = [str(elements)]
    data["verify"]["checks"] = [
        {"name": "growroot-on-node-layout", "run": "systemctl is-active growroot.service", "expect": "active"},
        {"name": "cloud-init-ec2", "run": "cloud-init status --long", "expect": "DataSourceEc2"},
    ]
    recipe = work / "dib-bookworm.yml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    home = Path("/home") / f"bake-dib-e2e-{secrets.token_hex(3)}"
    (home / ".ssh").mkdir(parents=True)
    host_key = f"ssh-rsa AAAAB3Nza{secrets.token_hex(20)} builder@build-host"
    (home / ".ssh" / "id_rsa.pub").write_text(host_key + "\n")
    env = {**os.environ, "BAKE_TEST_OPS_KEYS": str(ops_keys), "HOME": str(home)}
    try:
        before = {top: tree_state(top) for top in ("/etc", "/usr/share")}
        r = bake("build", str(recipe), "--output", str(OUT), env=env)
        after = {top: tree_state(top) for top in ("/etc", "/usr/share")}
        assert r.returncode == 0, r.stderr[-6000:]
        yield {"build": latest("dib-bookworm"), "key": key, "pub": pub, "ops_keys": ops_keys, "recipe": recipe,
               "env": env, "host_key": host_key, "host_changes": {t: changes(before[t], after[t]) for t in before},
               "work": work}
    finally:
        shutil.rmtree(home, ignore_errors=True)
        kill_qemu_under(OUT)
