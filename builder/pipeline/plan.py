"""What a bake of a recipe will do: stages, element hooks in order, packages, cache keys.

Making a plan needs neither root nor network: it reads the recipe, the elements, the
host's apt configuration and the cache's index. The cache keys computed here are the
ones the stages use, so `bake plan` tells truthfully what will be taken from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.core import cache as cache_mod
from builder.customize import scrub as scrubbing
from builder.recipe.distro import resolve_mirrors
from builder.recipe.dib import CHROOT as DIB_CHROOT
from builder.recipe.elements import PHASES, ordered_hooks, package_applies
from builder.core.errors import BakeError
from builder.recipe.recipe import Recipe
from builder.base.source import source_digest
from builder.recipe import dib

# Phases whose hooks run before packages are installed: they are part of the package
# checkpoint's key. Everything later (static files, install.d on) is re-run on a rebuild.
PRE_PACKAGE_PHASES = ("root.d", "extra-data.d", "pre-install.d")


@dataclass(frozen=True)
class Route:
    """How a bake runs, chosen once when its plan is made: where the root tree comes from
    (`debootstrap`, or an existing `image`) and how it is customized (in a `chroot` on the
    host, or inside the libguestfs `appliance`, which trusts nothing of the image)."""

    base: str      # "debootstrap" | "image"
    backend: str   # "chroot" | "appliance"

    @classmethod
    def of(cls, recipe: Recipe) -> "Route":
        """The route a recipe's bake takes."""
        base = recipe.base
        if not base:
            return cls("debootstrap", "chroot")
        return cls("image", "appliance" if base["method"] == "guestfs" else "chroot")


def image_base(recipe: Recipe) -> dict[str, Any]:
    """The recipe's `base:` section, for the code of the image route (which only a recipe
    with one takes)."""
    if recipe.base is None:
        raise BakeError(f"recipe {recipe.name} has no base: section; it is baked from debootstrap")
    return recipe.base


@dataclass
class CacheEntry:
    namespace: str
    key: str
    hit: bool
    note: str = ""


