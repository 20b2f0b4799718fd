"""The appliance route, `base.method: guestfs`: a recipe's changes made inside an existing
image through libguestfs, in place, without root.

The same operations as the chroot route's second half (`customizer.Customizer`), with
the same hook environment and the same guard, but every command runs inside the image
in libguestfs's appliance: the recipe's elements are copied to /tmp/bake/elements, their
static files into the image, then install.d hooks, users, files, commands, post-install.d
and finalise.d hooks, the scrub, and /tmp/bake goes.

What it does not do: install packages (an element's packages must already be in the
image, which is checked first), make an initramfs (the implied `kernel` element is left
out; a hook's call of update-initramfs is noted and skipped), or run the phases that
work on a tree from the build host (root.d, extra-data.d, cleanup.d) or prepare package
installs (pre-install.d). For any of those: `method: unpack`.
"""

from __future__ import annotations

from pathlib import Path

from builder.core.errors import BakeError
from builder.core.log import step
from builder.customize import guestfs
from builder.customize.backend import Backend
from builder.customize.customizer import Customizer
from builder.recipe.elements import package_applies
from builder.recipe.recipe import ElementUse, Recipe

PHASES = ("install.d", "post-install.d", "finalise.d")
UNPACK = "use base.method: unpack"
DPKG_STATUS = "/var/lib/dpkg/status"


def apply(recipe: Recipe, image: Path, *, init_system: str, lucid: bool = False,
          root_label: str | None = None) -> tuple[list[str], dict[str, object]]:
    """Make the recipe's changes inside the bare filesystem image `image` (bake's own
    copy, changed in place) through libguestfs, without root: the elements' static files
    and install.d, post-install.d and finalise.d hooks, users, files and commands, as the
    chroot route makes them for a target whose init system is `init_system`. `lucid`
    gives the appliance the vsyscall page Lucid's glibc needs; `root_label` is the
    BAKE_ROOT_LABEL hooks see (the recipe's label otherwise).

    Refused with a BakeError, before anything is changed: elements whose packages the
    image lacks, elements with hooks in other phases, an explicitly named `kernel`
    element, users the image already has. A failed hook, command or copy is a BakeError
    saying which and with its output's tail; the image is then half changed (bake's copy:
    a failed build drops it). Returns the hooks' `bake-note:` lines as notes, and what
the scrub did (`Customizer.scrubbed`)."""
    uses = elements(recipe)
    with guestfs.opened(image, lucid=lucid) as backend:
        c = Customizer(backend, recipe, init_system=init_system, uses=uses, root_label=root_label)
        check(backend, recipe, uses, init_system)
        with step("Copying the elements into the image"):
            c.copy_elements_in()
        with step("Guarding the image (no daemons, no initramfs)"):
            c.guard()
        c.copy_static()
        c.run_phase("install.d")
        c.create_users()
        c.copy_files()
        c.run_commands()
        c.run_phase("post-install.d")
        with step("Removing the guards"):
            calls = c.unguard()
        if calls:
            c.note(f"initramfs: update-initramfs was called {calls} time(s) and skipped: the guestfs method keeps "
                   "the image's initramfs (method: unpack makes a new one)")
        c.run_phase("finalise.d")
        c.scrub()
        c.remove_elements()
    return c.notes, c.scrubbed


def elements(recipe: Recipe) -> list[ElementUse]:
    """The elements the appliance route applies (all but the implied kernel), or a
    BakeError for one it cannot."""
    uses = []
    for u in recipe.elements:
        if u.name == "kernel":
            if u.explicit:
                raise BakeError("element 'kernel' installs a kernel and makes an initramfs, which the guestfs "
                                f"method does not do (it keeps the image's kernel); {UNPACK}")
            continue
        other = [ph for ph in u.element.hooks if ph not in PHASES]
        if other:
            raise BakeError(f"element '{u.name}' has {', '.join(other)} hooks; the guestfs method runs only "
                            f"{', '.join(PHASES)} hooks, inside the image; {UNPACK}")
        uses.append(u)
    return uses


def check(backend: Backend, recipe: Recipe, uses: list[ElementUse], init_system: str) -> None:
    """Refuse what the appliance route cannot do before changing anything: elements whose
    packages are not installed in the image (it installs none), users it already has."""
    with step("Checking the image's packages and users"):
        status = backend.read(DPKG_STATUS)
        if status is None:
            raise BakeError(f"the image has no {DPKG_STATUS}: the guestfs method works on Debian and Ubuntu "
                            f"images, whose packages it can check; {UNPACK}")
        have = installed(status.decode(errors="replace"))
        rel = recipe.release
        lacking = []
        for u in uses:
            wanted = [p for p, rule in u.element.packages.items()
                      if package_applies(rule, distro=rel.distro, suite=rel.suite, init=init_system)]
            missing = [p for p in wanted if p not in have]
            if missing:
                lacking.append(f"element '{u.name}' needs {', '.join(missing)}")
        missing = [p for p in recipe.data.get("packages") or [] if p not in have]
        if missing:
            lacking.append(f"packages: {', '.join(missing)}")
        if lacking:
            raise BakeError("the image lacks packages the recipe needs, and the guestfs method installs none ("
                            + "; ".join(lacking) + f"); {UNPACK}, which installs them")
        passwd = (backend.read("/etc/passwd") or b"").decode(errors="replace")
        accounts = {line.split(":", 1)[0] for line in passwd.splitlines() if ":" in line}
        taken = [u["name"] for u in recipe.data.get("users") or [] if u["name"] in accounts]
        if taken:
            raise BakeError(f"users: the image already has {', '.join(taken)}; the recipe's users are new "
                            "accounts (remove them from users: the image keeps its own)")


def installed(status: str) -> set[str]:
    """The packages a dpkg status file says are installed."""
    names = set()
    for para in status.split("\n\n"):
        fields = dict(line.split(":", 1) for line in para.splitlines() if ":" in line and line[:1] not in " \t")
        if fields.get("Status", "").strip().endswith(" installed") and fields.get("Package"):
            names.add(fields["Package"].strip())
    return names
