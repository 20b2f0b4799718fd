"""Stage customize: packages, element hooks, users, files and commands, in a chroot.

Two halves. The first (apt sources, root.d/extra-data.d/pre-install.d hooks, packages)
is saved as a checkpoint in the cache, keyed by everything it depends on, so changing a
later hook re-runs only the second half (static files, install.d, users, files,
commands, post-install.d, the initramfs, finalise.d, cleanup.d).

While it runs, daemons cannot start (policy-rc.d) and update-initramfs is a no-op, so
package triggers don't build the initramfs again and again: it is generated once, at
the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from builder.core import locks, sh
from builder.core.record import Build
from builder.core.cache import TreeCache, cache_root
from builder.customize.chroot import copy_into_image
from builder.recipe.elements import CHROOT_PHASES, Element, Hook, ordered_hooks, parameter_env
from builder.core.errors import BakeError
from builder.recipe.distro import DEB_ARCH
from builder.core.log import step
from builder.core.progress import AptCounter
from builder.pipeline.plan import Plan
from builder.recipe.recipe import Recipe

log = logging.getLogger("bake.customize")

IN_TARGET = "/tmp/bake"               # where elements are copied inside the chroot
DIVERTED = "/usr/sbin/update-initramfs"
DEFERRED_LOG = "/var/lib/bake-initramfs-deferred"
APT_OPTS = ["-y", "-q", "-o", "Dpkg::Options::=--force-confold", "-o", "Dpkg::Options::=--force-confdef",
            "-o", "APT::Install-Recommends=false"]


class HookError(BakeError):
    pass


def detect_init_system(root: Path, default: str) -> str:
    """systemd or upstart, from what the target has installed (`default` when it has neither yet)."""
    if (root / "sbin/initctl").exists() or (root / "sbin/initctl.distrib").exists():
        return "upstart"
    if (root / "lib/systemd/systemd").exists() or (root / "usr/lib/systemd/systemd").exists():
        return "systemd"
    return default


class Customizer:
    """Runs the customize stage of one build on one root tree."""

    def __init__(self, build: Build, recipe: Recipe, plan: Plan, root: Path):
        self.build, self.recipe, self.plan, self.root = build, recipe, plan, root
        self.notes: list[str] = []
        self.init_system = recipe.profile.init_system
        self.dib = None                    # builder.dib.run.DibRunner with DIB elements
        self.dib_python_added = False      # python3 was installed for DIB's hooks only
        self.notes_dib: list[str] = []
        self.dib_work: Path | None = None

    # --- environment ------------------------------------------------------------------
    def base_env(self) -> dict[str, str]:
        r, d = self.recipe, self.recipe.data
        return {
            "BAKE_DISTRO": r.release.distro, "BAKE_SUITE": r.release.suite,
            "BAKE_ARCH": r.arch, "BAKE_DEB_ARCH": DEB_ARCH[r.arch],
            "BAKE_INIT_SYSTEM": self.init_system, "BAKE_KERNEL_PACKAGE": r.kernel_package,
            "BAKE_DEFAULT_USER": r.default_user, "BAKE_ROOT_LABEL": d["label"],
            "BAKE_FILESYSTEM": d["filesystem"], "BAKE_IMAGE_NAME": r.name,
            "BAKE_HOSTNAME": r.hostname, "BAKE_LOCALE": d["locale"], "BAKE_TIMEZONE": d["timezone"],
            "BAKE_BASE": "image" if r.base else "debootstrap",
        }

    def hook_env(self, hook: Hook, inside: bool) -> dict[str, str]:
        use = next(u for u in self.recipe.elements if u.name == hook.element)
        env = self.base_env()
        env.update(parameter_env(use.name, use.params))
        env["BAKE_ELEMENT_DIR"] = f"{IN_TARGET}/elements/{use.name}" if inside else str(use.element.path)
        if not inside:
            env["TARGET_ROOT"] = str(self.root)
        return env

    # --- hooks ------------------------------------------------------------------------
    def run_phase(self, phase: str) -> None:
        hooks = ordered_hooks([u.element for u in self.recipe.elements], phase)
        if not hooks:
            return
        inside = phase in CHROOT_PHASES
        with step(f"{phase} ({len(hooks)} hook{'s' if len(hooks) != 1 else ''})"):
            for hook in hooks:
                env = self.hook_env(hook, inside)
                try:
                    if inside:
                        r = sh.chroot_run(self.root, [f"{IN_TARGET}/elements/{hook.element}/{phase}/{hook.name}"],
                                          extra_env=env, what=f"hook {hook.element}/{phase}/{hook.name}")
                    else:
                        full = dict(os.environ)
                        full.update(env)
                        r = sh.run([str(hook.path)], env=full, what=f"hook {hook.element}/{phase}/{hook.name}")
                except sh.CommandError as e:
                    raise HookError(f"element '{hook.element}', phase {phase}, hook {hook.name} failed "
                                    f"(exit {e.returncode})\n--- last lines of its output ---\n{e.tail.rstrip()}") from None
                for line in r.output.splitlines():
                    if line.startswith("bake-note:"):
                        note = f"{hook.element}: {line.split(':', 1)[1].strip()}"
                        self.notes.append(note)
                        log.warning("note: %s", note)

    def copy_elements_in(self) -> None:
        dest = self.root / IN_TARGET.lstrip("/") / "elements"
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for u in self.recipe.elements:
            shutil.copytree(u.element.path, dest / u.name, symlinks=True)

    def remove_elements(self) -> None:
        shutil.rmtree(self.root / IN_TARGET.lstrip("/"), ignore_errors=True)

    # --- the chroot's guard rails ---------------------------------------------------------
    def guard(self) -> None:
        """Block daemons and defer the initramfs while customizing."""
        rc = self.root / "usr/sbin/policy-rc.d"
        rc.write_text("#!/bin/sh\n# bake: no daemon starts while the image is built\nexit 101\n")
        rc.chmod(0o755)
        sh.chroot_run(self.root, ["dpkg-divert", "--local", "--rename", "--add", DIVERTED], quiet=True)
        stub = self.root / DIVERTED.lstrip("/")
        stub.write_text("#!/bin/sh\n# bake: the initramfs is generated once, at the end of customize\n"
                        f"echo \"$*\" >> {DEFERRED_LOG}\nexit 0\n")
        stub.chmod(0o755)
        if self.init_system == "upstart":
            sh.chroot_run(self.root, ["dpkg-divert", "--local", "--rename", "--add", "/sbin/initctl"], quiet=True)
            ic = self.root / "sbin/initctl"
            ic.write_text("#!/bin/sh\n# bake: upstart cannot be reached inside the build chroot\nexit 0\n")
            ic.chmod(0o755)
        self.use_host_resolver()

    def use_host_resolver(self) -> None:
        """Name resolution in the chroot through the build host's resolver."""
        resolv = self.root / "etc/resolv.conf"
        if resolv.is_symlink() or resolv.exists():
            resolv.unlink()
        shutil.copyfile("/etc/resolv.conf", resolv)

    def deferred_calls(self) -> int:
        """How many times packages asked for an initramfs while it was deferred."""
        f = self.root / DEFERRED_LOG.lstrip("/")
        return len(f.read_text().splitlines()) if f.exists() else 0

    def unguard(self) -> None:
        (self.root / DEFERRED_LOG.lstrip("/")).unlink(missing_ok=True)
        (self.root / "usr/sbin/policy-rc.d").unlink(missing_ok=True)
        (self.root / DIVERTED.lstrip("/")).unlink(missing_ok=True)
        sh.chroot_run(self.root, ["dpkg-divert", "--local", "--rename", "--remove", DIVERTED], quiet=True)
        if self.init_system == "upstart":
            (self.root / "sbin/initctl").unlink(missing_ok=True)
            sh.chroot_run(self.root, ["dpkg-divert", "--local", "--rename", "--remove", "/sbin/initctl"], quiet=True)
        self.hand_over_resolver()

    def hand_over_resolver(self) -> None:
        """Give /etc/resolv.conf back to the image (it held the build host's resolver):
        resolved's stub where systemd-resolved is enabled, otherwise an empty file that
        the instance's DHCP client fills in."""
        resolv = self.root / "etc/resolv.conf"
        if resolv.is_symlink() or resolv.exists():
            resolv.unlink()
        if resolved_enabled(self.root):
            resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
        else:
            resolv.write_text("")

    # --- steps ------------------------------------------------------------------------
    def install_packages(self, before=None) -> None:
        """apt-get update, then `before()` (with apt ready and the package cache mounted),
        then the plan's packages."""
        (self.root / "etc/apt/sources.list").write_text(self.plan.apt_sources)
        pkgs = self.plan.package_names
        archives = cache_root(self.build.dir.parent.parent) / "apt-archives" / \
            f"{self.recipe.release.distro}-{self.recipe.release.suite}-{self.recipe.arch}"
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        target = self.root / "var/cache/apt/archives"
        target.mkdir(parents=True, exist_ok=True)
        # apt's own lock on the shared archives would make a second bake's apt fail at
        # once: bakes of one suite take turns with it instead.
        with step(f"Installing {len(pkgs)} packages"), \
                locks.held(archives.with_name(archives.name + ".lock"), f"the apt package cache {archives}"), \
                sh.mount(str(archives), target, bind=True), \
                open(self.build.dir / "packages.log", "w") as logf:
            sh.chroot_run(self.root, ["apt-get", "-q", "update"], what="apt-get update", logfile=logf)
            if before is not None:
                before(logf)
            counter = AptCounter()
            sh.chroot_run(self.root, ["apt-get", *APT_OPTS, "install", *pkgs], what="installing packages",
                          logfile=logf, on_line=counter)
            counter.done()

    def copy_static(self) -> None:
        statics = [u.element.static for u in self.recipe.elements if u.element.static]
        if not statics:
            return
        with step("Copying static files"):
            for s in statics:
                # cp -a keeps modes, owners and links; the tree merges into the image.
                sh.run(["cp", "-a", "--no-preserve=ownership", f"{s}/.", str(self.root)], what=f"copying {s}")

    def create_users(self) -> None:
        users = self.recipe.data.get("users") or []
        top_keys = self.recipe.data.get("ssh_authorized_keys") or []
        if not users and not top_keys:
            return
        with step(f"Creating {len(users)} user(s)"):
            sudoers = []
            for i, u in enumerate(users):
                argv = ["useradd", "-m", "-s", u["shell"]]
                if u["groups"]:
                    argv += ["-G", ",".join(u["groups"])]
                sh.chroot_run(self.root, argv + [u["name"]], what=f"creating user {u['name']}")
                sh.chroot_run(self.root, ["usermod", "-p", "*", u["name"]], quiet=True)
                keys = list(u["ssh_authorized_keys"]) + (top_keys if i == 0 else [])
                if keys:
                    self._authorize(u["name"], keys)
                if u["sudo"]:
                    sudoers.append(f"{u['name']} ALL=(ALL) NOPASSWD:ALL")
            if not users and top_keys:
                self._authorize("root", top_keys)
            if sudoers:
                d = self.root / "etc/sudoers.d"
                d.mkdir(parents=True, exist_ok=True)
                f = d / "90-bake-users"
                f.write_text("# users the recipe gave passwordless sudo\n" + "\n".join(sudoers) + "\n")
                f.chmod(0o440)

    def _authorize(self, user: str, keys: list[str]) -> None:
        script = ('set -e; u=$1; shift; h=$(getent passwd "$u" | cut -d: -f6); g=$(id -gn "$u"); '
                  'mkdir -p "$h/.ssh"; for k in "$@"; do echo "$k" >> "$h/.ssh/authorized_keys"; done; '
                  'chmod 700 "$h/.ssh"; chmod 600 "$h/.ssh/authorized_keys"; chown -R "$u:$g" "$h/.ssh"')
        sh.chroot_run(self.root, ["/bin/sh", "-c", script, "sh", user, *keys], what=f"authorizing keys for {user}")

    def copy_files(self) -> None:
        files = self.recipe.data.get("files") or []
        if not files:
            return
        with step(f"Copying {len(files)} file(s)"):
            for i, f in enumerate(files):
                src = (self.recipe.path.parent / f["source"]).resolve()
                mode = int(f["mode"], 8) if f.get("mode") else None
                written = copy_into_image(self.root, src, f["dest"], mode=mode,
                                          what=f"files[{i}] ({f['source']} → {f['dest']})")
                if f.get("owner"):
                    # the image's own chown, so that its users and groups are the ones named
                    sh.chroot_run(self.root, ["chown", "-R", f["owner"], written], what=f"chown {written}")

    def run_commands(self) -> None:
        cmds = self.recipe.data.get("commands") or []
        if not cmds:
            return
        with step(f"Running {len(cmds)} command(s)"):
            for i, c in enumerate(cmds):
                try:
                    sh.chroot_run(self.root, ["/bin/sh", "-e", "-c", c], extra_env=self.base_env())
                except sh.CommandError as e:
                    raise BakeError(f"commands[{i}] failed in the chroot (exit {e.returncode}): {c}\n"
                                    f"--- last lines of its output ---\n{e.tail.rstrip()}") from None

    # --- diskimage-builder's elements --------------------------------------------------
    def dib_start(self) -> None:
        """The DIB runner of this build, with a fresh hooks tree."""
        from builder.recipe.dib.run import DibRunner
        from builder.pipeline.plan import dib_env_base
        if self.dib is None:
            self.dib = DibRunner(self.recipe.dib, self.recipe.dib_env, dib_env_base(self.recipe, self.init_system),
                                 self.root, self.dib_work, logfile=None)
        self.dib.prepare()

    def dib_phase(self, phase: str) -> None:
        if self.dib is not None:
            self.dib.run(phase)

    def dib_before_packages(self, logf) -> None:
        """python3 in the chroot (DIB's in-chroot tools need it from the first pre-install.d
        hook on), then DIB's pre-install.d, then apt's lists again (a hook may add sources)."""
        if not _installed(self.root, "python3"):
            with step("Installing python3 for diskimage-builder's hooks"):
                sh.chroot_run(self.root, ["apt-get", *APT_OPTS, "install", "python3"], what="installing python3",
                              logfile=logf)
            self.dib_python_added = "python3" not in self.plan.package_names
        self.dib.run("pre-install.d")
        sh.chroot_run(self.root, ["apt-get", "-q", "update"], what="apt-get update", logfile=logf)

    def dib_remove_python(self) -> None:
        """python3 again out of the image when only DIB's hooks wanted it: marked as
        installed automatically, it goes unless an installed package depends on it or
        recommends it."""
        if not self.dib_python_added or not _installed(self.root, "python3"):
            return
        with step("Removing python3 unless a package needs it"), open(self.build.dir / "packages.log", "a") as logf:
            sh.chroot_run(self.root, ["apt-mark", "auto", "python3"], what="apt-mark auto python3", logfile=logf)
            # a Suggests is no need (iproute2 suggests python3); a Recommends still is
            sh.chroot_run(self.root, ["apt-get", *APT_OPTS, "-o", "APT::AutoRemove::SuggestsImportant=false",
                                      "autoremove", "--purge"], what="apt-get autoremove", logfile=logf)
        kept = _installed(self.root, "python3")
        self.notes_dib.append("python3 kept: an installed package needs it" if kept else
                              "python3 removed after DIB's hooks (nothing installed needs it)")

    def cloud_init_user(self) -> None:
        """With cloud-init in the image, the instance's key goes to the recipe's default
        user (as bake's ec2-metadata element would do), or to root when it has none."""
        d = self.root / "etc/cloud/cloud.cfg.d"
        if not d.is_dir():
            return
        user = self.recipe.default_user
        if user:
            shell = next((u["shell"] for u in self.recipe.data.get("users") or [] if u["name"] == user), "/bin/sh")
            text = ("# bake: the instance's SSH key goes to the recipe's default user\n"
                    "system_info:\n  default_user:\n"
                    f"    name: {user}\n    lock_passwd: true\n    shell: {shell}\n")
        else:
            text = ("# bake: the recipe has no users; the instance's SSH key goes to root\n"
                    "disable_root: false\n")
        (d / "89-bake-default-user.cfg").write_text(text)

    def make_initramfs(self) -> None:
        with step("Generating the initramfs (once)"):
            with open(self.build.dir / "initramfs.log", "w") as logf:
                sh.chroot_run(self.root, ["update-initramfs", "-c", "-k", "all"], what="update-initramfs", logfile=logf)


