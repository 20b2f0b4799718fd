"""diskimage-builder's element library in a bake build.

DIB's elements come from the installed `diskimage-builder` package (the `dib` extra, an
exact pin). What DIB itself does is left to DIB: its `element_dependencies` expands the
requested elements (element-deps, element-provides), its `dib-run-parts` runs every
phase (and lists a phase's hooks for the plan), its `package-installs-squash` and
`pkg-map` decide the packages. What bake does in DIB's place:

- the operating system: a bake element, `bake-target` (in this folder), provides
  `operating-system`, so DIB's distro elements are never pulled in; its
  `install-packages` installs with the target's apt. DIB's distro, `base`, `dpkg` and
  bootloader/block-device elements, and the phases bake has no place for (`root.d`,
  `block-device.d`), are refused before anything is built;
- the hooks tree (`TMP_HOOKS_PATH`): every subfolder of every expanded element merged
  into one, a file named twice being an error, as DIB's `generate_hooks` does; in the
  chroot it is bind-mounted read-only at `/tmp/in_target.d`;
- the environment hooks rely on (see `base_env`, and `dib/env.py` for the recipe's
  `dib.env`), and the safety DIB leaves to its user (see `builder/recipe/dib/sandbox.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from typing import Any

from builder.core.errors import BakeError
from builder.recipe.dib.env import DibEnv, cache_salt, dib_env_declaration, resolve_env, secret_digest
from builder.recipe.distro import DEB_ARCH, suite_at_least

HERE = Path(__file__).resolve().parent
TARGET_ELEMENT = "bake-target"
IN_TARGET = "/tmp/in_target.d"

# DIB's phases, in the order disk-image-create runs them, and where each runs
PHASES = ("extra-data.d", "pre-install.d", "install.d", "post-install.d", "post-root.d",
          "pre-finalise.d", "finalise.d", "cleanup.d")
CHROOT = frozenset({"pre-install.d", "install.d", "post-install.d", "finalise.d"})
REFUSED_PHASES = {
    "root.d": "it makes the root tree, which bake's bootstrap (or base image) does",
    "block-device.d": "it makes the disk, which bake's image stage does (a Eucalyptus node is given a partition image)",
}
# the elements that make the operating system, the disk or its bootloader: bake's stages
# do those, for the node's kernel + ramdisk + partition image layout
REFUSED = {
    "base": "it dist-upgrades and installs open-iscsi, and bake's own base element sets the image up",
    "dpkg": "it installs packages through DIB's own apt setup, and bake-target does this with the target's apt",
    "debootstrap": "bake's bootstrap stage runs debootstrap",
    "bootloader": "a Eucalyptus node boots the kernel and ramdisk directly, without a bootloader",
    "grub2": "a Eucalyptus node boots the kernel and ramdisk directly, without a bootloader",
    "vm": "it partitions a whole disk; a Eucalyptus node is given a partition image",
    "ramdisk": "bake's image stage makes the ramdisk with the target's initramfs tools",
    "ramdisk-base": "bake's image stage makes the ramdisk with the target's initramfs tools",
    "iso": "bake makes a partition image",
    "baremetal": "bake makes the node's kernel + ramdisk + partition image",
    "lvm": "bake's image stage makes the partition image",
}
# DIB_* knobs bake sets itself: a recipe giving them would contradict the recipe
RESERVED_ENV = {
    "DIB_RELEASE": "the recipe's release",
    "DIB_INIT_SYSTEM": "the init system found in the target",
    "DIB_PYTHON_VERSION": "3 (DIB's hooks run the chroot's python3)",
    "DIB_PYTHON_EXEC": "bake's own interpreter",
    "DIB_ENV": "the recipe's dib.env without its secrets",
    "DIB_ROOT_LABEL": "the recipe's label",
    "DIB_ROOT_FSTYPE": "the recipe's filesystem",
    "DIB_DEBUG_TRACE": "BAKE_DIB_TRACE",
}
ENV_NAME = re.compile(r"^DIB_[A-Z0-9_]+$")
# the oldest releases whose python3 runs DIB's in-chroot tools (package-installs, pkg-map)
FIRST = {"debian": "buster", "ubuntu": "bionic"}


def missing_package_message() -> str:
    return ("diskimage-builder is not installed in bake's environment: run scripts/setup "
            "(it installs the pinned 'dib' extra, `pip install -e '.[dib]'`)")


def package_dir() -> Path:
    """The installed diskimage_builder package's folder."""
    try:
        import diskimage_builder  # noqa: PLC0415 (the `dib` extra: only recipes with DIB elements need it)
    except ImportError:
        raise BakeError(missing_package_message()) from None
    return Path(diskimage_builder.__file__).resolve().parent


