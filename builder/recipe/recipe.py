"""YAML recipe -> validated Recipe, before anything is built.

The JSON Schema (builder/schema/recipe.schema.json) is the single source of keys, types
and defaults; this module adds only what a schema cannot say: that elements and users
are named once, that the release is one bake knows, that elements exist, that their
parameters fit the element's own schema, that files to copy are there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.core.errors import BakeError
from builder.core.record import Build
from builder.recipe import dib
from builder.recipe import elements as elements_mod
from builder.recipe.distro import Profile, profile_for
from builder.recipe.schema import recipe_schema
from builder.recipe.schemaerrors import Located, RecipeError, fill_defaults, format_path, validate

IMPLICIT_ELEMENTS = ("base", "kernel")


@dataclass(frozen=True)
class Release:
    distro: str
    suite: str

    def __str__(self) -> str:
        return f"{self.distro}/{self.suite}"


@dataclass
class ElementUse:
    """One element as the build applies it: its definition and its parameters."""

    element: elements_mod.Element
    params: dict[str, Any]
    explicit: bool  # named in the recipe, rather than implied or pulled in as a dependency

    @property
    def name(self) -> str:
        return self.element.name


@dataclass
class Recipe:
    path: Path
    data: dict[str, Any]
    elements: list[ElementUse] = field(default_factory=list)
    given: frozenset[str] = frozenset()  # top-level keys the file sets (before defaults)
    dib: Any = None                      # builder.dib.Expansion of the {dib: NAME} elements, or None
    dib_env: Any = None                  # builder.dib.DibEnv of dib.env (None without DIB elements)
    notes: list[str] = field(default_factory=list)  # what loading changed, said by the plan

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def release(self) -> Release:
        d, _, s = self.data["release"].partition("/")
        return Release(d, s)

    @property
    def profile(self) -> Profile:
        return profile_for(self.data["release"])

    @property
    def arch(self) -> str:
        return self.data["arch"]

    @property
    def element_names(self) -> list[str]:
        return [e.name for e in self.elements]

    @property
    def kernel_package(self) -> str:
        return (self.data.get("kernel") or {}).get("package") or self.profile.kernel_package(self.arch)

    @property
    def default_user(self) -> str:
        users = self.data.get("users") or []
        return users[0]["name"] if users else ""

    @property
    def hostname(self) -> str:
        return self.data.get("hostname") or self.name.replace(".", "-").replace("_", "-")

    @property
    def base(self) -> dict[str, Any] | None:
        """The `base:` section (an existing image to start from), None for a debootstrap."""
        return self.data.get("base")

    @property
    def base_image(self) -> Path | None:
        """`base.image` resolved against the recipe's folder."""
        b = self.base
        return (self.path.parent / b["image"]).resolve() if b and b.get("image") else None

    def section(self, key: str) -> dict[str, Any]:
        """A reserved section (bundle, publish, verify) as a plain dict, empty if absent."""
        return dict(self.data.get(key) or {})

    @property
    def bundle(self) -> dict[str, Any]:
        return self.section("bundle")

    @property
    def publish(self) -> dict[str, Any]:
        return self.section("publish")

    @property
    def verify(self) -> dict[str, Any]:
        return self.section("verify")


def _element_entries(data: dict) -> list[tuple[int | None, str, dict]]:
    """(index in the recipe or None, name, parameters) of every element to apply."""
    out: list[tuple[int | None, str, dict]] = []
    named = set()
    for i, item in enumerate(data.get("elements") or []):
        if isinstance(item, str):
            out.append((i, item, {}))
            named.add(item)
        elif "dib" in item:
            continue
        else:
            out.append((i, item["name"], dict(item.get("with") or {})))
            named.add(item["name"])
    implicit: list[tuple[int | None, str, dict]] = [(None, n, {}) for n in IMPLICIT_ELEMENTS if n not in named]
    return implicit + out


