"""The light path, `base.method: guestfs`: a recipe's changes made inside an existing
image through libguestfs, in place, without root.

What it does is what the chroot path's second half does (`stages.customize`), with the
same hook environment and the same guard rails, but every command runs inside the image
in libguestfs's appliance: the recipe's elements are copied to /tmp/bake/elements, their
static files into the image, then install.d hooks, users, files, commands, post-install.d
and finalise.d hooks, and /tmp/bake goes. Nothing on the build host is mounted, attached
or chrooted into, so an unprivileged user can run it; what it writes belongs to root.

What it does not do: install packages (an element's packages must already be in the
image, which is checked first), make an initramfs (the implied `kernel` element is left
out; a hook's call of update-initramfs is noted and skipped), or run the phases that
work on a tree from the build host (root.d, extra-data.d, cleanup.d) or prepare package
installs (pre-install.d). For any of those: `method: unpack`.
"""

from __future__ import annotations

import contextlib
import logging
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from builder.recipe.elements import Hook, ordered_hooks, package_applies
from builder.core.errors import BakeError
from builder.core.log import step
from builder.recipe.recipe import ElementUse, Recipe
from builder.pipeline.stages.customize import DEFERRED_LOG, DIVERTED, IN_TARGET, Customizer, HookError
from . import appliance

log = logging.getLogger("bake.base")

PHASES = ("install.d", "post-install.d", "finalise.d")
UNPACK = "use base.method: unpack"
DPKG_STATUS = "/var/lib/dpkg/status"

# What a command run in the image starts from, as `sh.chroot_run` gives it.
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LC_ALL": "C",
    "LANG": "C",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
    "TERM": "dumb",
}

# Runs "$@" with its output in the file $1 and prints its exit status: the output comes
# back as bytes (whatever its encoding), and the status even when it fails.
RUN = 'out=$1; shift; "$@" >"$out" 2>&1; echo "$?"'

GUARD = """set -e
rc=/usr/sbin/policy-rc.d
if [ -e $rc ] || [ -L $rc ]; then mv $rc "$1/policy-rc.d.image"; fi
printf '#!/bin/sh\\n# bake: no daemon starts while the image is changed\\nexit 101\\n' >$rc
chmod 755 $rc
dpkg-divert --quiet --local --rename --add {diverted}
printf '#!/bin/sh\\n# bake: the light path makes no initramfs\\necho "$*" >> {deferred}\\nexit 0\\n' >{diverted}
chmod 755 {diverted}
if [ "$2" = upstart ]; then
    dpkg-divert --quiet --local --rename --add /sbin/initctl
    printf '#!/bin/sh\\n# bake: upstart cannot be reached inside the appliance\\nexit 0\\n' >/sbin/initctl
    chmod 755 /sbin/initctl
fi
""".format(diverted=DIVERTED, deferred=DEFERRED_LOG)

# Says first, one "called:" line each, how often update-initramfs was called.
UNGUARD = """set -e
if [ -e {deferred} ]; then sed 's/^/called: /' {deferred}; fi
rm -f {deferred} /usr/sbin/policy-rc.d {diverted}
saved="$1/policy-rc.d.image"
if [ -e "$saved" ] || [ -L "$saved" ]; then mv "$saved" /usr/sbin/policy-rc.d; fi
dpkg-divert --quiet --local --rename --remove {diverted}
if [ "$2" = upstart ]; then
    rm -f /sbin/initctl
    dpkg-divert --quiet --local --rename --remove /sbin/initctl
fi
""".format(diverted=DIVERTED, deferred=DEFERRED_LOG)

USER = """set -e
name=$1 shell=$2 groups=$3
shift 3
useradd -m -s "$shell" ${groups:+-G "$groups"} "$name"
usermod -p '*' "$name"
"""

AUTHORIZE = """set -e
u=$1
shift
h=$(getent passwd "$u" | cut -d: -f6)
g=$(id -gn "$u")
mkdir -p "$h/.ssh"
for k in "$@"; do echo "$k" >> "$h/.ssh/authorized_keys"; done
chmod 700 "$h/.ssh"
chmod 600 "$h/.ssh/authorized_keys"
chown -R "$u:$g" "$h/.ssh"
"""