def version() -> str:
    """The installed diskimage-builder's version."""
    try:
        return installed_version("diskimage-builder")
    except PackageNotFoundError:
        raise BakeError(missing_package_message()) from None


def library() -> Path:
    return package_dir() / "elements"


def run_parts() -> Path:
    return package_dir() / "lib" / "dib-run-parts"


def supported(distro: str, suite: str) -> str | None:
    """None when DIB elements can run on this release; otherwise why not."""
    first = FIRST.get(distro)
    if first is None:
        return f"diskimage-builder elements are not supported on {distro}"
    if suite_at_least(distro, suite, first):
        return None
    return (f"diskimage-builder's elements run python3 in the chroot (package-installs, pkg-map, dib-python), "
            f"and {distro}/{suite} has no python3 they can use: DIB elements need {distro} {first} or later")


@dataclass
class DibElement:
    name: str
    path: Path
    requested: bool
    depends: list[str] = field(default_factory=list)
    provides: list[str] = field(default_factory=list)


@dataclass
class Expansion:
    """The DIB elements a recipe's `{dib: NAME}` entries expand to."""
    requested: list[str]
    elements: list[DibElement]            # sorted by name; bake-target included
    paths: list[Path]                     # the element path DIB searched, first wins

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.elements]

    def has(self, name: str) -> bool:
        return name in self.names

    def path_string(self) -> str:
        return ":".join(str(p) for p in self.paths)


def _read_set(file: Path) -> list[str]:
    if not file.is_file():
        return []
    return sorted({w for line in file.read_text().splitlines() for w in [line.split("#", 1)[0].strip()] if w})


def element_paths(extra: list[Path]) -> list[Path]:
    """DIB's element search path for a build: the recipe's own DIB element folders first,
    then bake's (bake-target), then the library."""
    return [*extra, HERE / "elements", library()]


def expand(requested: list[str], extra_paths: list[Path] | None = None) -> Expansion:
    """Expand `requested` with DIB's own dependency resolution; a BakeError says which
    element is refused and why, or what DIB could not resolve."""
    from diskimage_builder import element_dependencies as ed  # noqa: PLC0415 (the `dib` extra, checked first)
    paths = element_paths(list(extra_paths or []))
    for p in paths:
        if not p.is_dir():
            raise BakeError(f"DIB element folder {p} does not exist")
    for name in requested:
        _refuse(name, None)
    try:
        found = ed.get_elements([*requested, TARGET_ELEMENT], paths=":".join(str(p) for p in paths))
    except ed.MissingElementException as e:
        raise BakeError(f"diskimage-builder: {e} (searched {':'.join(str(p) for p in paths)})") from None
    except ed.AlreadyProvidedException as e:
        raise BakeError(f"diskimage-builder: {e or 'an element is provided twice'}: bake-target provides "
                        "operating-system, so no DIB distro element may be named") from None
    except ed.MissingOSException as e:  # pragma: no cover - bake-target always provides it
        raise BakeError(f"diskimage-builder: {e}") from None
    out = []
    for name, path in sorted(found, key=lambda f: f[0]):
        p = Path(path)
        el = DibElement(name, p, name in requested, _read_set(p / "element-deps"), _read_set(p / "element-provides"))
        out.append(el)
    by_name = {e.name: e for e in out}
    for el in out:
        if el.name == TARGET_ELEMENT:
            continue
        via = _needed_by(el.name, requested, by_name)
        _refuse(el.name, via)
        for phase, why in REFUSED_PHASES.items():
            if (el.path / phase).is_dir() and any((el.path / phase).iterdir()):
                raise BakeError(f"DIB element '{el.name}'{_via(via)} has {phase} hooks, which bake does not run: {why}")
    expansion = Expansion(list(requested), out, paths)
    _check_merge(expansion)
    return expansion


