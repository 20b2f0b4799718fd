"""builder.core.confine: a command run in an image's tree sees its own processes, a
read-only /sys and kernel settings, a /dev of its own, and a hostname of its own; what it
leaves behind ends with it, an interrupt ends it at once, and an image whose /proc, /sys
or /dev is a link is refused with nothing mounted.

Every test runs real commands in a real tree made of the host's own programs (and their
libraries), from outside, as bake runs them: inside `sh.chroot_mounts`, through
`confine.argv`. Each one ends by checking that the host's mount table holds nothing under
the tree.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.core import confine, mountns, sh
from builder.core.errors import BakeError
from builder.recipe import dib
from builder.recipe.dib.run import DibHookError, DibRunner
from host_programs import copy_programs

PROGRAMS = ("sh", "ls", "cat", "sleep", "stat", "hostname", "touch", "readlink", "head", "wc", "setsid")
ENV = dict(sh.IMAGE_ENV)
MINIMAL_DEV = {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "fd", "stdin", "stdout",
               "stderr"}


def host_mounts_under(path: Path) -> list[str]:
    """Mount points at or under `path` in this process's own mount table, read afresh."""
    p = os.path.realpath(path)
    return [t for t, _ in mountns.mounts() if t == p or t.startswith(p + "/")]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A root tree the host's own PROGRAMS run in: bin and lib as links into /usr."""
    root = tmp_path_factory.mktemp("confine") / "template"
    for d in ("usr/bin", "usr/lib", "usr/lib64", "etc", "tmp", "root", "proc", "sys", "dev"):
        (root / d).mkdir(parents=True)
    for name in ("bin", "sbin", "lib", "lib64"):
        (root / name).symlink_to("usr/lib" if name == "lib" else "usr/lib64" if name == "lib64" else "usr/bin")
    copy_programs(root, PROGRAMS, "/usr/bin:/bin")
    return root


@pytest.fixture
def tree(template, tmp_path) -> Path:
    """A fresh copy of the template; nothing of the host may stay mounted under it."""
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", str(template), str(root)], check=True)
    yield root
    left = host_mounts_under(tmp_path)
    sh.unmount_all_under(tmp_path)
    assert left == [], f"left mounted on the host: {left}"


def run_in(root: Path, script: str, **kw) -> sh.Result:
    return sh.run(confine.argv(root, ["sh", "-c", script]), env=ENV, check=False, **kw)


def processes_in(root: Path) -> list[int]:
    return sh.chroot_processes(root)


def wait_for(what: str, predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.05)


def test_the_command_sees_only_its_own_processes_under_bakes_first_process_rooted_in_the_tree(tree):
    with sh.chroot_mounts(tree):
        r = run_in(tree, "echo me $$; ls /proc; echo root-of-1 $(readlink /proc/1/root); "
                         "cat /proc/1/cmdline; echo; "
                         "stat -c %d/%i /; stat -Lc %d/%i /proc/1/root")
    assert r.returncode == 0, r.output
    lines = r.output.splitlines()
    me = int(lines[0].split()[1])
    pids = {int(x) for x in lines[1:] if x.isdigit()}
    # the first process, the shell, and ls listing them: no process of the host
    assert 1 in pids and me in pids and len(pids) == 3, r.output
    assert "root-of-1 /proc" in lines, "the first process is rooted in the tree's /proc, never the host's /"
    assert "builder.core.confine" in r.output
    # / and the first process's root differ: a package script that asks learns it runs in a chroot
    assert lines[-1] != lines[-2]
    assert host_mounts_under(tree) == []


def test_kernel_settings_are_read_only_and_a_hostname_change_stays_inside(tree):
    host_name = socket.gethostname()
    with open("/proc/sys/kernel/hostname") as f:
        before = f.read()
    with sh.chroot_mounts(tree):
        r = run_in(tree, "echo taken > /proc/sys/kernel/hostname; echo write=$?; "
                         "echo 1 > /proc/sys/vm/drop_caches; echo drop=$?; "
                         "hostname image-chose-this; echo name=$(hostname)")
    assert "write=2" in r.output and "drop=2" in r.output and "Read-only file system" in r.output, r.output
    assert "name=image-chose-this" in r.output, r.output
    with open("/proc/sys/kernel/hostname") as f:
        assert f.read() == before
    assert socket.gethostname() == host_name
    assert host_mounts_under(tree) == []