@dataclass
class Plan:
    recipe: Recipe
    mirror: str
    security_mirror: str | None
    apt_sources: str
    packages: list[tuple[str, str]]          # (package, why)
    hooks: dict[str, list[tuple[str, str]]]  # phase -> [(hook, element)]
    bootstrap: CacheEntry
    checkpoint: CacheEntry
    stages: list[tuple[str, str]] = field(default_factory=list)  # (stage, what happens)
    dib: Any = None                          # builder.dib.DibPlan when the recipe has DIB elements
    route: Route = Route("debootstrap", "chroot")
    image_mirror: str = ""                   # the archive the shipped image's apt sources name
    image_sources: str = ""                  # its sources.list (scrub's apt-sources writes it)

    @property
    def package_names(self) -> list[str]:
        return [p for p, _ in self.packages]

    def as_dict(self) -> dict[str, Any]:
        r = self.recipe
        return {
            "recipe": str(r.path), "name": r.name, "release": str(r.release), "arch": r.arch,
            "init_system": r.profile.init_system, "mirror": self.mirror, "security_mirror": self.security_mirror,
            "image_mirror": self.image_mirror,
            "elements": [{"name": u.name, "explicit": u.explicit, "params": u.params} for u in r.elements],
            "hooks": {ph: [{"hook": h, "element": e} for h, e in hs] for ph, hs in self.hooks.items()},
            "packages": [{"name": p, "from": why} for p, why in self.packages],
            "cache": {c.namespace: {"key": c.key, "hit": c.hit, "note": c.note}
                      for c in (self.bootstrap, self.checkpoint)},
            "stages": [{"stage": s, "action": a} for s, a in self.stages],
            "scrub": self.scrub(),
            "notes": list(r.notes),
            "dib": None if self.dib is None else {
                "version": self.dib.version,
                "elements": [{"name": e.name, "requested": e.requested, "depends": e.depends, "provides": e.provides,
                              "path": str(e.path)} for e in r.dib.elements],
                "env": r.dib_env.public(),
                "hooks": {ph: [{"hook": h, "element": e} for h, e in hs] for ph, hs in self.dib.hooks.items()},
                "packages": {ph: {act: [{"name": p, "element": e} for p, e in items] for act, items in acts.items()}
                             for ph, acts in self.dib.packages.items()},
            },
        }

    def scrub(self) -> dict[str, Any]:
        """The scrub operations the customize stage will run, and why the others will not."""
        ops, why = scrubbing.chosen((self.recipe.data.get("scrub") or {}).get("skip") or [],
                                    sources=self.route.backend == "chroot")
        return {"run": [op.name for op in ops], "skipped": why}

    def render(self) -> str:
        r = self.recipe
        security = f" (security: {self.security_mirror})" if self.security_mirror else ""
        out = [f"recipe   {r.path}",
               (f"image    {r.name}: {r.release} {r.arch}, {r.data['filesystem']}, "
                f"size {r.data['size']}, init {r.profile.init_system}, kernel {r.kernel_package}"),
               f"mirror   {self.mirror}{security}", "", "stages"]
        out += [f"  {s:<10} {a}" for s, a in self.stages]
        out += ["", "elements"]
        for u in r.elements:
            how = "" if u.explicit else " (implied)" if u.name in ("base", "kernel") else " (dependency)"
            params = " ".join(f"{k}={v!r}" for k, v in u.params.items())
            out.append(f"  {u.name}{how}{': ' + params if params else ''}")
        scrub = self.scrub()
        out += ["", "scrub", "  " + " ".join(scrub["run"])]
        out += [f"  not {name}: {why}" for name, why in scrub["skipped"].items()]
        out += ["", "hooks"]
        for ph in PHASES:
            for h, e in self.hooks.get(ph, []):
                out.append(f"  {ph:<15} {h:<28} ({e})")
        if self.dib is not None:
            out += ["", f"diskimage-builder {self.dib.version} elements (expanded)"]
            for e in r.dib.elements:
                how = " (bake's)" if e.name == "bake-target" else "" if e.requested else " (dependency)"
                extra = f"  needs {', '.join(e.depends)}" if e.depends else ""
                extra += f"  provides {', '.join(e.provides)}" if e.provides else ""
                out.append(f"  {e.name}{how}{extra}")
            if r.dib_env.values:
                out += ["", "dib env"] + [f"  {k}={v}" for k, v in sorted(r.dib_env.public().items())]
            out += ["", "dib hooks (in the order dib-run-parts runs them)"]
            for ph, hs in self.dib.hooks.items():
                where = "chroot" if ph in DIB_CHROOT else "outside"
                for h, e in hs:
                    out.append(f"  {ph:<15} {h:<34} ({e}, {where})")
            out += ["", "dib packages (after pkg-map)"]
            for ph, acts in self.dib.packages.items():
                for act, items in acts.items():
                    out.append(f"  {ph:<15} {act:<10} " + " ".join(f"{p}({e})" for p, e in items))
        if r.notes:
            out += ["", "notes"] + [f"  {n}" for n in r.notes]
        out += ["", f"packages ({len(self.packages)})"]
        out += [f"  {p:<28} {why}" for p, why in self.packages]
        return "\n".join(out)


def collect_packages(recipe: Recipe) -> list[tuple[str, str]]:
    """Every package the image gets beyond the bootstrap, with where it comes from."""
    prof = recipe.profile
    out: dict[str, str] = {}
    if not recipe.base or (recipe.data.get("kernel") or {}).get("package"):
        # an image evolved from a base keeps the base's kernel unless the recipe names one
        out[recipe.kernel_package] = "kernel"
    for use in recipe.elements:
        for pkg, rule in use.element.packages.items():
            if package_applies(rule, distro=prof.distro, suite=prof.suite, init=prof.init_system):
                out.setdefault(pkg, f"element {use.name}")
    if any(u.get("sudo") for u in recipe.data.get("users") or []):
        out.setdefault("sudo", "users (sudo: true)")
    for pkg in recipe.data.get("packages") or []:
        out.setdefault(pkg, "recipe")
    return sorted(out.items())


def bootstrap_key(recipe: Recipe, mirror: str) -> str:
    d = recipe.data
    return cache_mod.key_of("bootstrap", 1, d["release"], mirror, recipe.arch, d["variant"], sorted(d["components"]))


def base_key(recipe: Recipe) -> str:
    """The key of the root tree taken out of the recipe's base image: the image's content
    (its SHA-256; an EMI by its id, which a cloud never points at other content), which
    partition of it, and whether its own kernel comes along."""
    b = image_base(recipe)
    # with from-source, the source's kernel and ramdisk are kept in the cached tree
    return cache_mod.key_of("base", 1, source_digest(recipe), b["partition"], recipe.arch, b["kernel"])