def _installed(root: Path, package: str) -> bool:
    r = sh.run(["chroot", str(root), "dpkg-query", "-W", "-f=${db:Status-Abbrev}", package], check=False, quiet=True)
    return r.returncode == 0 and r.output.startswith("ii")


def resolved_enabled(root: Path) -> bool:
    """Whether the tree's systemd starts systemd-resolved at boot (enabled through its
    D-Bus alias or a target's wants)."""
    etc = root / "etc/systemd/system"
    if (etc / "dbus-org.freedesktop.resolve1.service").is_symlink():
        return True
    return any(etc.glob("*.wants/systemd-resolved.service"))


def _first_half(c: Customizer, ckpt: TreeCache, plan: Plan, recipe: Recipe, output_root: Path,
                fresh_tree: Path | None) -> bool:
    """Bring `c.root` to the package checkpoint: unpacked from the cache, or made (and
    saved) from the base tree. Returns whether it came from the cache. The checkpoint's
    lock is held throughout, so two bakes that need the same checkpoint make it once."""
    root = c.root
    with ckpt.lock(plan.checkpoint.key):
        if ckpt.has(plan.checkpoint.key):
            with step("Unpacking the package checkpoint"):
                ckpt.restore(plan.checkpoint.key, root)
            meta = ckpt.meta(plan.checkpoint.key)
            c.init_system = meta.get("init_system", c.init_system)
            c.dib_python_added = bool(meta.get("dib_python_added"))
            return True
        if fresh_tree is not None:
            os.rename(fresh_tree, root)
        else:
            with step("Unpacking the base tree"):
                TreeCache(cache_root(output_root), plan.bootstrap.namespace).restore(plan.bootstrap.key, root)
        c.init_system = detect_init_system(root, recipe.profile.init_system)
        with sh.chroot_mounts(root):
            c.guard()
            c.copy_elements_in()
            c.run_phase("root.d")
            c.run_phase("extra-data.d")
            if recipe.dib is not None:
                c.dib_start()
                c.dib.run("extra-data.d")
            c.run_phase("pre-install.d")
            c.install_packages(before=c.dib_before_packages if recipe.dib is not None else None)
            c.remove_elements()
        with step("Saving the package checkpoint"):
            ckpt.save(plan.checkpoint.key, root, {"init_system": c.init_system, "packages": plan.package_names,
                                                  "dib_python_added": c.dib_python_added,
                                                  "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    return False


def run(build: Build, recipe: Recipe, plan: Plan, work: Path, fresh_tree: Path | None) -> Path:
    """Customize the image's root tree under `work`; returns the tree."""
    start = time.monotonic()
    root = work / "rootfs"
    if root.exists():
        shutil.rmtree(root)
    output_root = build.dir.parent.parent
    ckpt = TreeCache(cache_root(output_root), "packages")
    with step("Customize"):
        c = Customizer(build, recipe, plan, root)
        if recipe.dib is not None:
            c.dib_work = work
        cached = _first_half(c, ckpt, plan, recipe, output_root, fresh_tree)
        try:
            with sh.chroot_mounts(root):
                # packages (systemd-resolved's postinst, for one) may have pointed it elsewhere
                c.use_host_resolver()
                if recipe.dib is not None and c.dib is None:
                    # the hooks tree is the build's own: extra-data.d fills it again (the
                    # files it reads, a key for devuser, are read afresh on every build)
                    c.dib_start()
                    c.dib.run("extra-data.d")
                c.copy_elements_in()
                c.copy_static()
                c.run_phase("install.d")
                c.dib_phase("install.d")
                c.create_users()
                c.copy_files()
                c.run_commands()
                c.run_phase("post-install.d")
                c.dib_phase("post-install.d")
                c.dib_phase("post-root.d")
                if c.dib is not None:
                    c.cloud_init_user()
                c.dib_phase("pre-finalise.d")
                c.dib_phase("finalise.d")
                if c.dib is not None:
                    c.dib_remove_python()
                deferred = c.deferred_calls()
                c.unguard()
                c.make_initramfs()
                c.run_phase("finalise.d")
                c.remove_elements()
            c.run_phase("cleanup.d")
            c.dib_phase("cleanup.d")
        finally:
            if c.dib is not None:
                c.dib.remove()
    extra = {}
    if c.dib is not None:
        extra["dib"] = {"phases": c.dib.ran, "elements": recipe.dib.names, "env": recipe.dib_env.public(),
                        "notes": c.notes_dib}
    build.record_stage("customize", cached_packages=cached, checkpoint_key=plan.checkpoint.key,
                       init_system=c.init_system, initramfs_deferred=deferred,
                       seconds=round(time.monotonic() - start, 2), **extra)
    if c.notes or recipe.notes:
        build.set("notes", [*recipe.notes, *c.notes])
    return root