def _merge_entries(expansion: Expansion):
    """(subfolder, entry name, element, is a folder) of every entry DIB's generate_hooks
    would copy into the hooks tree, in its order."""
    for el in expansion.elements:
        for sub in sorted(el.path.iterdir()):
            if sub.name in ("tests", "__pycache__") or not sub.is_dir():
                continue
            for entry in sorted(sub.iterdir()):
                yield sub, entry, el.name, entry.is_dir() and not entry.is_symlink()


def _check_merge(expansion: Expansion) -> None:
    """A file two elements both put at one place of the hooks tree is refused, naming both
    (modprobe and modprobe-blacklist both have install.d/80-modprobe-blacklist)."""
    seen: dict[tuple[str, str], tuple[str, bool]] = {}
    for sub, entry, element, is_dir in _merge_entries(expansion):
        key = (sub.name, entry.name)
        if key in seen and not (is_dir and seen[key][1]):
            raise BakeError(f"DIB elements '{seen[key][0]}' and '{element}' both have {sub.name}/{entry.name}: "
                            "diskimage-builder refuses a hook named twice; name only one of them")
        seen.setdefault(key, (element, is_dir))


def _needed_by(name: str, requested: list[str], by_name: dict[str, DibElement]) -> list[str]:
    """A chain of requested element -> ... -> name, for messages."""
    for root in requested:
        chain = _path_to(root, name, by_name, set())
        if chain:
            return chain
    return [name]


def _path_to(cur: str, goal: str, by_name, seen: set) -> list[str] | None:
    if cur == goal:
        return [cur]
    if cur in seen or cur not in by_name:
        return None
    seen.add(cur)
    for d in by_name[cur].depends:
        rest = _path_to(d, goal, by_name, seen)
        if rest:
            return [cur, *rest]
    return None


def _via(chain: list[str] | None) -> str:
    return f" (needed by {' -> '.join(chain[:-1])})" if chain and len(chain) > 1 else ""


def _os_chain(name: str, seen: set[str]) -> list[str] | None:
    """name -> ... -> a library element providing operating-system, through element-deps."""
    if name in seen:
        return None
    seen.add(name)
    d = library() / name
    if "operating-system" in _read_set(d / "element-provides"):
        return [name]
    for dep in _read_set(d / "element-deps"):
        rest = _os_chain(dep, seen)
        if rest:
            return [name, *rest]
    return None


def _refuse(name: str, via: list[str] | None) -> None:
    why = REFUSED.get(name)
    if why is None and name.startswith("block-device"):
        why = "it makes the disk's partitions, which bake's image stage does"
    if why is None:
        chain = _os_chain(name, set())
        if chain:
            how = "it makes" if len(chain) == 1 else f"it needs {' -> '.join(chain[1:])}, which makes"
            why = f"{how} the operating system, which bake's bootstrap does (bake-target provides operating-system)"
    if why is not None:
        raise BakeError(f"DIB element '{name}'{_via(via)} cannot be used in a bake recipe: {why}")


# --- the merged hooks tree ----------------------------------------------------------------