# cp -a inside the image, as `customize.copy_into_image` copies from the host: a folder's
# contents merge into dest, a file given a folder goes into it, and the image's own
# symlinks are followed as the image resolves them.
COPY = """set -e
src=$1 dest=$2 mode=$3 owner=$4
if [ -d "$src" ]; then
    if [ -e "$dest" ] && [ ! -d "$dest" ]; then echo "$dest exists in the image and is not a folder" >&2; exit 1; fi
    mkdir -p "$dest"
    cp -a "$src/." "$dest/"
    target=$dest
else
    if [ -d "$dest" ]; then target=${dest%/}/${src##*/}; else target=$dest; mkdir -p "$(dirname "$dest")"; fi
    if [ -L "$target" ] || { [ -e "$target" ] && [ ! -f "$target" ]; }; then
        echo "$target exists in the image and is not a regular file" >&2; exit 1
    fi
    cp -a "$src" "$target"
fi
if [ -n "$mode" ]; then chmod "$mode" "$target"; fi
if [ -n "$owner" ]; then chown -R "$owner" "$target"; fi
"""


def apply(build, recipe: Recipe, image: Path, *, init_system: str, lucid: bool = False,
          root_label: str | None = None) -> list[str]:
    """Make the recipe's changes inside the bare filesystem image `image` (bake's own
    copy, changed in place) through libguestfs, without root: the elements' static files
    and install.d, post-install.d and finalise.d hooks, users, files and commands, as the
    chroot path makes them for a target whose init system is `init_system`. `lucid`
    gives the appliance the vsyscall page Lucid's glibc needs; `root_label` is the
    BAKE_ROOT_LABEL hooks see (the recipe's label otherwise).

    Refused with a BakeError, before anything is changed: elements whose packages the
    image lacks, elements with hooks in other phases, an explicitly named `kernel`
    element, users the image already has. A failed hook, command or copy is a BakeError
    saying which and with its output's tail; the image is then half changed (bake's copy:
    a failed build drops it). Returns the hooks' `bake-note:` lines as notes."""
    uses = _elements(recipe)
    light = _Light(build, recipe, uses, init_system, root_label)
    with contextlib.ExitStack() as stack:
        with step("Starting libguestfs on the image"):
            light.g = stack.enter_context(appliance.opened([Path(image)], readonly=False, lucid=lucid))
        light.check()
        light.copy_in()
        light.guard()
        light.copy_static()
        light.run_phase("install.d")
        light.create_users()
        light.copy_files()
        light.run_commands()
        light.run_phase("post-install.d")
        light.unguard()
        light.run_phase("finalise.d")
        with appliance.doing("removing bake's files from the image"):
            light.g.rm_rf(light.work)
        with step("Closing the image"):
            stack.close()
    return light.notes


def _elements(recipe: Recipe) -> list[ElementUse]:
    """The elements the light path applies (all but the implied kernel), or a BakeError
    for one it cannot."""
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


def _tar_owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