def test_sys_is_read_only(tree):
    with sh.chroot_mounts(tree):
        # lo's own MTU written back to it: harmless to the host even where /sys were writable
        r = run_in(tree, "ls /sys/kernel >/dev/null && echo listed; touch /sys/new; echo touch=$?; "
                         "mtu=$(cat /sys/class/net/lo/mtu); echo $mtu > /sys/class/net/lo/mtu; echo mtu=$?")
    assert "listed" in r.output and "touch=1" in r.output and "mtu=2" in r.output, r.output
    assert "/sys/class/net/lo/mtu: Read-only file system" in r.output
    assert host_mounts_under(tree) == []


def test_dev_holds_only_the_minimal_nodes_of_its_own(tree):
    host_dev = set(os.listdir("/dev"))
    assert host_dev - MINIMAL_DEV, "the host has devices (disks, loop devices) a chroot must not see"
    with sh.chroot_mounts(tree):
        r = run_in(tree, "ls -A /dev; echo --; ls -A /dev/pts; echo --; echo gone > /dev/null && echo null-ok; "
                         "head -c 5 /dev/zero | wc -c; head -c 5 /dev/urandom | wc -c; "
                         "echo x > /dev/full; echo full=$?")  # /dev/full: ENOSPC, which dash calls an I/O error
    assert r.returncode == 0, r.output
    dev, pts, rest = r.output.split("--\n")
    assert set(dev.split()) == MINIMAL_DEV
    assert pts.split() == ["ptmx"], "a devpts instance of its own: none of the host's terminals"
    assert rest.split()[:3] == ["null-ok", "5", "5"] and "full=1" in rest and "I/O error" in rest, r.output
    assert host_mounts_under(tree) == []


def test_a_process_the_command_leaves_in_the_background_is_gone_when_it_ends(tree):
    with sh.chroot_mounts(tree):
        # one in the command's process group, one in a session of its own that ignores SIGTERM
        r = run_in(tree, "sleep 1000 >/dev/null 2>&1 & "
                         "setsid sh -c 'trap \"\" TERM; exec sleep 1001' >/dev/null 2>&1 & echo left")
        assert r.returncode == 0 and "left" in r.output, r.output
        # gone already when the command's run returns: the kernel ends a PID namespace's
        # processes with its first one, and the first one waits for them to go
        assert processes_in(tree) == []
    assert host_mounts_under(tree) == []


def test_an_interrupt_ends_the_command_and_all_it_started_at_once(tree):
    with sh.chroot_mounts(tree):
        # a long grace: only SIGTERM may end it, SIGKILL would come far too late for the test
        script = "sleep 1000 & setsid sh -c 'trap \"\" TERM; exec sleep 1001' & wait"
        with sh.background(confine.argv(tree, ["sh", "-c", script]), env=ENV, grace=120) as proc:
            # the first process, the shell and its two sleeps, all in the tree
            # the shell and its two sleeps (and the first process, rooted in the tree's /proc,
            # where the kernel can name that root from here: not on a box that is a chroot)
            wait_for("the command and its children run", lambda: len(processes_in(tree)) >= 3)
            signalled = time.monotonic()
        took = time.monotonic() - signalled
        assert proc.returncode is not None
        assert processes_in(tree) == []
    assert took < 10, f"the command's process group took {took:.1f} s to end after SIGTERM"
    assert host_mounts_under(tree) == []


def test_a_hard_kill_of_bakes_side_ends_everything_in_the_tree(tree):
    """SIGKILL to the process bake started (as the watchdog of a killed bake sends it):
    unshare's --kill-child ends the namespace's first process, and with it the rest."""
    with sh.chroot_mounts(tree):
        with sh.background(confine.argv(tree, ["sh", "-c", "setsid sleep 1000 & wait"]), env=ENV) as proc:
            wait_for("the command and its child run", lambda: len(processes_in(tree)) >= 2)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            wait_for("everything in the tree ends", lambda: processes_in(tree) == [], timeout=10)
    assert host_mounts_under(tree) == []


@pytest.mark.parametrize("name", ["dev", "proc", "sys"])
def test_an_image_whose_dev_proc_or_sys_is_a_link_to_a_host_folder_is_refused(tree, tmp_path, name):
    host = tmp_path / f"host-{name}"
    host.mkdir()
    (tree / name).rmdir()
    (tree / name).symlink_to(host)
    with pytest.raises(BakeError) as e:
        with sh.chroot_mounts(tree):
            pass
    message = str(e.value)
    assert message == (f"refusing the image at {tree}: its /{name} is a symlink (to {host}); "
                       f"bake mounts /{name} only on a folder of the image's own")
    with pytest.raises(BakeError, match=f"its /{name} is a symlink"):
        confine.argv(tree, ["true"])
    assert list(host.iterdir()) == [] and host_mounts_under(host) == [] and host_mounts_under(tree) == []


