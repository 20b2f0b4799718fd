"""Running diskimage-builder's phases in a bake build (see builder/recipe/dib/__init__.py).

Each phase is one run of DIB's own `dib-run-parts` over the merged hooks tree, in a
sandbox (builder/recipe/dib/sandbox.py): outside the chroot with the host read-only but the
image, the hooks tree and the phase's scratch folders; in the chroot with the tree
bind-mounted read-only at /tmp/in_target.d. The environment is built here, not
inherited: no proxy, key or variable of the build host reaches a hook unless the
recipe's dib.env passes it, and secret values are masked in everything logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

from builder.core import confine, sh
from builder.core.errors import BakeError
from builder.core.log import step
from builder.recipe.dib import CHROOT, DibEnv, Expansion, IN_TARGET, dib_env_declaration, listed_hooks, merge_hooks

log = logging.getLogger("bake.dib")

SHIMS = Path(__file__).resolve().parent / "shims"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class DibHookError(BakeError):
    pass


class DibRunner:
    """The DIB phases of one build: `root` is the image's tree, `work` a folder of the
    build's own (the hooks tree, the outside hooks' home and scratch go there)."""

    def __init__(self, expansion: Expansion, env: DibEnv, base: dict[str, str], root: Path, work: Path,
                 logfile=None):
        self.expansion, self.env, self.base = expansion, env, base
        self.root, self.work = root, work
        self.tree = work / "dib-hooks"
        self.home = work / "dib-home"
        self.scratch = work / "dib-tmp"
        self.logfile = logfile
        self.ran: list[str] = []

    def prepare(self) -> None:
        """A fresh merged hooks tree, and an empty home and scratch for outside hooks."""
        for d in (self.tree, self.home, self.scratch):
            if d.exists():
                sh.discard_tree(d)
        merge_hooks(self.expansion, self.tree)
        self.home.mkdir(mode=0o700)
        self.scratch.mkdir(mode=0o1777)

    def hooks(self, phase: str) -> list[str]:
        return listed_hooks(self.tree, phase)

    def variables(self, phase: str) -> dict[str, str]:
        inside = phase in CHROOT
        env = dict(self.base)
        env.update(self.env.values)
        env.update({
            "TMP_MOUNT_PATH": str(self.root),
            "TMP_HOOKS_PATH": str(self.tree),
            "TMP_BUILD_DIR": str(self.work),
            "DIB_ENV": dib_env_declaration(self.env),
            "HOME": "/root" if inside else str(self.home),
            "PATH": CHROOT_PATH if inside else f"{SHIMS}:{HOST_PATH}",
            "DEBIAN_FRONTEND": "noninteractive",
            "TERM": "dumb",
        })
        if not inside:
            env["TMPDIR"] = str(self.scratch)
        if phase in ("cleanup.d",):
            env["TARGET_ROOT"] = str(self.root)
        return env

    def run(self, phase: str) -> None:
        """Run `phase`'s hooks (nothing when it has none)."""
        listed = self.hooks(phase)
        if not listed:
            return
        inside = phase in CHROOT
        # the sandbox makes the mounts private itself: unshare cannot where / is no mount (a chroot)
        if inside:
            # confined as every command in the tree (core/confine.py), which the sandbox
            # execs once the hooks tree is in place
            argv = [*confine.UNSHARE, *confine.program("builder.recipe.dib.sandbox"), "--chroot", str(self.root),
                    "--hooks", str(self.tree), "--",
                    *confine.entry(self.root, [f"{IN_TARGET}/dib-run-parts", f"{IN_TARGET}/{phase}"])]
            confine.check_tree(self.root)
        else:
            writable = [self.root, self.tree, self.home, self.scratch]
            argv = ["unshare", "--mount", "--uts", "--ipc", "--propagation", "unchanged", "--",
                    *confine.program("builder.recipe.dib.sandbox"), "--outside",
                    *[a for w in writable for a in ("--write", str(w))], "--",
                    "bash", str(self.tree / "dib-run-parts"), str(self.tree / phase)]
        where = "in the chroot" if inside else "outside the chroot"
        with step(f"DIB {phase} ({len(listed)} hook{'s' if len(listed) != 1 else ''}, {where})"):
            try:
                sh.run(argv, env=self.variables(phase), what=f"DIB {phase}", logfile=self.logfile,
                       redact=self.env.secret_values(), cwd=str(self.work))
            except sh.CommandError as e:
                raise DibHookError(f"diskimage-builder phase {phase} failed (exit {e.returncode}); "
                                   f"its hooks: {', '.join(listed)}\n--- last lines of its output ---\n"
                                   f"{e.tail.rstrip()}") from None
            finally:
                if inside:
                    # the sandbox's bind mount went with its namespace; its mount point stays
                    point = self.root / IN_TARGET.lstrip("/")
                    # never through a link of the image's (the sandbox made none there)
                    if not point.parent.is_symlink() and not point.is_symlink() and point.is_dir() \
                            and not point.is_mount():
                        point.rmdir()
        self.ran.append(phase)

    def remove(self) -> None:
        for d in (self.tree, self.home, self.scratch):
            sh.discard_tree(d, ignore_errors=True)
