"""diskimage-builder's element contract, without a boot: the plan, refusals, the hooks
tree, the environment and the sandbox outside hooks run in.

The elements are DIB's own (the pinned `diskimage-builder` package) and small test
elements written here in DIB's layout; phases run through DIB's dib-run-parts for real.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder.recipe import dib
from builder.recipe.dib.run import DibRunner
from conftest import REPO
from dib_builds import tree_state

BAKE = str(Path(sys.executable).parent / "bake")
TEST_ELEMENTS = REPO / "tests" / "dib-elements"
HEAD = "name: dibtest\nrelease: debian/bookworm\n"


def bake(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([BAKE, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def element(root: Path, name: str, files: dict[str, tuple[str, int]], deps: list[str] = ()) -> Path:
    d = root / name
    d.mkdir(parents=True)
    for rel, (text, mode) in files.items():
        f = d / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
        f.chmod(mode)
    if deps:
        (d / "element-deps").write_text("\n".join(deps) + "\n")
    return d


def recipe(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "r.yml"
    p.write_text(HEAD + body)
    return p


HOOK = "#!/bin/sh\necho ran $(basename $0)\n"


def test_plan_lists_install_hooks_as_dib_run_parts_orders_them(tmp_path):
    names = ["9-a", "10-b", "100-c", "2_x", "55-late", "7-Z"]
    files = {f"install.d/{n}": (HOOK, 0o755) for n in names}
    files["install.d/20-data.conf"] = ("data, with a dot: never run\n", 0o755)
    files["install.d/30-not-executable"] = ("#!/bin/sh\n", 0o644)
    element(tmp_path / "els", "ordered", files)
    r = recipe(tmp_path, "elements:\n  - dib: ordered\n  - dib: growroot\ndib:\n  elements_path: [els]\n")
    out = bake("plan", str(r), "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    listed = [h["hook"] for h in plan["dib"]["hooks"]["install.d"]]
    owners = {h["hook"]: h["element"] for h in plan["dib"]["hooks"]["install.d"]}
    mine = [h for h in listed if owners[h] == "ordered"]
    expected = subprocess.run(["sort", "-n"], input="\n".join(names) + "\n", capture_output=True, text=True,
                              env={"LANG": "C", "PATH": os.environ["PATH"]}).stdout.split()
    assert mine == expected
    assert mine.index("9-a") < mine.index("10-b") < mine.index("100-c")
    # the whole phase, DIB's own hooks among them, in one sort -n order
    whole = subprocess.run(["sort", "-n"], input="\n".join(listed) + "\n", capture_output=True, text=True,
                           env={"LANG": "C", "PATH": os.environ["PATH"]}).stdout.split()
    assert listed == whole
    assert "20-data.conf" not in listed and "30-not-executable" not in listed
    assert owners["20-install-init-scripts"] == "dib-init-system"
    # the expansion, with what provides operating-system, and packages after pkg-map
    els = {e["name"]: e for e in plan["dib"]["elements"]}
    assert els["bake-target"]["provides"] == ["operating-system"]
    assert els["growroot"]["requested"] and not els["install-static"]["requested"]
    assert not {"debian", "debian-minimal", "dpkg", "base", "debootstrap"} & set(els)
    growroot_pkgs = [p["name"] for p in plan["dib"]["packages"]["install.d"]["install"] if p["element"] == "growroot"]
    assert "cloud-utils" in growroot_pkgs and "growpart" not in growroot_pkgs   # pkg-map: growpart -> cloud-utils
    assert "cloud-utils" in [p["name"] for p in plan["packages"]]


def test_plan_text_names_phases_and_where_they_run(tmp_path):
    r = recipe(tmp_path, "elements:\n  - dib: runtime-ssh-host-keys\n")
    out = bake("plan", str(r))
    assert out.returncode == 0, out.stderr
    assert "provides operating-system" in out.stdout
    lines = [l for l in out.stdout.splitlines() if "90-remove-ssh-host-keys" in l]
    assert lines and "cleanup.d" in lines[0] and "outside" in lines[0]
    assert any("80-ssh-keygen" in l and "post-install.d" in l and "chroot" in l for l in out.stdout.splitlines())


def test_modprobe_with_modprobe_blacklist_fails_at_plan_time_naming_both(tmp_path):
    r = recipe(tmp_path, "elements:\n  - dib: modprobe\n  - dib: modprobe-blacklist\n")
    out = bake("plan", str(r))
    assert out.returncode != 0
    assert "'modprobe'" in out.stderr and "'modprobe-blacklist'" in out.stderr
    assert "install.d/80-modprobe-blacklist" in out.stderr


@pytest.mark.parametrize("name, says", [
    ("debian", "needs debian-minimal, which makes the operating system"),
    ("ubuntu-minimal", "makes the operating system"),
    ("base", "dist-upgrades and installs open-iscsi"),
    ("dpkg", "bake-target does this with the target's apt"),
    ("bootloader", "without a bootloader"),
    ("block-device-mbr", "partitions"),
    ("vm", "partition image"),
])
def test_elements_bake_makes_itself_are_refused_with_the_reason(tmp_path, name, says):
    r = recipe(tmp_path, f"elements:\n  - dib: {name}\n")
    out = bake("validate", str(r))
    assert out.returncode != 0
    assert f"'{name}'" in out.stderr and says in out.stderr, out.stderr


def test_an_element_needing_a_refused_one_names_the_chain_and_root_d_is_refused(tmp_path):
    element(tmp_path / "els", "wants-dpkg", {"install.d/10-x": (HOOK, 0o755)}, deps=["dpkg"])
    element(tmp_path / "els", "has-root-d", {"root.d/10-make-root": (HOOK, 0o755)})
    r = recipe(tmp_path, "elements:\n  - dib: wants-dpkg\ndib:\n  elements_path: [els]\n")
    out = bake("validate", str(r))
    assert out.returncode != 0 and "'dpkg' (needed by wants-dpkg)" in out.stderr, out.stderr
    r = recipe(tmp_path, "elements:\n  - dib: has-root-d\ndib:\n  elements_path: [els]\n")
    out = bake("validate", str(r))
    assert out.returncode != 0 and "root.d" in out.stderr and "bootstrap" in out.stderr, out.stderr


def test_a_secret_of_dib_env_stays_out_of_the_plan_and_dib_env(tmp_path):
    value = "s3cret-" + secrets.token_hex(6)
    r = recipe(tmp_path, "elements:\n  - dib: devuser\ndib:\n  env:\n    DIB_DEV_USER_USERNAME: ops\n"
                         "    DIB_DEV_USER_PASSWORD: {from_env: OPS_PASSWORD, secret: true}\n")
    out = bake("plan", str(r), "--json", env={"OPS_PASSWORD": value})
    assert out.returncode == 0, out.stderr
    assert value not in out.stdout
    assert json.loads(out.stdout)["dib"]["env"]["DIB_DEV_USER_PASSWORD"] == "(secret)"
    env = dib.resolve_env({"DIB_A": "x", "DIB_S": {"value": value, "secret": True}}, tmp_path)
    assert value not in dib.dib_env_declaration(env) and "DIB_A=x" in dib.dib_env_declaration(env)
    # the key changes with the secret without containing it
    salt = b"k" * 32
    assert dib.secret_digest(salt, "DIB_S", value) != dib.secret_digest(salt, "DIB_S", value + "1")
    without = {k: v for k, v in os.environ.items() if k != "OPS_PASSWORD"}
    missing = subprocess.run([BAKE, "plan", str(r)], capture_output=True, text=True, env=without, timeout=300)
    assert missing.returncode != 0 and "OPS_PASSWORD" in missing.stderr and "not set" in missing.stderr


@pytest.fixture
def fake_user_key():
    """A user of the build host with an SSH key (as devuser would copy it)."""
    home = Path("/home") / f"bake-dib-test-{secrets.token_hex(3)}"
    (home / ".ssh").mkdir(parents=True)
    key = f"ssh-rsa AAAAB3Nza{secrets.token_hex(16)} host-key-that-must-not-leak"
    (home / ".ssh" / "id_rsa.pub").write_text(key + "\n")
    yield home, key
    shutil.rmtree(home)


@pytest.mark.xdist_group("host-etc")     # watches the host's /etc (tests/parallel.py)
def test_outside_hooks_write_into_the_image_and_never_into_the_host(tmp_path, fake_user_key):
    home, host_key = fake_user_key
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "tmp").mkdir()
    value = "pa55-" + secrets.token_hex(6)
    element(tmp_path / "els", "secret-echo", {
        "environment.d/10-secret-echo": ("export DIB_TEST_SECRET=${DIB_TEST_SECRET:-}\n", 0o644),
        "extra-data.d/20-echo": ("#!/bin/bash\necho \"the secret is $DIB_TEST_SECRET\"\n"
                                 "echo 1 > /proc/sys/vm/swappiness 2>/dev/null && echo sysctl-changed || echo sysctl-refused\n"
                                 "touch /usr/share/bake-dib-test 2>/dev/null && echo usr-written || echo usr-refused\n"
                                 "echo in-tmp > \"$TMPDIR/scratch\" && echo tmpdir-ok\n", 0o755)})
    exp = dib.expand(["bake-test-static", "secret-echo", "devuser", "pkg-map"], [TEST_ELEMENTS, tmp_path / "els"])
    env = dib.DibEnv({"DIB_TEST_SECRET": value, "DIB_DEV_USER_USERNAME": "ops"}, {"DIB_TEST_SECRET"})
    base = dib.base_env(distro="debian", suite="bookworm", arch="x86_64", init_system="systemd", image_name="t",
                        label="root", filesystem="ext4", expansion=exp)
    before = {top: tree_state(top) for top in ("/etc", "/usr/share")}
    swappiness = Path("/proc/sys/vm/swappiness").read_text()
    log = tmp_path / "dib.log"
    runner = DibRunner(exp, env, base, root, tmp_path / "work", logfile=None)
    (tmp_path / "work").mkdir()
    runner.prepare()
    with open(log, "w") as logf:
        runner.logfile = logf
        runner.run("extra-data.d")
    text = log.read_text()
    # into the image, through TMP_MOUNT_PATH
    assert (root / "etc/bake-test/x").read_text().startswith("written by extra-data.d for t (debian bookworm amd64)")
    assert (root / "usr/share/pkg-map").is_dir()
    seen = dict(l.split("=", 1) for l in (root / "etc/bake-test/seen-outside").read_text().splitlines())
    assert seen == {"home": str(runner.home), "ssh-keys": "hidden", "host-etc": "read-only", "proxy": ""}
    # nothing of the host: no key for devuser, no write, no kernel setting
    assert not (runner.tree / "devuser-ssh-authorized-keys").exists()
    assert host_key not in text
    assert "sysctl-refused" in text and "usr-refused" in text and "tmpdir-ok" in text
    assert Path("/proc/sys/vm/swappiness").read_text() == swappiness
    assert not Path("/usr/share/bake-dib-test").exists()
    for top, state in before.items():
        assert tree_state(top) == state, f"{top} changed during the DIB phase"
    # the secret: traced by dib-run-parts and echoed by the hook, masked in the log
    assert value not in text and "the secret is ***" in text
    assert "DIB_TEST_SECRET=***" in text
    runner.remove()
    assert not runner.tree.exists()


def test_the_sandbox_refuses_to_run_in_the_hosts_own_mount_namespace():
    r = subprocess.run([sys.executable, "-m", "builder.recipe.dib.sandbox", "--outside", "--", "true"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "unshare --mount" in r.stderr


def test_dib_env_values_resolve_files_beside_the_recipe_and_refuse_missing_ones(tmp_path):
    (tmp_path / "keys.pub").write_text("ssh-ed25519 AAAA test\n")
    env = dib.resolve_env({"DIB_DEV_USER_AUTHORIZED_KEYS": {"file": "keys.pub"}, "DIB_N": 3, "DIB_B": True},
                          tmp_path)
    assert env.values == {"DIB_DEV_USER_AUTHORIZED_KEYS": str(tmp_path / "keys.pub"), "DIB_N": "3", "DIB_B": "1"}
    r = recipe(tmp_path, "elements:\n  - dib: devuser\ndib:\n  env:\n    DIB_DEV_USER_AUTHORIZED_KEYS: {file: nope.pub}\n")
    out = bake("validate", str(r))
    assert out.returncode != 0 and "dib.env.DIB_DEV_USER_AUTHORIZED_KEYS" in out.stderr and "nope.pub" in out.stderr