def test_an_image_whose_dev_is_a_file_is_refused(tree):
    (tree / "dev").rmdir()
    (tree / "dev").write_text("")
    with pytest.raises(BakeError, match=r"its /dev is not a folder; bake mounts /dev only on a folder"):
        with sh.chroot_mounts(tree):
            pass
    assert host_mounts_under(tree) == []


def test_confinement_refuses_to_run_outside_namespaces_of_its_own(tree):
    r = subprocess.run(confine.entry(tree, ["true"]), capture_output=True, text=True, check=False)
    assert r.returncode == 125 and "run it through unshare" in r.stderr
    r = subprocess.run(["unshare", "--pid", "--fork", "--kill-child", *confine.entry(tree, ["true"])],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 125 and "run it through unshare" in r.stderr, "a PID namespace without a mount one"
    assert host_mounts_under(tree) == []


def test_dibs_chroot_phases_run_confined_with_the_hooks_tree_in_place(tree, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "probe").write_text("#!/bin/sh\necho hooks-here; ls /proc; ls -A /dev/pts; "
                                 "touch /tmp/in_target.d/x; echo write=$?\n")
    (hooks / "probe").chmod(0o755)
    argv = [*confine.UNSHARE, *confine.program("builder.recipe.dib.sandbox"), "--chroot", str(tree),
            "--hooks", str(hooks), "--", *confine.entry(tree, ["/tmp/in_target.d/probe"])]
    with sh.chroot_mounts(tree):
        r = sh.run(argv, env=ENV, check=False)
    assert r.returncode == 0, r.output
    assert "hooks-here" in r.output and "write=1" in r.output, r.output
    pids = {int(x) for x in r.output.split() if x.isdigit()}
    assert 1 in pids and len(pids) == 3, "the first process, the hook's shell and ls: no process of the host"
    assert list(hooks.iterdir()) == [hooks / "probe"]
    assert host_mounts_under(tree) == []


def test_dibs_hooks_tree_is_never_mounted_where_the_images_tmp_link_points(tree, tmp_path):
    host = tmp_path / "host-etc"
    host.mkdir()
    (tree / "tmp").rmdir()
    (tree / "tmp").symlink_to(host)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    argv = [*confine.UNSHARE, *confine.program("builder.recipe.dib.sandbox"), "--chroot", str(tree),
            "--hooks", str(hooks), "--", *confine.entry(tree, ["true"])]
    with sh.chroot_mounts(tree):
        r = sh.run(argv, env=ENV, check=False)
    assert r.returncode != 0 and "its /tmp is no folder of its own" in r.output, r.output
    assert list(host.iterdir()) == [] and host_mounts_under(host) == []


def test_no_command_of_bake_enters_a_tree_through_a_bare_chroot():
    """Every command in an image's tree goes through confine.argv: a `chroot` argv anywhere
    in builder/ would run the image's code with the host's processes and devices."""
    package = Path(confine.__file__).resolve().parents[1]
    argv = re.compile(r"""\[\s*["']chroot["']\s*,\s*(str\(|self\.|root\b)""")
    bare = [f"{p.relative_to(package.parent)}:{n}" for p in sorted(package.rglob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1) if argv.search(line)]
    assert bare == []
    assert argv.search('sh.run(["chroot", str(self.root), *argv])'), "the pattern finds what it looks for"


# --- a build box that is itself a chroot, whose root is no mount and whose mounts propagate ---

BOX = r'''
import os, subprocess, sys
work, template, root_of_bake, python = sys.argv[1:5]
shared = os.path.join(work, "shared")
box = os.path.join(shared, "box")
os.makedirs(shared)
# the test's own mount, private, whatever the mount holding it does (on a build box that is
# itself a chroot, that mount lies outside and the namespace below could not be made private)
subprocess.run(["mount", "--bind", work, work], check=True)
subprocess.run(["mount", "--make-rprivate", work], check=True)
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", shared], check=True)
subprocess.run(["mount", "--make-shared", shared], check=True)
os.makedirs(box)
# the system's folders, and the top folders holding bake and its Python (wherever the clone is)
tops = {p.strip("/").split("/")[0] for p in (root_of_bake, python)} - {"tmp", "proc", ""}
for name in ("usr", "etc", "dev", "bin", "sbin", "lib", "lib64", *sorted(tops - {"usr", "etc", "dev"})):
    top = "/" + name
    if os.path.islink(top):
        os.symlink(os.readlink(top), os.path.join(box, name))
    elif os.path.isdir(top):
        os.makedirs(os.path.join(box, name))
        subprocess.run(["mount", "--rbind", top, os.path.join(box, name)], check=True)
for name in ("proc", "tmp"):
    os.makedirs(os.path.join(box, name))
subprocess.run(["mount", "-t", "proc", "proc", os.path.join(box, "proc")], check=True)
subprocess.run(["cp", "-a", template, os.path.join(box, "tmp/tree")], check=True)
env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": root_of_bake, "BAKE_STATE_DIR": "/tmp/state"}
r = subprocess.run(["chroot", box, python, "-c", sys.stdin.read()], env=env, capture_output=True, text=True)
print(r.stdout, r.stderr, f"exit={r.returncode}", sep="\n")
tree = os.path.join(box, "tmp/tree")
left = [line for line in open("/proc/self/mountinfo") if tree in line]
print("left on the box's host:", left)
'''

IN_BOX = r'''
import subprocess, sys
from builder.core import confine, sh
probe = [sys.executable, "-c", "from builder.core import mountns; print('private', mountns.make_private())"]
print(subprocess.run(["unshare", "--mount", "--propagation", "unchanged", "--", *probe],
                     capture_output=True, text=True).stdout.strip())
tree = "/tmp/tree"
bare = sh.run(confine.argv(tree, ["true"]), check=False)
print("without chroot_mounts:", bare.returncode, bare.output.strip())
with sh.chroot_mounts(tree):
    r = sh.run(confine.argv(tree, ["sh", "-c", "ls /proc; ls -A /dev/pts; touch /sys/x; echo touch=$?"]),
               env=sh.IMAGE_ENV, check=False)
print(r.output, f"confined exit={r.returncode}")
'''


def test_in_a_box_whose_root_is_no_mount_and_propagates_nothing_reaches_the_boxs_host(template, tmp_path):
    """The box is a chroot on a shared tmpfs of a mount namespace made for the test (the
    box's host); bake runs in it. Where mounts propagate and the tree lies on the mount the
    box cannot name, the confinement still mounts its own proc, sysfs and /dev, on the
    mounts chroot_mounts made (which it can name and make private), and refuses to mount
    without them; the box's host sees nothing of it."""
    helper = tmp_path / "box.py"
    helper.write_text(BOX)
    # in a chroot whose root is no mount, unshare cannot make the whole namespace private:
    # the box script then keeps its mounts on a private mount of its own
    private = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "true"],
                             capture_output=True, check=False).returncode == 0
    r = subprocess.run(["unshare", "--mount", "--propagation", "private" if private else "unchanged", "--",
                        sys.executable, str(helper),
                        str(tmp_path / "host"), str(template), confine.PACKAGE_PARENT, sys.executable],
                       input=IN_BOX, capture_output=True, text=True, timeout=300, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "private False" in out, "the box's mounts propagate: the case under test"
    assert "without chroot_mounts: 125 bake-confine: cannot mount on /tmp/tree/proc" in out, out
    assert "confined exit=0" in out and "touch=1" in out, out
    listing = out.split("confined exit=0")[0].split("without chroot_mounts")[1]
    assert "1\n" in listing and "ptmx" in listing
    assert "left on the box's host: []" in out, out
    assert host_mounts_under(tmp_path) == []


def test_a_dib_chroot_phase_in_an_image_whose_tmp_links_to_a_host_folder_fails_and_leaves_that_folder(
        tree, tmp_path):
    host = tmp_path / "host-folder"
    (host / "in_target.d").mkdir(parents=True)      # a folder of the host's, as the image's link names it
    (tree / "tmp").rmdir()
    (tree / "tmp").symlink_to(host)
    hook = tmp_path / "els/probe/install.d/10-probe"
    hook.parent.mkdir(parents=True)
    hook.write_text("#!/bin/sh\necho ran\n")
    hook.chmod(0o755)
    exp = dib.expand(["probe"], [tmp_path / "els"])
    base = dib.base_env(distro="debian", suite="bookworm", arch="x86_64", init_system="systemd", image_name="t",
                        label="root", filesystem="ext4", expansion=exp)
    (tmp_path / "work").mkdir()
    runner = DibRunner(exp, dib.DibEnv({}, set()), base, tree, tmp_path / "work")
    runner.prepare()
    with sh.chroot_mounts(tree):
        with pytest.raises(DibHookError, match=r"its /tmp is no folder of its own"):
            runner.run("install.d")
    assert (host / "in_target.d").is_dir() and list(host.iterdir()) == [host / "in_target.d"]
    assert host_mounts_under(host) == [] and host_mounts_under(tree) == []
    runner.remove()