def _named_once(path, loc, data: dict, section: str, what: str, name_of, *, where: tuple) -> None:
    """A RecipeError at the second item of `section` with the name of an earlier one."""
    seen: dict[str, int] = {}
    for i, item in enumerate(data.get(section) or []):
        name = name_of(item)
        if name in seen:
            at = (section, i, *where)
            raise RecipeError(path, loc.line_of(at), format_path(at),
                              f"{what} '{name}' is already listed at {section}[{seen[name]}]")
        seen[name] = i


def load_recipe(path: str | Path) -> Recipe:
    """Read, validate and resolve a recipe; one RecipeError (file, line, key path,
    expected, found) or BakeError for the first problem found."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise BakeError(f"{path}: no such recipe file") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise BakeError(f"{path}: cannot read recipe: {e}") from None
    loc = Located(text, path)
    data = loc.data
    if not isinstance(data, dict):
        raise RecipeError(path, loc.line_of(()), "", "expected a mapping of recipe keys at the top level, found "
                          + ("an empty file" if data is None else type(data).__name__))
    validate(data, recipe_schema(), loc)
    # Uniqueness by name is what JSON Schema's uniqueItems (whole items) cannot say.
    _named_once(path, loc, data, "elements", "element",
                lambda item: item if isinstance(item, str) else item.get("name") or f"dib: {item['dib']}", where=())
    _named_once(path, loc, data, "users", "user", lambda user: user["name"], where=("name",))
    given = frozenset(data)
    fill_defaults(data, recipe_schema())

    try:
        profile = profile_for(data["release"])
    except BakeError as e:
        raise RecipeError(path, loc.line_of(("release",)), "release", str(e).split(": ", 1)[-1]) from None
    if not profile.has_arch(data["arch"]):
        raise RecipeError(path, loc.line_of(("arch",)) or loc.line_of(("release",)), "arch",
                          f"{data['release']} has no {data['arch']} kernel; use x86_64")

    # Elements: each must exist, its parameters must fit its schema, dependencies must resolve.
    entries = _element_entries(data)
    known = elements_mod.available()
    for idx, name, _ in entries:
        if name not in known:
            where: tuple = ("elements", idx) if idx is not None else ("elements",)
            raise RecipeError(path, loc.line_of(where), format_path(where),
                              elements_mod.unknown_element_message(name, known))
    try:
        resolved = elements_mod.resolve([name for _, name, _ in entries])
    except RecipeError:
        raise
    except BakeError as e:
        # Point at the first listed element whose dependencies fail to resolve.
        at: tuple = ("elements",)
        for idx, name, _ in entries:
            try:
                elements_mod.resolve([name])
            except BakeError:
                if idx is not None:
                    at = ("elements", idx)
                break
        raise RecipeError(path, loc.line_of(at), format_path(at), str(e)) from None
    params_by_name = {name: (idx, params) for idx, name, params in entries}
    uses: list[ElementUse] = []
    for el in resolved:
        idx, params = params_by_name.get(el.name, (None, {}))
        prefix = ("elements", idx, "with") if idx is not None else ("elements",)
        validate(params, el.schema, loc, prefix)
        fill_defaults(params, el.schema)
        uses.append(ElementUse(el, params, explicit=idx is not None))

    _check_base(path, loc, data, given)
    recipe = Recipe(path.resolve(), data, uses, given)
    _load_dib(recipe, loc, path)

    # Files to copy must exist now, not halfway through a build.
    for i, f in enumerate(data.get("files") or []):
        src = (path.parent / f["source"]).resolve()
        if not src.exists():
            raise RecipeError(path, loc.line_of(("files", i, "source")), f"files[{i}].source",
                              f"no such file: {f['source']} (looked for {src})")
    return recipe


def recipe_of(build: Build) -> Recipe | None:
    """The recipe `build` was baked from, loaded again, if its file is still there (else None)."""
    rec = build.data.get("recipe")
    path = rec.get("path") if isinstance(rec, dict) else None
    if not path or not Path(path).is_file():
        return None
    return load_recipe(path)


def _dib_entries(data: dict) -> list[tuple[int, str]]:
    return [(i, item["dib"]) for i, item in enumerate(data.get("elements") or [])
            if isinstance(item, dict) and "dib" in item]


def _load_dib(recipe: Recipe, loc: Located, path: Path) -> None:
    """Expand the recipe's {dib: NAME} elements with diskimage-builder's own resolution,
    refusing what bake cannot run (before anything is built), and resolve dib.env."""
    data = recipe.data
    entries = _dib_entries(data)
    section = data.get("dib") or {}
    if not entries:
        if section.get("env") or section.get("elements_path"):
            raise RecipeError(path, loc.line_of(("dib",)), "dib",
                              "dib settings are given, but no element of the recipe is a {dib: NAME} element")
        return
    first: tuple = ("elements", entries[0][0])
    why = dib.supported(recipe.release.distro, recipe.release.suite)
    if why:
        raise RecipeError(path, loc.line_of(first), format_path(first), why)
    if recipe.base and recipe.base.get("method") == "guestfs":
        raise RecipeError(path, loc.line_of(first), format_path(first),
                          "DIB elements run in a chroot and install packages; base.method guestfs has neither "
                          "(use method: unpack)")
    for name, why in dib.RESERVED_ENV.items():
        if name in (section.get("env") or {}):
            at: tuple = ("dib", "env", name)
            raise RecipeError(path, loc.line_of(at), format_path(at), f"{name} is set by bake: it is {why}")
    extra = []
    for i, p in enumerate(section.get("elements_path") or []):
        d = (path.parent / p).resolve()
        if not d.is_dir():
            at = ("dib", "elements_path", i)
            raise RecipeError(path, loc.line_of(at), format_path(at), f"no such folder: {p} (looked for {d})")
        extra.append(d)
    for idx, name in entries:
        try:
            dib.expand([name], extra)
        except BakeError as e:
            at = ("elements", idx)
            raise RecipeError(path, loc.line_of(at), format_path(at), str(e)) from None
    try:
        recipe.dib = dib.expand([n for _, n in entries], extra)
    except BakeError as e:
        # each expands alone: it is the elements together that DIB refuses
        raise RecipeError(path, loc.line_of(("elements",)), "elements", str(e)) from None
    try:
        recipe.dib_env = dib.resolve_env(section.get("env") or {}, path.parent)
    except BakeError as e:
        name = str(e).split(":", 1)[0].removeprefix("dib.env.")
        at = ("dib", "env", name)
        raise RecipeError(path, loc.line_of(at), format_path(at), str(e).split(": ", 1)[1]) from None
    if recipe.dib.has("cloud-init"):
        ec2 = [u for u in recipe.elements if u.name == "ec2-metadata"]
        if ec2:
            recipe.elements = [u for u in recipe.elements if u.name != "ec2-metadata"]
            recipe.notes.append("ec2-metadata left out: cloud-init (DIB) installs the instance's key from the "
                                "metadata service")


def _check_base(path: Path, loc: Located, data: dict, given: frozenset[str]) -> None:
    """What the schema cannot say of `base:`: the keys only debootstrap reads are refused
    beside it, the light path installs no package, and the image is there."""
    base = data.get("base")
    if not base:
        return
    if bool(base.get("image")) == bool(base.get("emi")):
        raise RecipeError(path, loc.line_of(("base",)), "base",
                          "expected exactly one of image (a file or build folder) and emi (an image in the cloud), "
                          "found " + ("both" if base.get("image") else "neither"))
    if "variant" in given:
        raise RecipeError(path, loc.line_of(("variant",)), "variant",
                          "variant is debootstrap's, and a recipe with base: starts from that image instead; "
                          "remove variant")
    if base["method"] == "guestfs":
        if data.get("packages"):
            raise RecipeError(path, loc.line_of(("packages",)), "packages",
                              "base.method guestfs changes the image in place without a package manager; "
                              "remove packages, or use method: unpack to install them")
        if (data.get("kernel") or {}).get("package"):
            raise RecipeError(path, loc.line_of(("kernel", "package")), "kernel.package",
                              "base.method guestfs keeps the image's kernel; use method: unpack to install another")
    if base.get("image"):
        src = (path.parent / base["image"]).resolve()
        if not src.exists():
            raise RecipeError(path, loc.line_of(("base", "image")), "base.image",
                              f"no such image: {base['image']} (looked for {src})")
