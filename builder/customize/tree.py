"""The chroot route: a root tree on the build host, customized in two halves.

The first half (apt sources, root.d/extra-data.d/pre-install.d hooks, packages) brings a
base tree to the package checkpoint, which the customize stage caches; the second
(static files, install.d, users, files, commands, post-install.d, the initramfs,
finalise.d, cleanup.d) is made on every build. Only this route installs packages, runs
diskimage-builder's elements and makes the initramfs: it has the build host's network
and a tree the host can bind-mount into.

While it runs, daemons cannot start (policy-rc.d) and update-initramfs is a no-op, so
package triggers don't build the initramfs again and again: it is generated once, at
the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from builder.core import locks, sh
from builder.core.log import step
from builder.core.progress import AptCounter
from builder.customize.chroot import ChrootBackend
from builder.customize.customizer import Customizer
from builder.recipe import dib
from builder.recipe.dib.run import DibRunner
from builder.recipe.recipe import Recipe

APT_OPTS = ["-y", "-q", "-o", "Dpkg::Options::=--force-confold", "-o", "Dpkg::Options::=--force-confdef",
            "-o", "APT::Install-Recommends=false"]


@dataclass
class Packages:
    """What apt installs into the tree, as the plan resolved it."""

    sources: str        # the tree's sources.list while it is built
    names: list[str]
    archives: Path      # the .debs of this distro, suite and arch, shared between bakes
    image_sources: str = ""   # the sources.list the image ships (the build's, when empty)


class TreeCustomizer(Customizer):
    """The customize run of one build on the tree at `backend.root`; its logs
    (packages.log, initramfs.log) go to `logs`, DIB's hooks tree and scratch to
    `dib_work`."""

    backend: ChrootBackend

    def __init__(self, backend: ChrootBackend, recipe: Recipe, *, init_system: str, packages: Packages, logs: Path,
                 dib_work: Path):
        super().__init__(backend, recipe, init_system=init_system)
        self.packages, self.logs, self.dib_work = packages, logs, dib_work
        self.dib: DibRunner | None = None       # with DIB elements, once started
        self.dib_python_added = False           # python3 was installed for DIB's hooks only
        self.notes_dib: list[str] = []

    @property
    def root(self) -> Path:
        return self.backend.root

    # --- the two halves -------------------------------------------------------------------
    def to_checkpoint(self) -> None:
        """The first half, on a base tree: guarded, root.d, extra-data.d (DIB's too),
        pre-install.d, then the packages."""
        with sh.chroot_mounts(self.root):
            self.guard()
            self.backend.use_host_resolver()
            self.copy_elements_in()
            self.run_phase("root.d")
            self.run_phase("extra-data.d")
            if self.recipe.dib is not None:
                self.dib_start()
                self.dib_phase("extra-data.d")
            self.run_phase("pre-install.d")
            self.install_packages(before=self.dib_before_packages if self.recipe.dib is not None else None)
            self.remove_elements()

    def finish(self) -> int:
        """The second half, on a tree at the package checkpoint; returns how many times
        update-initramfs was called while it was deferred. DIB's hooks tree is removed
        however it ends."""
        try:
            with sh.chroot_mounts(self.root):
                # packages (systemd-resolved's postinst, for one) may have pointed it elsewhere
                self.backend.use_host_resolver()
                if self.recipe.dib is not None and self.dib is None:
                    # the hooks tree is the build's own: extra-data.d fills it again (the
                    # files it reads, a key for devuser, are read afresh on every build)
                    self.dib_start()
                    self.dib_phase("extra-data.d")
                self.copy_elements_in()
                self.copy_static()
                self.run_phase("install.d")
                self.dib_phase("install.d")
                self.create_users()
                self.copy_files()
                self.run_commands()
                self.run_phase("post-install.d")
                self.dib_phase("post-install.d")
                self.dib_phase("post-root.d")
                if self.dib is not None:
                    self.cloud_init_user()
                self.dib_phase("pre-finalise.d")
                self.dib_phase("finalise.d")
                if self.dib is not None:
                    self.dib_remove_python()
                deferred = self.unguard()
                self.backend.hand_over_resolver()
                self.make_initramfs()
                self.run_phase("finalise.d")
                self.scrub(self.packages.image_sources or self.packages.sources)
                self.remove_elements()
            self.run_phase("cleanup.d")
            self.dib_phase("cleanup.d")
        finally:
            if self.dib is not None:
                self.dib.remove()
        return deferred

    # --- packages -----------------------------------------------------------------------
    def install_packages(self, before: Callable[[IO[str]], None] | None = None) -> None:
        """apt-get update, then `before(log)` (with apt ready and the package cache
        mounted), then the plan's packages."""
        self.backend.write("/etc/apt/sources.list", self.packages.sources.encode())
        pkgs = self.packages.names
        archives = self.packages.archives
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        self.backend.mkdir("/var/cache/apt/archives")
        target = self.backend.path("/var/cache/apt/archives")
        # apt's own lock on the shared archives would make a second bake's apt fail at
        # once: bakes of one suite take turns with it instead.
        with step(f"Installing {len(pkgs)} packages"), \
                locks.held(archives.with_name(archives.name + ".lock"), f"the apt package cache {archives}"), \
                sh.mount(str(archives), target, bind=True), \
                open(self.logs / "packages.log", "w") as logf:
            self.backend.run(["apt-get", "-q", "update"], what="apt-get update", logfile=logf, check=True)
            if before is not None:
                before(logf)
            counter = AptCounter()
            self.backend.run(["apt-get", *APT_OPTS, "install", *pkgs], what="installing packages", logfile=logf,
                             on_line=counter, check=True)
            counter.done()

    def installed(self, package: str) -> bool:
        """Whether dpkg has `package` installed in the tree."""
        r = self.backend.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", package], quiet=True)
        return r.returncode == 0 and r.output.startswith("ii")

    def make_initramfs(self) -> None:
        with step("Generating the initramfs (once)"), open(self.logs / "initramfs.log", "w") as logf:
            self.backend.run(["update-initramfs", "-c", "-k", "all"], what="update-initramfs", logfile=logf,
                             check=True)

    # --- diskimage-builder's elements --------------------------------------------------
    def dib_start(self) -> None:
        """The DIB runner of this build, with a fresh hooks tree."""
        r = self.recipe
        if self.dib is None:
            assert r.dib is not None
            base = dib.base_env(distro=r.release.distro, suite=r.release.suite, arch=r.arch,
                                init_system=self.init_system, image_name=r.name, label=r.data["label"],
                                filesystem=r.data["filesystem"], expansion=r.dib)
            self.dib = DibRunner(r.dib, r.dib_env, base, self.root, self.dib_work, logfile=None)
        self.dib.prepare()

    def dib_phase(self, phase: str) -> None:
        if self.dib is not None:
            self.dib.run(phase)

    def dib_before_packages(self, logf: IO[str]) -> None:
        """python3 in the chroot (DIB's in-chroot tools need it from the first pre-install.d
        hook on), then DIB's pre-install.d, then apt's lists again (a hook may add sources)."""
        if not self.installed("python3"):
            with step("Installing python3 for diskimage-builder's hooks"):
                self.backend.run(["apt-get", *APT_OPTS, "install", "python3"], what="installing python3",
                                 logfile=logf, check=True)
            self.dib_python_added = "python3" not in self.packages.names
        self.dib_phase("pre-install.d")
        self.backend.run(["apt-get", "-q", "update"], what="apt-get update", logfile=logf, check=True)

    def dib_remove_python(self) -> None:
        """python3 again out of the image when only DIB's hooks wanted it: marked as
        installed automatically, it goes unless an installed package depends on it or
        recommends it."""
        if not self.dib_python_added or not self.installed("python3"):
            return
        with step("Removing python3 unless a package needs it"), open(self.logs / "packages.log", "a") as logf:
            self.backend.run(["apt-mark", "auto", "python3"], what="apt-mark auto python3", logfile=logf,
                             check=True)
            # a Suggests is no need (iproute2 suggests python3); a Recommends still is
            self.backend.run(["apt-get", *APT_OPTS, "-o", "APT::AutoRemove::SuggestsImportant=false",
                              "autoremove", "--purge"], what="apt-get autoremove", logfile=logf, check=True)
        kept = self.installed("python3")
        self.notes_dib.append("python3 kept: an installed package needs it" if kept else
                              "python3 removed after DIB's hooks (nothing installed needs it)")