def checkpoint_key(recipe: Recipe, boot_key: str, release_digest: str, apt_sources: str,
                   packages: list[str], dib_digest: str | None = None) -> str:
    # Only elements with hooks before the package step change what the checkpoint holds;
    # their packages are in the key already, through the package list.
    digests = [(u.name, u.params, u.element.hooks_digest(PRE_PACKAGE_PHASES)) for u in recipe.elements
               if any(u.element.hooks.get(ph) for ph in PRE_PACKAGE_PHASES)]
    parts: list[Any] = ["packages", 1, boot_key, release_digest, apt_sources, sorted(packages), digests,
                        recipe.profile.init_system]
    if dib_digest:
        parts.append({"dib": dib_digest})  # DIB's elements, its version and dib.env
    return cache_mod.key_of(*parts)


def dib_env_base(recipe: Recipe, init_system: str | None = None) -> dict[str, str]:
    """The variables DIB hooks get for this recipe (before dib.env)."""
    d = recipe.data
    return dib.base_env(distro=recipe.release.distro, suite=recipe.release.suite, arch=recipe.arch,
                        init_system=init_system or recipe.profile.init_system, image_name=recipe.name,
                        label=d["label"], filesystem=d["filesystem"], expansion=recipe.dib)


def dib_plan(recipe: Recipe, cache_root: Path):
    """The DIB part of the plan (builder.dib.DibPlan); needs dib.env's from_env variables."""
    recipe.dib_env.check()
    salt = dib.cache_salt(cache_root) if recipe.dib_env.secret else None
    return dib.make_plan(recipe.dib, recipe.dib_env, dib_env_base(recipe), salt)


def make_plan(recipe: Recipe, output_root: Path) -> Plan:
    """The plan for `recipe`, with cache hits looked up under `output_root`'s cache; its
    stage lines are the stage table's (`pipeline.table.plan_build` fills them)."""
    d = recipe.data
    mirror, security = resolve_mirrors(recipe.release.distro, d.get("mirror"), d.get("security_mirror"),
                                       "security_mirror" in recipe.given)
    prof = recipe.profile
    if prof.security_suite() is None:
        security = None  # sid: no security suite to read, whatever archive would serve it
    apt_sources = prof.apt_sources(mirror, security, d["components"])
    try:
        image_mirror, image_security = resolve_mirrors(recipe.release.distro, d.get("image_mirror") or d.get("mirror"),
                                                       d.get("security_mirror"), "security_mirror" in recipe.given,
                                                       use_env=False)
    except BakeError:
        # nothing but BAKE_MIRROR names an archive: the image can only name that one
        image_mirror, image_security = mirror, security
        note = (f"the image's apt sources name {mirror} (BAKE_MIRROR): this build host has no "
                f"{recipe.release.distro} source of its own; set image_mirror to name another")
        if note not in recipe.notes:
            recipe.notes.append(note)
    if prof.security_suite() is None:
        image_security = None
    image_sources = prof.apt_sources(image_mirror, image_security, d["components"])
    packages = collect_packages(recipe)
    elements = [u.element for u in recipe.elements]
    hooks = {ph: [(h.name, h.element) for h in ordered_hooks(elements, ph)] for ph in PHASES}
    hooks = {ph: hs for ph, hs in hooks.items() if hs}

    root = cache_mod.cache_root(output_root)
    base = recipe.base
    if base:
        bkey = base_key(recipe)
        bcache = cache_mod.TreeCache(root, "base")
    else:
        bkey = bootstrap_key(recipe, mirror)
        bcache = cache_mod.TreeCache(root, "bootstrap")
    bhit = bcache.has(bkey)
    bmeta = bcache.meta(bkey) if bhit else {}
    if base:
        source = base.get("image") or base.get("emi")
        note = f"root tree of {source}, opened {bmeta.get('created', '?')}" if bhit else ""
    else:
        note = f"built {bmeta.get('created', '?')}; the archive's Release file is checked when baking" if bhit else ""
    boot = CacheEntry(bcache.namespace, bkey, bhit, note)
    release_digest = bmeta.get("release_sha256", "")
    dplan = None
    if recipe.dib is not None:
        dplan = dib_plan(recipe, root)
        have = {p for p, _ in packages}
        for p, el in (dplan.packages.get("install.d") or {}).get("install", []):
            if p not in have:
                packages.append((p, f"dib element {el}"))
                have.add(p)
        packages.sort()
    ckey = checkpoint_key(recipe, bkey, release_digest, apt_sources, [p for p, _ in packages],
                          dplan.digest if dplan else None)
    ccache = cache_mod.TreeCache(root, "packages")
    chit = bhit and ccache.has(ckey)
    check = CacheEntry("packages", ckey, chit, "root tree after package installation" if chit else "")

    plan = Plan(recipe, mirror, security, apt_sources, packages, hooks, boot, check, dib=dplan, route=Route.of(recipe),
                image_mirror=image_mirror, image_sources=image_sources)
    return plan