def merge_hooks(expansion: Expansion, dest: Path) -> None:
    """Merge every subfolder (but `tests`) of every expanded element into `dest`, as DIB's
    generate_hooks does: a top-level entry of a phase folder named by two elements is an
    error naming both; folders (static trees) merge."""
    _check_merge(expansion)
    dest.mkdir(parents=True, exist_ok=True)
    for sub, entry, _element, is_dir in _merge_entries(expansion):
        target = dest / sub.name
        target.mkdir(exist_ok=True)
        if is_dir:
            shutil.copytree(entry, target / entry.name, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(entry, target / entry.name, follow_symlinks=False)
    for el in expansion.elements:
        for f in sorted(el.path.iterdir()):
            if f.is_file() and f.suffix != ".pyc":
                shutil.copy2(f, dest / f.name)
    shutil.copy2(run_parts(), dest / "dib-run-parts")


def listed_hooks(tree: Path, phase: str) -> list[str]:
    """The hooks dib-run-parts runs in `phase`, in its order (`--list`)."""
    d = tree / phase
    if not d.is_dir():
        return []
    r = subprocess.run(["bash", str(tree / "dib-run-parts"), "--list", str(d)], capture_output=True, text=True,
                       check=False, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C"})
    if r.returncode != 0:
        raise BakeError(f"dib-run-parts --list {phase} failed: {r.stderr.strip()}")
    return [Path(line).name for line in r.stdout.split()]


def hook_owner(expansion: Expansion, phase: str, hook: str) -> str:
    for el in expansion.elements:
        if (el.path / phase / hook).exists():
            return el.name
    return "?"


# --- packages -----------------------------------------------------------------------------

def squashed_packages(expansion: Expansion, env: dict[str, str]) -> dict[str, Any]:
    """DIB's package-installs-squash over the expansion: {phase: {install|uninstall: [[pkg, element]]}}."""
    squash = library() / "package-installs" / "bin" / "package-installs-squash"
    with tempfile.TemporaryDirectory(prefix="bake-dib-") as tmp:
        out = Path(tmp) / "package-installs.json"
        full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C", **env}
        r = subprocess.run([sys.executable, str(squash), f"--elements={' '.join(expansion.names)}",
                            f"--path={expansion.path_string()}", str(out)], capture_output=True, text=True,
                           check=False, env=full)
        if r.returncode != 0:
            raise BakeError("diskimage-builder's package-installs-squash failed: "
                            f"{(r.stderr or r.stdout).strip()[-800:]}")
        return json.loads(out.read_text())


def mapped(expansion: Expansion, element: str, packages: list[str], env: dict[str, str]) -> list[str]:
    """`packages` of `element` as DIB's pkg-map names them on the target."""
    el = next((e for e in expansion.elements if e.name == element), None)
    if el is None or not (el.path / "pkg-map").is_file():
        return list(packages)
    tool = library() / "pkg-map" / "bin" / "pkg-map"
    r = subprocess.run([sys.executable, str(tool), "--prefix", "-", "--missing-ok",
                        "--pkg-map", str(el.path / "pkg-map"), *packages], capture_output=True, text=True, check=False,
                       env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C", **env})
    if r.returncode == 2:
        return list(packages)
    if r.returncode != 0:
        raise BakeError(f"diskimage-builder's pkg-map failed for element {element}: "
                        f"{(r.stderr or r.stdout).strip()[-400:]}")
    return [line[1:] for line in r.stdout.splitlines() if line.startswith("-") and line[1:]]


def packages_by_phase(expansion: Expansion, env: dict[str, str]) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """{phase: {"install"|"uninstall": [(package after pkg-map, element)]}}."""
    out: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for phase, actions in squashed_packages(expansion, env).items():
        for action, items in actions.items():
            by_el: dict[str, list[str]] = {}
            for pkg, el in items:
                by_el.setdefault(el, []).append(pkg)
            for el, pkgs in by_el.items():
                for p in mapped(expansion, el, pkgs, env):
                    out.setdefault(phase, {}).setdefault(action, []).append((p, el))
    return out


# --- the environment ----------------------------------------------------------------------
# (the recipe's dib.env is resolved in dib/env.py)

def base_env(*, distro: str, suite: str, arch: str, init_system: str, image_name: str, label: str,
             filesystem: str, expansion: Expansion) -> dict[str, str]:
    """The variables every DIB hook gets, as disk-image-create exports them."""
    yaml_map = "\n".join(f"{e.name}: {e.path}" for e in expansion.elements)
    array = " ".join(f"[{e.name}]={e.path}" for e in expansion.elements)
    return {
        "DISTRO_NAME": distro,
        "DIB_RELEASE": suite,
        "ARCH": DEB_ARCH[arch],
        "DIB_PYTHON_VERSION": "3",
        "DIB_PYTHON": "python3",
        "DIB_INIT_SYSTEM": init_system,
        "DIB_ROOT_LABEL": label,
        "DIB_ROOT_FSTYPE": filesystem,
        "DIB_DEBUG_TRACE": os.environ.get("BAKE_DIB_TRACE", "0"),
        "DIB_DEFAULT_INSTALLTYPE": "package",
        "DIB_PYTHON_EXEC": sys.executable,
        "IMAGE_NAME": image_name,
        "IMAGE_ELEMENT": " ".join(expansion.names),
        "IMAGE_ELEMENT_YAML": yaml_map,
        "ELEMENTS_PATH": expansion.path_string(),
        "FS_TYPE": filesystem,
        "BASH_FUNC_get_image_element_array%%": f"() {{  echo \"{array}\"\n}}",
        "LC_ALL": "C",
        "LANG": "C",
    }


# --- what a build with DIB elements will do -------------------------------------------------

@dataclass
class DibPlan:
    hooks: dict[str, list[tuple[str, str]]]                  # phase -> [(hook, element)] as dib-run-parts runs them
    packages: dict[str, dict[str, list[tuple[str, str]]]]    # phase -> install|uninstall -> [(package, element)]
    digest: str                                              # the elements' files, DIB's version, dib.env
    version: str = ""


def tree_digest(expansion: Expansion) -> str:
    """SHA-256 over every file of every expanded element (names, modes, contents)."""
    h = hashlib.sha256()
    for el in expansion.elements:
        for f in sorted(el.path.rglob("*")):
            if "__pycache__" in f.parts or f.is_dir():
                continue
            rel = f.relative_to(el.path).as_posix()
            h.update(f"{el.name}/{rel}\0{oct(f.lstat().st_mode)}\0".encode())
            h.update(os.readlink(f).encode() if f.is_symlink() else f.read_bytes())
    return h.hexdigest()


def make_plan(expansion: Expansion, env: DibEnv, base: dict[str, str], salt: bytes | None) -> DibPlan:
    """The hooks (listed by DIB's dib-run-parts from a merged tree) and packages (by DIB's
    package-installs-squash and pkg-map) of a build, and its part of the checkpoint key."""
    hooks: dict[str, list[tuple[str, str]]] = {}
    with tempfile.TemporaryDirectory(prefix="bake-dib-plan-") as tmp:
        tree = Path(tmp) / "hooks"
        merge_hooks(expansion, tree)
        for phase in PHASES:
            listed = listed_hooks(tree, phase)
            if listed:
                hooks[phase] = [(h, hook_owner(expansion, phase, h)) for h in listed]
    full = {**base, **env.values}
    packages = packages_by_phase(expansion, full)
    parts = {k: (secret_digest(salt or b"", k, v) if k in env.secret else v) for k, v in sorted(env.values.items())}
    digest = hashlib.sha256(json.dumps([version(), tree_digest(expansion), parts], sort_keys=True).encode()).hexdigest()
    return DibPlan(hooks, packages, digest, version())


# what the package offers (the recipe's dib.env is resolved in dib/env.py, and named here too)
__all__ = [
    "HERE", "TARGET_ELEMENT", "IN_TARGET", "PHASES", "CHROOT", "REFUSED_PHASES", "REFUSED", "RESERVED_ENV",
    "ENV_NAME", "FIRST", "missing_package_message", "package_dir", "version", "library", "run_parts", "supported",
    "DibElement", "Expansion", "element_paths", "expand", "merge_hooks", "listed_hooks", "hook_owner",
    "squashed_packages", "mapped", "packages_by_phase", "base_env", "DibPlan", "tree_digest", "make_plan", "DibEnv",
    "resolve_env", "secret_digest", "cache_salt", "dib_env_declaration",
]
