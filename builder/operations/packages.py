"""Debian package versions in dpkg's order, and what changed between two images'
package lists (what the release notes say)."""

from __future__ import annotations

import re
from dataclasses import dataclass


def _weight(s: str, i: int) -> int:
    # Debian's order of the non-digit parts of a version: "~" before everything, even
    # the end of the part; then the end; then letters; then every other character.
    if i >= len(s) or s[i].isdigit():
        return 0
    if s[i] == "~":
        return -1
    return ord(s[i]) if s[i].isalpha() else ord(s[i]) + 256


def _compare_part(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            wa, wb = _weight(a, i), _weight(b, j)
            if wa != wb:
                return -1 if wa < wb else 1
            i, j = i + 1, j + 1
        da = re.match(r"[0-9]*", a[i:]).group()     # type: ignore[union-attr]
        db = re.match(r"[0-9]*", b[j:]).group()     # type: ignore[union-attr]
        if int(da or 0) != int(db or 0):
            return -1 if int(da or 0) < int(db or 0) else 1
        i, j = i + len(da), j + len(db)
    return 0


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version `a` sorts before, with or after `b` (epoch, upstream
    version, revision, as dpkg orders them)."""
    def split(v: str) -> tuple[int, str, str]:
        epoch, _, rest = v.partition(":") if ":" in v else ("0", "", v)
        upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
        return int(epoch) if epoch.isdigit() else 0, upstream, revision
    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


@dataclass
class PackageChanges:
    """What changed in an image's packages between two releases."""

    added: list[tuple[str, str]]                    # (name, version)
    removed: list[tuple[str, str]]
    upgraded: list[tuple[str, str, str]]            # (name, old version, new version)
    downgraded: list[tuple[str, str, str]]


def _by_name(packages: list[dict[str, str]]) -> dict[str, str]:
    names = [p["name"] for p in packages]
    # a package installed for two architectures (multiarch) is told apart by its arch
    return {(p["name"] if names.count(p["name"]) == 1 else f"{p['name']}:{p['arch']}"): p["version"] for p in packages}


def package_changes(old: list[dict[str, str]], new: list[dict[str, str]]) -> PackageChanges:
    """The packages added, removed, upgraded and downgraded from `old` to `new` (lists as
    the image stage records them), each sorted by name."""
    a, b = _by_name(old), _by_name(new)
    changed = [(n, a[n], b[n], compare_versions(a[n], b[n])) for n in sorted(set(a) & set(b)) if a[n] != b[n]]
    return PackageChanges(added=[(n, b[n]) for n in sorted(set(b) - set(a))],
                          removed=[(n, a[n]) for n in sorted(set(a) - set(b))],
                          upgraded=[(n, o, v) for n, o, v, c in changed if c < 0],
                          downgraded=[(n, o, v) for n, o, v, c in changed if c > 0])