class _Light:
    """One run of the light path on one open image."""

    def __init__(self, build, recipe: Recipe, uses: list[ElementUse], init_system: str, root_label: str | None):
        self.recipe, self.uses, self.init_system = recipe, uses, init_system
        self.customizer = Customizer(build, recipe, None, Path("/"))    # for its hook environment
        self.customizer.init_system = init_system
        self.root_label = root_label
        self.notes: list[str] = []
        self.g = None
        self.work = IN_TARGET           # the image's /tmp/bake, as the appliance reaches it

    # --- environment --------------------------------------------------------------------
    def base_env(self) -> dict[str, str]:
        env = self.customizer.base_env()
        if self.root_label:
            env["BAKE_ROOT_LABEL"] = self.root_label
        return env

    def hook_env(self, hook: Hook) -> dict[str, str]:
        env = self.customizer.hook_env(hook, inside=True)
        if self.root_label:
            env["BAKE_ROOT_LABEL"] = self.root_label
        return env

    # --- running in the image -------------------------------------------------------------
    def run(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
        """Run `argv` in the image's root with the chroot path's environment plus `env`:
        (exit status, its output)."""
        full = {**CHROOT_ENV, **(env or {})}
        status = self.g.command(["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in full.items()),
                                 "/bin/sh", "-c", RUN, "sh", f"{IN_TARGET}/output", *argv]).strip()
        with tempfile.TemporaryDirectory(prefix="bake-light-") as tmp:
            local = Path(tmp) / "output"
            self.g.download(f"{self.work}/output", str(local))
            output = local.read_bytes().decode(errors="replace")
        for line in output.splitlines():
            log.debug("  | %s", line)
        try:
            return int(status.splitlines()[-1]), output
        except (ValueError, IndexError):
            raise BakeError(f"running {argv[0]} in the image gave no exit status (output: {status!r})") from None

    def script(self, what: str, script: str, *args: str, env: dict[str, str] | None = None) -> str:
        """Run the shell `script` with `args` in the image; a BakeError saying `what` failed."""
        with appliance.doing(what):
            rc, output = self.run(["/bin/sh", "-c", script, "sh", *args], env)
        if rc != 0:
            raise BakeError(f"{what} failed in the image (exit {rc})\n--- last lines of its output ---\n"
                            + _tail(output))
        return output

    # --- steps ----------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse what the light path cannot do before changing anything: elements whose
        packages are not installed in the image, users it already has."""
        g = self.g
        with step("Checking the image's packages and users"), appliance.doing("reading the image's dpkg status"):
            if not g.is_file(DPKG_STATUS):
                raise BakeError(f"the image has no {DPKG_STATUS}: the guestfs method works on Debian and Ubuntu "
                                f"images, whose packages it can check; {UNPACK}")
            installed = _installed(self._read(DPKG_STATUS))
            rel = self.recipe.release
            lacking = []
            for u in self.uses:
                wanted = [p for p, rule in u.element.packages.items()
                          if package_applies(rule, distro=rel.distro, suite=rel.suite, init=self.init_system)]
                missing = [p for p in wanted if p not in installed]
                if missing:
                    lacking.append(f"element '{u.name}' needs {', '.join(missing)}")
            missing = [p for p in self.recipe.data.get("packages") or [] if p not in installed]
            if missing:
                lacking.append(f"packages: {', '.join(missing)}")
            if lacking:
                raise BakeError("the image lacks packages the recipe needs, and the guestfs method installs none ("
                                + "; ".join(lacking) + f"); {UNPACK}, which installs them")
            accounts = {line.split(":", 1)[0] for line in self._read("/etc/passwd").splitlines() if ":" in line}
            taken = [u["name"] for u in self.recipe.data.get("users") or [] if u["name"] in accounts]
            if taken:
                raise BakeError(f"users: the image already has {', '.join(taken)}; the recipe's users are new "
                                "accounts (remove them from users: the image keeps its own)")

    def _read(self, path: str) -> str:
        with tempfile.TemporaryDirectory(prefix="bake-light-") as tmp:
            local = Path(tmp) / "file"
            self.g.download(path, str(local))
            return local.read_bytes().decode(errors="replace")

    def copy_in(self) -> None:
        """The elements and the recipe's files to /tmp/bake in the image, owned by root."""
        g = self.g
        with step("Copying the elements into the image"), appliance.doing("copying the elements into the image"):
            if g.is_symlink("/tmp"):
                # tar_in writes from the appliance's side: where the image's own /tmp really is
                self.work = str(PurePosixPath(g.realpath("/tmp")) / "bake")
            g.rm_rf(self.work)
            g.mkdir_p(self.work)
            with tempfile.TemporaryDirectory(prefix="bake-light-") as tmp:
                bundle = Path(tmp) / "bake.tar"
                with tarfile.open(bundle, "w", format=tarfile.GNU_FORMAT) as tar:
                    for u in self.uses:
                        tar.add(u.element.path, arcname=f"elements/{u.name}", filter=_tar_owned_by_root)
                    for i, f in enumerate(self.recipe.data.get("files") or []):
                        src = (self.recipe.path.parent / f["source"]).resolve()
                        tar.add(src, arcname=f"files/{i}/{src.name}", filter=_tar_owned_by_root)
                g.tar_in(str(bundle), self.work)

    def guard(self) -> None:
        """As the chroot path: no daemon starts, update-initramfs is a stub that counts
        its calls (and, on upstart, initctl a stub)."""
        with step("Guarding the image (no daemons, no initramfs)"):
            self.script("guarding the image", GUARD, IN_TARGET, self.init_system)

    def unguard(self) -> None:
        with step("Removing the guards"):
            output = self.script("removing the guards", UNGUARD, IN_TARGET, self.init_system)
        calls = sum(1 for line in output.splitlines() if line.startswith("called: "))
        if calls:
            note = (f"update-initramfs was called {calls} time(s) and skipped: the guestfs method keeps the image's "
                    "initramfs (method: unpack makes a new one)")
            self.notes.append(f"initramfs: {note}")
            log.warning("note: %s", note)

    def copy_static(self) -> None:
        statics = [u for u in self.uses if u.element.static]
        if not statics:
            return
        with step("Copying static files"):
            for u in statics:
                # cp -a keeps modes and links; the tree merges into the image, owned by root
                self.script(f"copying element {u.name}'s static files", 'cp -a "$1/." /',
                            f"{IN_TARGET}/elements/{u.name}/static")

    def run_phase(self, phase: str) -> None:
        hooks = ordered_hooks([u.element for u in self.uses], phase)
        if not hooks:
            return
        with step(f"{phase} ({len(hooks)} hook{'s' if len(hooks) != 1 else ''})"):
            for hook in hooks:
                path = f"{IN_TARGET}/elements/{hook.element}/{phase}/{hook.name}"
                with appliance.doing(f"running hook {hook.element}/{phase}/{hook.name}"):
                    rc, output = self.run([path], self.hook_env(hook))
                if rc != 0:
                    raise HookError(f"element '{hook.element}', phase {phase}, hook {hook.name} failed "
                                    f"(exit {rc})\n--- last lines of its output ---\n{_tail(output)}")
                for line in output.splitlines():
                    if line.startswith("bake-note:"):
                        note = f"{hook.element}: {line.split(':', 1)[1].strip()}"
                        self.notes.append(note)
                        log.warning("note: %s", note)

    def create_users(self) -> None:
        users = self.recipe.data.get("users") or []
        top_keys = self.recipe.data.get("ssh_authorized_keys") or []
        if not users and not top_keys:
            return
        with step(f"Creating {len(users)} user(s)"):
            sudoers = []
            for i, u in enumerate(users):
                self.script(f"creating user {u['name']}", USER, u["name"], u["shell"], ",".join(u["groups"]))
                keys = list(u["ssh_authorized_keys"]) + (top_keys if i == 0 else [])
                if keys:
                    self.script(f"authorizing keys for {u['name']}", AUTHORIZE, u["name"], *keys)
                if u["sudo"]:
                    sudoers.append(f"{u['name']} ALL=(ALL) NOPASSWD:ALL")
            if not users and top_keys:
                self.script("authorizing keys for root", AUTHORIZE, "root", *top_keys)
            if sudoers:
                with appliance.doing("writing the sudoers file"):
                    self.g.mkdir_p("/etc/sudoers.d")
                    path = "/etc/sudoers.d/90-bake-users"
                    self.g.write(path, "# users the recipe gave passwordless sudo\n" + "\n".join(sudoers) + "\n")
                    self.g.chown(0, 0, path)
                    self.g.chmod(0o440, path)

    def copy_files(self) -> None:
        files = self.recipe.data.get("files") or []
        if not files:
            return
        with step(f"Copying {len(files)} file(s)"):
            for i, f in enumerate(files):
                name = Path((self.recipe.path.parent / f["source"]).resolve()).name
                mode = f"{int(f['mode'], 8):o}" if f.get("mode") else ""
                self.script(f"files[{i}] ({f['source']} → {f['dest']})", COPY, f"{IN_TARGET}/files/{i}/{name}",
                            f["dest"], mode, f.get("owner") or "")

    def run_commands(self) -> None:
        cmds = self.recipe.data.get("commands") or []
        if not cmds:
            return
        with step(f"Running {len(cmds)} command(s)"):
            for i, c in enumerate(cmds):
                with appliance.doing(f"running commands[{i}]"):
                    rc, output = self.run(["/bin/sh", "-e", "-c", c], self.base_env())
                if rc != 0:
                    raise BakeError(f"commands[{i}] failed in the image (exit {rc}): {c}\n"
                                    f"--- last lines of its output ---\n{_tail(output)}")


def _installed(status: str) -> set[str]:
    """The packages a dpkg status file says are installed."""
    names = set()
    for para in status.split("\n\n"):
        fields = dict(line.split(":", 1) for line in para.splitlines() if ":" in line and line[:1] not in " \t")
        if fields.get("Status", "").strip().endswith(" installed") and fields.get("Package"):
            names.add(fields["Package"].strip())
    return names


def _tail(output: str, lines: int = 40) -> str:
    return "\n".join(output.rstrip().splitlines()[-lines:])
