"""The operations a recipe asks of an image's root, written once over a backend.

Element hooks with their environment, the guard that keeps daemons from starting and
defers the initramfs, the elements' static files, users (with their keys and sudo),
files, commands, and the notes hooks leave (`bake-note:` lines). Which of them run, and
in which order, is the route's: `tree.TreeCustomizer` (the chroot) and `inplace.apply`
(the libguestfs appliance).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from builder.core import sh
from builder.core.errors import BakeError
from builder.core.log import step
from builder.customize import scrub as scrubbing
from builder.customize.backend import Backend, tail
from builder.recipe.distro import DEB_ARCH
from builder.recipe.elements import CHROOT_PHASES, Hook, ordered_hooks, parameter_env
from builder.recipe.recipe import ElementUse, Recipe

log = logging.getLogger("bake.customize")

IN_TARGET = "/tmp/bake"               # where elements are copied inside the image
POLICY = "/usr/sbin/policy-rc.d"
SAVED_POLICY = "/var/lib/bake-policy-rc.d.image"   # the image's own policy-rc.d while bake's is in place
DIVERTED = "/usr/sbin/update-initramfs"
DEFERRED_LOG = "/var/lib/bake-initramfs-deferred"
INITCTL = "/sbin/initctl"
SUDOERS = "/etc/sudoers.d/90-bake-users"

# A new user (home, shell, groups) whose password is locked: it logs in by key only.
USER = ('set -e; name=$1 shell=$2 groups=$3; useradd -m -s "$shell" ${groups:+-G "$groups"} "$name"; '
        'usermod -p "*" "$name"')

# dpkg-divert $1 (--add, --remove) of each program named after it, renaming it.
DIVERT = 'set -e; how=$1; shift; for p; do dpkg-divert --local --rename "$how" "$p"; done'

# Adds a user's keys to their authorized_keys, as that user (their home, group and modes).
AUTHORIZE = ('set -e; u=$1; shift; h=$(getent passwd "$u" | cut -d: -f6); g=$(id -gn "$u"); '
             'mkdir -p "$h/.ssh"; for k in "$@"; do echo "$k" >> "$h/.ssh/authorized_keys"; done; '
             'chmod 700 "$h/.ssh"; chmod 600 "$h/.ssh/authorized_keys"; chown -R "$u:$g" "$h/.ssh"')


class HookError(BakeError):
    pass


class Customizer:
    """The operations of one customize run on one image's root, through `backend`.
    `uses` are the elements it applies (the recipe's by default), `init_system` the
    target's, `root_label` the BAKE_ROOT_LABEL hooks see (the recipe's label otherwise)."""

    def __init__(self, backend: Backend, recipe: Recipe, *, init_system: str,
                 uses: list[ElementUse] | None = None, root_label: str | None = None):
        self.backend, self.recipe = backend, recipe
        self.uses = list(recipe.elements) if uses is None else uses
        self.init_system = init_system
        self.root_label = root_label
        self.notes: list[str] = []
        self.scrubbed: dict[str, object] = {}   # build.json's record of the scrub, once done

    def note(self, note: str) -> None:
        """Keep `note` for build.json's notes, and say it."""
        self.notes.append(note)
        log.warning("note: %s", note)

    # --- environment ------------------------------------------------------------------
    def base_env(self) -> dict[str, str]:
        """What every hook and command sees of the recipe."""
        r, d = self.recipe, self.recipe.data
        return {
            "BAKE_DISTRO": r.release.distro, "BAKE_SUITE": r.release.suite,
            "BAKE_ARCH": r.arch, "BAKE_DEB_ARCH": DEB_ARCH[r.arch],
            "BAKE_INIT_SYSTEM": self.init_system, "BAKE_KERNEL_PACKAGE": r.kernel_package,
            "BAKE_DEFAULT_USER": r.default_user, "BAKE_ROOT_LABEL": self.root_label or d["label"],
            "BAKE_FILESYSTEM": d["filesystem"], "BAKE_IMAGE_NAME": r.name,
            "BAKE_HOSTNAME": r.hostname, "BAKE_LOCALE": d["locale"], "BAKE_TIMEZONE": d["timezone"],
            "BAKE_BASE": "image" if r.base else "debootstrap",
        }

    def hook_env(self, hook: Hook, inside: bool) -> dict[str, str]:
        """The base environment, the element's parameters and where the element is
        (`inside` the image, or on the build host for the phases that run there)."""
        use = next(u for u in self.recipe.elements if u.name == hook.element)
        env = self.base_env()
        env.update(parameter_env(use.name, use.params))
        env["BAKE_ELEMENT_DIR"] = f"{IN_TARGET}/elements/{use.name}" if inside else str(use.element.path)
        if not inside:
            env["TARGET_ROOT"] = str(self._host_root(hook))
        return env

    def _host_root(self, hook: Hook) -> Path:
        root = self.backend.host_root
        if root is None:
            raise BakeError(f"element '{hook.element}': its {hook.phase} hooks work on the image's tree from the "
                            f"build host, and {self.backend.name} customizing has none")
        return root

    # --- hooks ------------------------------------------------------------------------
    def run_phase(self, phase: str) -> None:
        """Run `phase`'s hooks of the elements in order: inside the image for the chroot
        phases, on the build host (with TARGET_ROOT) for the others. A failed hook is a
        HookError naming it, with its output's tail."""
        hooks = ordered_hooks([u.element for u in self.uses], phase)
        if not hooks:
            return
        inside = phase in CHROOT_PHASES
        with step(f"{phase} ({len(hooks)} hook{'s' if len(hooks) != 1 else ''})"):
            for hook in hooks:
                env = self.hook_env(hook, inside)
                what = f"hook {hook.element}/{phase}/{hook.name}"
                if inside:
                    r = self.backend.run([f"{IN_TARGET}/elements/{hook.element}/{phase}/{hook.name}"], env=env,
                                         what=what)
                else:
                    r = sh.run([str(hook.path)], env={**os.environ, **env}, what=what, check=False)
                if r.returncode != 0:
                    raise HookError(f"element '{hook.element}', phase {phase}, hook {hook.name} failed "
                                    f"(exit {r.returncode})\n--- last lines of its output ---\n{tail(r.output)}")
                for line in r.output.splitlines():
                    if line.startswith("bake-note:"):
                        self.note(f"{hook.element}: {line.split(':', 1)[1].strip()}")

    def copy_elements_in(self) -> None:
        """The elements to IN_TARGET/elements in the image, where their hooks run from."""
        self.backend.remove(f"{IN_TARGET}/elements")
        self.backend.mkdir(f"{IN_TARGET}/elements")
        for u in self.uses:
            self.backend.copy_in(u.element.path, f"{IN_TARGET}/elements/{u.name}", what=f"element {u.name}")

    def remove_elements(self) -> None:
        self.backend.remove(IN_TARGET)

    # --- the guard ----------------------------------------------------------------------
    def guard(self) -> None:
        """Block daemons (policy-rc.d; the image's own is put back by `unguard`) and defer
        the initramfs (update-initramfs diverted to a stub that counts its calls); on
        upstart, initctl diverted to a stub too."""
        b = self.backend
        if b.is_symlink(POLICY) or b.exists(POLICY):
            b.rename(POLICY, SAVED_POLICY)
        b.write(POLICY, b"#!/bin/sh\n# bake: no daemon starts while the image is built\nexit 101\n", mode=0o755)
        self._divert("--add")
        b.write(DIVERTED, ("#!/bin/sh\n# bake: the initramfs is not made while the image is customized\n"
                           f"echo \"$*\" >> {DEFERRED_LOG}\nexit 0\n").encode(), mode=0o755)
        if self.init_system == "upstart":
            b.write(INITCTL, b"#!/bin/sh\n# bake: upstart cannot be reached while the image is built\nexit 0\n",
                    mode=0o755)

    def unguard(self) -> int:
        """Undo `guard`; returns how many times packages or hooks called update-initramfs
        meanwhile."""
        b = self.backend
        deferred = b.read(DEFERRED_LOG)
        calls = len(deferred.decode(errors="replace").splitlines()) if deferred else 0
        for path in (DEFERRED_LOG, POLICY, DIVERTED, *self._diverted()[1:]):
            b.remove(path)
        if b.is_symlink(SAVED_POLICY) or b.exists(SAVED_POLICY):
            b.rename(SAVED_POLICY, POLICY)
        self._divert("--remove")
        return calls

    def _diverted(self) -> list[str]:
        """The programs the guard replaces by stubs."""
        return [DIVERTED, INITCTL] if self.init_system == "upstart" else [DIVERTED]

    def _divert(self, how: str) -> None:
        """dpkg-divert `how` (--add: aside to NAME.distrib; --remove: back) of the guard's programs."""
        self.must(f"dpkg-divert {how}", ["/bin/sh", "-c", DIVERT, "sh", how, *self._diverted()], quiet=True)

    def must(self, what: str, argv: list[str], *, quiet: bool = False) -> None:
        """Run `argv` in the image; a BakeError saying `what` failed, with its output's
        tail, when it exits non-zero."""
        r = self.backend.run(argv, what=what, quiet=quiet)
        if r.returncode != 0:
            raise BakeError(f"{what} failed in {self.backend.where} (exit {r.returncode})\n"
                            f"--- last lines of its output ---\n{tail(r.output)}")

    # --- what the recipe asks -----------------------------------------------------------
    def copy_static(self) -> None:
        """The elements' static/ trees merged into the image's root (modes and links
        kept, owned by root)."""
        statics = [(u.name, u.element.static) for u in self.uses if u.element.static]
        if not statics:
            return
        with step("Copying static files"):
            for name, static in statics:
                self.backend.copy_in(static, "/", what=f"element {name}'s static files")

    def create_users(self) -> None:
        """The recipe's users (home, shell, groups, no password), their keys (the first
        user also gets the recipe's top-level keys; root gets them when there is no user)
        and passwordless sudo for those that ask."""
        users = self.recipe.data.get("users") or []
        top_keys = self.recipe.data.get("ssh_authorized_keys") or []
        if not users and not top_keys:
            return
        b = self.backend
        with step(f"Creating {len(users)} user(s)"):
            sudoers = []
            for i, u in enumerate(users):
                self.must(f"creating user {u['name']}",
                          ["/bin/sh", "-c", USER, "sh", u["name"], u["shell"], ",".join(u["groups"])])
                keys = list(u["ssh_authorized_keys"]) + (top_keys if i == 0 else [])
                if keys:
                    self._authorize(u["name"], keys)
                if u["sudo"]:
                    sudoers.append(f"{u['name']} ALL=(ALL) NOPASSWD:ALL")
            if not users and top_keys:
                self._authorize("root", top_keys)
            if sudoers:
                b.mkdir(str(Path(SUDOERS).parent))
                b.write(SUDOERS, ("# users the recipe gave passwordless sudo\n" + "\n".join(sudoers) + "\n").encode(),
                        mode=0o440)

    def _authorize(self, user: str, keys: list[str]) -> None:
        self.must(f"authorizing keys for {user}", ["/bin/sh", "-c", AUTHORIZE, "sh", user, *keys])

    def copy_files(self) -> None:
        """The recipe's files: copied in (`Backend.copy_in`), given their mode, and their
        owner by the image's own chown (its users and groups are the ones named)."""
        files = self.recipe.data.get("files") or []
        if not files:
            return
        with step(f"Copying {len(files)} file(s)"):
            for i, f in enumerate(files):
                src = (self.recipe.path.parent / f["source"]).resolve()
                mode = int(f["mode"], 8) if f.get("mode") else None
                written = self.backend.copy_in(src, f["dest"], mode=mode,
                                               what=f"files[{i}] ({f['source']} → {f['dest']})")
                if f.get("owner"):
                    self.must(f"files[{i}]: chown {f['owner']} {written}", ["chown", "-R", f["owner"], written])

    def run_commands(self) -> None:
        """The recipe's commands, each by `sh -e -c` in the image with the base environment."""
        cmds = self.recipe.data.get("commands") or []
        if not cmds:
            return
        with step(f"Running {len(cmds)} command(s)"):
            for i, c in enumerate(cmds):
                r = self.backend.run(["/bin/sh", "-e", "-c", c], env=self.base_env(), what=f"commands[{i}]")
                if r.returncode != 0:
                    raise BakeError(f"commands[{i}] failed in {self.backend.where} (exit {r.returncode}): {c}\n"
                                    f"--- last lines of its output ---\n{tail(r.output)}")

    def cloud_init_user(self) -> None:
        """With cloud-init in the image, the instance's key goes to the recipe's default
        user (as bake's ec2-metadata element would do), or to root when it has none."""
        folder = "/etc/cloud/cloud.cfg.d"
        if not self.backend.is_dir(folder):
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
        self.backend.write(f"{folder}/89-bake-default-user.cfg", text.encode())

    # --- the end ----------------------------------------------------------------------
    def scrub(self, image_sources: str | None = None) -> None:
        """The named scrub operations (`scrub.OPERATIONS`, less the recipe's
        `scrub.skip`), after every hook; `image_sources` is the sources.list the image
        ships, where this route wrote its own for the build. `self.scrubbed` says what
        ran and what did not, and why."""
        skip = (self.recipe.data.get("scrub") or {}).get("skip") or []
        ops, why = scrubbing.chosen(skip, sources=image_sources is not None)
        env = self.base_env()
        if image_sources is not None:
            env["BAKE_IMAGE_APT_SOURCES"] = image_sources
        t0 = time.monotonic()
        ran = scrubbing.scrub(self.backend, ops, env)
        self.scrubbed = {"ran": ran, "skipped": why, "seconds": round(time.monotonic() - t0, 2)}
